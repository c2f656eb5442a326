"""The engine's building blocks as plain functions on HF modules' own parameters: norms, linear layers,
rotary embedding, the fast GELU, a sparse mixture of experts, and the CPU weight layout (with the Adam step
that keeps it fast)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from textrl import kernels
from textrl.arch import Moe, Spec

_GELU_K = 2 * math.sqrt(2 / math.pi)


class _TanhGELU(torch.autograd.Function):
    """GPT-2's tanh GELU written as ``x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))``.

    The same function (``0.5 (1 + tanh z) = sigmoid(2 z)``; it differs from ``F.gelu(approximate="tanh")``
    by float rounding, at most ~5e-7), but torch's CPU ``tanh`` kernel is several times slower than its
    ``sigmoid``, and the tanh GELU runs on every decode step of a GPT-2 MLP. The backward is torch's own
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
    """GELU (``approximate``: ``"tanh"`` or ``"none"``); the tanh one through :class:`_TanhGELU` (without autograd,
    textrl's row kernel :func:`textrl.kernels.gelu_tanh` where it applies)."""
    if approximate != "tanh":
        return F.gelu(x, approximate=approximate)
    if torch.is_grad_enabled() and x.requires_grad:
        return _TanhGELU.apply(x)
    if kernels.wants_rows(x):  # one pass where torch's ops make five
        return kernels.gelu_tanh(x)
    return _tanh_gelu(x)


class _RMSNorm(torch.autograd.Function):
    """RMSNorm on textrl's row kernels, forward (:func:`textrl.kernels.rms_norm`) and backward
    (:func:`textrl.kernels.rms_norm_backward`): one pass each way where torch's autograd runs six elementwise
    ops forward and their backwards."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return kernels.rms_norm(x, weight, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dx, dweight = kernels.rms_norm_backward(grad, x, weight, ctx.eps)
        return dx, dweight if ctx.needs_input_grad[1] else None, None


class _SiLUMul(torch.autograd.Function):
    """SwiGLU's product ``F.silu(gate) * up`` on textrl's row kernels, forward (:func:`textrl.kernels.silu_mul`) and
    backward (:func:`textrl.kernels.silu_mul_backward`): one pass each way where torch's autograd runs a SiLU,
    a product and three backward ops."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return kernels.silu_mul(gate, up)

    @staticmethod
    def backward(ctx, grad):
        return kernels.silu_mul_backward(grad, *ctx.saved_tensors)


