"""Language models: load the embedded default or any local Hugging Face causal LM, and sample from it.

``load_lm("tiny")`` returns the GPT-2-architecture model that ships inside this package (made by
``textrl pretrain``; its model card is ``textrl/models/tiny/README.md``). Any local folder with an HF
causal LM (GPT-2, Llama, Qwen2, ...) loads the same way, and so do a textrl checkpoint (its ``policy/``)
and a run folder (its newest complete checkpoint). Nothing is ever downloaded: a hub id that is not
already in the local Hugging Face cache is a clear :class:`LMNotFoundError`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

MODELS_DIR = Path(__file__).parent / "models"
EMBEDDED_MODELS: dict[str, Path] = {"tiny": MODELS_DIR / "tiny", "tiny-moe": MODELS_DIR / "tiny-moe"}
"""Registry of the models that ship inside the package: name -> folder. ``tiny`` is a dense GPT-2 (the default);
``tiny-moe`` a Mixtral-style mixture of experts with about as many active parameters, pre-trained on the same
corpus for the same number of tokens."""

_RECIPES = {
    "tiny": "textrl pretrain --out textrl/models/tiny",
    "tiny-moe": "textrl pretrain --arch moe --out textrl/models/tiny-moe",
}


class LMNotFoundError(FileNotFoundError):
    """The requested language model is neither embedded, a local folder, nor in the local HF cache."""


class NotACausalLMError(ValueError):
    """The folder holds a model that is not a causal (decoder-only, next-token) language model."""


def resolve_lm_path(name_or_path: str | os.PathLike) -> Path | str:
    """Map ``"tiny"`` (or another embedded name) to its folder; return local model folders as paths.

    A textrl checkpoint (a folder with ``state.json`` or ``manifest.json`` and ``policy/``) maps to its
    ``policy/`` folder once it verifies; a run folder (``<run>/checkpoints/step-*``) to the ``policy/`` of
    its newest complete checkpoint (a newer broken one is skipped with a warning on stderr). Anything else
    is returned unchanged as a hub id, to be looked up in the local HF cache only.

    Raises:
        LMNotFoundError: a local path that holds no model, or a run folder with no complete checkpoint.
        textrl.checkpoint.CheckpointError: a checkpoint named directly that is incomplete or corrupt.
    """
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        path = EMBEDDED_MODELS[name]
        if not (path / "config.json").is_file():
            raise LMNotFoundError(
                f"the embedded model {name!r} is missing from {path}; reinstall textrl-suite "
                f"or rebuild it with `{_RECIPES[name]}`"
            )
        return path
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LMNotFoundError(f"{path} is a file; pass the folder that holds config.json and the weights")
        checkpoint = _checkpoint_in(path)  # first: a run folder has a config.json too (the run's settings)
        if checkpoint is not None:
            return checkpoint / "policy"
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return path
        raise LMNotFoundError(
            f"{path} is not a Hugging Face model folder (it has no config.json), nor a textrl checkpoint "
            "(state.json and policy/) or run folder (checkpoints/step-*)"
        )
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an "org/name" hub id
        raise LMNotFoundError(f"model folder not found: {path}")
    return name


def _checkpoint_in(path: Path) -> Path | None:
    """The checkpoint that ``path`` is, or the newest complete one of the run folder ``path``; None if neither."""
    from textrl.checkpoint import CheckpointError, latest_checkpoint, verify

    if (path / "state.json").is_file() or (path / "manifest.json").is_file():
        if not (path / "policy").is_dir():
            raise LMNotFoundError(f"{path} is a textrl checkpoint without a policy/ folder")
        return verify(path)

    def warn(skipped: Path, error: CheckpointError) -> None:
        print(f"warning: skipping checkpoint {skipped}: {error}", file=sys.stderr)

    for folder in (path / "checkpoints", path):
        if any(folder.glob("step-*")):
            found = latest_checkpoint(folder, on_skip=warn)
            if found is None:
                raise LMNotFoundError(f"{folder} has no complete checkpoint (every step-* failed to verify)")
            if not (found / "policy").is_dir():
                raise LMNotFoundError(f"{found} is a textrl checkpoint without a policy/ folder")
            return found
    return None


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' progress bars ("Loading weights", "Writing model shards") for the calls inside.

    textrl's own progress bar is separate and unaffected; warnings and errors still show.
    """
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _hub_error(name: str, cause: Exception) -> LMNotFoundError:
    return LMNotFoundError(
        f"{name!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)}), not a local folder, and not in "
        f"the local Hugging Face cache. textrl never downloads weights at run time: download the model "
        f"once where there is network (e.g. `hf download {name} --local-dir DIR`) and pass that local "
        f"folder, e.g. load_lm('DIR') or --lm DIR. ({type(cause).__name__})"
    )


