"""Model cores: the three forwards an RL agent needs, on the very same parameters as the HF model.

Shape legend: B batch, P prompt length (left-padded), S = P + T sequence length, T generated tokens,
V vocabulary, E width, H heads, D head size, L layers.

A core offers
- ``prefill(ids (B, P), mask (B, P), max_len)``: run the prompts, fill a KV cache with room for
  ``max_len`` positions, return the last position's ``(logits (B, V), hidden (B, E))``;
- ``decode(tokens (B,))``: one token per row through the cache, same return;
- ``forward(ids (B, S), mask (B, S), start=0)``: the whole sequence (training / reference pass),
  returning ``(logits (B, S - start, V), hidden (B, S - start, E))`` for positions ``start..S-1`` (the
  LM head is only run where its logits are used).

Rows are **left-padded** inside the cores (the env's observations are right-padded; the rollout converts),
so in a synchronous rollout every row writes its next key/value into the same cache column and the decode
mask is one shared slice. :class:`GPT2Core` is our own minimal forward over the parameters of a
``GPT2LMHeadModel`` with a static cache (at this model size the per-token cost is framework overhead, so a
lean loop is several times faster than the generic HF forward); :class:`HFCore` runs any other HF causal
LM through its own forward with a ``DynamicCache``. Both are tested for agreement with the HF forward.

Rollout replay (:class:`GPT2Core`): a rollout started with ``prefill(..., record=True)`` keeps the output
of every linear layer (QKV, attention projection, MLP in and out, per layer) and the LM head's logits in
a :class:`Record`, written in place by the same matmuls that sample the tokens. When the update then runs
``forward`` on those very sequences with unchanged weights (REINFORCE, and PPO's first minibatch: the
on-policy step), the forward takes each linear layer's output from the record instead of recomputing it
(:class:`_Replayed`), while everything else (embeddings, layer norms, attention, GELU) is recomputed with
autograd as usual; the backward is exactly the usual one (the same three matmuls per layer as ``addmm``'s
backward). So the update skips the forward's matmuls, about a fifth of the FLOPs of an RL iteration
(benchmarks/peers.py). Rows whose tokens, weights (version counters) or autocast state differ from the
record's are computed normally.

Shared prompts (:class:`GPT2Core`): when at most half the rows are distinct over a prompt (the ``group_size``
samples of each prompt that RLOO/GRPO-style baselines draw), the prefill runs each distinct prompt once and
copies its keys/values, record and first logits to its rows, and ``forward`` (reference pass, update;
replayed or not) runs the first ``start`` positions once per distinct prompt, the rows attending to the
gathered keys/values (:meth:`GPT2Core._shared_prefix`); autograd adds up the rows' gradients there.
"""

from __future__ import annotations

import inspect
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

_GELU_K = 2 * math.sqrt(2 / math.pi)


class _TanhGELU(torch.autograd.Function):
    """GPT-2's tanh GELU written as ``x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))``.

    The same function (``0.5 (1 + tanh z) = sigmoid(2 z)``; it differs from ``F.gelu(approximate="tanh")``
    by float rounding, at most ~5e-7), but torch's CPU ``tanh`` kernel is ~3.5x slower than its ``sigmoid``:
    the forward takes 108 instead of 235 us on a (64, 1024) decode activation. The backward is torch's own
    tanh-GELU derivative.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _tanh_gelu(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    y = x * x  # the only new tensor: every later step is in place
    return torch.addcmul(x, y, x, value=0.044715, out=y).mul_(_GELU_K).sigmoid_().mul_(x)


def gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """GELU (``approximate``: ``"tanh"`` or ``"none"``); the tanh one through :class:`_TanhGELU`."""
    if approximate != "tanh":
        return F.gelu(x, approximate=approximate)
    if torch.is_grad_enabled() and x.requires_grad:
        return _TanhGELU.apply(x)
    return _tanh_gelu(x)


class _Replayed(torch.autograd.Function):
    """A linear layer whose output was recorded during the rollout: the forward returns the record.

    ``y = x @ weight + bias`` (HF ``Conv1D`` layout, weight (in, out)) or, with ``transposed``,
    ``y = x @ weight.T`` (an ``nn.Linear`` / tied LM head, weight (out, in)). The backward is the one
    autograd runs for ``addmm`` / ``linear``: ``dx = g W^T``, ``dW = x^T g`` (or ``g^T x``), ``db = sum g``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, recorded, transposed: bool):
        ctx.save_for_backward(x, weight)
        ctx.transposed, ctx.has_bias = transposed, bias is not None
        return recorded.view_as(recorded)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])  # (N, out), (N, in)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (g @ (weight if ctx.transposed else weight.t())).view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = g.t() @ x2 if ctx.transposed else x2.t() @ g
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0)
        return dx, dw, db, None, None


