"""One forward for the causal-LM architectures people train, on the very same parameters as the HF model.

Shape legend: B batch, P prompt length (left-padded), S sequence length, T generated tokens, V vocabulary,
E width, H query heads, G key/value heads (grouped-query attention: H is a multiple of G), D head size.

An architecture is described by which HF module plays which role (:mod:`textrl.arch`): the norms (LayerNorm
or RMSNorm), query/key/value projections (one fused GPT-2 ``Conv1D``, or three ``nn.Linear`` with or
without bias), query/key norms (Qwen3), the attention output, the MLP (GELU ``fc -> proj``, or SwiGLU
``down(silu(gate) * up)``, or a sparse mixture of SwiGLU experts: Mixtral, Qwen2-MoE), positions (learned,
or rotary with the model's own rotary module, so every rotary variant whose angles depend on the position
alone is exact), sliding-window layers (Mistral, Mixtral) and the LM head, tied or not. :func:`describe`
reads that off a model and refuses anything it does not know, by name: a module that is not exactly the
class a role needs (a quantised linear, a wrapper it does not know) must never run as plain weights, so
such a model takes the HF path (:class:`textrl.core.HFCore`). peft LoRA layers over a known linear run
here: base output plus the adapters' low-rank term (:func:`textrl.ops.lora_delta`).

The block is written once (:meth:`Engine._block`); the modes differ only in the two functions it is given:
``attend`` (the whole-sequence ``forward`` attends under a causal + padding (+ window) mask, ``start`` (the
prefill) also writes the static KV cache, a decode step appends one column to it and attends over the cache,
shared prompts attend to their prompt's gathered keys, the SB3 prefix cache to each row's own columns) and
``lin`` (every linear layer computed, written into a rollout :class:`Record`, or replayed from one). The
interface is :mod:`textrl.core`'s (``start`` -> a :class:`Session` with ``step``/``close``, and ``forward``);
rows are left-padded.

Rollout replay: a rollout started with ``start(..., record=True)`` keeps every linear layer's output and
the logits, written by the very matmuls that sample the tokens. The update's first forward on those
sequences (REINFORCE's only one, PPO's first minibatch), under unchanged weights and without autocast, takes
them from the record (:class:`textrl.replay._Replayed`) and recomputes only norms, rotary, attention and
activations with autograd; the backward is the usual one. A mixture's routed experts are recomputed.

Shared prompts: when at most half the rows are distinct over a prompt (the ``group_size`` samples that
RLOO/GRPO-style baselines draw), the prefill runs each distinct prompt once and copies its keys/values and
record to its rows, and ``forward`` runs the first ``start`` positions once per distinct prompt. There the
distinct prompts' positions and the rows' own ones form one token stream through the norms, linear layers and
MLPs (one matmul per linear layer, forward and backward, whose weight gradient covers both parts); only the
attention splits it.

Static decode steps (:attr:`Engine.decode_step`): the eager step attends over the cache columns filled so far
(a shape that grows by one each step) and issues ~20 small kernels per layer from Python, which on a GPU
leaves the step bound by launch overhead rather than by memory bandwidth. A static step has one shape for the
whole rollout: it attends over every column of the static cache under the key mask (unfilled columns are
masked), and writes the step's keys, values and record columns at a position held in a tensor. That makes
it capturable: ``"graph"`` captures it as a CUDA graph (one per session's buffers, replayed every step, and by
the next rollout of the same shape), ``"compile"`` runs it through ``torch.compile`` first (fewer, fused
kernels), ``"static"`` runs it as it is (for tests; no faster). Mixture-of-experts layers (data-dependent
routing) and sessions with LoRA adapters (folded anew per session) always take the eager step.

The fused eager step (:attr:`Engine.fused_step`): on a CPU, where textrl's kernels apply (float32, no autocast,
no active LoRA adapter, no mixture-of-experts layer), the eager step is one C++ call (a
:func:`textrl.kernels.decode_plan`, made once for the session's buffers): the embeddings, each block
(:func:`textrl.kernels.decode_layer_op`), the final norm and the head, on the same kernels the op-by-op step
calls, in the same order: the same logits and record bit for bit, without the step's Python-level calls.

On a CPU, where the fused eager step applies it is the fastest step (``docs/benchmarks.md`` has the figures).
``"compile"`` takes a similar route by another means: inductor fuses each layer's norms, rotary, cache writes
and activations into a few C++ loops, and a C++ wrapper calls them and the matmuls. Compiling costs
tens of seconds once per batch shape (two graphs: with a record and without), cached on disk by inductor for
later processes, so it pays off in runs of hundreds of iterations, not in a short one. Each layer's cache is
a tensor of its own (:class:`textrl.session.KVCache`): the compiled step then writes it in place.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from textrl import kernels
from textrl.arch import Layer, Spec, Unsupported, describe
from textrl.core import positions_from_mask
from textrl.ops import (
    base_group_into,
    base_into,
    base_layer,
    decode_attention,
    folded_adapters,
    gelu,
    in_out_weight,
    input_major,
    is_input_major,
    is_lora,
    linear,
    moe,
    norm,
    rotate,
    signed_sin,
    swiglu,
)
from textrl.replay import Record, _Replayed, replayed, width
from textrl.session import KVCache, Session

DECODE_STEPS = ("eager", "static", "graph", "compile")
"""The values of :attr:`Engine.decode_step`."""


class Engine(nn.Module):
    """The model through the engine's own forward (see the module docstring)."""

    @staticmethod
    def why_not(model: PreTrainedModel) -> str | None:
        """None when the engine runs ``model``, else why not (naming the part)."""
        try:
            describe(model)
        except Unsupported as e:
            return str(e)
        return None

    @classmethod
    def supports(cls, model: PreTrainedModel) -> bool:
        return cls.why_not(model) is None

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        try:
            spec = describe(model)
        except Unsupported as e:
            raise ValueError(f"the engine cannot run this model: {e}") from None
        self.model = model
        input_major(spec, model)  # in place, on CPU: decode steps of few rows run faster (see input_major)
        self._spec = [spec]  # in a list: the spec's modules are the model's, not submodules of the engine
        self.arch = spec.arch
        """The architecture family it runs as (``gpt2``, ``llama``, ``mistral``, ``qwen2``, ``qwen3``)."""
        self._loras = [m for layer in spec.layers for m in layer.linears() if is_lora(m)]  # peft LoRA layers
        self._windows = {layer.window for layer in spec.layers}  # the attention windows in use (None: full)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, signed sin) by position, (N, D)
        self._cache: KVCache | None = None  # the last session's cache buffers, reused by the next of its shape
        self._record: Record | None = None  # the last recorded rollout (replay)
        self.router_log: list | None = None
        """Set to a list to collect every MoE layer's routing in :meth:`forward` (see
        :func:`textrl.ops.router_balance_loss`); None: nothing is kept."""
        self.replayed = 0
        """How many ``forward`` calls took their linear layers from a rollout record (tests, benchmarks)."""
        self.record_limit: int | None = None
        """Largest record in bytes (None: no limit): a rollout that would need more is not recorded, and the
        update computes its forward instead (see :meth:`record_bytes`)."""
        self.checkpoint_blocks = False
        """Activation checkpointing in :meth:`forward` under autograd: each block keeps only its input, and the
        backward pass recomputes the block's activations from it (``torch.utils.checkpoint``, non-reentrant).
        The update's activation memory drops from every block's to one block's plus the block inputs, for one
        more forward pass of compute (a replayed forward's linear outputs come from the record again)."""
        self.decode_step: str = "eager"
        """How a decode step runs (:data:`DECODE_STEPS`): ``"eager"``, or a static-shape step (see the module
        docstring): ``"static"``, ``"graph"`` (CUDA graphs; on other devices as ``"static"``) or ``"compile"``
        (``torch.compile``, then a CUDA graph on CUDA)."""
        self._static: _StaticStep | None = None  # the static step of the last session's buffers
        self._plans: tuple | None = None  # (key, plans): the fused step's plans on the kept cache and record
        self.fused_step = True
        """Eager decode steps run as one C++ call each (:func:`textrl.kernels.decode_plan`) where the kernels apply
        (float32 on a CPU, no autocast, no LoRA adapter active, no mixture-of-experts layer): the same kernels and
        the same numbers as the op-by-op step, without its ~40 Python-level calls per layer and the ~30 around the
        blocks. False: always op by op."""

    @property
    def spec(self) -> Spec:
        return self._spec[0]

    # --- inputs ----------------------------------------------------------------------------------------

    def _rope_table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary table (cos, signed sin) (N, D) for N >= ``length`` positions (256 at least), from the model's
        rotary module; kept, and made anew only when a longer one (or one on another device) is asked for. The
        sine's first half is negated, as :func:`textrl.ops.rotate` takes it."""
        if self._rope is None or self._rope[0].shape[0] < length or self._rope[0].device != device:
            size = max(length, 256)
            dummy = torch.zeros(1, dtype=torch.float32, device=device)
            with torch.no_grad():
                cos, sin = self.spec.rotary(dummy, torch.arange(size, device=device)[None])
            self._rope = (cos[0].float(), signed_sin(sin[0].float()))  # (N, D)
        return self._rope

    def _angles(self, positions: torch.Tensor, dtype: torch.dtype):
        """(cos, signed sin) (B, 1, S, D) for position ids (B, S): rows of :meth:`_rope_table`."""
        cos, signed = self._rope_table(int(positions.max()) + 1, positions.device)
        return cos[positions][:, None].to(dtype), signed[positions][:, None].to(dtype)

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor):
        """Token (+ learned position) embeddings (B, S, E) and the rotary angles (or None)."""
        s = self.spec
        x = s.embed(ids)
        if s.positions is not None:
            return x + s.positions(positions), None
        return x, self._angles(positions, x.dtype)

    def _masks(self, mask: torch.Tensor) -> dict[int | None, torch.Tensor]:
        """(B, 1, S, S) bool per window the layers use: causal, key padding, and the window; a pad query
        sees itself."""
        S = mask.shape[1]
        i = torch.arange(S, device=mask.device)
        out = {}
        for window in self._windows:
            allowed = i[None, :] <= i[:, None]
            if window is not None:
                allowed = allowed & (i[:, None] - i[None, :] < window)
            m = (allowed[None] & mask.bool()[:, None, :]) | torch.eye(S, dtype=torch.bool, device=mask.device)[None]
            out[window] = m[:, None]
        return out

    # --- the block, once -------------------------------------------------------------------------------

    def _qkv(self, layer: Layer, h: torch.Tensor, angles, lin=linear, lins=None):
        """Queries (B, H, S, D), keys and values (B, G, S, D) of normed inputs h (B, S, E)."""
        s = self.spec
        B, S, _ = h.shape
        H, G, D = s.n_head, s.n_kv_head, s.head_dim
        if layer.qkv is not None:
            q, k, v = lin(h, layer.qkv).view(B, S, 3, H, D).unbind(2)  # (B, S, H, D) each
        else:
            q, k, v = lins(h, (layer.q, layer.k, layer.v)) if lins else (lin(h, m) for m in (layer.q, layer.k, layer.v))
            q, k, v = q.view(B, S, H, D), k.view(B, S, G, D), v.view(B, S, G, D)
        if layer.q_norm is not None:
            q, k = norm(q, layer.q_norm), norm(k, layer.k_norm)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if angles is not None:  # queries and keys rotated as one tensor: half the elementwise kernels
            q, k = rotate(torch.cat((q, k), 1), *angles).split((H, G), 1)
        return q, k, v

    def _block(
        self, layer: Layer, x: torch.Tensor, angles, attend, lin=linear, valid=None, lins=None
    ) -> torch.Tensor | None:
        """One Transformer block.

        The modes differ in two functions: ``attend(q, k, v) -> (B, H, S, D)`` (the attention; None when only
        the keys and values were wanted, and the block stops there) and ``lin(x, module)`` (every linear layer:
        computed, computed into a rollout record, or replayed from one). ``lins(x, modules)``, when given, runs
        the linear layers that read the same input together (q, k and v; gate and up) and returns their
        outputs in order (a decode step's grouped split matmul). ``valid`` (B, S): the real tokens, whose
        routing :attr:`router_log` keeps.
        """
        B, S, _ = x.shape
        q, k, v = self._qkv(layer, norm(x, layer.norm1), angles, lin, lins)
        att = attend(q, k, v)
        if att is None:
            return None
        if att.shape[2] != S:  # attend kept the last positions only (a shared prompt's last layer): the rest stop
            x, S = x[:, S - att.shape[2] :], att.shape[2]
            valid = None if valid is None else valid[:, -S:]
        x = x + lin(att.transpose(1, 2).reshape(B, S, -1), layer.out)
        h = norm(x, layer.norm2)
        if layer.moe is not None:
            return x + moe(layer.moe, h, lin, self.router_log, valid)
        if layer.gate is not None:
            gate, up = lins(h, (layer.gate, layer.up)) if lins else (lin(h, layer.gate), lin(h, layer.up))
            h = swiglu(gate, up)
        else:
            h = gelu(lin(h, layer.up), self.spec.act)
        return x + lin(h, layer.down)

    def _checkpointed(self, layer: Layer, x: torch.Tensor, angles, attend, lin, valid) -> torch.Tensor | None:
        """:meth:`_block`, under activation checkpointing when :attr:`checkpoint_blocks` is set and autograd
        records. The recompute in the backward pass runs the same block on the same input (the replayed
        linear layers read the same record columns); it logs its routing into a list of its own, not into
        :attr:`router_log`, which the first run already filled (the same ops run, so the same tensors are
        saved, as the recompute requires)."""
        if not (self.checkpoint_blocks and torch.is_grad_enabled()):
            return self._block(layer, x, angles, attend, lin, valid)
        runs = 0

        def run(x):
            nonlocal runs
            runs += 1
            if runs == 1:
                return self._block(layer, x, angles, attend, lin, valid)
            log = self.router_log
            self.router_log = None if log is None else []
            try:
                return self._block(layer, x, angles, attend, lin, valid)
            finally:
                self.router_log = log

        return checkpoint(run, x, use_reentrant=False)

    def _sdpa(self, q, k, v, mask):
        gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)

    def _attend_one(self, q, k, v, mask):
        """A decode step's attention, one query per row: textrl's CPU kernel where it applies (float32 on a
        CPU, no autograd; :func:`textrl.kernels.decode_attention`), torch's otherwise."""
        if kernels.wants_attention(q, k):
            return kernels.decode_attention(q, k, v, mask)
        return self._sdpa(q, k, v, mask)

    # --- the modes -------------------------------------------------------------------------------------

    @staticmethod
    def _shared_prefix(ids: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(first, inverse)`` when at most half the rows have distinct first ``n`` positions (tokens and
        mask), as when each prompt is sampled several times (GRPO-style groups): ``ids[first]`` are the
        distinct prefixes (U,) and ``inverse`` (B,) maps each row to its prefix. None: not worth sharing."""
        B = ids.shape[0]
        if n < 1 or B < 2:
            return None
        key = torch.cat([ids[:, :n], mask[:, :n].to(ids.dtype)], 1)  # (B, 2n)
        distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
        if 2 * len(distinct) > B:
            return None
        first = torch.empty(len(distinct), dtype=torch.long, device=ids.device)
        first.scatter_(0, inverse, torch.arange(B, device=ids.device))  # a row of each prefix (they are equal)
        return first, inverse

    def _weights_version(self) -> tuple:
        """Changes whenever a parameter is updated in place (optimizer steps, ``load_state_dict``) or a LoRA
        layer's adapters are switched (``disable_adapter()``, merging, another active adapter): a record is
        valid only for the function that wrote it."""
        adapters = tuple((m.disable_adapters, m.merged, tuple(m.active_adapters)) for m in self._loras)
        return tuple(p._version for p in self.model.parameters()), adapters

    def _replayable(self, ids, mask, start, rows) -> tuple[Record | None, torch.Tensor | None]:
        rec = self._record
        if rec is None or torch.is_autocast_enabled(ids.device.type):
            return None, rows
        if rec.version != self._weights_version():  # stale; its buffers stay for the next rollout
            return None, rows
        if (
            rows is not None
            and len(rows) == rec.ids.shape[0]
            and torch.equal(rows, torch.arange(len(rows), device=rows.device))
        ):
            rows = None  # all rows in order: slices of the record instead of gathered copies
        S = ids.shape[1]
        if rec.len < S or start < 0 or ids.dtype != torch.long:
            return None, rows
        recorded = rec.ids[:, :S] if rows is None else rec.ids[rows, :S]
        if recorded.shape != ids.shape:
            return None, rows
        taken = mask.bool()  # positions after a row's end are masked out and carry other tokens
        if not torch.equal(recorded.masked_fill(~taken, 0), ids.masked_fill(~taken, 0)):
            return None, rows
        prompt_mask = rec.prompt_mask if rows is None else rec.prompt_mask[rows]
        if not torch.equal(taken[:, : rec.P], prompt_mask):  # the prompts' padding, as prefilled
            return None, rows
        generated = taken[:, rec.P :]  # the decode let every position see all earlier ones: no holes
        if not torch.equal(generated, generated.cummin(1).values):
            return None, rows
        return rec, rows

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, start: int = 0, rows: torch.Tensor | None = None):
        """The whole sequence: ``(logits (B, S - start, V), hidden (B, S - start, E))``.

        Shared prompts: when at most half the rows have distinct first ``start`` positions (the samples of a
        prompt that RLOO/GRPO-style baselines draw), those positions run once per distinct prefix and every
        row attends to its prefix's gathered keys/values; autograd adds up the rows' gradients there. The
        prefixes' positions and the rows' own run as one token stream (1, N, E) through everything but the
        attention, so each linear layer is one matmul and its weight gradient one matmul over all N positions.

        Rollout replay: on the very sequences of the last recorded rollout (``rows`` of it; all when None),
        under unchanged weights and without autocast, every linear layer's output and the logits are taken
        from the record instead of recomputed (norms, rotary, attention and activations are recomputed with
        autograd; the backward is the usual one). Anything else is computed normally.
        """
        rec, rows = self._replayable(ids, mask, start, rows)
        if rec is not None:
            self.replayed += 1
        positions = positions_from_mask(mask)
        masks = self._masks(mask)
        B, S = ids.shape
        shared = self._shared_prefix(ids, mask, start) if start < S else None
        if shared is None:
            lin = linear if rec is None else self._replaying(rec, rows, 0, S)
            x, angles = self._embed(ids, positions)
            for layer in self.spec.layers:
                attend = lambda q, k, v, m=masks[layer.window]: self._sdpa(q, k, v, m)  # noqa: E731
                x = self._checkpointed(layer, x, angles, attend, lin, mask)
            return self._head(x[:, start:], rec, rows, start)
        # One token stream (1, N, E): the U distinct prefixes' n positions, then every row's S - n own ones. Norms,
        # linear layers and the MLP run on it once (one matmul per layer and pass, whose weight gradient covers both
        # parts); only the attention splits it: each prefix attends to itself, each row to its prefix's gathered
        # keys/values and its own.
        first, inverse = shared
        n, U, last = start, len(first), self.spec.layers[-1]
        Np = U * n  # the prefixes' positions come first in the stream

        def stream(t: torch.Tensor) -> torch.Tensor:  # (B, S, ...) -> (1, N, ...)
            return torch.cat([t[first, :n].flatten(0, 1), t[:, n:].flatten(0, 1)])[None]

        def part(t: torch.Tensor, rows: int, length: int, lo: int) -> torch.Tensor:  # (1, h, N, D) -> (rows, h, len, D)
            return t[0, :, lo : lo + rows * length].unflatten(1, (rows, length)).transpose(0, 1)

        lin = linear if rec is None else self._replaying_stream(rec, first if rows is None else rows[first], rows, n, S)
        x, angles = self._embed(stream(ids), stream(positions))
        valid = stream(mask)
        for layer in self.spec.layers:
            m = masks[layer.window]

            def attend(q, k, v, m=m, last=layer is last):
                keys, values = part(k, U, n, 0), part(v, U, n, 0)
                rows_att = self._sdpa(
                    part(q, B, S - n, Np),
                    torch.cat([keys.index_select(0, inverse), part(k, B, S - n, Np)], 2),
                    torch.cat([values.index_select(0, inverse), part(v, B, S - n, Np)], 2),
                    m[:, :, n:],
                )
                parts = [rows_att]  # after the last layer only the rows' positions count
                if not last:
                    parts.insert(0, self._sdpa(part(q, U, n, 0), keys, values, m[first, :, :n, :n]))
                tokens = torch.cat([a.transpose(1, 2).flatten(0, 1) for a in parts])  # (N', H, D), token-major
                return tokens[None].transpose(1, 2)

            x = self._checkpointed(layer, x, angles, attend, lin, valid)
        return self._head(x.view(B, S - n, -1), rec, rows, n)

    @staticmethod
    def _replaying_stream(rec: Record, prefix_rows: torch.Tensor, rows: torch.Tensor | None, n: int, S: int):
        """``lin`` of the shared-prompt stream taking its outputs from the record: positions ``0:n`` of
        ``prefix_rows`` (the record's row of each distinct prompt), then ``n:S`` of ``rows`` (all rows when
        None), copied into one stream tensor; at the last layer, where the stream holds the rows' positions only,
        just those."""
        U, B = len(prefix_rows), rec.ids.shape[0] if rows is None else len(rows)

        def lin(x, module):
            buf = rec.out[module]
            out = x.new_empty(x.shape[1], buf.shape[-1])
            own = out[out.shape[0] - B * (S - n) :].view(B, S - n, -1)
            if rows is None:
                own.copy_(buf[:, n:S])
            else:
                torch.index_select(buf[:, n:S], 0, rows, out=own)
            if out.shape[0] > B * (S - n):
                torch.index_select(buf[:, :n], 0, prefix_rows, out=out[: U * n].view(U, n, -1))
            return replayed(x, module, out[None])

        return lin

    @staticmethod
    def _replaying(rec: Record, rows: torch.Tensor | None, begin: int, end: int):
        """``lin`` taking positions ``begin:end`` of ``rows`` (all rows when None) from the record."""
        if rows is None:
            return lambda x, module: replayed(x, module, rec.out[module][:, begin:end])
        return lambda x, module: replayed(x, module, rec.out[module][rows, begin:end])

    def _head(self, x: torch.Tensor, rec: Record | None = None, rows: torch.Tensor | None = None, start: int = 0):
        """Logits (B, S', V) and final hidden states of x (B, S', E) at positions ``start:``; replayed when
        the record holds the logits there (from position P - 1 on)."""
        hidden = norm(x, self.spec.norm)
        j = start - rec.P + 1 if rec is not None else -1  # column of the logits record for position start
        if j < 0:
            return linear(hidden, self.spec.head), hidden  # the weight's gradient in its own layout
        logits = rec.logits[:, j : j + x.shape[1]] if rows is None else rec.logits[rows, j : j + x.shape[1]]
        return _Replayed.apply(hidden, self.spec.head.weight, None, logits, True), hidden

    def trunk(self, ids: torch.Tensor, mask: torch.Tensor, keep_kv: bool = False):
        """The blocks and the final norm over ``ids`` (N, S): hidden (N, S, E) and, with ``keep_kv``, every
        layer's ``(keys, values)`` (N, G, S, D) (what :class:`textrl.prefix_cache.PrefixCache` stores)."""
        x, angles = self._embed(ids, positions_from_mask(mask))
        masks = self._masks(mask)
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in self.spec.layers:

            def attend(q, k, v, m=masks[layer.window]):
                if keep_kv:
                    kv.append((k, v))
                return self._sdpa(q, k, v, m)

            x = self._block(layer, x, angles, attend)
        return norm(x, self.spec.norm), kv

    def step_rows(self, token: torch.Tensor, pos: torch.Tensor, attend_cached) -> torch.Tensor:
        """One new token per row (n,) at its own position ``pos`` (n,), through the blocks: the final hidden
        state (n, E). ``attend_cached(i, layer, q, k, v)`` stores the new keys/values of layer ``i`` and attends
        over the row's cached ones (the caller's cache layout)."""
        x, angles = self._embed(token[:, None], pos[:, None])  # (n, 1, E)
        for i, layer in enumerate(self.spec.layers):
            x = self._block(layer, x, angles, lambda q, k, v, i=i, layer=layer: attend_cached(i, layer, q, k, v))
        return norm(x[:, 0], self.spec.norm)

    def record_bytes(self, B: int, P: int, max_len: int) -> int:
        """Memory a record of B rows, P-token prompts and ``max_len`` positions takes: every linear layer's
        output at every position but the last, and the logits from position P - 1 on."""
        s = self.spec
        widths = sum(width(m) for layer in s.layers for m in layer.linears())
        per_row = (max_len - 1) * widths + (max_len - P) * s.head.weight.shape[0]
        return B * per_row * s.embed.weight.element_size()

    @torch.no_grad()
    def start(self, ids: torch.Tensor, mask: torch.Tensor, max_len: int, record: bool = False) -> Session:
        """Run the prompts (B, P) into a static KV cache with room for ``max_len`` positions: a
        :class:`Session` holding the last prompt position's ``logits`` (B, V) and ``hidden`` (B, E), whose
        :meth:`Session.step` feeds one token per row.

        ``record``: keep every linear layer's output of this rollout for the update (replay); without it the
        last record stays valid (an evaluation may run in between).
        """
        s = self.spec
        B, P = ids.shape
        if max_len > s.context:
            raise ValueError(f"{max_len} positions exceed the model's context of {s.context}")
        key = (len(s.layers), B, s.n_kv_head, max_len, s.head_dim, s.embed.weight.dtype, ids.device)
        cache = self._cache
        if cache is None or cache.key != key or cache.in_use:
            if cache is not None and not cache.in_use:
                self._cache = self._static = self._plans = None  # free the old buffers (and static graphs) first
            cache = KVCache(*key[:5], s.embed.weight)
            if self._cache is None:
                self._cache = cache  # kept for the next session of this shape
        cache.keymask.zero_()
        cache.keymask[:, 0, 0, :P] = mask.bool()
        rec = None
        if record and self.record_limit is not None and self.record_bytes(B, P, max_len) > self.record_limit:
            record = False
            self._record = self._static = self._plans = None  # over the budget: free the last record too
        if record and max_len > P and not torch.is_autocast_enabled(ids.device.type):
            rec = self._record
            if rec is None or rec.key != (B, P, max_len, s.embed.weight.dtype, ids.device) or rec.in_use:
                self._record = rec = self._static = self._plans = None  # free the old buffers first
                rec = Record(s, B, P, max_len, s.embed.weight)
            rec.reset(self._weights_version())
            rec.ids[:, :P], rec.prompt_mask = ids, mask.bool()
            self._record = rec
        session = Session(self, cache, rec, positions_from_mask(mask)[:, -1].clone(), P)
        session.adapters = folded_adapters(self._loras) if self._loras else {}
        # rows with the same prompt (GRPO-style groups) are computed once, then copied to each row
        shared = self._shared_prefix(ids, mask, P)
        if shared is not None:
            ids, mask = ids[shared[0]], mask[shared[0]]

        def spread(t: torch.Tensor) -> torch.Tensor:
            return t if shared is None else t.index_select(0, shared[1])

        def lin(x, module):
            flat = x.reshape(-1, x.shape[-1])
            y = base_into(flat, module)  # the record keeps the base output; a LoRA term goes on top
            if rec is not None:
                rec.out[module][:, :P] = spread(y.view(*x.shape[:-1], -1))
            pair = session.adapters.get(module)
            if pair is not None:
                y = torch.addmm(y, flat @ pair[0].t(), pair[1].t())
            return y.view(*x.shape[:-1], y.shape[-1])

        x, angles = self._embed(ids, positions_from_mask(mask))
        masks = self._masks(mask)
        for i, layer in enumerate(s.layers):

            def attend(q, k, v, i=i, m=masks[layer.window]):
                cache.k[i][:, :, :P], cache.v[i][:, :, :P] = spread(k), spread(v)
                return self._sdpa(q, k, v, m)

            x = self._block(layer, x, angles, attend, lin)
        session.logits, session.hidden = (spread(t[:, 0]) for t in self._head(x[:, -1:]))
        if rec is not None:
            rec.logits[:, 0] = session.logits
            rec.len = P
        return session

    def _step(self, session: Session, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row (B,) through the session's cache: ``(logits (B, V), hidden (B, E))``."""
        cache, rec, t = session.cache, session.record, session.length
        if t >= cache.max_len:
            raise RuntimeError(f"KV cache full ({t} positions); start with a larger max_len")
        if rec is not None and t >= rec.capacity:
            rec = None  # the last position never feeds an update: not recorded
        if self.decode_step != "eager" and not session.adapters and self._static_ok():
            return self._static_step(session, tokens, rec)
        if session.fused is None:
            session.fused = self._fused_plan(session)
        out = None if rec is None else rec.logits[:, t - rec.P + 1]
        if session.fused:  # the whole step in one C++ call (embeddings, blocks, final norm, head)
            plan = session.fused[rec is not None]
            col, ids = (0, None) if rec is None else (t, rec.ids)
            logits, hidden = plan.step(tokens, session.pos, t, col, ids, out)
            session.length = t + 1
            if rec is not None:
                rec.len = t + 1
            return (logits, hidden) if logits is not None else (self._head_product(hidden, out), hidden)
        session.pos += 1
        cache.mask_col[t].fill_(True)
        x, angles = self._embed(tokens[:, None], session.pos[:, None])  # (B, 1, E)
        x = self._layers_op_by_op(session, x, angles, t, rec)
        session.length = t + 1
        hidden = norm(x[:, 0], self.spec.norm)  # (B, E)
        if rec is not None:
            rec.ids[:, t] = tokens
            rec.len = t + 1
        split = kernels.wants_split(hidden, self.spec.head.weight.t())  # by vocabulary columns over the threads
        if split or is_input_major(self.spec.head.weight):  # split, or stored (E, V): the product as it lies
            return base_into(hidden, self.spec.head, out, split=split), hidden
        return self._head_product(hidden, out), hidden

    def _head_product(self, hidden: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """A decode step's logits (B, V) from an (V, E) head not split over the threads: (V, E) @ (E, B), then
        transposed (about half the CPU time of (B, E) @ (E, V) at small B); into ``out`` when given."""
        logits_t = torch.mm(self.spec.head.weight, hidden.t())  # (V, B)
        return logits_t.t().contiguous() if out is None else out.copy_(logits_t.t())

    def _layers_op_by_op(self, session: Session, x: torch.Tensor, angles, t: int, rec: Record | None) -> torch.Tensor:
        """A decode step's blocks through :meth:`_block` on x (B, 1, E): the last block's output."""
        cache, adapters, B = session.cache, session.adapters, x.shape[0]

        def lin(x, module):  # each base matmul writes straight into the record's column t
            flat = x.reshape(B, -1)
            y = base_into(flat, module, None if rec is None else rec.out[module][:, t])
            pair = adapters.get(module)
            if pair is not None:  # the LoRA term on top, a new tensor (the record keeps the base output)
                y = torch.addmm(y, flat @ pair[0].t(), pair[1].t())
            return y.unsqueeze(1)

        def lins(x, modules):  # a group of one input (q, k, v; gate, up): one grouped split matmul where it pays
            if adapters.keys() & set(modules):
                return [lin(x, m) for m in modules]
            outs = None if rec is None else [rec.out[m][:, t] for m in modules]
            return [y.unsqueeze(1) for y in base_group_into(x.reshape(B, -1), modules, outs)]

        for i, layer in enumerate(self.spec.layers):
            first = 0 if layer.window is None else max(0, t + 1 - layer.window)

            def attend(q, k, v, i=i, first=first):
                cache.k_col[i][t].copy_(k[:, :, 0])
                cache.v_col[i][t].copy_(v[:, :, 0])
                keys, values = cache.k_upto[i][t][:, :, first:], cache.v_upto[i][t][:, :, first:]
                return self._attend_one(q, keys, values, cache.mask_upto[t][..., first:])

            x = self._block(layer, x, angles, attend, lin, lins=lins)
        return x

    def _fused_plan(self, session: Session) -> dict | bool:
        """The session's whole-step plans (:func:`textrl.kernels.decode_plan`), by whether a step writes the record:
        ``{True: plan, False: plan}`` (without a record, one-column scratch buffers take the linear outputs); False
        where the fused step does not apply (:attr:`fused_step`)."""
        s, cache, rec = self.spec, session.cache, session.record
        if not (self.fused_step and not session.adapters and all(layer.moe is None for layer in s.layers)):
            return False
        modules = [m for layer in s.layers for m in layer.linears()]
        x = cache.k[0].new_empty(cache.k[0].shape[0], s.embed.weight.shape[1])  # (B, E)
        if not kernels.wants_rows(x, *(in_out_weight(m) for m in modules)):
            return False
        if any(m.q_norm is not None and m.q_norm.variance_epsilon != m.k_norm.variance_epsilon for m in s.layers):
            return False  # the kernel takes one epsilon for both
        # the plans on the engine's kept cache and record serve every later session on them, as long as the
        # weights are the same tensors and nothing a plan decided from (threads, the kernels' switch and sizes)
        # changed; an engine that frees those buffers drops its plans with them
        key = (cache, rec, tuple(p.data_ptr() for p in self.model.parameters()), torch.get_num_threads())
        key += (kernels.enabled(), kernels.MIN_WEIGHT, kernels.MAX_ROWS)
        if self._plans is not None and self._plans[0] == key:
            return self._plans[1]
        scratch = {m: x.new_empty(x.shape[0], 1, width(m)) for m in modules}
        plans = {False: self._decode_plan(cache, scratch, x)}
        if rec is not None:
            plans[True] = self._decode_plan(cache, rec.out, x)
        if cache is self._cache and rec is self._record:
            self._plans = (key, plans)
        return plans

    def _decode_plan(self, cache: KVCache, outs: dict, x: torch.Tensor):
        """A :func:`textrl.kernels.decode_plan` for steps on ``cache`` writing the linear outputs into ``outs[module]``
        (B, T, width): the embeddings, the positions' table (learned, or the rotary angles up to the cache's
        length), every block's :meth:`_fused_args`, the final norm, and the head where it is a plain product (split
        over the threads, or stored (E, V)); otherwise the step returns no logits and :meth:`_head_product` makes
        them."""
        s = self.spec
        # the rotary table up to max_len (a step reads rows of it)
        rotary = self._rope_table(cache.max_len, x.device) if s.positions is None else None
        head_w = in_out_weight(s.head)
        split = kernels.wants_split(x, head_w)
        if not (split or is_input_major(s.head.weight)):
            head_w = None
        final = s.norm
        ln = isinstance(final, nn.LayerNorm)
        plan = kernels.decode_plan(
            s.embed.weight,
            None if s.positions is None else s.positions.weight,
            rotary,
            (final.weight, getattr(final, "bias", None), final.eps if ln else final.variance_epsilon, ln),
            (head_w, base_layer(s.head).bias, split),
            cache.keymask,
        )
        for window, args in self._fused_args(cache, outs, x):
            plan.add_layer(-1 if window is None else window, *args)
        return plan

    def _fused_args(self, cache: KVCache, outs: dict, x: torch.Tensor) -> list[tuple[int | None, tuple]]:
        """Per layer: its attention window and its arguments of :func:`textrl.kernels.decode_layer_op` after the
        per-step ones (x, col, t, first, cos, sin), the linear layers writing into ``outs[module]`` (B, T, width).
        Each linear call takes the split matmul where :func:`textrl.kernels.wants_split` says so for rows like
        x's, as the op-by-op step decides."""
        s = self.spec

        def weights_biases(mods):
            return [in_out_weight(m) for m in mods], [base_layer(m).bias for m in mods]

        def split(*mods):
            ws = [in_out_weight(m) for m in mods]
            return int(kernels.wants_split(x.new_empty(x.shape[0], ws[0].shape[0]), *ws))

        args = []
        for i, layer in enumerate(s.layers):
            attn = (layer.qkv,) if layer.qkv is not None else (layer.q, layer.k, layer.v)
            mlp = (layer.gate, layer.up) if layer.gate is not None else (layer.up,)
            ln = isinstance(layer.norm1, nn.LayerNorm)
            eps = [m.eps if ln else m.variance_epsilon for m in (layer.norm1, layer.norm2)]
            eps.append(0.0 if layer.q_norm is None else layer.q_norm.variance_epsilon)
            (aw, ab), (mw, mb) = weights_biases(attn), weights_biases(mlp)
            qk_norms = (None, None) if layer.q_norm is None else (layer.q_norm.weight, layer.k_norm.weight)
            act = 0 if s.act is None else 1 if s.act == "tanh" else 2
            layer_args = (
                *(layer.norm1.weight, getattr(layer.norm1, "bias", None), aw, ab, [outs[m] for m in attn], *qk_norms),
                *(cache.k[i], cache.v[i], cache.keymask),
                *(in_out_weight(layer.out), base_layer(layer.out).bias, outs[layer.out]),
                *(layer.norm2.weight, getattr(layer.norm2, "bias", None), mw, mb, [outs[m] for m in mlp]),
                *(in_out_weight(layer.down), base_layer(layer.down).bias, outs[layer.down]),
                *(s.n_head, act, ln, eps, [split(*attn), split(layer.out), split(*mlp), split(layer.down)]),
            )
            args.append((layer.window, layer_args))
        return args

    def _static_ok(self) -> bool:
        """Whether the static step can run this model: no mixture-of-experts layer (its routing has
        data-dependent shapes)."""
        if self.decode_step not in DECODE_STEPS:
            raise ValueError(f"decode_step must be one of {', '.join(DECODE_STEPS)}, got {self.decode_step!r}")
        return all(layer.moe is None for layer in self.spec.layers)

    def _static_step(self, session: Session, tokens: torch.Tensor, rec: Record | None):
        """The decode step through a :class:`_StaticStep` (the static-shape body, captured or compiled by
        mode), made for the session's buffers and kept for the next session on the same ones."""
        static = self._static
        if session.pos is not getattr(static, "pos", None):  # a new session (or another one) on this engine
            key = (self.decode_step, tuple(p.data_ptr() for p in self.model.parameters()))
            if static is None or (static.cache, static.key) != (session.cache, key):
                self._static = None  # free the old buffers (and graphs) first
                static = self._static = _StaticStep(self, session.cache, key)
            static.pos.copy_(session.pos)
            session.pos = static.pos  # its positions now live in the static buffer
        t = session.length
        session.pos += 1
        static.tokens.copy_(tokens)
        static.t.fill_(t)
        static.run(rec)
        session.length = t + 1
        if rec is not None:
            rec.len = t + 1
            return rec.logits[:, t - rec.P + 1], static.hidden.clone()
        return static.logits.clone(), static.hidden.clone()


class _StaticStep:
    """The static-shape decode step on one KV cache: input buffers (tokens, positions, the column ``t`` as a
    0-d tensor), output buffers (logits, hidden), and the body that reads and writes only them and the record
    it is given; run as it is, compiled, or captured as CUDA graphs (one per record written, and one without
    any: evaluation, and the last position, which is never recorded), replayed by every later step and session
    on the same buffers. The body is idempotent (it writes column t from its inputs alone), so the warm-up runs
    before a capture change nothing."""

    def __init__(self, engine: Engine, cache: KVCache, key: tuple):
        s = engine.spec
        self.engine, self.cache, self.key = engine, cache, key
        self.mode = engine.decode_step
        like = s.embed.weight
        B, max_len = cache.keymask.shape[0], cache.max_len
        self.tokens = torch.zeros(B, dtype=torch.long, device=like.device)
        self.pos = torch.zeros(B, dtype=torch.long, device=like.device)
        self.t = torch.zeros((), dtype=torch.long, device=like.device)
        self.logits = like.new_zeros(B, s.head.weight.shape[0])
        self.hidden = like.new_zeros(B, s.embed.weight.shape[1])
        self.columns = torch.arange(max_len, device=like.device)
        # the rope table up to max_len, kept here (the body reads these very tensors)
        self.rope = engine._rope_table(max_len, like.device) if s.positions is None else None
        self.cuda = like.device.type == "cuda" and self.mode in ("graph", "compile")
        self.body = self._body
        if self.mode == "compile":
            # on a CPU, a C++ wrapper calls the kernels (no Python between them); on CUDA the graph replays them
            options = {"cpp_wrapper": True} if like.device.type == "cpu" else None
            self.body = torch.compile(self._body, dynamic=False, options=options)
        # the step's one query per row: textrl's CPU kernel where it is built (:func:`textrl.kernels.
        # decode_attention`); otherwise, compiled on a CPU, the attention written out for inductor to fuse
        # (:func:`textrl.ops.decode_attention`); elsewhere torch's kernel, as in every other mode
        cpu_compiled = self.mode == "compile" and like.device.type == "cpu"
        self.attention = decode_attention if cpu_compiled else engine._sdpa
        with torch.no_grad():
            if kernels.wants_attention(like.new_empty(B, s.n_head, 1, s.head_dim), cache.k[0]):
                self.attention = kernels.decode_attention
        self.compiled: set[bool] = set()  # the graphs compiled so far (CPU): with a record (False), without (True)
        # which matmuls take textrl's split kernel (a CPU, few rows, a large enough weight), decided once here:
        # the compiled body must not trace the decision
        self.split: dict[nn.Module, bool] = {}
        with torch.no_grad():  # as the steps run
            for m in (m for layer in s.layers for m in layer.linears()):
                w = in_out_weight(m)
                self.split[m] = kernels.wants_split(like.new_empty(B, w.shape[0]), w)
            self.split_head = kernels.wants_split(like.new_empty(B, s.head.weight.shape[1]), s.head.weight.t())
            # the groups of one input (q, k, v; gate, up) that take the grouped kernel, in one call each
            self.grouped = {
                g: kernels.wants_split(like.new_empty(B, in_out_weight(g[0]).shape[0]), *map(in_out_weight, g))
                for layer in s.layers
                for g in layer.groups()
            }
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Record | None]] = {}  # by record and autocast dtype
        self.pool = torch.cuda.graph_pool_handle() if self.cuda else None

    def run(self, rec: Record | None) -> None:
        if not self.cuda:
            if self.mode == "compile" and (rec is None) not in self.compiled:
                self._compile_or_fall_back(rec)
                return
            self.body(rec)
            return
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (None if rec is None else id(rec), autocast)  # a graph runs in the precision it was captured in
        if key not in self.graphs:
            # autocast's cache of cast weights must not outlive a capture: captured without it
            cast = torch.autocast("cuda", dtype=autocast, cache_enabled=False) if autocast else contextlib.nullcontext()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), cast:  # warm-up (and compilation) outside the capture; idempotent
                for _ in range(2):
                    self.body(rec)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"), cast:
                self.body(rec)
            self.graphs[key] = (graph, rec)  # the record kept alive while its graph writes into it
        self.graphs[key][0].replay()

    def _compile_or_fall_back(self, rec: Record | None) -> None:
        """The first step of a graph (with a record or without) on a CPU: compiled, then run. Where
        ``torch.compile`` cannot compile here (no C++ compiler, no Python headers), the step runs uncompiled
        from then on, with a warning naming the cause, and the rollout goes on: compiling fails before the body
        writes anything, and the body writes column t from its inputs alone."""
        try:
            self.body(rec)
        except Exception as e:  # a body that fails for its own reasons fails again below, uncompiled
            if self.body is self._body:
                raise
            self.body = self._body
            warnings.warn(
                f"decode_step='compile': torch.compile could not compile the decode step here, so it runs "
                f"uncompiled (no faster than decode_step='eager'): {type(e).__name__}: {str(e)[:300]}",
                RuntimeWarning,
                stacklevel=2,
            )
            self.body(rec)
        self.compiled.add(rec is None)

    def _body(self, rec: Record | None) -> None:
        """The step at column ``t``: keys/values (and the columns of ``rec``, when given) written there, the
        attention over the whole cache under its key mask; logits and hidden into the output buffers."""
        engine, cache = self.engine, self.cache
        s = engine.spec
        t = self.t.view(1)
        B = self.tokens.shape[0]
        cache.keymask.index_fill_(3, t, True)
        x = s.embed(self.tokens[:, None])  # (B, 1, E)
        if s.positions is not None:
            x, angles = x + s.positions(self.pos[:, None]), None
        else:
            cos, signed = self.rope
            angles = (cos[self.pos][:, None, None].to(x.dtype), signed[self.pos][:, None, None].to(x.dtype))

        def lin(x, module):
            flat = x.reshape(B, -1)
            y = base_into(flat, module, split=self.split.get(module, False))
            if rec is not None:
                rec.out[module].index_copy_(1, t, y[:, None])
            return y.unsqueeze(1)

        def lins(x, modules):
            if not self.grouped.get(modules, False):
                return [lin(x, m) for m in modules]
            ys = base_group_into(x.reshape(B, -1), modules, split=True)
            if rec is not None:
                for m, y in zip(modules, ys, strict=True):
                    rec.out[m].index_copy_(1, t, y[:, None])
            return [y.unsqueeze(1) for y in ys]

        for i, layer in enumerate(s.layers):
            mask = cache.keymask
            if layer.window is not None:  # the key columns within the window of position column t
                mask = mask & (self.columns > t - layer.window)

            def attend(q, k, v, i=i, mask=mask):  # (under autocast, bf16 keys into the weights' dtype, as copy_ does)
                cache.k[i].index_copy_(2, t, k.to(cache.k[i].dtype))
                cache.v[i].index_copy_(2, t, v.to(cache.v[i].dtype))
                return self.attention(q, cache.k[i], cache.v[i], mask)

            x = engine._block(layer, x, angles, attend, lin, lins=lins)
        hidden = norm(x[:, 0], s.norm)  # (B, E)
        logits = base_into(hidden, s.head, split=self.split_head)
        if rec is not None:
            rec.ids.index_copy_(1, t, self.tokens[:, None])
            rec.logits.index_copy_(1, t - rec.P + 1, logits[:, None])
        self.logits.copy_(logits)
        self.hidden.copy_(hidden)
