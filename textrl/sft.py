"""Supervised fine-tuning (SFT) on demonstrations: teach a causal LM to answer as the examples do.

Each row of a JSONL file is one demonstration, in one of two forms:

- ``{"prompt": ..., "completion": ...}``: the prompt is tokenized as textrl's envs and
  :func:`textrl.lm.generate` tokenize a prompt (special tokens included; an empty prompt is the bos token),
  the completion on its own, and the two id lists are concatenated and closed with the eos token. Tokenizing
  the two sides apart keeps the boundary exact (no BPE merge across it), so the model learns to continue
  precisely the tokens it will be given at generation time, and to stop.
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation rendered with the tokenizer's chat
  template (or the one given with ``chat_template``). Each assistant message is located by rendering the
  conversation up to it (with the generation prompt) and up to its end: its text is the difference. The
  rendering is cut at those points and each piece tokenized alone, so every assistant span, template tokens
  that close the turn included, is an exact run of tokens.

The loss is the mean next-token cross-entropy over the tokens the model should produce (the completion and
its eos, or the assistant messages); prompt, user and system tokens are context only (label -100).
Batches are right-padded. A demonstration longer than ``max_length`` is an error naming its line, unless
``truncate`` cuts its end to fit (counted in the summary).

Training is AdamW with linear warm-up and cosine decay (as :mod:`textrl.pretrain`), on all weights or on
peft LoRA adapters (:mod:`textrl.lora`), with a held-out loss at the start, every ``eval_interval`` steps and
at the end, logged to TensorBoard under ``runs/sft__...``. Checkpoints in that run folder are atomic and
pickle-free (:mod:`textrl.checkpoint`): the model (``policy/``, a Hugging Face or peft folder, so
``load_lm(run)`` and ``textrl export`` read them), the optimizer, the random states and the data position.
The order of the examples is a function of the seed and the position alone, so ``resume`` continues a run
exactly: N steps, a stop, and a resume to 2N give the same weights as 2N steps in one go. The final model
is a plain Hugging Face folder (LoRA adapters merged in; the adapters also kept in peft's format under
``adapter/``) with ``training_summary.json`` and a model card.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from textrl.checkpoint import (
    CheckpointError,
    flatten_state,
    latest_checkpoint,
    load_json,
    load_tensors,
    save_json,
    save_tensors,
    unflatten_state,
    write_atomic,
)
from textrl.config import config_markdown, save_config, to_jsonable
from textrl.jsonl import DataError, read_jsonl, require_fields
from textrl.pretrain import cosine_lr, decay_groups

IGNORE = -100
"""Label of a position that is not scored (prompt, user and system tokens, padding)."""

FORMAT = "textrl-sft/1"
"""``format`` recorded in each checkpoint's ``state.json``."""