class _ReplayedPair(torch.autograd.Function):
    """:class:`_Replayed` for one linear layer applied to two sets of rows (a shared prompt prefix and the
    rows' own positions): both outputs come from the record; the backward forms the weight gradient as one
    ``mm`` plus one accumulating ``addmm`` (no second weight-sized gradient to add up). An output that no
    loss uses (the prefix after the last layer) gets no gradient and costs nothing in the backward."""

    @staticmethod
    def forward(ctx, xa, xb, weight, bias, recorded_a, recorded_b):
        ctx.save_for_backward(xa, xb, weight)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None instead of zeros
        return recorded_a.view_as(recorded_a), recorded_b.view_as(recorded_b)

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        xa, xb, weight = ctx.saved_tensors
        parts = [
            (x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]))  # (N, in), (N, out)
            for x, g in ((xa, grad_a), (xb, grad_b))
            if g is not None
        ]
        dx = [
            (g @ weight.t()).view(x.shape) if g is not None and ctx.needs_input_grad[i] else None
            for i, (x, g) in enumerate(((xa, grad_a), (xb, grad_b)))
        ]
        dw = db = None
        if ctx.needs_input_grad[2] and parts:
            dw = parts[0][0].t() @ parts[0][1]
            for x2, g2 in parts[1:]:
                dw.addmm_(x2.t(), g2)
        if ctx.has_bias and ctx.needs_input_grad[3] and parts:
            db = sum(g2.sum(0) for _, g2 in parts)
        return dx[0], dx[1], dw, db, None, None


class KVCache:
    """A static KV cache (L, B, H, max_len, D) with the per-step views a decode step needs, made once.

    Python-level indexing costs a few microseconds per view, and a decode step at this model size is
    ~100 small ops: the per-position column views (written by step t) and prefix views (read by step t)
    are built once per shape and the cache is reused by the next rollout of the same shape.
    """

    def __init__(self, L: int, B: int, H: int, max_len: int, D: int, like: torch.Tensor):
        self.key = (L, B, H, max_len, D, like.dtype, like.device)
        self.k = torch.zeros(L, B, H, max_len, D, dtype=like.dtype, device=like.device)
        self.v = torch.zeros_like(self.k)
        self.keymask = torch.zeros(B, 1, 1, max_len, dtype=torch.bool, device=like.device)
        layers = range(L)
        self.k_col = [[self.k[i, :, :, t] for t in range(max_len)] for i in layers]  # (B, H, D)
        self.v_col = [[self.v[i, :, :, t] for t in range(max_len)] for i in layers]
        self.k_upto = [[self.k[i, :, :, : t + 1] for t in range(max_len)] for i in layers]  # (B, H, t+1, D)
        self.v_upto = [[self.v[i, :, :, : t + 1] for t in range(max_len)] for i in layers]
        self.mask_col = [self.keymask[:, 0, 0, t] for t in range(max_len)]  # (B,)
        self.mask_upto = [self.keymask[..., : t + 1] for t in range(max_len)]  # (B, 1, 1, t+1)


