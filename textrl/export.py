"""``textrl export``: a run's or checkpoint's policy as a plain Hugging Face model folder.

The folder holds what ``save_pretrained`` writes for the model and tokenizer (safetensors weights, configs,
tokenizer files) and a model card naming where it came from, so transformers loads it without textrl.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from transformers import PreTrainedModel

from textrl.lm import LMNotFoundError, load_lm, quiet_transformers, resolve_lm_path
from textrl.lora import is_peft


def export_lm(
    source: str | os.PathLike, out: str | os.PathLike, *, force: bool = False, merge: bool = False
) -> tuple[Path, list[Path]]:
    """Write the policy of a run or checkpoint (or any local model) as a plain Hugging Face model folder.

    ``out`` gets the weights (safetensors), ``config.json``, ``generation_config.json``, the tokenizer
    files and a model card ``README.md`` naming where it came from, so
    ``transformers.AutoModelForCausalLM.from_pretrained(out)`` and ``AutoTokenizer.from_pretrained(out)``
    load it without textrl.

    Args:
        source: a run folder (its newest complete checkpoint), a checkpoint, or a local model folder.
        out: the folder to write; it must be absent or empty unless ``force``.
        force: write into a non-empty ``out``, replacing its files (weights of an earlier export in it are
            removed first, so no stale shard is left next to the new ones).
        merge: for a policy with LoRA adapters, merge them into the base weights and write a plain model
            folder; without it such a policy is written as peft's adapter folder (``adapter_config.json``,
            ``adapter_model.safetensors``) for ``peft.PeftModel.from_pretrained(base, out)``.

    Raises:
        ValueError: ``merge`` for a policy without adapters, or a bad ``out``.

    Returns:
        ``(model folder read, files written)``.
    """
    where = resolve_lm_path(source)
    if not isinstance(where, Path):
        raise LMNotFoundError(f"{source} is not a local run, checkpoint or model folder")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; pass a folder to export to")
    if out.resolve() == where.resolve():
        raise ValueError(f"{out} is the folder being exported; pass another one")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ValueError(f"{out} is not empty; pass --force (force=True) to overwrite its files")
        for pattern in ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json"):
            for stale in out.glob(pattern):
                stale.unlink()
    model, tokenizer = load_lm(where)
    if merge:
        if not is_peft(model):
            raise ValueError(f"--merge: {source} has no LoRA adapters to merge (it is a full model); export it without")
        model = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    with quiet_transformers():
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(_model_card(where, model, out), encoding="utf-8")
    written = sorted(p for p in out.iterdir() if p.is_file() and before.get(p) != p.stat().st_mtime_ns)
    return where, written


def _model_card(where: Path, model: PreTrainedModel, out: Path) -> str:
    """A short README for an exported model: its source and, for a checkpoint, the run's settings."""
    checkpoint = where.parent if where.name == "policy" and (where.parent / "state.json").is_file() else None
    state: dict = {}
    if checkpoint is not None:
        with contextlib.suppress(OSError, ValueError):  # the card is a courtesy: a bad state.json leaves it short
            loaded = json.loads((checkpoint / "state.json").read_text())
            state = loaded if isinstance(loaded, dict) else {}
    rows = [("exported from", str(checkpoint or where)), ("architecture", type(model).__name__)]
    rows += [("parameters", f"{sum(p.numel() for p in model.parameters()):,}")]
    for key, label in [("agent", "agent"), ("env_id", "env"), ("num_timesteps", "trained tokens"),
                       ("lm", "starting LM"), ("run_dir", "run")]:  # fmt: skip
        if state.get(key) is not None:
            rows.append((label, str(state[key])))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (
        "# textrl policy\n\n"
        "A causal language model trained with reinforcement learning by textrl, exported as a plain "
        "Hugging Face model folder.\n\n"
        f"| | |\n|-|-|\n{table}\n\n" + (_adapter_usage(model, out) if is_peft(model) else _plain_usage(out))
    )


def _plain_usage(out: Path) -> str:
    return (
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "```\n"
    )


def _adapter_usage(model, out: Path) -> str:
    base = model.get_base_model().config._name_or_path
    return (
        "LoRA adapters in peft's format, for the base model below.\n\n"
        "```python\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {str(out)!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "```\n"
    )