@dataclass
class SFTConfig:
    """Settings of `textrl sft`."""

    lm: str = "tiny"
    """Model to fine-tune: embedded name, local Hugging Face model folder, or textrl run or checkpoint folder."""
    data: str = ""
    """JSONL file of demonstrations: rows {"prompt", "completion"} or {"messages": [{"role", "content"}, ...]}."""
    heldout_data: str = ""
    """JSONL file of held-out demonstrations ("" = hold out heldout_fraction of the data rows)."""
    heldout_fraction: float = 0.1
    """Fraction of the data rows held out for evaluation when no heldout_data is given (0 = no held-out loss)."""
    out: str = "sft-model"
    """Folder that receives the fine-tuned model (Hugging Face format), its tokenizer and a model card."""
    run_dir: str = "runs"
    """Parent folder of the run folder (TensorBoard logs and checkpoints)."""
    epochs: float = 3.0
    """Passes over the training rows (fractions allowed); used when steps is 0."""
    steps: int = 0
    """Optimisation steps (0 = as many as epochs takes)."""
    batch_size: int = 8
    """Demonstrations per optimisation step."""
    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices (not on biases, norms or the input embeddings)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    max_length: int = 0
    """Most tokens of one demonstration (0 = the model's context length)."""
    truncate: bool = False
    """Cut the end of demonstrations longer than max_length (counted) instead of stopping with an error."""
    eval_interval: int = 100
    """Steps between held-out evaluations (0 = only at the start and the end)."""
    save_interval: int = 500
    """Steps between checkpoints in the run folder, the last step included (0 = none: no resume)."""
    seed: int = 0
    """Seed for the held-out split, the order of the examples, LoRA's initialisation and dropout."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    device: str = "auto"
    """'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ..."""
    progress: bool = True
    """Show a progress bar."""
    lora_rank: int = 0
    """Rank of peft LoRA adapters to train instead of every weight (0 = full fine-tuning)."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: the adapters' term is multiplied by lora_alpha / lora_rank."""
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get adapters: names such as q_proj v_proj, or all-linear (every linear layer of the blocks)."""
    lora_layers: list[int] = field(default_factory=list)
    """Indices of the blocks that get adapters (empty = all)."""
    resume: str = ""
    """Run folder to continue from its newest complete checkpoint, with its settings (those left at their
    defaults here are the run's; out, steps, epochs, intervals, progress, threads and device may change)."""
    chat_template: str = ""
    """Jinja chat template file for "messages" rows, for tokenizers without one (or to replace theirs)."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad value."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"SFTConfig: {f.name} must be a finite number, got {value}")
        checks = [
            (bool(self.data), "data must name a JSONL file of demonstrations (--data FILE)"),
            (0.0 <= self.heldout_fraction < 1.0, "heldout_fraction must be in [0, 1)"),
            (self.steps >= 0, "steps must be >= 0 (0 = from epochs)"),
            (self.steps > 0 or self.epochs > 0, "epochs must be > 0 when steps is 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.min_lr >= 0, "min_lr must be >= 0"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.grad_clip >= 0, "grad_clip must be >= 0"),
            (self.max_length >= 0, "max_length must be >= 0 (0 = the model's context length)"),
            (self.eval_interval >= 0, "eval_interval must be >= 0"),
            (self.save_interval >= 0, "save_interval must be >= 0"),
            (self.threads >= 0, "threads must be >= 0"),
            (self.lora_rank >= 0, "lora_rank must be >= 0 (0 = full fine-tuning)"),
            (self.lora_rank == 0 or self.lora_alpha > 0, "lora_alpha must be > 0"),
            (self.lora_rank == 0 or bool(self.lora_targets), "lora_targets must name modules (or all-linear)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SFTConfig: {message}")


@dataclass
class Example:
    """One tokenized demonstration."""

    ids: list[int]
    """Token ids, prompt and completion (or the whole conversation)."""
    labels: list[int]
    """``ids`` where the model is scored on predicting the token, :data:`IGNORE` elsewhere."""
    line: int
    """Line of the data file it came from."""
    truncated: bool = False
    """Whether its end was cut to fit ``max_length``."""


# --- data ---------------------------------------------------------------------------------------------------


def encode_prompt_completion(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of a prompt/completion pair: ``prompt ids + completion ids + [eos]``.

    The prompt is tokenized as a generation prompt is (special tokens included; the empty prompt is the bos
    token, the eos token when there is none), the completion alone without special tokens. The labels are
    :data:`IGNORE` over the prompt and the ids themselves over the completion and the eos.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prompt_ids = list(tokenizer(prompt)["input_ids"]) or [start]
    answer = [*tokenizer(completion, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return prompt_ids + answer, [IGNORE] * len(prompt_ids) + answer


def encode_messages(tokenizer, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation rendered with the tokenizer's chat template.

    The labels are the ids over each assistant message's rendering (from the end of the generation prompt
    before it to the end of the turn, closing tokens included) and :data:`IGNORE` elsewhere.

    Raises:
        ValueError: the tokenizer has no chat template, the conversation has no assistant message, or the
            template renders the start of the conversation differently on its own (so the assistant's text
            cannot be located in the whole).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")

    def render(msgs: list[dict[str, Any]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not turns:
        raise ValueError("the conversation has no assistant message, so there is nothing to learn")
    full = render(messages, False)
    spans: list[tuple[int, int]] = []
    for i in turns:
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        for text, what in ((before, f"before message {i}"), (through, f"through message {i}")):
            if not full.startswith(text):
                raise ValueError(
                    f"the chat template renders the conversation {what} as {text[-60:]!r}, which is not how the "
                    "whole conversation starts, so the assistant's tokens cannot be located; use a template "
                    "that renders earlier turns the same in every prefix, or prompt/completion rows"
                )
        start = len(before)
        if spans and start < spans[-1][1]:
            raise ValueError(f"the chat template's rendering of message {i} overlaps the previous assistant turn")
        spans.append((start, max(start, len(through))))
    ids: list[int] = []
    labels: list[int] = []
    at = 0
    pieces = []
    for a, b in spans:
        pieces += [(full[at:a], False), (full[a:b], True)]
        at = b
    pieces.append((full[at:], False))
    for text, scored in pieces:
        if not text:
            continue
        piece = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids += piece
        labels += piece if scored else [IGNORE] * len(piece)
    return ids, labels


def _check_messages(path: Path, number: int, messages: list) -> None:
    if not messages:
        raise DataError(f"{path}, line {number}: field 'messages' is an empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{path}, line {number}: messages[{i}] must be an object, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{path}, line {number}: messages[{i}] has no {key!r} (it has {sorted(m)})")
            if not isinstance(m[key], str):
                raise DataError(
                    f"{path}, line {number}: messages[{i}][{key!r}] must be a str, got {type(m[key]).__name__}"
                )


def load_examples(path: str | Path, tokenizer, max_length: int | None, truncate: bool = False) -> list[Example]:
    """Read and tokenize a JSONL file of demonstrations (see the module docstring for the row formats).

    Args:
        path: the JSONL file.
        tokenizer: the model's tokenizer (with a chat template for "messages" rows).
        max_length: most tokens of one demonstration (None = no limit).
        truncate: cut the end of longer demonstrations instead of raising.

    Returns:
        One :class:`Example` per row, in file order.

    Raises:
        DataError: the file is missing or empty, a line is not a JSON object, a row has neither form or a
            field of the wrong type, a "messages" row without a chat template, a demonstration longer than
            ``max_length`` (without ``truncate``), or one with no token left to learn from. The message names
            the file and the line.
    """
    path = Path(path)
    examples = []
    for number, row in read_jsonl(path):
        where = f"{path}, line {number}"
        if "messages" in row:
            if "prompt" in row or "completion" in row:
                raise DataError(f"{where}: the row has both 'messages' and 'prompt'/'completion'; give one form")
            require_fields(path, number, row, ["messages"], kind=list)
            _check_messages(path, number, row["messages"])
            if not getattr(tokenizer, "chat_template", None):
                raise DataError(
                    f"{where}: a 'messages' row needs a chat template and this model's tokenizer has none; "
                    "pass --chat-template FILE (a Jinja template) or write the rows as 'prompt'/'completion'"
                )
            try:
                ids, labels = encode_messages(tokenizer, row["messages"])
            except Exception as e:  # the template's own errors (e.g. roles must alternate) are about this row
                raise DataError(f"{where}: {e}") from None
        elif "prompt" in row or "completion" in row:
            require_fields(path, number, row, ["prompt", "completion"])
            ids, labels = encode_prompt_completion(tokenizer, row["prompt"], row["completion"])
        else:
            raise DataError(
                f"{where}: expected 'prompt' and 'completion' strings or a 'messages' list (the row has {sorted(row)})"
            )
        cut = max_length is not None and len(ids) > max_length
        if cut:
            if not truncate:
                raise DataError(
                    f"{where}: the demonstration is {len(ids)} tokens, more than max_length {max_length}; "
                    "shorten it, raise --max-length (up to the model's context) or pass --truncate true"
                )
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):  # the first token is never predicted
            what = "after truncation to max_length " + str(max_length) if cut else "in it"
            raise DataError(f"{where}: no completion or assistant token to learn from {what}")
        examples.append(Example(ids, labels, number, cut))
    return examples


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``round(fraction * n)`` examples (at least one when ``fraction > 0``), chosen by ``seed``.

    Returns:
        ``(train, heldout)``, each in file order.

    Raises:
        DataError: holding out would leave no training example.
    """
    if fraction <= 0:
        return list(examples), []
    n_held = max(1, round(fraction * len(examples)))
    if n_held >= len(examples):
        raise DataError(
            f"{len(examples)} demonstration(s) are too few to hold out {fraction:g} of them; "
            "give more rows, --heldout-data FILE, or --heldout-fraction 0"
        )
    held = set(np.random.default_rng(seed).permutation(len(examples))[:n_held].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (B, L); labels are -100 on padding."""
    length = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the scored positions, and their count.

    Args:
        logits: (B, L, V) model outputs.
        labels: (B, L) with :data:`IGNORE` where nothing is scored; the logits at position t predict label t+1.
    """
    targets = labels[:, 1:]
    scored = targets != IGNORE
    total = F.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="sum")
    return total, int(scored.sum())


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed loss and scored-token count of one collated batch (already on the model's device)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_loss(logits, batch["labels"])


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: list[Example], batch_size: int, pad_id: int) -> float | None:
    """Mean cross-entropy (nats per scored token) over ``examples``; None when there are none."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ordered = sorted(examples, key=lambda e: len(e.ids))  # similar lengths together: less padding
    total, count = 0.0, 0
    for i in range(0, len(ordered), batch_size):
        batch = {k: v.to(device) for k, v in collate(ordered[i : i + batch_size], pad_id).items()}
        loss, n = batch_loss(model, batch)
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / count


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the training examples of ``step`` (1-based): a fresh permutation each epoch.

    The order is a function of ``(seed, position)`` alone, so a resumed run needs only the step to continue
    with the same examples; a batch may straddle two epochs.

    >>> sorted(batch_indices(1, 4, 4, 0)) == [0, 1, 2, 3]
    True
    """
    out, perms = [], {}
    for position in range((step - 1) * batch_size, step * batch_size):
        epoch, i = divmod(position, n)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(perms[epoch][i]))
    return out


