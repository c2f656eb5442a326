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
to :class:`HFCore` (any HF causal LM through its own forward with a ``DynamicCache``). The engine's parts
live beside it: :mod:`textrl.ops` (blocks' functions), :mod:`textrl.replay` (rollout replay),
:mod:`textrl.session` (the static KV cache and the decode session).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import PreTrainedModel


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
        inner = model.get_base_model() if hasattr(model, "peft_config") else model  # a peft model passes it on
        params = inspect.signature(inner.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.checkpoint_blocks = False
        """Activation checkpointing in :meth:`forward` under autograd, through the model's own (transformers'
        per-layer ``torch.utils.checkpoint``, non-reentrant), as :attr:`textrl.engine.Engine.checkpoint_blocks`."""
        self._checkpointing: list[nn.Module] | None = None  # the layers transformers checkpoints, once enabled

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
        layers = self.checkpoint_layers() if self.checkpoint_blocks and torch.is_grad_enabled() else []
        # transformers checkpoints a layer only in training mode; the policy keeps every module in eval mode
        # (no dropout), so the flag is raised on the checkpointed layers alone, and only for this call
        for layer in layers:
            layer.training = True
        try:
            logits, hidden, _ = self._run(ids, mask.long(), positions_from_mask(mask), keep=ids.shape[1] - start)
        finally:
            for layer in layers:
                layer.training = False
        return logits, hidden

    def checkpoint_layers(self) -> list[nn.Module]:
        """The model's layers that transformers checkpoints, with checkpointing switched on (the first time)."""
        if self._checkpointing is None:
            inner = self.model.get_base_model() if hasattr(self.model, "peft_config") else self.model
            if not getattr(inner, "supports_gradient_checkpointing", False):
                raise ValueError(
                    f"activation checkpointing: {type(inner).__name__} does not support it in transformers "
                    "(supports_gradient_checkpointing is False); turn activation_checkpointing off"
                )
            enable = getattr(inner, "activation_checkpointing_enable", None) or inner.gradient_checkpointing_enable
            enable({"use_reentrant": False})
            self._checkpointing = [m for m in inner.modules() if getattr(m, "gradient_checkpointing", False) is True]
        return self._checkpointing


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
