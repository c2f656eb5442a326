"""Language models: load the embedded default or any local Hugging Face causal LM, and sample from it.

``load_lm("tiny")`` returns the GPT-2-architecture model that ships inside this package (made by
``textrl pretrain``; its model card is ``textrl/models/tiny/README.md``). Any local folder with an HF
causal LM (GPT-2, Llama, Qwen2, ...) loads the same way. Nothing is ever downloaded: a hub id that is not
already in the local Hugging Face cache is a clear :class:`LMNotFoundError`.
"""

from __future__ import annotations

import os
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
EMBEDDED_MODELS: dict[str, Path] = {"tiny": MODELS_DIR / "tiny"}
"""Registry of the models that ship inside the package: name -> folder."""


class LMNotFoundError(FileNotFoundError):
    """The requested language model is neither embedded, a local folder, nor in the local HF cache."""


class NotACausalLMError(ValueError):
    """The folder holds a model that is not a causal (decoder-only, next-token) language model."""


def resolve_lm_path(name_or_path: str | os.PathLike) -> Path | str:
    """Map ``"tiny"`` (or another embedded name) to its folder; return local folders as paths.

    Anything else is returned unchanged as a hub id, to be looked up in the local HF cache only.
    """
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        path = EMBEDDED_MODELS[name]
        if not (path / "config.json").is_file():
            raise LMNotFoundError(
                f"the embedded model {name!r} is missing from {path}; reinstall textrl-suite "
                "or rebuild it with `textrl pretrain --out textrl/models/tiny`"
            )
        return path
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LMNotFoundError(f"{path} is a file; pass the folder that holds config.json and the weights")
        if not (path / "config.json").is_file():
            raise LMNotFoundError(f"{path} is not a Hugging Face model folder: it has no config.json")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an "org/name" hub id
        raise LMNotFoundError(f"model folder not found: {path}")
    return name


def _hub_error(name: str, cause: Exception) -> LMNotFoundError:
    return LMNotFoundError(
        f"{name!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)}), not a local folder, and not in "
        f"the local Hugging Face cache. textrl never downloads weights at run time: download the model "
        f"once where there is network (e.g. `hf download {name} --local-dir DIR`) and pass that local "
        f"folder, e.g. load_lm('DIR') or --lm DIR. ({type(cause).__name__})"
    )


def load_lm(
    name_or_path: str | os.PathLike = "tiny",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a causal language model and its fast tokenizer.

    Args:
        name_or_path: ``"tiny"`` (the embedded default), a local folder holding an HF causal LM, or a
            hub id that is already in the local Hugging Face cache.
        device: where to put the model.
        dtype: parameter dtype (float32 by default; the embedded model is stored in float32).

    Returns:
        ``(model, tokenizer)``: a ``transformers`` causal LM in eval mode and a
        ``PreTrainedTokenizerFast`` whose ``eos_token`` and ``pad_token`` are set (the pad token falls
        back to the eos token when the tokenizer defines none).

    Raises:
        LMNotFoundError: nothing loadable under that name without network.
        NotACausalLMError: the folder holds, e.g., an encoder-only model.
    """
    where = resolve_lm_path(name_or_path)
    local = isinstance(where, Path)
    try:
        config = AutoConfig.from_pretrained(where, local_files_only=True)
    except OSError as e:
        if local:
            raise LMNotFoundError(f"cannot read the model config in {where}: {e}") from e
        raise _hub_error(str(where), e) from None
    try:
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
    before, after = model(input_ids=ids).logits[0, :-1], model(input_ids=changed).logits[0, :-1]  # (3, V)
    return torch.allclose(before.float(), after.float(), rtol=0.0, atol=1e-5)


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
    num_return_sequences: int = 1,
    seed: int | None = None,
) -> list[str]:
    """Sample continuations of ``prompts`` (KV-cached ``model.generate``) and return the new text only.

    Args:
        model, tokenizer: as returned by :func:`load_lm`.
        prompts: the prompts; the empty string starts from the eos token.
        max_new_tokens: upper bound on generated tokens (generation stops early at eos).
        temperature: softmax temperature; 0 means greedy decoding.
        top_k: keep only the k most likely tokens (0 = off).
        top_p: nucleus sampling mass (1.0 = off).
        num_return_sequences: continuations per prompt, returned prompt-major.
        seed: seeds torch's RNG for reproducible samples.

    Returns:
        ``len(prompts) * num_return_sequences`` completions.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_k={top_k}, top_p={top_p}")
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    texts = [p if p else tokenizer.eos_token for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts are left-padded
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True).to(device)
    finally:
        tokenizer.padding_side = side
    limit = context_length_of(model.config)
    if limit is not None and batch.input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({batch.input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context of {limit} tokens"
        )
    sample = temperature > 0
    out = model.generate(
        **batch,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_k=top_k if sample and top_k else None,
        top_p=top_p if sample else None,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_return_sequences if sample else 1,  # HF refuses several greedy sequences
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # (B * num_return_sequences, P + T)
    if not sample:
        out = out.repeat_interleave(num_return_sequences, dim=0)  # greedy: identical copies, prompt-major
    new = out[:, batch.input_ids.shape[1] :]
    return tokenizer.batch_decode(new, skip_special_tokens=True)