def lr_at(step: int, total: int, cfg: SFTConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total`` (0-based step)."""
    return cosine_lr(step, total, cfg.lr, cfg.min_lr, cfg.warmup_steps)


def _optimizer(model: torch.nn.Module, cfg: SFTConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr)


# --- checkpoints --------------------------------------------------------------------------------------------


def _sha256(path: str) -> str | None:
    if not path:
        return None
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    return tensors, {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}


def _set_rng_state(tensors: dict[str, torch.Tensor], numpy_state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (numpy_state["kind"], keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    )
    cuda = sorted(k for k in tensors if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])


def save_model(model, tokenizer, folder: Path) -> None:
    """Save a model (weights as safetensors; a peft model: its adapters) and its tokenizer in HF format."""
    from textrl.lm import quiet_transformers

    folder.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(folder, safe_serialization=True)
    tokenizer.backend_tokenizer.no_padding()  # do not ship the padding state of the last padded call
    tokenizer.save_pretrained(folder)


def save_checkpoint(run: Path, step: int, model, tokenizer, optimizer, state: dict[str, Any]) -> Path:
    """Write ``run/checkpoints/step-<step>`` atomically: ``policy/`` (the model, or the adapters alone, in
    Hugging Face / peft format, with the tokenizer), the optimizer state, the random states and ``state.json``
    (step, data position, history, settings)."""

    def write(tmp: Path) -> None:
        save_model(model, tokenizer, tmp / "policy")
        tensors, skeleton = flatten_state(optimizer.state_dict())
        save_tensors(tmp / "optimizer.safetensors", tensors)
        save_json(tmp / "optimizer.json", skeleton)
        rng_tensors, numpy_state = _rng_state()
        save_tensors(tmp / "rng.safetensors", rng_tensors)
        save_json(tmp / "state.json", {**state, "step": step, "numpy_rng": numpy_state})

    return write_atomic(run / "checkpoints" / f"step-{step:012d}", write)


_SESSION_FIELDS = {"out", "steps", "epochs", "eval_interval", "save_interval", "progress", "threads", "device"}
"""Settings a resumed run may change; every other one is the run's."""


def _resumed_config(given: SFTConfig, saved: dict[str, Any], run: Path) -> SFTConfig:
    defaults = SFTConfig()
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    values: dict[str, Any] = {}
    for name in names:
        g, d = getattr(given, name), getattr(defaults, name)
        s = saved.get(name, d)
        if name in ("resume", "run_dir"):
            values[name] = g if name == "resume" else s
        elif g in (d, s):
            values[name] = s
        elif name in _SESSION_FIELDS:
            values[name] = g
        else:
            raise ValueError(
                f"resume: {name} is {s!r} in the run {run} and cannot change when resuming (given {g!r}); "
                f"leave it out to keep the run's value, or start a new run"
            )
    return SFTConfig(**values)


def _find_checkpoint(run: Path) -> Path:
    def warn(skipped: Path, error: CheckpointError) -> None:
        print(f"warning: skipping checkpoint {skipped}: {error}", file=sys.stderr)

    if not run.is_dir():
        raise CheckpointError(f"resume: no run folder at {run}")
    found = latest_checkpoint(run / "checkpoints", on_skip=warn)
    if found is None:
        raise CheckpointError(f"resume: {run}/checkpoints holds no complete checkpoint (was save_interval 0?)")
    return found


# --- training -----------------------------------------------------------------------------------------------


def _load_model(cfg: SFTConfig, checkpoint: Path | None, device: torch.device):
    """The model to train (with fresh adapters, or those of the checkpoint) and its tokenizer."""
    from textrl.lm import load_lm, resolve_lm_path
    from textrl.lora import attach, is_peft

    if checkpoint is not None:
        return load_lm(checkpoint / "policy", device=device)
    model, tokenizer = load_lm(cfg.lm, device=device)
    if is_peft(model):
        raise ValueError(f"{cfg.lm} is a LoRA adapter folder; fine-tune its merged export or its base model instead")
    where = resolve_lm_path(cfg.lm)
    if isinstance(where, Path):  # the adapter folder names its base by this path: make it work from anywhere
        model.name_or_path = model.config._name_or_path = str(where.resolve())
    if cfg.chat_template:
        template = Path(cfg.chat_template)
        if not template.is_file():
            raise DataError(f"chat template file {template} does not exist")
        tokenizer.chat_template = template.read_text(encoding="utf-8")
    if cfg.lora_rank:
        model = attach(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_layers)
    return model, tokenizer


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).name or "lm").strip("-") or "lm"


