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
"""

from __future__ import annotations

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


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: 0 at each row's first real token (pads get 0)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, S)


class HFCore(nn.Module):
    """Any HF causal LM through its own forward (generic; used for architectures without a fast core)."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
        self._cache = None

    def _run(self, ids, mask, positions, cache=None, keep: int = 0):
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=cache is not None,
            output_hidden_states=True,
            logits_to_keep=keep,  # 0 = all positions
        )
        hidden = out.hidden_states[-1]
        return out.logits, hidden[:, -keep:] if keep else hidden, out.past_key_values

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, max_len: int):
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

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, start: int = 0):
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
        self._k: torch.Tensor | None = None

    # --- pieces ----------------------------------------------------------------------------------------

    def _qkv(self, block, x):  # x (B, S, E) -> q, k, v each (B, H, S, D)
        B, S, E = x.shape
        h = F.layer_norm(x, (E,), block.ln_1.weight, block.ln_1.bias, self.eps)
        qkv = torch.addmm(block.attn.c_attn.bias, h.view(-1, E), block.attn.c_attn.weight)  # (B*S, 3E)
        qkv = qkv.view(B, S, 3, self.n_head, E // self.n_head).permute(2, 0, 3, 1, 4)  # (3, B, H, S, D)
        return qkv[0], qkv[1], qkv[2]

    def _finish_block(self, block, x, att):  # att (B, H, S, D)
        B, H, S, D = att.shape
        att = att.transpose(1, 2).reshape(B * S, H * D)
        x = x + torch.addmm(block.attn.c_proj.bias, att, block.attn.c_proj.weight).view(B, S, H * D)
        h = F.layer_norm(x, (H * D,), block.ln_2.weight, block.ln_2.bias, self.eps).view(B * S, H * D)
        h = gelu(torch.addmm(block.mlp.c_fc.bias, h, block.mlp.c_fc.weight), self.approximate)
        return x + torch.addmm(block.mlp.c_proj.bias, h, block.mlp.c_proj.weight).view(B, S, H * D)

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

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, start: int = 0):
        x = self.wte(ids) + self.wpe(positions_from_mask(mask))  # (B, S, E)
        attn_mask = self._full_mask(mask)
        for block in self.blocks:
            q, k, v = self._qkv(block, x)
            x = self._finish_block(block, x, F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))
        return self._head(x[:, start:])  # (B, S - start, V), (B, S - start, E)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, max_len: int):
        B, P = ids.shape
        E, H = self.wte.embedding_dim, self.n_head
        if max_len > self.wpe.num_embeddings:
            raise ValueError(f"{max_len} positions exceed the model's context of {self.wpe.num_embeddings}")
        shape = (len(self.blocks), B, H, max_len, E // H)
        self._k = torch.empty(shape, dtype=self.wte.weight.dtype, device=ids.device)
        self._v = torch.empty_like(self._k)
        self._keymask = torch.zeros(B, 1, 1, max_len, dtype=torch.bool, device=ids.device)
        self._keymask[:, 0, 0, :P] = mask.bool()
        self._len = P
        self._pos = positions_from_mask(mask)[:, -1].clone()  # (B,)
        x = self.wte(ids) + self.wpe(positions_from_mask(mask))
        attn_mask = self._full_mask(mask)
        for i, block in enumerate(self.blocks):
            q, k, v = self._qkv(block, x)
            self._k[i, :, :, :P], self._v[i, :, :, :P] = k, v
            x = self._finish_block(block, x, F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))
        logits, hidden = self._head(x[:, -1:])
        return logits[:, 0], hidden[:, 0]

    def decode(self, tokens: torch.Tensor):
        t = self._len
        if t >= self._k.shape[3]:
            raise RuntimeError(f"KV cache full ({t} positions); prefill with a larger max_len")
        self._pos += 1
        self._keymask[:, 0, 0, t] = True
        x = self.wte(tokens[:, None]) + self.wpe(self._pos[:, None])  # (B, 1, E)
        keymask = self._keymask[..., : t + 1]
        for i, block in enumerate(self.blocks):
            q, k, v = self._qkv(block, x)
            self._k[i, :, :, t : t + 1], self._v[i, :, :, t : t + 1] = k, v
            att = F.scaled_dot_product_attention(q, self._k[i, :, :, : t + 1], self._v[i, :, :, : t + 1], keymask)
            x = self._finish_block(block, x, att)
        self._len = t + 1
        logits, hidden = self._head(x)
        return logits[:, 0], hidden[:, 0]

    def release(self) -> None:
        self._k = self._v = None


def make_core(model: PreTrainedModel, fast: bool = True) -> nn.Module:
    """The fastest core that supports ``model``: :class:`GPT2Core` for GPT-2, else :class:`HFCore`."""
    return GPT2Core(model) if fast and GPT2Core.supports(model) else HFCore(model)