def norm(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A LayerNorm or RMSNorm module's output for x (..., E); RMSNorm through textrl's row kernels
    (:func:`textrl.kernels.rms_norm`, and under autograd :class:`_RMSNorm`) where they apply."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    if kernels.wants_rows(x, module.weight):
        return kernels.rms_norm(x, module.weight, module.variance_epsilon)
    if kernels.wants_rows(x, module.weight, autograd=True):
        return _RMSNorm.apply(x, module.weight, module.variance_epsilon)
    return F.rms_norm(x, (x.shape[-1],), module.weight, module.variance_epsilon)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up``; in one pass (:func:`textrl.kernels.silu_mul`, and under autograd :class:`_SiLUMul`)
    where textrl's row kernels apply."""
    if kernels.wants_rows(gate, up):
        return kernels.silu_mul(gate, up)
    if kernels.wants_rows(gate, up, autograd=True):
        return _SiLUMul.apply(gate, up)
    return F.silu(gate) * up


def is_lora(module: nn.Module) -> bool:
    """Whether ``module`` is a peft LoRA layer (a ``base_layer`` plus ``lora_A``/``lora_B`` adapters)."""
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def base_layer(module: nn.Module) -> nn.Module:
    """The plain linear layer under a peft LoRA layer (the module itself otherwise)."""
    return module.base_layer if is_lora(module) else module


def active_adapters(module: nn.Module) -> list[str]:
    """The names of a peft LoRA layer's adapters that act now: none for a plain layer, or when the adapters
    are disabled (``disable_adapter()``) or merged into the base weight."""
    if not is_lora(module) or module.disable_adapters or module.merged:
        return []
    return [name for name in module.active_adapters if name in module.lora_A]


def lora_delta(x: torch.Tensor, module: nn.Module) -> torch.Tensor | None:
    """The low-rank term a peft LoRA layer adds to its base output for rows x (N, in): the sum over its
    active adapters of ``scaling * B(A(x))``, as peft computes it; None for a plain layer, or when the
    adapters are disabled (``disable_adapter()``) or merged into the base weight. The models run in eval
    mode, so LoRA dropout is the identity, as in peft's own forward."""
    delta = None
    for name in active_adapters(module):
        d = F.linear(F.linear(x, module.lora_A[name].weight), module.lora_B[name].weight) * module.scaling[name]
        delta = d if delta is None else delta + d
    return delta


def folded_adapters(modules) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """For no-grad decoding: each peft LoRA layer's active adapters as one pair ``(A (r, in), S (out, r))``
    with ``S`` the B matrices times their scaling, side by side (several adapters: their ranks add up), so
    the layer's term is ``(x @ A.T) @ S.T``, one ``mm`` and one ``addmm`` onto the base output. Layers with
    no active adapter are left out. A snapshot: valid until the adapters change (an optimizer step)."""
    folded = {}
    with torch.no_grad():
        for module in modules:
            names = active_adapters(module)
            if names:
                a = torch.cat([module.lora_A[n].weight for n in names])
                s = torch.cat([module.lora_B[n].weight * module.scaling[n] for n in names], dim=1)
                folded[module] = (a, s)
    return folded


def in_out_weight(module: nn.Module) -> torch.Tensor:
    """The base layer's weight as (in, out): an ``nn.Linear``'s (out, in) weight transposed (a view), a GPT-2
    ``Conv1D``'s as it is; ``x @ in_out_weight(m)`` is the layer's matmul."""
    base = base_layer(module)
    return base.weight.t() if isinstance(base, nn.Linear) else base.weight


def base_into(
    x: torch.Tensor, module: nn.Module, out: torch.Tensor | None = None, split: bool | None = None
) -> torch.Tensor:
    """The base layer's output for rows x (N, in) (a LoRA layer's term left out), into ``out`` if given.

    ``split``: through :func:`textrl.kernels.split_mm` (a decode step's few rows on a CPU); None decides by
    :func:`textrl.kernels.wants_split`, a compiled step passes what it decided when it was made.
    """
    w, bias = in_out_weight(module), base_layer(module).bias
    if split is None:
        split = kernels.wants_split(x, w)
    if split:
        return kernels.split_mm(x, w, bias, out)
    if out is None and kernels.wants_onednn(x, w):
        return kernels.onednn_mm(x, w, bias)
    kw = {} if out is None else {"out": out}
    return torch.mm(x, w, **kw) if bias is None else torch.addmm(bias, x, w, **kw)


def base_group_into(
    x: torch.Tensor, modules: tuple[nn.Module, ...], outs: list[torch.Tensor] | None = None, split: bool | None = None
) -> list[torch.Tensor]:
    """The base layers' outputs for rows x (N, in) of a group that reads the same input (q, k and v; gate
    and up), into ``outs`` when given: :func:`base_into` for a group.

    ``split``: in one :func:`textrl.kernels.split_mm_group` call; None decides by
    :func:`textrl.kernels.wants_split` on the whole group. Otherwise one torch matmul per layer (a group too
    small for the kernel has no member large enough either).
    """
    weights = [in_out_weight(m) for m in modules]
    if split is None:
        split = kernels.wants_split(x, *weights)
    if not split:
        outs = outs if outs is not None else [None] * len(modules)
        return [base_into(x, m, out, split=False) for m, out in zip(modules, outs, strict=True)]
    return kernels.split_mm_group(x, weights, [base_layer(m).bias for m in modules], outs)


def linear(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``module(x)`` for an ``nn.Linear`` (weight (out, in)), a GPT-2 ``Conv1D`` (weight (in, out)), or a
    peft LoRA layer over either (base output plus :func:`lora_delta`).

    Always as one 2-D matmul over the flattened rows: on CPU a (B, 1, E) input through ``F.linear`` costs
    about a quarter more than the same rows as (B, E), which is every decode step.
    """
    flat = x.reshape(-1, x.shape[-1])
    y = base_into(flat, module)
    delta = lora_delta(flat, module)
    if delta is not None:
        y = y + delta
    return y.view(*x.shape[:-1], y.shape[-1])


def input_major(spec: Spec, model: nn.Module | None = None) -> int:
    """Store every block ``nn.Linear`` weight, and an LM head not tied to the embeddings, input-major (its
    (in, out) transpose contiguous, the logical (out, in) tensor a strided view of it), in place; returns how
    many were changed. (A tied head stays: its rows are the embedding table's, which lookups gather.)

    With ``model`` given, its other CPU parameters are copied into memory of their own as well (once per
    parameter: a second engine on the same model copies nothing). transformers maps a safetensors file into
    memory and the loaded parameters point into that mapping, which stays resident as long as any of them
    does; once every parameter has its own copy the mapping is released, and the re-strided weights do not
    cost their size twice. And weights in a file's mapping read slowly in a decode step: its kernel walks each
    weight down a strip of columns, a row at a time, and the mapping's pages (the page cache's, 4 KiB) make
    that walk about twice as slow as over the process's own memory (GPT-2's ``Conv1D`` weights, already
    input-major, used to stay in the mapping).

    Values, shapes and the ``Parameter`` objects are unchanged; only the memory order is. On CPU a matmul of a
    few rows (a decode step: B rows) against an (out, in)-contiguous weight runs well below the speed of the
    same product against (in, out)-contiguous memory (GPT-2's ``Conv1D`` layout); with many rows (prefill, the
    update) the two are alike. Gradients arrive in the same layout (autograd's ``mm`` backward and
    :class:`textrl.replay._Replayed` follow the weight's strides), so nothing is transposed per step. Done on
    CPU only: GPU matmul libraries take either order at full speed.
    """
    restrided = set()
    modules = [base_layer(m) for layer in spec.layers for m in layer.linears()]
    if spec.head.weight is not spec.embed.weight:
        modules.append(spec.head)
    for module in modules:
        w = module.weight
        if isinstance(module, nn.Linear) and w.device.type == "cpu" and w.stride() == (w.shape[1], 1):
            with torch.no_grad():
                w.data = w.data.t().contiguous().t()
            restrided.add(id(w))
    if model is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.device.type == "cpu" and not getattr(p, _OWN_MEMORY, False):
                    if id(p) not in restrided:
                        p.data = p.data.clone()
                    setattr(p, _OWN_MEMORY, True)
    return len(restrided)


_OWN_MEMORY = "_textrl_own_memory"  # marks a parameter input_major gave memory of its own


def is_input_major(t: torch.Tensor) -> bool:
    """Whether a 2-D tensor is stored input-major (:func:`input_major`): not contiguous, its transpose is."""
    return t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous()


class InputMajorAdam(torch.optim.Adam):
    """``torch.optim.Adam`` whose step hands input-major weights (:func:`input_major`) to its kernels as the
    contiguous (in, out) tensors they are stored as.

    torch's fused CPU Adam works on contiguous memory: given an (out, in) view of input-major storage (with
    its gradient and moments laid out alike, as autograd and ``zeros_like`` lay them out) it copies all four
    into contiguous scratch and the results back, which more than doubles the step's time. Adam is elementwise,
    so the transposed views get the same numbers (bit for bit when a tensor's size is a multiple of the CPU's
    vector width, as model weights are; otherwise its last few elements take the kernel's scalar path in one
    order and its vector path in the other, a last-bit difference): for the step each such parameter, its
    gradient and its moments are transposed (``.data``, ``.grad`` and the state entries; no copy), and
    transposed back after it, whatever happens. Moments laid out otherwise (a checkpoint's, loaded) are
    relaid like their parameter once; a parameter whose gradient is laid out otherwise is left as it is. The
    saved state (``state_dict``) is unchanged: the moments are in each parameter's own
    shape.
    """

    _MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def _input_major_params(self) -> list[torch.Tensor]:
        """The input-major parameters to hand over transposed (their moments relaid like them first)."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                if not is_input_major(p):
                    continue
                state = self.state.get(p, {})
                for key in self._MOMENTS:  # moments laid out otherwise (loaded from a checkpoint): relaid once
                    if key in state and state[key].stride() != p.stride():
                        state[key] = state[key].t().contiguous().t()
                parts = [p.grad] + [state[k] for k in self._MOMENTS if k in state]
                if all(t is None or t.stride() == p.stride() for t in parts):
                    out.append(p)
        return out

    def _transpose(self, params: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p in params:
                grad = p.grad
                p.grad = None  # the grad setter checks the shape against the parameter's
                p.data = p.data.t()
                if grad is not None:
                    p.grad = grad.t()
                state = self.state.get(p)
                if state:
                    for key in self._MOMENTS:
                        if key in state:
                            state[key] = state[key].t()

    def step(self, closure=None):
        loss = None
        if closure is not None:  # the forward sees the parameters as they are
            with torch.enable_grad():
                loss = closure()
        # torch wraps an optimizer class's step once to run the step hooks; this class's own step is wrapped so,
        # and Adam's, once wrapped for an Adam made elsewhere, must not run them a second time
        adam_step = torch.optim.Adam.step
        if getattr(adam_step, "hooked", False):
            adam_step = adam_step.__wrapped__
        flipped = self._input_major_params()
        self._transpose(flipped)
        try:
            adam_step(self)
        finally:
            self._transpose(flipped)
        return loss


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query position's attention over a KV cache, as ``F.scaled_dot_product_attention(q, k, v,
    attn_mask=mask, enable_gqa=True)`` computes it: q (B, H, 1, D); k, v (B, G, S, D) with G dividing H (grouped
    queries); ``mask`` boolean, broadcastable to (B, 1, 1, S), True where a key is seen (at least one per row).

    Written as broadcast products and sums for the compiled CPU decode step: inductor fuses them into a few
    loops over the cache, where torch's CPU flash-attention kernel, made for many queries, spends most of its
    time per call on set-up when there is one. Computed in fp32; the result in q's dtype.
    """
    B, H, _, D = q.shape
    G = k.shape[1]
    qg = q.reshape(B, G, H // G, 1, D).float()  # each key/value head's group of query heads
    scores = (qg * k[:, :, None].float()).sum(-1) * (1.0 / math.sqrt(D))  # (B, G, H/G, S)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    out = (probs[..., None] * v[:, :, None].float()).sum(-2)  # (B, G, H/G, D)
    return out.reshape(B, H, 1, D).to(q.dtype)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """The sine table :func:`rotate` takes: ``sin`` (.., D) with its first half negated."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as HF applies it, ``x * cos + rotate_half(x) * sin``, with ``rotate_half(x) =
    cat(-x2, x1)``; x (B, h, S, D), cos and ``signed = signed_sin(sin)`` (B, 1, S, D).

    The negation sits in the table: ``cat(x2, x1) * signed`` is ``cat(-x2, x1) * sin`` bit for bit (a sign
    flip is exact), one elementwise kernel fewer per call.
    """
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed


def moe(moe: Moe, h: torch.Tensor, lin, log: list | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """A sparse mixture of experts on h (B, S, E), as the HF block computes it: router softmax, top-k,
    each chosen expert on its tokens weighted by its probability, plus the gated shared expert.

    ``log``: a list that receives ``(probs (N, n_experts), chosen (N, k))`` of the tokens where ``valid``
    (B, S) is true (all when None), for :func:`router_balance_loss`.
    """
    flat = h.reshape(-1, h.shape[-1])  # (N, E)
    probs = F.softmax(F.linear(flat, moe.router.weight), dim=-1, dtype=torch.float)  # (N, n_experts)
    top, chosen = torch.topk(probs, moe.top_k, dim=-1)  # (N, k)
    if log is not None:
        keep = slice(None) if valid is None else valid.reshape(-1).bool()
        log.append((probs[keep], chosen[keep]))
    if moe.normalize:
        top = top / top.sum(dim=-1, keepdim=True)
    top = top.to(flat.dtype)
    out = torch.zeros_like(flat)
    experts = moe.experts
    for e in torch.unique(chosen).tolist():
        rows, slot = torch.where(chosen == e)
        gate, up = F.linear(flat[rows], experts.gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(swiglu(gate, up), experts.down_proj[e]) * top[rows, slot, None]
        out = out.index_add(0, rows, y)
    if moe.shared_proj is not None:
        gate, up, down = moe.shared_proj
        shared = lin(swiglu(lin(h, gate), lin(h, up)), down)
        out = out + (torch.sigmoid(lin(h, moe.shared_gate)) * shared).reshape(out.shape)
    return out.view(h.shape)


def router_balance_loss(log: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Switch Transformer's load-balancing loss over the routing decisions :func:`moe` logged, pooled over
    layers as HF's ``load_balancing_loss_func`` pools them: ``n_experts * sum(f * P)``, with ``f`` the share
    of (token, slot) choices each expert got per top-k slot and ``P`` its mean router probability. It is about
    ``top_k`` when the load is even and grows as the router favours some experts."""
    probs = torch.cat([p for p, _ in log])  # (M, n_experts)
    chosen = torch.cat([c for _, c in log])  # (M, k)
    n_experts = probs.shape[-1]
    share = F.one_hot(chosen, n_experts).float().mean(0)  # (k, n_experts)
    return n_experts * (share * probs.mean(0)).sum()
