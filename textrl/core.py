"""Model cores: the three forwards an RL agent needs, on the very same parameters as the HF model.

Shape legend: B batch, P prompt length (left-padded), S = P + T sequence length, T generated tokens,
V vocabulary, E width, H heads, D head size, L layers.

A core offers
- ``start(ids (B, P), mask (B, P), max_len, record=False)``: run the prompts into a KV cache with room for
  ``max_len`` positions; returns a decode session (the rollout's state: cache, positions, record) holding
  the last position's ``logits`` (B, V) and ``hidden`` (B, E). ``session.step(tokens (B,))`` feeds one
  token per row and returns the next ``(logits, hidden)``; ``session.close()`` ends the rollout;
- ``forward(ids (B, S), mask (B, S), start=0, rows=None)``: the whole sequence (training / reference
  pass), returning ``(logits (B, S - start, V), hidden (B, S - start, E))`` for positions ``start..S-1``
  (the LM head is only run where its logits are used).

Rows are **left-padded** inside the cores (the env's observations are right-padded; the rollout converts),
so in a synchronous rollout every row writes its next key/value into the same cache column and the decode
mask is one shared slice. :func:`make_core` picks :class:`textrl.engine.Engine` (our own forward, one block
for every architecture it describes, with a static cache, rollout replay and shared prompts) and falls back
to :class:`HFCore` (any HF causal LM through its own forward with a ``DynamicCache``). This module holds what
they share: the static :class:`KVCache`, the replayed linear layer (:class:`_Replayed`), the fast GELU.
"""

from __future__ import annotations

import inspect
import math

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
            if not ctx.transposed:
                dw = x2.t() @ g
            elif weight.stride(0) == 1 and weight.dim() == 2:  # input-major storage: the gradient in its layout
                dw = (x2.t() @ g).t()
            else:
                dw = g.t() @ x2
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0)
        return dx, dw, db, None, None


class KVCache:
    """A static KV cache (L, B, H, max_len, D) with the per-step views a decode step needs, made once.

    Python-level indexing costs a few microseconds per view, and a decode step at this model size is
    ~100 small ops: the per-position column views (written by step t) and prefix views (read by step t)
    are built once per shape and the cache is reused by the next rollout of the same shape.
    """

    def __init__(self, L: int, B: int, H: int, max_len: int, D: int, like: torch.Tensor):
        self.key = (L, B, H, max_len, D, like.dtype, like.device)
        self.in_use = False  # an open decode session holds it
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


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: 0 at each row's first real token (pads get 0)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, S)


class HFCore(nn.Module):
    """Any HF causal LM through its own forward (generic; used for architectures without a fast core)."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
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

    @torch.no_grad()
    def start(self, ids: torch.Tensor, mask: torch.Tensor, max_len: int, record: bool = False) -> HFSession:
        """As :meth:`textrl.engine.Engine.start` (``max_len`` and ``record`` are accepted and unused: the
        ``DynamicCache`` grows, and there is no replay here)."""
        from transformers import DynamicCache

        session = HFSession(self, mask.long(), positions_from_mask(mask)[:, -1])
        logits, hidden, session.cache = self._run(ids, session.mask, positions_from_mask(mask), DynamicCache())
        session.logits, session.hidden = logits[:, -1], hidden[:, -1]
        return session

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, start: int = 0, rows: torch.Tensor | None = None):
        logits, hidden, _ = self._run(ids, mask.long(), positions_from_mask(mask), keep=ids.shape[1] - start)
        return logits, hidden


class HFSession:
    """One rollout in progress on an :class:`HFCore`: its ``DynamicCache``, attention mask and positions
    (the counterpart of :class:`textrl.engine.Session`)."""

    def __init__(self, core: HFCore, mask: torch.Tensor, pos: torch.Tensor):
        self.core, self.mask, self.pos = core, mask, pos
        self.cache = None
        self.logits: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one token per row (B,): the next ``(logits (B, V), hidden (B, E))``."""
        if self.cache is None:
            raise RuntimeError("this decode session is closed; start a new one")
        self.pos = self.pos + 1
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        logits, hidden, self.cache = self.core._run(tokens[:, None], self.mask, self.pos[:, None], self.cache)
        self.logits, self.hidden = logits[:, -1], hidden[:, -1]
        return self.logits, self.hidden

    def close(self) -> None:
        self.cache = None

    def __enter__(self) -> HFSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_core(model: PreTrainedModel, fast: bool = True) -> nn.Module:
    """The fastest core that runs ``model``: :class:`textrl.engine.Engine` for the architectures it describes
    (GPT-2, Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE), else :class:`HFCore` (anything else, including
    models whose modules the engine does not know, such as LoRA-wrapped or quantised layers; ``reason`` says
    why). :func:`core_name` says which one a policy runs."""
    from textrl.engine import Engine

    why = Engine.why_not(model) if fast else "fast cores off"
    if why is None:
        return Engine(model)
    core = HFCore(model)
    core.reason = why
    return core


def core_name(core: nn.Module) -> str:
    """What runs a model: ``"engine (llama)"``, ... or ``"HF forward (why)"``.

    >>> core_name(HFCore.__new__(HFCore))
    'HF forward'
    """
    if isinstance(core, HFCore):
        reason = getattr(core, "reason", None)
        return f"HF forward ({reason})" if reason else "HF forward"
    return f"engine ({core.arch})"
