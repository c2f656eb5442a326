"""Decode state: the static KV cache and the session of one rollout in progress on the engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from textrl.replay import Record

if TYPE_CHECKING:
    from textrl.engine import Engine


class KVCache:
    """A static KV cache: per layer, keys and values (B, H, max_len, D), with the per-step views a decode step
    needs, made once.

    Python-level indexing costs a few microseconds per view, and a decode step at this model size is
    ~100 small ops: the per-position column views (written by step t) and prefix views (read by step t)
    are built once per shape and the cache is reused by the next rollout of the same shape.
    """

    def __init__(self, L: int, B: int, H: int, max_len: int, D: int, like: torch.Tensor):
        self.key = (L, B, H, max_len, D, like.dtype, like.device)
        self.in_use = False  # an open decode session holds it
        self.max_len = max_len
        # one tensor per layer, not views of one (L, ...) tensor: a compiled static step then writes each in place
        # (an in-place write to a view of a compiled graph's input becomes a copy of the whole input)
        self.k = [torch.zeros(B, H, max_len, D, dtype=like.dtype, device=like.device) for _ in range(L)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.keymask = torch.zeros(B, 1, 1, max_len, dtype=torch.bool, device=like.device)
        layers = range(L)
        self.k_col = [[self.k[i][:, :, t] for t in range(max_len)] for i in layers]  # (B, H, D)
        self.v_col = [[self.v[i][:, :, t] for t in range(max_len)] for i in layers]
        self.k_upto = [[self.k[i][:, :, : t + 1] for t in range(max_len)] for i in layers]  # (B, H, t+1, D)
        self.v_upto = [[self.v[i][:, :, : t + 1] for t in range(max_len)] for i in layers]
        self.mask_col = [self.keymask[:, 0, 0, t] for t in range(max_len)]  # (B,)
        self.mask_upto = [self.keymask[..., : t + 1] for t in range(max_len)]  # (B, 1, 1, t+1)


class Session:
    """One rollout in progress on an :class:`Engine` (made by :meth:`Engine.start`): its KV cache, each
    row's position, the length so far and the record it writes (replay); ``logits`` and ``hidden`` are the
    latest step's outputs. The decode state lives here, not in the engine, so sessions are independent:
    the engine lends its cache and record buffers to one open session at a time and allocates fresh ones
    for another.
    """

    def __init__(self, engine: Engine, cache: KVCache, record: Record | None, pos: torch.Tensor, length: int):
        self.engine, self.cache, self.record = engine, cache, record
        self.pos = pos  # (B,) position of each row's latest token
        self.length = length  # cache columns filled
        self.logits: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None
        self.adapters: dict = {}  # LoRA layers' folded adapters for this session (textrl.ops.folded_adapters)
        self.fused: dict | bool | None = None  # the fused step's plans (Engine._fused_plan); None: not made yet
        cache.in_use = True
        if record is not None:
            record.in_use = True

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one token per row (B,): the next ``(logits (B, V), hidden (B, E))``."""
        if self.cache is None:
            raise RuntimeError("this decode session is closed; start a new one")
        self.logits, self.hidden = self.engine._step(self, tokens)
        return self.logits, self.hidden

    def close(self) -> None:
        """End the rollout: the cache (and the record, valid until the weights change) go back to the engine
        for the next session of the same shape. Closing twice is harmless."""
        if self.cache is not None:
            self.cache.in_use = False
            if self.record is not None:
                self.record.in_use = False
            self.cache = self.record = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
