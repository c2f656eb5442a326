"""Rollout replay's parts: the record of a rollout and the linear layer that replays it.

A training rollout keeps every linear layer's output (and the logits) in a :class:`Record`, written by the
very matmuls that sample the tokens (:func:`textrl.ops.base_into` writes into its columns). The update's
first forward over the same sequences under unchanged weights takes those outputs instead of recomputing
them (:func:`replayed`): the forward skips the matmul and the backward is the linear layer's own.
:class:`textrl.engine.Engine` decides when a record is valid; this module holds the mechanics.
"""

from __future__ import annotations

import torch
from torch import nn

from textrl import kernels
from textrl.arch import Spec
from textrl.ops import base_layer, is_input_major, lora_delta


def width(module: nn.Module) -> int:
    """Output features of an ``nn.Linear``, a GPT-2 ``Conv1D`` or a peft LoRA layer over either."""
    module = base_layer(module)
    return module.out_features if isinstance(module, nn.Linear) else module.weight.shape[1]


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
            w = weight if ctx.transposed else weight.t()
            dx = (kernels.onednn_mm(g, w) if kernels.wants_onednn(g, w) else g @ w).view(x.shape)
        if ctx.needs_input_grad[1]:
            if not ctx.transposed:
                dw = x2.t() @ g
            elif is_input_major(weight):  # the gradient in the weight's own layout
                dw = (x2.t() @ g).t()
            else:
                dw = g.t() @ x2
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0)
        return dx, dw, db, None, None


def replayed(x: torch.Tensor, module: nn.Module, recorded: torch.Tensor) -> torch.Tensor:
    """``module(x)`` whose base output is ``recorded`` (a rollout's record): the forward skips the base
    matmul, the backward is the linear layer's own (:class:`_Replayed`); a LoRA layer's low-rank term is
    computed with autograd on top (the adapters are small, and they are what trains)."""
    base = base_layer(module)
    y = _Replayed.apply(x, base.weight, base.bias, recorded, isinstance(base, nn.Linear))
    delta = lora_delta(x.reshape(-1, x.shape[-1]), module)
    return y if delta is None else y + delta.view(y.shape)


class Record:
    """A recorded rollout: the fed tokens and every linear layer's output (and the logits), per position.

    Buffers are (B, max_len - 1, width), one per linear module of the model (keyed by the module): a decode
    step writes its matmul output straight into column t, and the update's sequences (all but the last
    token) are then whole buffers. ``logits`` is (B, max_len - P, V), from position P - 1 on. Reused by the
    next rollout of the same shape.
    """

    def __init__(self, spec: Spec, B: int, P: int, max_len: int, like: torch.Tensor):
        self.key = (B, P, max_len, like.dtype, like.device)
        self.ids = torch.empty(B, max_len, dtype=torch.long, device=like.device)
        self.capacity = max_len - 1  # positions recorded; the last one never feeds an update
        self.in_use = False  # an open Session writes into it
        modules = [m for layer in spec.layers for m in layer.linears()]
        self.out = {m: like.new_empty(B, self.capacity, width(m)) for m in modules}
        self.logits = like.new_empty(B, max_len - P, spec.head.weight.shape[0])
        self.P = P
        self.reset(None)

    def reset(self, version) -> None:
        self.len, self.version = 0, version
        self.prompt_mask: torch.Tensor | None = None
