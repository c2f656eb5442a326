"""Architecture specs: which module of a Hugging Face causal LM plays which role, for :mod:`textrl.engine`.

:func:`describe` reads a model's layout (GPT-2, Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE) into a
:class:`Spec` of :class:`Layer` roles, and refuses anything it does not know exactly with
:class:`Unsupported`, naming the part: a module that is not exactly the class a role needs (a quantised
linear, a wrapper it does not know) must never run as plain weights. A peft LoRA layer (plain LoRA over
the class a role needs) is known: it runs as base output plus the adapters' low-rank term.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn
from transformers import PreTrainedModel

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe")
"""``config.model_type`` values the engine runs."""

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
"""Rotary variants whose angles depend on the position alone (a precomputed table is exact)."""

ACTIVATIONS = {"silu": None, "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
"""Supported ``hidden_act``/``activation_function`` -> GELU approximation (None: SiLU)."""


class Moe(NamedTuple):
    """A sparse mixture-of-experts MLP: a softmax router picks ``top_k`` experts per token (SwiGLU experts
    with their weights stacked in 3-D tensors), optionally renormalising the chosen probabilities, plus an
    optional always-on shared expert scaled by a sigmoid gate (Qwen2-MoE)."""

    router: nn.Module  # .weight (n_experts, E)
    experts: nn.Module  # .gate_up_proj (n_experts, 2 I, E), .down_proj (n_experts, E, I)
    top_k: int
    normalize: bool
    shared_gate: nn.Module | None  # nn.Linear(E, 1)
    shared_proj: tuple[nn.Module, nn.Module, nn.Module] | None  # the shared expert's gate, up, down


ROUTERS = {"MixtralTopKRouter": lambda router: True, "Qwen2MoeTopKRouter": lambda router: router.norm_topk_prob}
"""Router classes the engine runs -> whether their top-k probabilities are renormalised."""
EXPERTS = ("MixtralExperts", "Qwen2MoeExperts")
"""Expert classes the engine runs (stacked SwiGLU experts, no biases)."""


class Layer(NamedTuple):
    """The modules of one Transformer block, by role (None: the architecture has no such part)."""

    norm1: nn.Module
    qkv: nn.Module | None  # fused (GPT-2 Conv1D)
    q: nn.Module | None
    k: nn.Module | None
    v: nn.Module | None
    q_norm: nn.Module | None  # per-head RMSNorm of queries and keys (Qwen3)
    k_norm: nn.Module | None
    out: nn.Module
    norm2: nn.Module
    gate: nn.Module | None  # SwiGLU's gate
    up: nn.Module | None  # None: a mixture of experts instead
    down: nn.Module | None
    window: int | None  # sliding-window attention: a query sees this many positions, itself included
    moe: Moe | None = None

    def linears(self) -> list[nn.Module]:
        """The block's linear layers (what a rollout record keeps the outputs of; a mixture's routed experts
        are computed, not recorded)."""
        parts = [self.qkv, self.q, self.k, self.v, self.out, self.gate, self.up, self.down]
        if self.moe is not None and self.moe.shared_proj is not None:
            parts += [*self.moe.shared_proj, self.moe.shared_gate]
        return [m for m in parts if m is not None]

    def groups(self) -> list[tuple[nn.Module, ...]]:
        """The linear layers that read the same input, in the order the block uses their outputs: (q, k, v)
        where they are separate, (gate, up) for SwiGLU (a decode step computes each group in one call)."""
        out = []
        if self.q is not None:
            out.append((self.q, self.k, self.v))
        if self.gate is not None and self.up is not None:
            out.append((self.gate, self.up))
        return out


class Spec(NamedTuple):
    """A model described for the engine."""

    arch: str
    embed: nn.Embedding
    positions: nn.Embedding | None  # learned positions (GPT-2); None: rotary
    rotary: nn.Module | None
    layers: list[Layer]
    norm: nn.Module
    head: nn.Module
    n_head: int
    n_kv_head: int
    head_dim: int
    act: str | None  # GELU approximation, or None for SiLU
    context: int


class Unsupported(ValueError):
    """The model has something the engine does not run; the message names it."""


def _exactly(module: nn.Module | None, cls: type, name: str) -> nn.Module:
    if type(module) is not cls:
        found = "missing" if module is None else f"a {type(module).__name__}"
        what = f"torch.nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else f"transformers {cls.__name__}"
        raise Unsupported(f"{name} is {found}; the engine runs a plain {what} there")
    return module


def _linear(module: nn.Module | None, cls: type, name: str) -> nn.Module:
    """A linear role: exactly ``cls``, or a peft LoRA layer (plain LoRA: no DoRA or other variant) over
    exactly ``cls``, which the engine runs as base output plus the adapters' low-rank term."""
    if module is not None and hasattr(module, "lora_A") and hasattr(module, "base_layer"):
        _exactly(module.base_layer, cls, f"{name}.base_layer")
        if getattr(module, "lora_variant", None) or any(getattr(module, "use_dora", {}).values()):
            raise Unsupported(f"{name} is a LoRA variant (e.g. DoRA); the engine runs plain LoRA layers")
        if any(
            type(m) is not nn.Linear or m.bias is not None for m in (*module.lora_A.values(), *module.lora_B.values())
        ):
            raise Unsupported(f"{name} has LoRA matrices that are not bias-free torch.nn.Linear layers")
        return module
    return _exactly(module, cls, name)