def sft(cfg: SFTConfig) -> dict:
    """Fine-tune ``cfg.lm`` on the demonstrations in ``cfg.data``; return the summary (also written to
    ``out/training_summary.json``).

    Raises:
        DataError: a problem in a data file (it names the file and line).
        ValueError: a bad setting, or one that a resumed run cannot change.
        textrl.checkpoint.CheckpointError: ``resume`` names no run with a complete checkpoint, or the data
            or base model changed since it was written.
        FloatingPointError: the loss became NaN or infinite (the message names the step).
    """
    from textrl.device import resolve_device
    from textrl.lm import context_length_of
    from textrl.lora import base_identity, is_peft

    t_start = time.time()
    checkpoint, state = None, {}
    if cfg.resume:
        run = Path(cfg.resume)
        checkpoint = _find_checkpoint(run)
        state = load_json(checkpoint / "state.json")
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(f"resume: {checkpoint} is not a checkpoint of `textrl sft`")
        cfg = _resumed_config(cfg, state["config"], run)
    cfg.validate()
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} is a file; pass a folder")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    model, tokenizer = _load_model(cfg, checkpoint, device)
    lora = is_peft(model)
    context = context_length_of(model.config)
    max_length = cfg.max_length or context
    if cfg.max_length and context is not None and cfg.max_length > context:
        raise ValueError(f"max_length {cfg.max_length} is more than the model's context of {context} tokens")
    examples = load_examples(cfg.data, tokenizer, max_length, cfg.truncate)
    if cfg.heldout_data:
        train, heldout = examples, load_examples(cfg.heldout_data, tokenizer, max_length, cfg.truncate)
    else:
        train, heldout = split_examples(examples, cfg.heldout_fraction, cfg.seed)
    truncated = sum(e.truncated for e in train + heldout)
    total = cfg.steps or math.ceil(cfg.epochs * len(train) / cfg.batch_size)
    data_sha = {"data": _sha256(cfg.data), "heldout_data": _sha256(cfg.heldout_data)}
    identity = base_identity(model) if lora else None

    model.train()
    optimizer = _optimizer(model, cfg)
    pad_id = tokenizer.pad_token_id
    start_step, history = 0, []
    tokens = scored_tokens = 0
    past_seconds = 0.0
    if checkpoint is not None:
        if state.get("data_sha256") != data_sha:
            raise CheckpointError(f"resume: the data files changed since {checkpoint} was written ({data_sha})")
        if lora and state.get("base") != identity:
            raise CheckpointError(f"resume: the base model under the adapters is not the one of {checkpoint}")
        if total < state["step"]:
            raise ValueError(f"resume: the run is at step {state['step']}, past the {total} steps asked for")
        skeleton = load_json(checkpoint / "optimizer.json")
        optimizer.load_state_dict(unflatten_state(skeleton, load_tensors(checkpoint / "optimizer.safetensors")))
        _set_rng_state(load_tensors(checkpoint / "rng.safetensors"), state["numpy_rng"])
        start_step, history = state["step"], [tuple(h) for h in state["eval_history"]]
        tokens, scored_tokens, past_seconds = state["tokens"], state["scored_tokens"], state["wall_clock_seconds"]
    else:
        run = Path(cfg.run_dir) / f"sft__{_slug(cfg.lm)}__{cfg.seed}__{int(t_start)}"
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    writer = SummaryWriter(run)
    if checkpoint is None:
        writer.add_text("config", config_markdown(cfg))
        save_config(cfg, run)
        eval_loss = evaluate(model, heldout, cfg.batch_size, pad_id)
        history.append((0, eval_loss))
        if eval_loss is not None:
            writer.add_scalar("eval/loss", eval_loss, 0)
    eval_loss = history[-1][1] if history else None

    def checkpoint_state(step: int) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "total_steps": total,
            "position": step * cfg.batch_size,
            "train_examples": len(train),
            "eval_history": history,
            "tokens": tokens,
            "scored_tokens": scored_tokens,
            "wall_clock_seconds": past_seconds + time.time() - t_start,
            "data_sha256": data_sha,
            "base": identity,
            "config": to_jsonable(cfg),
        }

    bar = tqdm(
        range(start_step + 1, total + 1),
        desc="sft",
        initial=start_step,
        total=total,
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    t_last, tokens_last, loss_ema = time.perf_counter(), tokens, None
    train_loss = None
    for step in bar:
        lr = lr_at(step - 1, total, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        chosen = [train[i] for i in batch_indices(step, len(train), cfg.batch_size, cfg.seed)]
        batch = {k: v.to(device) for k, v in collate(chosen, pad_id).items()}
        loss_sum, count = batch_loss(model, batch)
        loss = loss_sum / count
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the SFT loss became {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()

        train_loss = loss.item()
        tokens += int(batch["attention_mask"].sum())
        scored_tokens += count
        loss_ema = train_loss if loss_ema is None else 0.9 * loss_ema + 0.1 * train_loss
        writer.add_scalar("train/loss", train_loss, step)
        writer.add_scalar("charts/learning_rate", lr, step)
        if step % 10 == 0 or step == total:
            now = time.perf_counter()
            tps = (tokens - tokens_last) / max(now - t_last, 1e-9)
            t_last, tokens_last = now, tokens
            writer.add_scalar("charts/tokens_per_second", tps, step)
            shown = {"loss": f"{loss_ema:.3f}", "tok_s": f"{tps:.0f}"}
            bar.set_postfix(shown | ({"eval": f"{eval_loss:.3f}"} if eval_loss is not None else {}))
        if heldout and ((cfg.eval_interval and step % cfg.eval_interval == 0) or step == total):
            eval_loss = evaluate(model, heldout, cfg.batch_size, pad_id)
            history.append((step, eval_loss))
            writer.add_scalar("eval/loss", eval_loss, step)
            t_last = time.perf_counter()  # keep evaluation out of tokens/s
        if cfg.save_interval and (step % cfg.save_interval == 0 or step == total):
            save_checkpoint(run, step, model, tokenizer, optimizer, checkpoint_state(step))
            t_last = time.perf_counter()
    bar.close()

    model.eval()
    if heldout and history[-1][0] != total:  # a resume with nothing left to train
        eval_loss = evaluate(model, heldout, cfg.batch_size, pad_id)
        history.append((total, eval_loss))
    if lora:
        save_model(model, tokenizer, out / "adapter")  # peft writes the adapters alone
        model = model.merge_and_unload()
    save_model(model, tokenizer, out)
    threads = f"{torch.get_num_threads()} thread" + ("" if torch.get_num_threads() == 1 else "s")
    machine = f"{platform.machine()}, torch {torch.__version__}, {device}, {threads}"
    summary = {
        "lm": cfg.lm,
        "data": cfg.data,
        "heldout_data": cfg.heldout_data or None,
        "rows": {"train": len(train), "heldout": len(heldout)},
        "truncated": truncated,
        "max_length": max_length,
        "steps": total,
        "epochs": total * cfg.batch_size / len(train),
        "tokens": tokens,
        "scored_tokens": scored_tokens,
        "parameters": n_params,
        "trainable_parameters": n_trainable,
        "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": cfg.lora_targets} if lora else None,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "heldout_loss_before": history[0][1] if history else None,
        "heldout_loss_after": eval_loss,
        "last_train_loss": train_loss,
        "eval_history": history,
        "wall_clock_seconds": round(past_seconds + time.time() - t_start, 1),
        "machine": machine,
        "config": to_jsonable(cfg),
        "run": str(run),
        "out": str(out),
        "adapter": str(out / "adapter") if lora else None,
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "README.md").write_text(model_card(summary), encoding="utf-8")
    if history and history[0][1] is not None:
        writer.add_hparams(
            {"lr": cfg.lr, "batch_size": cfg.batch_size, "steps": total, "lora_rank": cfg.lora_rank},
            {"hparam/heldout_loss": eval_loss},
            run_name=".",
        )
    writer.close()
    return summary


def model_card(s: dict) -> str:
    """Render the training summary as the model's README.md."""

    def loss(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    lora = s["lora"]
    how = (
        f"LoRA (rank {lora['rank']}, alpha {lora['alpha']:g}, on {', '.join(lora['targets'])}), merged into the "
        "weights; the adapters alone are in `adapter/` (peft format)"
        if lora
        else "all weights"
    )
    return f"""# Fine-tuned with textrl sft

A causal language model fine-tuned on demonstrations by `textrl sft` (supervised next-token loss on the
completions or assistant turns only). Load it with `textrl.load_lm({s["out"]!r})` or any Hugging Face
`AutoModelForCausalLM` / `AutoTokenizer`.

| | |
|-|-|
| base model | {s["lm"]} |
| data | {s["data"]} ({s["rows"]["train"]} train / {s["rows"]["heldout"]} held-out demonstrations, \
{s["truncated"]} truncated to {s["max_length"]} tokens) |
| trained | {how}; {s["trainable_parameters"]:,} of {s["parameters"]:,} parameters |
| training | {s["steps"]} steps ({s["epochs"]:.2f} epochs), {s["tokens"]:,} tokens, \
{s["wall_clock_seconds"] / 60:.1f} min on {s["machine"]} |
| held-out loss | {loss(s["heldout_loss_before"])} -> {loss(s["heldout_loss_after"])} nats per completion token |
| chat template | {"yes" if s["chat_template"] else "no"} |

Weights are stored as safetensors. Full settings: `training_summary.json`.
"""
