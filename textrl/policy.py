"""The actor-critic policy on a causal LM, and the sampling it acts with.

Shape legend: B batch, P prompt length (left-padded), T generated tokens, S = P + T, V vocab, E width.

- The **actor** is the LM head: its logits over the vocabulary are the action logits.
- The **critic** is a value head, ``Linear(E, 1)`` on the final hidden state of the shared trunk
  (``value_model="shared"``, the default), or on a separate copy of the LM trunk (``"separate"``), which
  costs one more model copy and one more forward per step.
- The **reference** is a frozen copy of the starting LM, kept only when a KL penalty is used
  (``kl_coef > 0``), for the reference log-probs. So two model copies by default, three at most.

Rollouts are synchronous: every row is reset at the start of a rollout, all rows
decode together through one KV cache (one token's forward per step, not the whole prefix), and rows that
finish early are masked out of training. The env never sees the cache.

Sampling: ``temperature``, ``top_k`` and ``top_p`` shape the distribution the action is *drawn from*,
and the log-probs stored for learning are those of that same shaped distribution (so the PPO ratio is
exactly 1 at the first update epoch). Dropout is switched off: the model is kept in eval mode during
rollouts *and* updates, so rollout and update log-probs agree.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from textrl.core import HFCore, core_name, make_core
from textrl.ops import router_balance_loss


def shape_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    suppress_tokens: Sequence[int] | torch.Tensor = (),
) -> torch.Tensor:
    """Remove ``suppress_tokens``, apply temperature, then top-k, then top-p (nucleus) filtering; removed and
    filtered logits become -inf (top-k and top-p choose among the tokens that are not suppressed).

    >>> shape_logits(torch.tensor([[2.0, 1.0, 0.0]]), top_k=2).tolist()
    [[2.0, 1.0, -inf]]
    >>> shape_logits(torch.tensor([[2.0, 1.0, 0.0]]), top_k=2, suppress_tokens=[0]).tolist()
    [[-inf, 1.0, 0.0]]
    """
    if len(suppress_tokens):
        logits = suppress(logits, suppress_tokens)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def suppress(logits: torch.Tensor, tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """A copy of ``logits`` (.., V) with the logits of ``tokens`` set to -inf: they can never be drawn.

    >>> suppress(torch.zeros(1, 3), [2]).tolist()
    [[0.0, 0.0, -inf]]
    """
    index = torch.as_tensor(tokens, dtype=torch.long, device=logits.device)
    return logits.index_fill(-1, index, float("-inf"))


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from ``probs`` (B, V) by inverse-CDF sampling.

    Draws one uniform number per row (``torch.multinomial`` draws one per vocabulary entry, which at a
    4k vocabulary costs ~15x more per step). Zero-probability tokens are never chosen.

    >>> sample(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])).tolist()
    [1, 2]
    """
    cdf = probs.cumsum(-1)  # (B, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(probs.shape[-1] - 1)  # (B,)


_CHUNK_BYTES = 1 << 19
"""Rows of (.., V) log-prob work are processed in chunks of about this size (512 KiB: cache-resident)."""
_CHUNK_BYTES_GPU = 1 << 28
"""The same on a GPU: 256 MiB (a few large kernels instead of one per row at a 150k vocabulary; the chunk's
float temporaries stay small beside the logits)."""