def _rms_norm(module: nn.Module | None, name: str) -> nn.Module:
    if module is None or not type(module).__name__.endswith("RMSNorm"):
        raise Unsupported(f"{name} is a {type(module).__name__}, not an RMSNorm")
    params = dict(module.named_parameters())
    if set(params) != {"weight"} or not hasattr(module, "variance_epsilon") or list(module.children()):
        raise Unsupported(f"{name} ({type(module).__name__}) is not a plain RMSNorm (weight * x / rms(x))")
    return module


def describe(model: PreTrainedModel) -> Spec:
    """The engine's description of ``model`` (a peft model is described through its base model, whose
    linear layers carry the adapters); :class:`Unsupported` names what it cannot run."""
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    c = model.config
    arch = c.model_type
    if arch not in FAMILIES:
        raise Unsupported(f"model type {arch!r} is not one the engine runs ({', '.join(FAMILIES)})")
    if arch == "gpt2":
        return _describe_gpt2(model)
    return _describe_llama(model)


def _describe_gpt2(model: PreTrainedModel) -> Spec:
    from transformers.pytorch_utils import Conv1D

    c, tr = model.config, model.transformer
    if c.activation_function not in ACTIVATIONS or ACTIVATIONS[c.activation_function] is None:
        raise Unsupported(f"GPT-2 activation {c.activation_function!r} is not supported")
    if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx or getattr(c, "add_cross_attention", False):
        raise Unsupported("GPT-2 with non-standard attention scaling or cross-attention is not supported")
    layers = []
    for i, block in enumerate(tr.h):
        p = f"transformer.h.{i}"
        layers.append(
            Layer(
                norm1=_exactly(block.ln_1, nn.LayerNorm, f"{p}.ln_1"),
                qkv=_linear(block.attn.c_attn, Conv1D, f"{p}.attn.c_attn"),
                q=None,
                k=None,
                v=None,
                q_norm=None,
                k_norm=None,
                out=_linear(block.attn.c_proj, Conv1D, f"{p}.attn.c_proj"),
                norm2=_exactly(block.ln_2, nn.LayerNorm, f"{p}.ln_2"),
                gate=None,
                up=_linear(block.mlp.c_fc, Conv1D, f"{p}.mlp.c_fc"),
                down=_linear(block.mlp.c_proj, Conv1D, f"{p}.mlp.c_proj"),
                window=None,
            )
        )
    return Spec(
        arch="gpt2",
        embed=_exactly(tr.wte, nn.Embedding, "transformer.wte"),
        positions=_exactly(tr.wpe, nn.Embedding, "transformer.wpe"),
        rotary=None,
        layers=layers,
        norm=_exactly(tr.ln_f, nn.LayerNorm, "transformer.ln_f"),
        head=_head(model),
        n_head=c.n_head,
        n_kv_head=c.n_head,
        head_dim=c.n_embd // c.n_head,
        act=ACTIVATIONS[c.activation_function],
        context=c.n_positions,
    )


