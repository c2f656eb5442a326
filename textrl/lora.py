"""LoRA adapters with peft: attach them to a model, load an adapter folder, and name the base model.

peft's format is the source of truth: a policy with adapters is a ``peft.PeftModel`` whose
``save_pretrained`` writes ``adapter_config.json`` and ``adapter_model.safetensors``, which
``peft.PeftModel.from_pretrained(base, folder)`` loads. The engine runs peft's LoRA layers on its fast path
(:func:`textrl.ops.lora_delta`); the base weights stay frozen, and with fresh adapters the reference model
is the base with the adapters switched off (no second copy of the weights).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

ALL_LINEAR = "all-linear"
"""``lora_targets`` value for every linear layer of the blocks (peft's shorthand; the LM head excluded)."""


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is a peft model (adapters attached)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def attach(model: nn.Module, rank: int, alpha: float, targets: list[str], layers: list[int] | None = None):
    """``model`` with fresh LoRA adapters (peft ``LoraConfig``: ``r=rank``, ``lora_alpha=alpha``, no dropout)
    on the modules named by ``targets`` (names such as ``q_proj``, or ``"all-linear"``), in the blocks
    ``layers`` (all when empty). The base weights are frozen; only the adapters train.

    Raises:
        ValueError: a rank or alpha <= 0, or target names that match no module (the message lists the
            linear layers' names that exist).
    """
    import peft

    if rank <= 0:
        raise ValueError(f"lora_rank must be > 0 for adapters, got {rank}")
    if alpha <= 0:
        raise ValueError(f"lora_alpha must be > 0, got {alpha}")
    if not targets:
        raise ValueError(f"lora_targets names no module; use {ALL_LINEAR!r} or names such as q_proj")
    target = ALL_LINEAR if list(targets) == [ALL_LINEAR] else list(targets)
    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())  # GPT-2 stores weights (in, out)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=target,
        layers_to_transform=layers or None,
        fan_in_fan_out=conv1d,
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise ValueError(
            f"lora_targets {target!r} match no module of this model ({e}); its linear layers are named: "
            f"{', '.join(names)} (or use {ALL_LINEAR!r})"
        ) from None


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def base_identity(model: nn.Module) -> dict[str, str]:
    """The base model under the adapters: its path and a SHA-256 of its config and weights (what a
    checkpoint of a LoRA run records, so that it is never resumed on another base)."""
    base = model.get_base_model() if is_peft(model) else model
    digest = hashlib.sha256(json.dumps(base.config.to_dict(), sort_keys=True, default=str).encode())
    for name, p in sorted(base.state_dict().items()):
        if "lora_" in name:
            continue
        digest.update(name.replace(".base_layer", "").encode())
        digest.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {"base": str(getattr(base.config, "_name_or_path", "") or ""), "base_sha256": digest.hexdigest()}


def adapter_base(folder: Path) -> str:
    """The base model an adapter folder was made for (``base_model_name_or_path`` in its config)."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder}/adapter_config.json names no base model (base_model_name_or_path)")
    return base