class Record:
    """What a recorded rollout keeps: the fed tokens and every linear layer's output, per position.

    Buffers are (B, max_len - 1, width): a decode step writes its matmul output straight into column t
    (``out=`` with a row stride: no copy, no extra op), and the update's sequences (all but the last token,
    so max_len - 1 positions) are then whole, contiguous buffers. ``logits`` is (B, max_len - P, V), from
    position P - 1 on. The buffers are reused by the next rollout of the same shape (fresh 10-100 MB
    tensors cost page faults on every iteration).
    """

    def __init__(self, core: GPT2Core, B: int, P: int, max_len: int, like: torch.Tensor):
        E, V, L = core.wte.embedding_dim, core.lm_head.weight.shape[0], len(core.blocks)
        inner = core.blocks[0].mlp.c_fc.weight.shape[1]
        new = lambda *shape: torch.empty(shape, dtype=like.dtype, device=like.device)  # noqa: E731
        self.key = (B, P, max_len, like.dtype, like.device)
        self.ids = torch.empty(B, max_len, dtype=torch.long, device=like.device)
        self.capacity = max_len - 1  # positions recorded; the last one never feeds an update
        self.qkv = [new(B, self.capacity, 3 * E) for _ in range(L)]
        self.proj = [new(B, self.capacity, E) for _ in range(L)]
        self.fc = [new(B, self.capacity, inner) for _ in range(L)]
        self.mlp = [new(B, self.capacity, E) for _ in range(L)]
        self.logits = new(B, max_len - P, V)
        positions = range(self.capacity)
        self.at = [  # per layer, per position: the (B, width) slices a decode step writes with out=
            [(self.qkv[i][:, t], self.proj[i][:, t], self.fc[i][:, t], self.mlp[i][:, t]) for t in positions]
            for i in range(L)
        ]
        self.logits_at = [self.logits[:, t - P + 1] for t in range(P - 1, self.capacity)]  # by position - P + 1
        self.P = P
        self.reset(None)

    def reset(self, version) -> None:
        self.len, self.version = 0, version
        self.prompt_mask: torch.Tensor | None = None


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: 0 at each row's first real token (pads get 0)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, S)


