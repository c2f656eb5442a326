"""Learned reward models: score completions with a sequence-classification model, and train one from preferences.

A rule-based reward (:mod:`textrl.rewards`, :mod:`textrl.reward_library`) scores what can be written down as a
rule; a learned reward model scores what people prefer. :func:`reward_model` wraps any local Hugging Face
``AutoModelForSequenceClassification`` folder (e.g. a published reward model, or one made by
``textrl reward-train``) as an ordinary sequence reward, so it combines with other rewards in an env's
``reward=`` like any of them::

    from textrl.rewards import reward_model
    env = gym.make("textrl/Prompts-v0", reward={reward_model("rm/"): 1.0, "repetition_penalty": 0.5})

The model reads ``prompt + completion`` (plain concatenation, the same text it is trained on), truncated from
the left to its context so that the end of the completion is always scored.

:func:`reward_train` (``textrl reward-train``) fits a reward model to preference pairs with the Bradley-Terry
loss ``-log sigmoid(r(chosen) - r(rejected))`` (Ouyang et al., 2022), starting from a pretrained language model
whose weights it keeps and on top of which it adds a fresh one-output score head. The data is JSONL, one pair a
line::

    {"prompt": "The weather today", "chosen": " is lovely and warm.", "rejected": " is a cruel, bad storm."}

(``prompt`` is optional and is prepended to both). It reports held-out pair accuracy (the share of pairs whose
chosen text scores higher) and loss before and after training, in TensorBoard and in the summary, and writes a
Hugging Face folder (safetensors and tokenizer) that :func:`reward_model` loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from textrl.jsonl import DataError, read_jsonl, require_fields

Normalize = Literal["sigmoid", "softmax"]


class NotARewardModelError(ValueError):
    """The folder holds a model that is not a sequence-classification (reward) model."""


# ---------------------------------------------------------------------------------------------------------
# Encoding (shared by scoring and training, so a trained model sees the same tokens at both)


def context_limit(model, tokenizer, max_length: int | None) -> int | None:
    """The most tokens a text may keep: ``max_length`` if given, else the smaller of the model's positions and
    the tokenizer's ``model_max_length`` (None when neither says).

    Raises:
        ValueError: ``max_length`` below 1 or beyond the model's positions.
    """
    from textrl.lm import context_length_of

    positions = context_length_of(model.config)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:  # transformers' "no limit" is a huge number
        positions = tok_limit if positions is None else min(positions, tok_limit)
    if max_length is None:
        return positions
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if positions is not None and max_length > positions:
        raise ValueError(f"max_length {max_length} exceeds the model's context of {positions} tokens")
    return max_length


def encode(tokenizer, texts: Sequence[str], max_length: int | None) -> list[list[int]]:
    """Token ids of each text, truncated from the left to ``max_length`` (the end is kept; special tokens the
    tokenizer adds, e.g. BERT's ``[CLS]``/``[SEP]``, are kept too). An empty text becomes the bos (else eos)
    token, so that every text has a token to score."""
    if not texts:
        return []
    tokenizer.truncation_side = "left"
    tokenizer.backend_tokenizer.no_padding()
    kwargs = {"truncation": True, "max_length": max_length} if max_length is not None else {}
    ids = tokenizer(list(texts), **kwargs)["input_ids"]
    filler = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [list(row) if len(row) else [filler] for row in ids]


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both (B, longest), right-padded with ``pad_id``.

    >>> ids, mask = pad_batch([[5, 6, 7], [8]], 0, torch.device("cpu"))
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------------------------------------------------
# Loading


def _describe(config) -> str:
    """What a config's model is, in words: its model type, kind and architectures."""
    archs = list(getattr(config, "architectures", None) or [])
    names = ", ".join(archs) or type(config).__name__
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return f"a {config.model_type!r} causal language model ({names})"
    return f"a {config.model_type!r} model ({names})"


def _not_a_reward_model(where, config) -> NotARewardModelError:
    return NotARewardModelError(
        f"{where} holds {_describe(config)}, not a sequence-classification (reward) model; train one from it with "
        f"`textrl reward-train --lm {where} --data pairs.jsonl --out RM`, or pass a sequence-classification folder"
    )


def load_reward_model(folder: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` from a local sequence-classification folder, in eval mode on ``device``.

    Only local files are read (``local_files_only``) and only safetensors weights (never pickled ``.bin``).
    The model's ``config.pad_token_id`` is set from the tokenizer (falling back to eos), so models that score
    the last token (GPT-2, Llama, ...) find the last real token of a right-padded row.

    Raises:
        textrl.LMNotFoundError: the folder (or hub id in the local cache) does not exist or holds no model.
        NotARewardModelError: the folder holds another kind of model, e.g. a causal LM, or its weights lack
            the classification head.
    """
    from transformers import AutoModelForSequenceClassification

    from textrl.lm import LMNotFoundError, _load_tokenizer, quiet_transformers, read_config, resolve_lm_path

    where = resolve_lm_path(folder)
    local = isinstance(where, Path)
    if local and not (where / "config.json").is_file():
        raise NotARewardModelError(
            f"{where} holds no config.json (a peft adapter folder?); pass a full sequence-classification folder"
        )
    config = read_config(where)
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise _not_a_reward_model(where, config)
    try:
        with quiet_transformers():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                where, config=config, local_files_only=True, use_safetensors=True, output_loading_info=True
            )
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise _not_a_reward_model(where, config) from None
        raise
    except OSError as e:
        raise LMNotFoundError(
            f"cannot load safetensors weights from {where} (textrl never loads pickled .bin weights): {e}"
        ) from e
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise NotARewardModelError(
            f"{where} lacks weights for {', '.join(sorted(missing)[:4])}{' ...' if len(missing) > 4 else ''}: "
            f"it holds {_describe(config)} without a trained classification head"
        )
    tokenizer = _load_tokenizer(where)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.requires_grad_(False)
    return model.to(device).eval(), tokenizer


def _label_index(config, label: int | str | None, where: Any) -> int:
    """The column of the logits to score: ``label`` as an index or a name of ``config.id2label``."""
    n = config.num_labels
    id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
    names = [id2label.get(i, f"LABEL_{i}") for i in range(n)]
    listing = ", ".join(f"{i}={name!r}" for i, name in enumerate(names))
    if label is None:
        if n == 1:
            return 0
        raise ValueError(
            f"the reward model in {where} has {n} labels ({listing}); choose the one to reward with "
            "label=<index or name>"
        )
    if isinstance(label, str) and label in names:
        return names.index(label)
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label)
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < n:
        return label
    raise ValueError(f"label {label!r} is not one of the reward model's labels in {where}: {listing}")


# ---------------------------------------------------------------------------------------------------------
# The reward


class RewardModel:
    """Sequence reward: the score a sequence-classification model gives ``prompt + completion``.

    Texts are scored in batches of ``batch_size``, right-padded with an attention mask, under
    ``torch.no_grad`` in eval mode. A text longer than the model's context is truncated from the **left**:
    the end of the completion is always kept (and the start of a long prompt is dropped).

    Build it with :func:`reward_model`; it is called like every sequence reward
    (``reward(prompts=..., completions=..., **fields)``, see :mod:`textrl.rewards`) and returns one float per
    sample. Its name in logs is ``name`` (``"reward_model"`` by default).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        label: int | str | None = None,
        batch_size: int = 32,
        device: str | torch.device = "auto",
        max_length: int | None = None,
        normalize: Normalize | None = None,
        name: str = "reward_model",
    ):
        from textrl.device import resolve_device

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if normalize not in (None, "sigmoid", "softmax"):
            raise ValueError(f"normalize must be None, 'sigmoid' or 'softmax', got {normalize!r}")
        self.folder = folder
        self.device = resolve_device(device)
        self.model, self.tokenizer = load_reward_model(folder, self.device)
        self.label = _label_index(self.model.config, label, folder)
        self.label_name = (self.model.config.id2label or {}).get(self.label, f"LABEL_{self.label}")
        if normalize == "softmax" and self.model.config.num_labels < 2:
            raise ValueError("normalize='softmax' needs a model with several labels; use 'sigmoid' for one score")
        self.normalize = normalize
        self.batch_size = batch_size
        self.max_length = context_limit(self.model, self.tokenizer, max_length)
        self.__name__ = name

    def __repr__(self) -> str:
        return (
            f"RewardModel({str(self.folder)!r}, label={self.label_name!r}, device={str(self.device)!r}, "
            f"max_length={self.max_length})"
        )

    @torch.no_grad()
    def score(self, texts: Sequence[str]) -> list[float]:
        """The reward of each whole text (already joined prompt and completion)."""
        rows = encode(self.tokenizer, texts, self.max_length)
        out: list[float] = []
        for i in range(0, len(rows), self.batch_size):
            ids, mask = pad_batch(rows[i : i + self.batch_size], self.model.config.pad_token_id, self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()  # (B, labels)
            if self.normalize == "softmax":
                values = logits.softmax(-1)[:, self.label]
            elif self.normalize == "sigmoid":
                values = logits[:, self.label].sigmoid()
            else:
                values = logits[:, self.label]
            out.extend(values.tolist())
        return out

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts for {len(completions)} completions")
        return self.score([p + c for p, c in zip(prompts, completions, strict=True)])


def reward_model(
    folder: str | os.PathLike,
    *,
    label: int | str | None = None,
    batch_size: int = 32,
    device: str | torch.device = "auto",
    max_length: int | None = None,
    normalize: Normalize | None = None,
) -> RewardModel:
    """A sequence reward that scores ``prompt + completion`` with a local sequence-classification model.

    Args:
        folder: a local Hugging Face ``AutoModelForSequenceClassification`` folder (safetensors weights and a
            tokenizer), e.g. the ``--out`` of ``textrl reward-train``; never downloaded.
        label: the output to reward, as an index or a name from the model's ``id2label``; required when the
            model has more than one output.
        batch_size: texts per forward pass.
        device: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        max_length: tokens kept per text (from the end); default the model's context.
        normalize: ``None`` (the raw logit), ``"sigmoid"`` (the logit squashed to (0, 1)) or ``"softmax"``
            (the label's probability among all labels).

    Returns:
        A :class:`RewardModel`, named ``"reward_model"`` in logs.

    Raises:
        textrl.LMNotFoundError: the folder does not exist or holds no model.
        NotARewardModelError: it holds another kind of model (e.g. a causal LM), naming which.
        ValueError: a missing or unknown ``label`` (the message lists the labels), or a bad setting.
    """
    return RewardModel(
        folder, label=label, batch_size=batch_size, device=device, max_length=max_length, normalize=normalize
    )


# ---------------------------------------------------------------------------------------------------------
# Training from preference pairs


@dataclass
class RewardTrainConfig:
    """Settings of `textrl reward-train`."""

    lm: str = "tiny"
    """Pretrained model to start from (its weights, plus a fresh score head): "tiny", a local HF folder, or a
    textrl run or checkpoint folder (its policy)."""
    data: str = ""
    """JSONL file of preference pairs: {"chosen": str, "rejected": str} with an optional "prompt": str that is
    prepended to both."""
    heldout_data: str = ""
    """JSONL file of held-out pairs (same format); empty = hold out --heldout-fraction of --data."""
    heldout_fraction: float = 0.1
    """Share of --data held out for evaluation when no --heldout-data is given (0 = no evaluation)."""
    out: str = "reward_model"
    """Folder that receives the trained model (safetensors), tokenizer, summary and model card."""
    run_dir: str = "runs"
    """Parent folder of the TensorBoard run folder."""
    epochs: int = 1
    """Passes over the training pairs (when --steps is 0)."""
    steps: int = 0
    """Optimisation steps; 0 = as many as --epochs take."""
    batch_size: int = 8
    """Preference pairs per optimisation step."""
    lr: float = 5e-5
    """Peak learning rate (linear warm-up, then linear decay to 0)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices (not on biases, norms or embeddings)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    max_length: int | None = None
    """Tokens kept per text, from the end (the start of a long prompt is dropped); none = the model's context."""
    disable_dropout: bool = True
    """Train without dropout (the reward of a text then does not depend on a random mask)."""
    eval_interval: int = 50
    """Steps between held-out evaluations (besides before and after training; 0 = only those)."""
    seed: int = 0
    """Seed for the held-out split, the batch order and the score head's initialisation."""
    device: str = "auto"
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        if not self.data:
            raise ValueError("--data is required: a JSONL file of {'chosen': ..., 'rejected': ...} pairs")
        checks = [
            (self.epochs >= 1 or self.steps >= 1, f"epochs must be >= 1 (or steps >= 1), got {self.epochs}"),
            (self.steps >= 0, f"steps must be >= 0, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}"),
            (0.0 <= self.heldout_fraction < 1.0, f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}"),
            (self.warmup_steps >= 0 and self.eval_interval >= 0, "warmup_steps and eval_interval must be >= 0"),
            (self.weight_decay >= 0 and self.grad_clip >= 0, "weight_decay and grad_clip must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def read_pairs(path: str | os.PathLike) -> list[tuple[str, str]]:
    """The ``(prompt + chosen, prompt + rejected)`` texts of a preference JSONL file.

    Raises:
        DataError: the file is missing or empty, a line is not a JSON object, a field is missing or not a
            string, or a pair's two texts are identical; the message names the line.
    """
    pairs = []
    for number, row in read_jsonl(path):
        require_fields(path, number, row, ["chosen", "rejected"])
        if "prompt" in row:
            require_fields(path, number, row, ["prompt"])
        prompt = row.get("prompt", "")
        chosen, rejected = prompt + row["chosen"], prompt + row["rejected"]
        if chosen == rejected:
            raise DataError(f"{path}, line {number}: chosen and rejected are identical ({chosen!r:.80})")
        pairs.append((chosen, rejected))
    return pairs


def split_pairs(pairs: list, fraction: float, seed: int) -> tuple[list, list]:
    """``(train, heldout)``: a seeded random ``fraction`` held out (at least one pair when fraction > 0).

    >>> split_pairs(list(range(10)), 0.2, 0)[1]
    [4, 6]
    """
    if fraction <= 0:
        return list(pairs), []
    n_heldout = max(1, round(len(pairs) * fraction))
    if n_heldout >= len(pairs):
        raise DataError(f"{len(pairs)} pairs are too few to hold out {fraction:.0%} and still train on some")
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i] for i in sorted(order[n_heldout:])], [pairs[i] for i in order[:n_heldout]]


def pair_rewards(model, rows: Sequence[tuple[list[int], list[int]]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_chosen, r_rejected)`` (both (B,)) for token-id pairs, in one forward pass of 2B rows."""
    ids, mask = pad_batch([c for c, _ in rows] + [r for _, r in rows], model.config.pad_token_id, device)
    rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
    return rewards[: len(rows)], rewards[len(rows) :]


def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, accuracy)``: the mean of ``-log sigmoid(r_chosen - r_rejected)`` and the share of pairs with
    ``r_chosen > r_rejected`` (a tie counts as wrong).

    >>> loss, acc = bradley_terry(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    >>> round(loss.item(), 4), acc.item()
    (0.41, 0.5)
    """
    return -F.logsigmoid(r_chosen - r_rejected).mean(), (r_chosen > r_rejected).float().mean()


@torch.no_grad()
def evaluate_pairs(model, rows, batch_size: int, device) -> tuple[float, float] | tuple[None, None]:
    """Held-out ``(loss, accuracy)`` over all pairs (``(None, None)`` with no pairs)."""
    if not rows:
        return None, None
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0.0
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        loss, acc = bradley_terry(*pair_rewards(model, batch, device))
        loss_sum += loss.item() * len(batch)
        correct += acc.item() * len(batch)
    model.train(was_training)
    return loss_sum / len(rows), correct / len(rows)


def _optimizer(model: torch.nn.Module, cfg: RewardTrainConfig) -> torch.optim.AdamW:
    from textrl.pretrain import decay_groups

    return torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr)


def lr_at(step: int, total: int, cfg: RewardTrainConfig) -> float:
    """Learning rate of step ``step`` (1-based) of ``total``: linear warm-up, then linear decay towards 0.

    >>> cfg = RewardTrainConfig(data="x", lr=1.0, warmup_steps=2)
    >>> [round(lr_at(s, 6, cfg), 2) for s in range(1, 7)]
    [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    """
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    return cfg.lr * (total - step + 1) / max(1, total - cfg.warmup_steps)


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[list[int]]:
    """Indices of each batch, epoch after epoch, each epoch a fresh shuffle (its last batch may be smaller).

    >>> import itertools
    >>> [len(b) for b in itertools.islice(_batches(5, 2, np.random.default_rng(0)), 4)]
    [2, 2, 1, 2]
    """
    while True:
        order = rng.permutation(n).tolist()
        for i in range(0, n, batch_size):
            yield order[i : i + batch_size]


def _load_start(cfg: RewardTrainConfig, device: torch.device):
    """The model to train (the LM's weights and a fresh one-output score head) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    from textrl.lm import LMNotFoundError, _load_tokenizer, quiet_transformers, resolve_lm_path

    where = resolve_lm_path(cfg.lm)
    if isinstance(where, Path) and not (where / "config.json").is_file():
        raise ValueError(f"{where} holds no config.json (a LoRA adapter folder? merge it first: textrl export --merge)")
    tokenizer = _load_tokenizer(where)
    try:
        with quiet_transformers(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from transformers.utils import logging as hf_logging

            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # "Some weights ... newly initialized" is the point here
            try:
                model = AutoModelForSequenceClassification.from_pretrained(
                    where, num_labels=1, local_files_only=True, use_safetensors=True, dtype=torch.float32
                )
            finally:
                hf_logging.set_verbosity(verbosity)
    except OSError as e:
        raise LMNotFoundError(f"cannot load safetensors weights for {cfg.lm!r} from {where}: {e}") from e
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise ValueError(
                f"{where} holds a model type with no sequence-classification head in transformers"
            ) from None
        raise
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.id2label, model.config.label2id = {0: "reward"}, {"reward": 0}
    if cfg.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model.to(device), tokenizer


def reward_train(cfg: RewardTrainConfig) -> dict:
    """Fit a reward model to preference pairs (Bradley-Terry loss); save it to ``cfg.out``; return the summary.

    The summary (also ``training_summary.json`` in ``cfg.out``) holds the held-out pair accuracy and loss
    before and after training (``heldout_accuracy_before`` / ``_after``, ``heldout_loss_before`` / ``_after``;
    None without held-out pairs), the evaluation history, the pair counts, the run folder and the config.

    Raises:
        DataError: a malformed data file (the message names the line).
    """
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    from textrl.config import config_markdown, save_config
    from textrl.device import resolve_device
    from textrl.lm import quiet_transformers

    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    pairs = read_pairs(cfg.data)
    if cfg.heldout_data:
        train_pairs, heldout_pairs = pairs, read_pairs(cfg.heldout_data)
    else:
        train_pairs, heldout_pairs = split_pairs(pairs, cfg.heldout_fraction, cfg.seed)

    torch.manual_seed(cfg.seed)
    model, tokenizer = _load_start(cfg, device)
    limit = context_limit(model, tokenizer, cfg.max_length)

    def tokenized(texts: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        ids = encode(tokenizer, [t for pair in texts for t in pair], limit)
        return list(zip(ids[0::2], ids[1::2], strict=True))

    train_rows, heldout_rows = tokenized(train_pairs), tokenized(heldout_pairs)
    same = sum(c == r for c, r in train_rows)
    if same:
        warnings.warn(
            f"{same} of {len(train_rows)} training pairs are identical once cut to {limit} tokens (they differ "
            "only in text that was truncated away); they cannot be learned from: raise max_length",
            stacklevel=2,
        )

    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    total = cfg.steps or cfg.epochs * steps_per_epoch
    optimizer = _optimizer(model, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    lm_name = Path(str(cfg.lm)).name or str(cfg.lm)
    run = Path(cfg.run_dir) / f"reward-train__{lm_name}__{cfg.seed}__{int(t_start)}"
    writer = SummaryWriter(run)
    writer.add_text("config", config_markdown(cfg))
    save_config(cfg, run)

    def evaluation(step: int) -> tuple[float | None, float | None]:
        loss, acc = evaluate_pairs(model, heldout_rows, cfg.batch_size, device)
        if loss is not None:
            writer.add_scalar("eval/loss", loss, step)
            writer.add_scalar("eval/accuracy", acc, step)
            history.append((step, loss, acc))
        return loss, acc

    history: list[tuple[int, float, float]] = []
    loss_before, acc_before = evaluation(0)
    eval_loss, eval_acc = loss_before, acc_before
    model.train()
    batches = _batches(len(train_rows), cfg.batch_size, np.random.default_rng(cfg.seed))
    train_loss = train_acc = float("nan")
    bar = tqdm(range(1, total + 1), desc="reward-train", disable=not cfg.progress, dynamic_ncols=True)
    for step in bar:
        lr = lr_at(step, total, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, acc = bradley_terry(*pair_rewards(model, [train_rows[i] for i in next(batches)], device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"reward-model loss became {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        train_loss, train_acc = loss.item(), acc.item()
        writer.add_scalar("train/loss", train_loss, step)
        writer.add_scalar("train/accuracy", train_acc, step)
        writer.add_scalar("charts/learning_rate", lr, step)
        if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == total:
            eval_loss, eval_acc = evaluation(step)
        if eval_acc is not None:
            bar.set_postfix(loss=f"{train_loss:.3f}", eval_acc=f"{eval_acc:.3f}")
        else:
            bar.set_postfix(loss=f"{train_loss:.3f}")
    bar.close()

    model.eval()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(out)  # safetensors (the only format transformers 5 writes)
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.save_pretrained(out)
    summary = {
        "lm": str(cfg.lm),
        "data": str(cfg.data),
        "heldout_data": str(cfg.heldout_data) if cfg.heldout_data else None,
        "pairs": {"train": len(train_rows), "heldout": len(heldout_rows)},
        "parameters": n_params,
        "max_length": limit,
        "steps": total,
        "epochs": total / steps_per_epoch,
        "heldout_accuracy_before": acc_before,
        "heldout_accuracy_after": eval_acc,
        "heldout_loss_before": loss_before,
        "heldout_loss_after": eval_loss,
        "last_train_loss": train_loss,
        "last_train_accuracy": train_acc,
        "eval_history": history,
        "wall_clock_seconds": round(time.time() - t_start, 1),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {device}",
        "config": dataclasses.asdict(cfg),
        "run": str(run),
        "out": str(out),
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "README.md").write_text(model_card(summary))
    if acc_before is not None:
        writer.add_hparams(
            {"steps": total, "lr": cfg.lr, "batch_size": cfg.batch_size},
            {"hparam/heldout_accuracy": eval_acc, "hparam/heldout_loss": eval_loss},
            run_name=".",
        )
    writer.close()
    return summary


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def model_card(s: dict) -> str:
    """Render the training summary as the reward model's README.md."""
    heldout = f"{s['pairs']['heldout']} held-out pairs" + (
        f" from {s['heldout_data']}" if s["heldout_data"] else f" ({s['config']['heldout_fraction']:.0%} of the data)"
    )
    return f"""# Reward model

A reward model trained by `textrl reward-train` on preference pairs with the Bradley-Terry loss
`-log sigmoid(r(chosen) - r(rejected))`, starting from `{s["lm"]}` with a fresh one-output score head.
It scores `prompt + completion` (truncated from the left to {s["max_length"]} tokens); higher is preferred.

| | |
|-|-|
| data | {s["data"]}: {s["pairs"]["train"]} training pairs; {heldout} |
| training | {s["steps"]} steps ({s["epochs"]:.2f} epochs) of {s["config"]["batch_size"]} pairs, lr \
{s["config"]["lr"]:g}, {s["wall_clock_seconds"]:.1f} s on {s["machine"]} |
| held-out accuracy | {_fmt(s["heldout_accuracy_before"])} before -> {_fmt(s["heldout_accuracy_after"])} after |
| held-out loss | {_fmt(s["heldout_loss_before"])} before -> {_fmt(s["heldout_loss_after"])} after (nats/pair) |
| parameters | {s["parameters"]:,} |

Use it as a reward in textrl:

```python
from textrl.rewards import reward_model
reward = reward_model("{s["out"]}")
```

or load it with `transformers.AutoModelForSequenceClassification.from_pretrained` and `AutoTokenizer`.
Weights are stored as safetensors. Full settings: `training_summary.json`.
"""