def _chunk_rows(flat: torch.Tensor, dtype: torch.dtype) -> int:
    """Rows of ``flat`` (N, V) per chunk of the log-prob work in ``dtype`` on its device."""
    size = _CHUNK_BYTES if flat.device.type == "cpu" else _CHUNK_BYTES_GPU
    return max(1, size // (flat.shape[1] * dtype.itemsize))


class _ActionLogProbs(torch.autograd.Function):
    """``log_softmax(logits).gather(actions)`` without any (N, V) temporary besides the input gradient.

    The full-vocabulary work (log-softmax, its backward, the entropy) runs over row chunks that stay in
    cache; a whole (B, T, V) log-prob tensor is never materialised (at B=64 each such tensor is 32 MiB,
    allocated through fresh ``mmap`` pages every time). The backward recomputes each chunk's softmax
    and forms ``onehot * g - softmax * g``, which is what autograd's gather + log-softmax backward computes.
    Suppressed tokens (``suppress``: a LongTensor of token ids, or None) are set to -inf in each chunk's copy,
    so the distribution is the sampled one without a (N, V) copy of the logits.

    Half-precision logits (bf16, fp16) are taken to float32 a chunk at a time, and the log-probs come out
    in float32: the numbers of ``logits.float()`` passed in, bit for bit, gradient included (each chunk's
    float32 gradient is rounded to the logits' dtype, as autograd rounds the whole one after ``.float()``).
    What that saves is the float32 copy of the logits (kept for the backward) and its float32 gradient:
    at a 150k vocabulary and B x T = 16k tokens, 10 GB each.
    """

    @staticmethod
    def forward(ctx, logits, actions, want_entropy: bool, suppress: torch.Tensor | None):
        flat, acts = logits.reshape(-1, logits.shape[-1]), actions.reshape(-1, 1)  # (N, V), (N, 1)
        dtype = torch.promote_types(flat.dtype, torch.float32)  # the work's: float32 at least
        out = torch.empty(flat.shape[0], dtype=dtype, device=flat.device)
        entropy = torch.empty_like(out) if want_entropy else None
        rows = _chunk_rows(flat, dtype)
        floor = torch.finfo(dtype).min  # -inf log-probs (filtered tokens) contribute 0 * floor = 0
        for i in range(0, flat.shape[0], rows):
            logp = F.log_softmax(_chunk(flat, i, rows, suppress, dtype), dim=-1)
            torch.gather(logp, 1, acts[i : i + rows], out=out[i : i + rows, None])
            if entropy is not None:
                entropy[i : i + rows] = -torch.linalg.vecdot(logp.exp(), logp.clamp_min(floor))
        ctx.save_for_backward(logits, actions)
        ctx.suppress = suppress
        if entropy is None:
            return out.view(actions.shape), None
        ctx.mark_non_differentiable(entropy)
        return out.view(actions.shape), entropy.view(actions.shape)

    @staticmethod
    def backward(ctx, grad, _grad_entropy):
        logits, actions = ctx.saved_tensors
        flat, acts, g = logits.reshape(-1, logits.shape[-1]), actions.reshape(-1, 1), grad.reshape(-1, 1)
        dtype = torch.promote_types(flat.dtype, torch.float32)  # the forward's
        out = torch.empty_like(flat)  # (N, V), in the logits' dtype
        rows = _chunk_rows(flat, dtype)
        for i in range(0, flat.shape[0], rows):
            chunk = out[i : i + rows] if out.dtype == dtype else None  # written in place, or through a copy
            probs = F.softmax(_chunk(flat, i, rows, ctx.suppress, dtype), dim=-1)
            chunk = torch.mul(probs, g[i : i + rows].neg(), out=chunk)
            chunk.scatter_add_(1, acts[i : i + rows], g[i : i + rows])
            if out.dtype != dtype:
                out[i : i + rows] = chunk
        return out.view(logits.shape), None, None, None


def _chunk(flat: torch.Tensor, i: int, rows: int, suppressed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``i : i + rows`` of ``flat`` (N, V) in ``dtype``, with the ``suppress`` columns at -inf (then a
    copy)."""
    chunk = flat[i : i + rows].to(dtype)
    return chunk if suppressed is None else suppress(chunk, suppressed)


def action_logprobs(
    logits: torch.Tensor, actions: torch.Tensor, entropy: bool = False, suppress_tokens: Sequence[int] = ()
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, T) of ``actions`` (B, T) under ``logits`` (B, T, V), and the entropies (B, T) if asked.

    Differentiable with respect to the log-probs only (the entropy comes without gradient: for logging).
    Equal to ``F.log_softmax(logits, -1).gather(-1, actions[..., None])`` with its autograd backward, but
    cheaper in memory traffic (see :class:`_ActionLogProbs`). ``suppress_tokens``: as if their logits were
    -inf (``shape_logits(..., suppress_tokens=...)``), without a copy of ``logits``.

    >>> logp, ent = action_logprobs(torch.tensor([[[0.0, 0.0]]]), torch.tensor([[1]]), entropy=True)
    >>> round(logp.item(), 4), round(ent.item(), 4)
    (-0.6931, 0.6931)
    """
    index = torch.as_tensor(suppress_tokens, dtype=torch.long, device=logits.device) if len(suppress_tokens) else None
    return _ActionLogProbs.apply(logits, actions, entropy, index)


class PolicySession:
    """A rollout in progress on an :class:`ActorCritic`: the policy core's decode session (and the separate
    value trunk's), with the latest ``logits`` (B, V) and ``values`` (B,). A context manager; ``close`` ends
    the rollout."""

    def __init__(self, policy: ActorCritic, main, value=None):
        self.policy, self.main, self.value = policy, main, value
        self.logits, self.values = main.logits, self._values(main.hidden, value and value.hidden)

    def _values(self, hidden: torch.Tensor, value_hidden: torch.Tensor | None) -> torch.Tensor:
        return self.policy.values(hidden if value_hidden is None else value_hidden)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed the sampled tokens (B,); returns the next logits (B, V) and values (B,)."""
        logits, hidden = self.main.step(tokens)
        value_hidden = self.value.step(tokens)[1] if self.value is not None else None
        self.logits, self.values = logits, self._values(hidden, value_hidden)
        return self.logits, self.values

    def close(self) -> None:
        """Free the KV caches (they go back to the cores for the next rollout)."""
        self.main.close()
        if self.value is not None:
            self.value.close()

    def __enter__(self) -> PolicySession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ActorCritic(nn.Module):
    """LM policy + value head (+ frozen reference), over one :mod:`textrl.core` core each.

    Args:
        model: the HF causal LM to train (its parameters are trained in place).
        value_model: ``"shared"`` (value head on the policy trunk) or ``"separate"`` (own trunk copy).
        reference: keep a frozen reference model for KL penalties: a copy of ``model``, or with
            ``reference_is_base`` (``model`` a peft model whose adapters start at zero) ``model`` itself
            with its adapters switched off, so no second copy of the weights is kept.
        fast: run the model on the engine (:mod:`textrl.engine`) when it describes the architecture.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        value_model: Literal["shared", "separate"] = "shared",
        reference: bool = True,
        reference_is_base: bool = False,
        fast: bool = True,
    ):
        super().__init__()
        if value_model not in ("shared", "separate"):
            raise ValueError(f"value_model must be 'shared' or 'separate', got {value_model!r}")
        model.eval()  # dropout off for rollouts and updates alike
        self.model = model
        self.core = make_core(model, fast)
        self.runs_on = core_name(self.core)
        """What runs the model: ``"gpt2 core"``, ``"engine (llama)"``, ... or ``"HF forward (why)"``."""
        hidden = model.get_input_embeddings().embedding_dim
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.value_model_kind = value_model
        self.value_model = None
        if value_model == "separate":
            self.value_model = copy.deepcopy(model).eval()
            self.value_core = make_core(self.value_model, fast)
        self.ref_model = None
        self.reference = reference
        self.reference_is_base = reference and reference_is_base
        if self.reference_is_base:
            if not hasattr(model, "disable_adapter"):
                raise ValueError("reference_is_base needs a peft model (its adapters are switched off there)")
            self.ref_core = self.core
        elif reference:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
            self.ref_core = make_core(self.ref_model, fast)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.replay = True
        """Record rollouts so the next update on them skips its forward matmuls (see :mod:`textrl.engine`).

        A record is trusted while the parameters' autograd version counters are unchanged. torch's fused
        optimizers (``fused=True``) update in place without bumping them: the agents register a step hook
        that does; a hand-written loop with a fused optimizer must call
        ``torch.autograd.graph.increment_version(params)`` after each step, or set this to False."""
        self.replay_memory_mb: float | None = None
        """Largest rollout record in MB (None: no limit); a rollout that needs more is not recorded."""
        self.decode_step = "eager"
        """How the engine cores run a decode step (:attr:`textrl.engine.Engine.decode_step`)."""
        self.router_balance = False
        """Mixture-of-experts policies: when True, :meth:`logits_and_values` also computes the router's
        load-balancing loss over the real tokens of its input (:func:`textrl.ops.router_balance_loss`), kept
        in :attr:`router_loss` for the agent to add to its loss."""
        self.router_loss: torch.Tensor | None = None
        """The load-balancing loss of the last :meth:`logits_and_values` call (with gradients), or None."""

    @property
    def activation_checkpointing(self) -> bool:
        """Whether the update's forward recomputes each block's activations in the backward pass instead of
        keeping them (:attr:`textrl.engine.Engine.checkpoint_blocks`; on the HF path, transformers' own
        checkpointing): less memory for about one more forward pass. Rollouts and reference passes, which keep
        no activations, are unchanged."""
        return self.core.checkpoint_blocks

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        for core in (self.core, getattr(self, "value_core", None)):
            if core is not None:
                core.checkpoint_blocks = bool(on)
                if on and isinstance(core, HFCore):
                    core.checkpoint_layers()  # a model transformers cannot checkpoint fails here, not mid-run

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """The value head on final hidden states (..., E): values (...), in the head's float32 (a bf16 model's
        hidden states are cast up to it)."""
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)

    @property
    def has_router(self) -> bool:
        """Whether the policy is a mixture of experts that runs on the engine (which can log its routing)."""
        spec = getattr(self.core, "spec", None)
        return spec is not None and any(layer.moe is not None for layer in spec.layers)

    def train(self, mode: bool = True):
        """Keep every HF module in eval mode (no dropout); only our own flag changes."""
        self.training = mode
        return self

    # --- rollout ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def start(self, ids: torch.Tensor, mask: torch.Tensor, max_len: int, record: bool = False) -> PolicySession:
        """Prefill prompts (B, P) with room for ``max_len`` positions: a :class:`PolicySession` holding the
        first action's ``logits`` (B, V) and ``values`` (B,); its ``step`` feeds the sampled tokens.

        ``record``: keep this rollout's activations for the update that follows (if :attr:`replay`).
        """
        record = record and self.replay
        limit = None if self.replay_memory_mb is None else int(self.replay_memory_mb * 2**20)
        for core in (self.core, getattr(self, "value_core", None)):
            if hasattr(core, "record_limit"):
                core.record_limit = limit
                core.decode_step = self.decode_step
        main = self.core.start(ids, mask, max_len, record=record)
        value = self.value_core.start(ids, mask, max_len, record=record) if self.value_model is not None else None
        return PolicySession(self, main, value)

    # --- training --------------------------------------------------------------------------------------

    def logits_and_values(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        prompt_len: int,
        need_values: bool = True,
        rows: torch.Tensor | None = None,
    ):
        """Logits for the generated positions and their values, with gradients.

        Args:
            ids, mask: prompt + completion, (B, S) with prompts left-padded to ``prompt_len``.
            rows: which rows of the last rollout these are (None: all of them, in order); with unchanged
                weights the forward then replays the rollout's recorded activations (:mod:`textrl.engine`),
                and the logits returned are views of that record: valid until the next rollout.

        Returns:
            ``logits`` (B, T, V) predicting tokens ``prompt_len..S-1`` and ``values`` (B, T) or None.
        """
        start = prompt_len - 1  # the position that predicts the first generated token
        if self.router_balance:
            self.core.router_log = []
        try:
            logits, hidden = self.core.forward(ids[:, :-1], mask[:, :-1], start, rows)  # (B, T, V), (B, T, E)
            self.router_loss = router_balance_loss(self.core.router_log) if self.router_balance else None
        finally:
            if self.router_balance:
                self.core.router_log = None
        values = None
        if need_values:
            if self.value_model is not None:
                _, hidden = self.value_core.forward(ids[:, :-1], mask[:, :-1], start, rows)
            values = self.values(hidden)  # (B, T)
        return logits, values

    @torch.no_grad()
    def reference_logprobs(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        prompt_len: int,
        actions: torch.Tensor,
        suppress_tokens: Sequence[int] = (),
    ):
        """Reference-model log-probs (B, T) of ``actions`` (B, T), in one batched pass.

        ``suppress_tokens``: those the policy may not sample are removed from the reference distribution
        too, so the KL compares two distributions over the same tokens.

        One pass over the finished sequences is cheaper than a second cached forward at every rollout step
        (one large matmul instead of T small ones).
        """
        if not self.reference:
            raise RuntimeError("this policy was built without a reference model (reference=False)")
        if self.reference_is_base:
            with self.model.disable_adapter():
                logits, _ = self.ref_core.forward(ids[:, :-1], mask[:, :-1], prompt_len - 1)  # (B, T, V)
        else:
            logits, _ = self.ref_core.forward(ids[:, :-1], mask[:, :-1], prompt_len - 1)
        return action_logprobs(logits, actions, suppress_tokens=suppress_tokens)[0]  # float32 (B, T)

    def trainable_parameters(self):
        """Policy trunk (the adapters alone, with LoRA) + value head (+ value trunk); never the reference."""
        params = [p for p in self.model.parameters() if p.requires_grad] + list(self.value_head.parameters())
        if self.value_model is not None:
            params += list(self.value_model.parameters())
        return params