def read_config(where: Path | str):
    """The model config at ``where`` (a folder from :func:`resolve_lm_path`, or a hub id in the local cache).

    Raises:
        LMNotFoundError: an unreadable folder, or a hub id that is not in the local cache.
    """
    try:
        return AutoConfig.from_pretrained(where, local_files_only=True)
    except OSError as e:
        if isinstance(where, Path):
            raise LMNotFoundError(f"cannot read the model config in {where}: {e}") from e
        raise _hub_error(str(where), e) from None


def load_lm(
    name_or_path: str | os.PathLike = "tiny",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a causal language model and its fast tokenizer.

    Args:
        name_or_path: ``"tiny"`` (the embedded default), a local folder holding an HF causal LM, a peft
            adapter folder (its base model, loaded by the same rules, with the adapters on top, trainable), a
            textrl checkpoint or run folder (its policy), or a hub id that is already in the local HF cache.
        device: where to put the model.
        dtype: parameter dtype (float32 by default; the embedded model is stored in float32).

    Returns:
        ``(model, tokenizer)``: a ``transformers`` causal LM in eval mode and a
        ``PreTrainedTokenizerFast`` whose ``eos_token`` and ``pad_token`` are set (the pad token falls
        back to the eos token when the tokenizer defines none).

    Raises:
        LMNotFoundError: nothing loadable under that name without network.
        NotACausalLMError: the folder holds, e.g., an encoder-only model.
        textrl.checkpoint.CheckpointError: a checkpoint named directly is incomplete or corrupt.
    """
    where = resolve_lm_path(name_or_path)
    local = isinstance(where, Path)
    if local and (where / "adapter_config.json").is_file() and not (where / "config.json").is_file():
        return _load_adapter(where, device, dtype)
    config = read_config(where)
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(where, config=config, local_files_only=True, dtype=dtype)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise NotACausalLMError(
                f"{where} holds a {config.model_type!r} model ({type(config).__name__}), which is not a "
                "causal language model; textrl needs a decoder-only LM such as GPT-2, Llama or Qwen2"
            ) from None
        raise
    except OSError as e:
        raise LMNotFoundError(f"cannot load the weights in {where}: {e}") from e
    if not _attends_causally(model):  # e.g. BERT: AutoModelForCausalLM maps it to BertLMHeadModel
        raise NotACausalLMError(
            f"{where} holds a {config.model_type!r} model ({type(config).__name__}) whose predictions depend on "
            "later tokens, so it is not a causal language model; textrl needs a decoder-only LM such as GPT-2, "
            "Llama or Qwen2"
        )
    tokenizer = _load_tokenizer(where)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.to(device).eval()
    return model, tokenizer


@torch.no_grad()
def _attends_causally(model: PreTrainedModel) -> bool:
    """Probe: changing the last of four tokens must leave the logits at the first three unchanged."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = (torch.arange(4) % vocab).unsqueeze(0).to(next(model.parameters()).device)  # (1, 4)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % vocab
    mask = torch.ones_like(ids)  # no padding (without a mask transformers warns that there may be some)
    before = model(input_ids=ids, attention_mask=mask).logits[0, :-1]  # (3, V)
    after = model(input_ids=changed, attention_mask=mask).logits[0, :-1]
    return torch.allclose(before.float(), after.float(), rtol=0.0, atol=1e-5)


def _load_adapter(folder: Path, device, dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A peft adapter folder: its base model (by :func:`load_lm`'s rules) with the adapters on top,
    trainable; the tokenizer saved beside the adapters, else the base model's."""
    import peft

    from textrl.lora import adapter_base

    try:
        base_name = adapter_base(folder)
    except (OSError, ValueError) as e:
        raise LMNotFoundError(f"cannot read the adapter folder {folder}: {e}") from None
    base, tokenizer = load_lm(base_name, device=device, dtype=dtype)
    with quiet_transformers():
        model = peft.PeftModel.from_pretrained(base, folder, is_trainable=True).to(device)
    if (folder / "tokenizer.json").is_file():
        tokenizer = _load_tokenizer(folder)
    return model.eval(), tokenizer


def _load_tokenizer(where: Path | str) -> PreTrainedTokenizerFast:
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError) as e:
        raise LMNotFoundError(f"cannot load a tokenizer from {where}: {e}") from e
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise LMNotFoundError(f"{where} has a slow tokenizer only; textrl needs a tokenizer.json (fast)")
    if len(tokenizer) <= len(tokenizer.all_special_tokens):  # what transformers builds when the files are missing
        raise LMNotFoundError(f"{where} has no tokenizer files (e.g. tokenizer.json); save the tokenizer there too")
    if tokenizer.eos_token is None:
        raise LMNotFoundError(f"the tokenizer in {where} defines no eos token; set one in its config")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name_or_path: str | os.PathLike = "tiny") -> PreTrainedTokenizerFast:
    """Load only the tokenizer of a model (same rules and errors as :func:`load_lm`)."""
    where = resolve_lm_path(name_or_path)
    try:
        return _load_tokenizer(where)
    except LMNotFoundError as e:
        if isinstance(where, Path):
            raise
        raise _hub_error(str(where), e) from None


def context_length_of(config) -> int | None:
    """The number of positions a model config supports (None when it does not say)."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def lm_context_length(name_or_path: str | os.PathLike = "tiny") -> int | None:
    """The context length of a model, read from its config alone (no weights are loaded)."""
    where = resolve_lm_path(name_or_path)
    try:
        return context_length_of(AutoConfig.from_pretrained(where, local_files_only=True))
    except OSError as e:
        if isinstance(where, Path):
            raise LMNotFoundError(f"cannot read the model config in {where}: {e}") from e
        raise _hub_error(str(where), e) from None


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    *,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    suppress_tokens: Sequence[int] = (),
    num_return_sequences: int = 1,
    seed: int | None = None,
    stop: str | list[str] | None = None,
) -> list[str]:
    """Sample continuations of ``prompts`` through textrl's decode loop and return the new text only.

    The model runs on the engine when its architecture is one the engine describes (the HF forward
    otherwise, :func:`textrl.core.make_core`), through the same loop as training rollouts
    (:func:`textrl.generation.decode`), sampling as they do.

    Args:
        model, tokenizer: as returned by :func:`load_lm`.
        prompts: the prompts; the empty string starts from the bos (or eos) token.
        max_new_tokens: upper bound on generated tokens (generation stops early at eos).
        temperature: softmax temperature; 0 means greedy decoding.
        top_k: keep only the k most likely tokens (0 = off).
        top_p: nucleus sampling mass (1.0 = off).
        suppress_tokens: token ids never chosen (greedy decoding included).
        num_return_sequences: continuations per prompt, returned prompt-major.
        seed: seeds the sampling generator for reproducible samples.
        stop: strings that end a continuation; each text is cut right after the first one it contains
            (kept), as the env ends an episode once the completion contains one.

    Returns:
        ``len(prompts) * num_return_sequences`` completions.
    """
    import torch.nn.functional as F

    from textrl.core import make_core
    from textrl.generation import continue_texts
    from textrl.policy import sample, shape_logits

    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_k={top_k}, top_p={top_p}")
    device = next(model.parameters()).device
    longest = max((len(tokenizer(p)["input_ids"]) for p in prompts), default=0)
    limit = context_length_of(model.config)
    if limit is not None and max(longest, 1) + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({max(longest, 1)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context of {limit} tokens"
        )
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))

    suppressed = torch.as_tensor(list(suppress_tokens), dtype=torch.long, device=device)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if temperature == 0:
            return shape_logits(logits.float(), suppress_tokens=suppressed).argmax(-1)
        shaped = shape_logits(logits.float(), temperature, top_k, top_p, suppressed)
        return sample(F.softmax(shaped, dim=-1), generator)

    rows = [p for p in prompts for _ in range(num_return_sequences)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            texts = continue_texts(make_core(model), tokenizer, rows, max_new_tokens, pick, stops, device)
    finally:
        model.train(was_training)
    return [cut_at_stop(text, stops) for text in texts]


def cut_at_stop(text: str, stops: list[str]) -> str:
    """``text`` up to and including the first stop string in it (the earliest to end), or all of it.

    >>> cut_at_stop("one. two. three", [".", "two"])
    'one.'
    >>> cut_at_stop("no stop here", ["!"])
    'no stop here'
    """
    ends = [i + len(s) for s in stops if (i := text.find(s)) >= 0]
    return text[: min(ends)] if ends else text