def _describe_llama(model: PreTrainedModel) -> Spec:
    c, base = model.config, model.model
    if getattr(c, "hidden_act", None) != "silu":
        raise Unsupported(f"activation {getattr(c, 'hidden_act', None)!r} is not supported (SwiGLU needs silu)")
    if getattr(c, "pretraining_tp", 1) != 1:
        raise Unsupported("pretraining_tp > 1 is not supported")
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise Unsupported(f"rotary type {rope_type!r} depends on the sequence length; supported: {ROPE_TYPES}")
    if getattr(c, "partial_rotary_factor", 1.0) != 1.0:
        raise Unsupported("partial rotary embeddings are not supported")
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise Unsupported("model.rotary_emb is missing or not a rotary embedding")
    n_head = c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or n_head
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_head
    window_size = getattr(c, "sliding_window", None)
    # Mistral has no layer types: a sliding window, when set, applies to every layer
    layer_types = getattr(c, "layer_types", None) or (
        ["sliding_attention" if window_size else "full_attention"] * c.num_hidden_layers
    )
    layers = []
    for i, block in enumerate(base.layers):
        p, attn, mlp = f"model.layers.{i}", block.self_attn, block.mlp
        kind = layer_types[i]
        if kind not in ("full_attention", "sliding_attention"):
            raise Unsupported(f"{p} has attention type {kind!r}")
        if kind == "sliding_attention" and not window_size:
            raise Unsupported(f"{p} is a sliding-window layer but the config sets no sliding_window")
        window = window_size if kind == "sliding_attention" else None
        has_qk_norm = hasattr(attn, "q_norm")
        extra = set(dict(block.named_children())) - {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
        if extra:
            raise Unsupported(f"{p} has parts the engine does not know: {sorted(extra)}")
        sparse = type(mlp).__name__.endswith("SparseMoeBlock")
        layers.append(
            Layer(
                norm1=_rms_norm(block.input_layernorm, f"{p}.input_layernorm"),
                qkv=None,
                q=_linear(attn.q_proj, nn.Linear, f"{p}.self_attn.q_proj"),
                k=_linear(attn.k_proj, nn.Linear, f"{p}.self_attn.k_proj"),
                v=_linear(attn.v_proj, nn.Linear, f"{p}.self_attn.v_proj"),
                q_norm=_rms_norm(attn.q_norm, f"{p}.self_attn.q_norm") if has_qk_norm else None,
                k_norm=_rms_norm(attn.k_norm, f"{p}.self_attn.k_norm") if has_qk_norm else None,
                out=_linear(attn.o_proj, nn.Linear, f"{p}.self_attn.o_proj"),
                norm2=_rms_norm(block.post_attention_layernorm, f"{p}.post_attention_layernorm"),
                gate=None if sparse else _linear(getattr(mlp, "gate_proj", None), nn.Linear, f"{p}.mlp.gate_proj"),
                up=None if sparse else _linear(getattr(mlp, "up_proj", None), nn.Linear, f"{p}.mlp.up_proj"),
                down=None if sparse else _linear(getattr(mlp, "down_proj", None), nn.Linear, f"{p}.mlp.down_proj"),
                window=window,
                moe=_describe_moe(mlp, f"{p}.mlp") if sparse else None,
            )
        )
    return Spec(
        arch=c.model_type,
        embed=_exactly(base.embed_tokens, nn.Embedding, "model.embed_tokens"),
        positions=None,
        rotary=rotary,
        layers=layers,
        norm=_rms_norm(base.norm, "model.norm"),
        head=_head(model),
        n_head=n_head,
        n_kv_head=n_kv,
        head_dim=head_dim,
        act=None,
        context=c.max_position_embeddings,
    )


def _describe_moe(block: nn.Module, name: str) -> Moe:
    """A sparse MoE block of a known layout (Mixtral, Qwen2-MoE), else :class:`Unsupported`."""
    router, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    if type(router).__name__ not in ROUTERS or set(dict(router.named_parameters())) != {"weight"}:
        raise Unsupported(f"{name}.gate is a {type(router).__name__}; the engine runs {sorted(ROUTERS)}")
    if type(experts).__name__ not in EXPERTS or set(dict(experts.named_parameters())) != {"gate_up_proj", "down_proj"}:
        raise Unsupported(f"{name}.experts is a {type(experts).__name__}; the engine runs {list(EXPERTS)}")
    if type(getattr(experts, "act_fn", None)).__name__ != "SiLUActivation":
        raise Unsupported(f"{name}.experts has activation {type(getattr(experts, 'act_fn', None)).__name__}, not SiLU")
    unknown = sorted(set(dict(block.named_children())) - {"gate", "experts", "shared_expert", "shared_expert_gate"})
    if unknown:
        raise Unsupported(f"{name} has parts the engine does not know: {unknown}")
    shared = getattr(block, "shared_expert", None)
    shared_proj = shared_gate = None
    if shared is not None:
        shared_proj = tuple(
            _exactly(getattr(shared, part, None), nn.Linear, f"{name}.shared_expert.{part}")
            for part in ("gate_proj", "up_proj", "down_proj")
        )
        shared_gate = _exactly(getattr(block, "shared_expert_gate", None), nn.Linear, f"{name}.shared_expert_gate")
    return Moe(router, experts, router.top_k, bool(ROUTERS[type(router).__name__](router)), shared_gate, shared_proj)


def _head(model: PreTrainedModel) -> nn.Module:
    head = _exactly(model.get_output_embeddings(), nn.Linear, "lm_head")
    if head.bias is not None:
        raise Unsupported("an LM head with a bias is not supported")
    return head