class HFCore(nn.Module):
    """Any HF causal LM through its own forward (generic; used for architectures without a fast core)."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
        self._cache = None
        # the cache keyword is `cache` in recent transformers (which warn on `past_key_values`), earlier
        # `past_key_values`; the cache object is filled in place, so it is what _run returns either way
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def _run(self, ids, mask, positions, cache=None, keep: int = 0):
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=cache is not None,
            output_hidden_states=True,
            logits_to_keep=keep,  # 0 = all positions
            **{self._cache_kw: cache},
        )
        hidden = out.hidden_states[-1]
        return out.logits, hidden[:, -keep:] if keep else hidden, cache

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, max_len: int, record: bool = False):
        """As :meth:`GPT2Core.prefill`; ``record`` is accepted and ignored (no replay for generic models)."""
        from transformers import DynamicCache

        self._mask = mask.long()
        self._pos = positions_from_mask(mask)[:, -1]  # (B,)
        logits, hidden, self._cache = self._run(ids, self._mask, positions_from_mask(mask), DynamicCache())
        return logits[:, -1], hidden[:, -1]

    def decode(self, tokens: torch.Tensor):
        self._pos = self._pos + 1
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(tokens), 1)], dim=1)
        logits, hidden, self._cache = self._run(tokens[:, None], self._mask, self._pos[:, None], self._cache)
        return logits[:, -1], hidden[:, -1]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, start: int = 0, rows: torch.Tensor | None = None):
        logits, hidden, _ = self._run(ids, mask.long(), positions_from_mask(mask), keep=ids.shape[1] - start)
        return logits, hidden

    def release(self) -> None:
        self._cache = None


class GPT2Core(nn.Module):
    """Minimal GPT-2 forward with a static KV cache, sharing the parameters of a ``GPT2LMHeadModel``."""

    SUPPORTED_ACTIVATIONS: ClassVar[dict[str, str]] = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}

    @classmethod
    def supports(cls, model: PreTrainedModel) -> bool:
        c = model.config
        return (
            c.model_type == "gpt2"
            and c.activation_function in cls.SUPPORTED_ACTIVATIONS
            and c.scale_attn_weights
            and not c.scale_attn_by_inverse_layer_idx
            and not getattr(c, "add_cross_attention", False)
        )

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        if not self.supports(model):
            raise ValueError("GPT2Core needs a GPT-2 config with standard attention and a GELU activation")
        self.model = model
        tr = model.transformer
        c = model.config
        self.n_head, self.eps = c.n_head, c.layer_norm_epsilon
        self.approximate = self.SUPPORTED_ACTIVATIONS[c.activation_function]
        self.wte, self.wpe, self.blocks, self.ln_f = tr.wte, tr.wpe, tr.h, tr.ln_f
        self.lm_head = model.lm_head
        self._cache: KVCache | None = None  # kept for the next rollout of the same shape
        self._live: KVCache | None = None  # the cache of the rollout in progress (None after release)
        self._record: Record | None = None
        self._writing: Record | None = None
        self.replayed = 0
        """How many ``forward`` calls took their linear layers from a rollout record (for tests/benchmarks)."""

    # --- pieces ----------------------------------------------------------------------------------------

    def _qkv(self, block, x):  # x (B, S, E) -> q, k, v each (B, H, S, D)
        B, S, E = x.shape
        h = F.layer_norm(x, (E,), block.ln_1.weight, block.ln_1.bias, self.eps)
        qkv = torch.addmm(block.attn.c_attn.bias, h.view(-1, E), block.attn.c_attn.weight)  # (B*S, 3E)
        qkv = qkv.view(B, S, 3, self.n_head, E // self.n_head).permute(2, 0, 3, 1, 4)  # (3, B, H, S, D)
        return qkv[0], qkv[1], qkv[2]

    def _finish_block(self, block, x, att):  # att (B, H, S, D)
        return self._block_outputs(block, x, att)[0]

    def _block_outputs(self, block, x, att):
        """The rest of the block after attention: new x (B, S, E) and the linear outputs (B*S, width)."""
        B, H, S, D = att.shape
        att = att.transpose(1, 2).reshape(B * S, H * D)
        proj = torch.addmm(block.attn.c_proj.bias, att, block.attn.c_proj.weight)
        x = x + proj.view(B, S, H * D)
        h = F.layer_norm(x, (H * D,), block.ln_2.weight, block.ln_2.bias, self.eps).view(B * S, H * D)
        fc = torch.addmm(block.mlp.c_fc.bias, h, block.mlp.c_fc.weight)
        out = torch.addmm(block.mlp.c_proj.bias, gelu(fc, self.approximate), block.mlp.c_proj.weight)
        return x + out.view(B, S, H * D), proj, fc, out

    def _head(self, x):  # (B, S, E) -> logits (B, S, V), hidden (B, S, E)
        hidden = F.layer_norm(x, (x.shape[-1],), self.ln_f.weight, self.ln_f.bias, self.eps)
        return F.linear(hidden, self.lm_head.weight), hidden

    @staticmethod
    def _full_mask(mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) bool: causal and key-padding; a pad query attends to itself (never an empty row)."""
        S = mask.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=mask.device).tril()
        m = causal[None] & mask.bool()[:, None, :]
        return (m | torch.eye(S, dtype=torch.bool, device=mask.device)[None])[:, None]

    # --- the three forwards ----------------------------------------------------------------------------

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, start: int = 0, rows: torch.Tensor | None = None):
        """The whole sequence; ``rows`` (indices into the last recorded rollout) allows a replay."""
        record, rows = self._replayable(ids, mask, start, rows)
        if record is not None:
            return self._replay(record, ids, mask, start, rows)
        shared = self._shared_prefix(ids, mask, start)
        if shared is not None:
            return self._forward_shared(ids, mask, start, *shared)
        x = self.wte(ids) + self.wpe(positions_from_mask(mask))  # (B, S, E)
        attn_mask = self._full_mask(mask)
        for block in self.blocks:
            q, k, v = self._qkv(block, x)
            x = self._finish_block(block, x, F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))
        return self._head(x[:, start:])  # (B, S - start, V), (B, S - start, E)

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

    def _forward_shared(self, ids, mask, n: int, first: torch.Tensor, inverse: torch.Tensor):
        """``forward`` computing the first ``n`` positions once per distinct prefix (U rows) instead of once
        per row: rows attend to their prefix's keys/values (gathered) and their own. Autograd sums the
        gradients of rows sharing a prefix (``index_select``'s backward), so this holds for updates too."""
        positions = positions_from_mask(mask)
        x = self.wte(ids[first, :n]) + self.wpe(positions[first, :n])  # (U, n, E): the distinct prefixes
        y = self.wte(ids[:, n:]) + self.wpe(positions[:, n:])  # (B, S - n, E): every row's own positions
        full = self._full_mask(mask)  # (B, 1, S, S)
        mask_x, mask_y = full[first, :, :n, :n], full[:, :, n:]  # (U, 1, n, n), (B, 1, S - n, S)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            qx, kx, vx = self._qkv(block, x)
            if i < last:  # the prefix's outputs after the last layer are never used
                x = self._finish_block(block, x, F.scaled_dot_product_attention(qx, kx, vx, attn_mask=mask_x))
            qy, ky, vy = self._qkv(block, y)
            k = torch.cat([kx.index_select(0, inverse), ky], 2)  # (B, H, S, D)
            v = torch.cat([vx.index_select(0, inverse), vy], 2)
            y = self._finish_block(block, y, F.scaled_dot_product_attention(qy, k, v, attn_mask=mask_y))
        return self._head(y)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, max_len: int, record: bool = False):
        """Rollouts only (no autograd): the static cache and the record are written in place."""
        B, P = ids.shape
        E, H = self.wte.embedding_dim, self.n_head
        if max_len > self.wpe.num_embeddings:
            raise ValueError(f"{max_len} positions exceed the model's context of {self.wpe.num_embeddings}")
        key = (len(self.blocks), B, H, max_len, E // H, self.wte.weight.dtype, ids.device)
        if self._cache is None or self._cache.key != key:
            self._cache = None
            self._cache = KVCache(*key[:5], self.wte.weight)
        cache = self._live = self._cache
        cache.keymask.zero_()
        cache.keymask[:, 0, 0, :P] = mask.bool()
        self._len = P
        self._pos = positions_from_mask(mask)[:, -1].clone()  # (B,)
        rec = None  # without record=True the last record stays valid (an evaluation may run in between)
        if record and max_len > P and not torch.is_autocast_enabled(ids.device.type):
            rec = self._record
            if rec is None or rec.key != (B, P, max_len, self.wte.weight.dtype, ids.device):
                self._record = rec = None  # free the old buffers before allocating new ones
                rec = Record(self, B, P, max_len, self.wte.weight)
            rec.reset(self._weights_version())
            rec.ids[:, :P], rec.prompt_mask = ids, mask.bool()
            self._record = rec
        self._writing = rec  # what decode writes into
        # rows with the same prompt (GRPO-style groups) are computed once, then copied to each row
        shared = self._shared_prefix(ids, mask, P)
        spread = (lambda t: t) if shared is None else (lambda t: t.index_select(0, shared[1]))
        src_ids, src_mask = (ids, mask) if shared is None else (ids[shared[0]], mask[shared[0]])
        U = src_ids.shape[0]
        x = self.wte(src_ids) + self.wpe(positions_from_mask(src_mask))
        attn_mask = self._full_mask(src_mask)
        for i, block in enumerate(self.blocks):
            q, k, v = self._qkv(block, x)
            cache.k[i, :, :, :P], cache.v[i, :, :, :P] = spread(k), spread(v)
            x, proj, fc, out = self._block_outputs(
                block, x, F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            )
            if rec is not None:
                rec.qkv[i][:, :P] = spread(torch.stack((q, k, v), 2).transpose(1, 3).reshape(U, P, 3 * E))
                rec.proj[i][:, :P], rec.fc[i][:, :P] = spread(proj.view(U, P, -1)), spread(fc.view(U, P, -1))
                rec.mlp[i][:, :P] = spread(out.view(U, P, -1))
        logits, hidden = (spread(t[:, 0]) for t in self._head(x[:, -1:]))
        if rec is not None:
            rec.logits[:, 0] = logits
            rec.len = P
        return logits, hidden

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor):
        """One token per row (B,) through the cache; all activations are (B, width) rows. No autograd."""
        cache, rec = self._live, self._writing
        if cache is None:
            raise RuntimeError("decode needs a prefill first (none yet, or the rollout was released)")
        t = self._len
        if t >= cache.k.shape[3]:
            raise RuntimeError(f"KV cache full ({t} positions); prefill with a larger max_len")
        if rec is not None and t >= rec.capacity:
            rec = None  # the last position never feeds an update: not recorded
        B, E, H = len(tokens), self.wte.embedding_dim, self.n_head
        self._pos += 1
        cache.mask_col[t].fill_(True)
        keymask = cache.mask_upto[t]
        x = self.wte.weight[tokens] + self.wpe.weight[self._pos]  # (B, E)
        ln, addmm = F.layer_norm, torch.addmm
        no_record = (None, None, None, None)
        for i, block in enumerate(self.blocks):
            attn, mlp = block.attn, block.mlp
            out_qkv, out_proj, out_fc, out_mlp = no_record if rec is None else rec.at[i][t]  # out=None: new tensor
            h = ln(x, (E,), block.ln_1.weight, block.ln_1.bias, self.eps)
            qkv = addmm(attn.c_attn.bias, h, attn.c_attn.weight, out=out_qkv).view(B, 3, H, E // H)
            cache.k_col[i][t].copy_(qkv[:, 1])
            cache.v_col[i][t].copy_(qkv[:, 2])
            att = F.scaled_dot_product_attention(qkv[:, 0, :, None], cache.k_upto[i][t], cache.v_upto[i][t], keymask)
            x = x + addmm(attn.c_proj.bias, att.view(B, E), attn.c_proj.weight, out=out_proj)
            h = ln(x, (E,), block.ln_2.weight, block.ln_2.bias, self.eps)
            h = gelu(addmm(mlp.c_fc.bias, h, mlp.c_fc.weight, out=out_fc), self.approximate)
            x = x + addmm(mlp.c_proj.bias, h, mlp.c_proj.weight, out=out_mlp)
        self._len = t + 1
        hidden = ln(x, (E,), self.ln_f.weight, self.ln_f.bias, self.eps)
        # (V, E) @ (E, B), then transposed: ~20% less CPU than (B, E) @ (E, V) with MKL at B <= 64 here
        logits_t = torch.mm(self.lm_head.weight, hidden.t())  # (V, B)
        if rec is None:
            return logits_t.t().contiguous(), hidden
        rec.ids[:, t] = tokens
        rec.len = t + 1
        return rec.logits_at[t - rec.P + 1].copy_(logits_t.t()), hidden

    def release(self) -> None:
        """End the rollout: the cache and the record stay allocated for the next rollout of the same shape
        (the record until the weights change); ``decode`` needs a new ``prefill``."""
        self._live = self._writing = None

    # --- replay ----------------------------------------------------------------------------------------

    def _weights_version(self) -> tuple[int, ...]:
        """Changes whenever a parameter is updated in place (optimizer steps, ``load_state_dict``)."""
        return tuple(p._version for p in self.model.parameters())

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

    def _replay(self, rec: Record, ids, mask, start, rows):
        """``forward`` with every linear layer's output taken from ``rec`` (see :class:`_Replayed`)."""
        shared = self._shared_prefix(ids, mask, start)
        if shared is not None:
            return self._replay_shared(rec, ids, mask, start, rows, *shared)
        B, S = ids.shape
        E, H = self.wte.embedding_dim, self.n_head
        pick = (lambda buf: buf[:, :S]) if rows is None else (lambda buf: buf[rows, :S])
        x = self.wte(ids) + self.wpe(positions_from_mask(mask))  # (B, S, E)
        attn_mask = self._full_mask(mask)
        for i, block in enumerate(self.blocks):
            attn, mlp = block.attn, block.mlp
            h = F.layer_norm(x, (E,), block.ln_1.weight, block.ln_1.bias, self.eps)
            qkv = _Replayed.apply(h, attn.c_attn.weight, attn.c_attn.bias, pick(rec.qkv[i]), False)
            q, k, v = qkv.unflatten(-1, (3, H, E // H)).permute(2, 0, 3, 1, 4)  # (B, H, S, D) each
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(B, S, E)
            x = x + _Replayed.apply(att, attn.c_proj.weight, attn.c_proj.bias, pick(rec.proj[i]), False)
            h = F.layer_norm(x, (E,), block.ln_2.weight, block.ln_2.bias, self.eps)
            fc = _Replayed.apply(h, mlp.c_fc.weight, mlp.c_fc.bias, pick(rec.fc[i]), False)
            out = _Replayed.apply(
                gelu(fc, self.approximate), mlp.c_proj.weight, mlp.c_proj.bias, pick(rec.mlp[i]), False
            )
            x = x + out
        self.replayed += 1
        hidden = F.layer_norm(x[:, start:], (E,), self.ln_f.weight, self.ln_f.bias, self.eps)
        j = start - rec.P + 1  # column of the logits record that predicts position start + 1
        if j < 0:
            return F.linear(hidden, self.lm_head.weight), hidden
        logits = rec.logits[:, j : j + S - start] if rows is None else rec.logits[rows, j : j + S - start]
        return _Replayed.apply(hidden, self.lm_head.weight, None, logits, True), hidden

    def _replay_shared(self, rec: Record, ids, mask, n: int, rows, first: torch.Tensor, inverse: torch.Tensor):
        """:meth:`_replay` with the first ``n`` positions once per distinct prompt, as :meth:`_forward_shared`:
        the backward then runs the prompts' positions once per prompt, not once per sample of it."""
        B, S = ids.shape
        E, H, D = self.wte.embedding_dim, self.n_head, self.wte.embedding_dim // self.n_head
        U = len(first)
        source = first if rows is None else rows[first]  # the record's row of each distinct prompt

        def pre(buf):  # (U, n, width): gathered
            return buf[source, :n]

        def own(buf):  # (B, S - n, width): a view when all rows are asked for in order
            return buf[:, n:S] if rows is None else buf[rows, n:S]

        positions = positions_from_mask(mask)
        x = self.wte(ids[first, :n]) + self.wpe(positions[first, :n])  # (U, n, E)
        y = self.wte(ids[:, n:]) + self.wpe(positions[:, n:])  # (B, S - n, E)
        full = self._full_mask(mask)
        mask_x, mask_y = full[first, :, :n, :n], full[:, :, n:]
        ln = F.layer_norm
        for i, block in enumerate(self.blocks):
            attn, mlp = block.attn, block.mlp
            hx = ln(x, (E,), block.ln_1.weight, block.ln_1.bias, self.eps)
            hy = ln(y, (E,), block.ln_1.weight, block.ln_1.bias, self.eps)
            qkv_x, qkv_y = _ReplayedPair.apply(
                hx, hy, attn.c_attn.weight, attn.c_attn.bias, pre(rec.qkv[i]), own(rec.qkv[i])
            )
            qx, kx, vx = qkv_x.unflatten(-1, (3, H, D)).permute(2, 0, 3, 1, 4)  # (U, H, n, D) each
            qy, ky, vy = qkv_y.unflatten(-1, (3, H, D)).permute(2, 0, 3, 1, 4)  # (B, H, S - n, D) each
            k = torch.cat([kx.index_select(0, inverse), ky], 2)
            v = torch.cat([vx.index_select(0, inverse), vy], 2)
            att_y = F.scaled_dot_product_attention(qy, k, v, attn_mask=mask_y).transpose(1, 2).reshape(B, S - n, E)
            att_x = F.scaled_dot_product_attention(qx, kx, vx, attn_mask=mask_x).transpose(1, 2).reshape(U, n, E)
            px, py = _ReplayedPair.apply(
                att_x, att_y, attn.c_proj.weight, attn.c_proj.bias, pre(rec.proj[i]), own(rec.proj[i])
            )
            x, y = x + px, y + py
            fx, fy = _ReplayedPair.apply(
                ln(x, (E,), block.ln_2.weight, block.ln_2.bias, self.eps),
                ln(y, (E,), block.ln_2.weight, block.ln_2.bias, self.eps),
                mlp.c_fc.weight,
                mlp.c_fc.bias,
                pre(rec.fc[i]),
                own(rec.fc[i]),
            )
            mx, my = _ReplayedPair.apply(
                gelu(fx, self.approximate),
                gelu(fy, self.approximate),
                mlp.c_proj.weight,
                mlp.c_proj.bias,
                pre(rec.mlp[i]),
                own(rec.mlp[i]),
            )
            x, y = x + mx, y + my
        self.replayed += 1
        hidden = ln(y, (E,), self.ln_f.weight, self.ln_f.bias, self.eps)
        j = n - rec.P + 1  # column of the logits record that predicts position n + 1
        if j < 0:
            return F.linear(hidden, self.lm_head.weight), hidden
        logits = rec.logits[:, j : j + S - n] if rows is None else rec.logits[rows, j : j + S - n]
        return _Replayed.apply(hidden, self.lm_head.weight, None, logits, True), hidden


def make_core(model: PreTrainedModel, fast: bool = True) -> nn.Module:
    """The fastest core that runs ``model``: :class:`GPT2Core` for GPT-2 (with rollout replay and shared
    prompts), :class:`textrl.engine.Engine` for the other architectures it describes (Llama, Mistral, Qwen2,
    Qwen3), else :class:`HFCore` (anything else, including models whose modules the engine does not know,
    such as LoRA-wrapped or quantised layers). :func:`core_name` says which one a policy runs."""
    from textrl.engine import Engine

    if fast and GPT2Core.supports(model):
        return GPT2Core(model)
    why = Engine.why_not(model) if fast else "fast cores off"
    if why is None:
        return Engine(model)
    core = HFCore(model)
    core.reason = why
    return core


def core_name(core: nn.Module) -> str:
    """What runs a model: ``"gpt2 core"``, ``"engine (llama)"``, ... or ``"HF forward (why)"``.

    >>> core_name(HFCore.__new__(HFCore))
    'HF forward'
    """
    if isinstance(core, GPT2Core):
        return "gpt2 core"
    if isinstance(core, HFCore):
        reason = getattr(core, "reason", None)
        return f"HF forward ({reason})" if reason else "HF forward"
    return f"engine ({core.arch})"
