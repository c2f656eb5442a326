"""Prompt sources: lists of strings, text or JSONL files, or any iterable / ``datasets.Dataset`` of rows.

A row is a string (the prompt) or a mapping with a ``"prompt"`` entry plus optional extra fields (for
example ``"reference"``); the extra fields are passed to the sequence rewards by keyword, the way TRL
passes a dataset's extra columns.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


class PromptError(ValueError):
    """A prompt source is empty, malformed, or holds a prompt that does not fit the context."""


PromptSource = str | Path | Iterable[str | Mapping[str, Any]]


def _read_file(path: Path) -> list[str | dict[str, Any]]:
    if not path.is_file():
        raise PromptError(f"prompt file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows: list[str | dict[str, Any]] = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, (dict, str)):
                raise PromptError(f"{path}:{i}: expected an object with a 'prompt' field or a string")
            rows.append(row)
        return rows
    # plain text: one prompt per non-empty line; "\n" inside a line stands for a newline
    return [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
    )


def render_chat(tokenizer, messages: list[Mapping[str, str]]) -> str:
    """``messages`` rendered with the tokenizer's chat template, ending with the assistant's generation prompt."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


class PromptSet:
    """Prompts, their extra fields and their token ids, checked once up front.

    Args:
        source: list of strings / rows, a ``.txt`` (one prompt per line) or ``.jsonl`` file, or any
            iterable of rows (``datasets.Dataset`` included).
        tokenizer: the env's tokenizer.
        max_prompt_tokens: longest allowed prompt in tokens.
        truncate: if True, over-long prompts keep their last ``max_prompt_tokens`` tokens
            (left-truncation); if False (default) they are an error naming the prompt.
        chat: render each prompt with the tokenizer's chat template, as a user message followed by the
            assistant's generation prompt; a row may give ``messages`` (e.g. with a system message) instead
            of ``prompt``. :attr:`texts` are then the rendered texts, which the model reads.
    """

    def __init__(
        self, source: PromptSource, tokenizer, max_prompt_tokens: int, truncate: bool = False, chat: bool = False
    ):
        if chat and not getattr(tokenizer, "chat_template", None):
            raise PromptError(
                "chat=True renders prompts with the tokenizer's chat template, and this tokenizer has none; set "
                "tokenizer.chat_template (a Jinja string) or leave chat off"
            )
        if isinstance(source, (str, Path)) and (isinstance(source, Path) or Path(source).suffix in (".txt", ".jsonl")):
            rows: list[Any] = _read_file(Path(source))
            origin = str(source)
        elif isinstance(source, str):
            raise PromptError(
                f"prompts={source!r} is a single string; pass a list of prompts, or a .txt / .jsonl file path"
            )
        else:
            try:
                rows = list(source)
            except TypeError:
                raise PromptError(
                    f"prompts must be a list, a file path or an iterable, got {type(source).__name__}"
                ) from None
            origin = type(source).__name__
        if not rows:
            raise PromptError(f"the prompt source ({origin}) is empty")

        self.texts: list[str] = []
        extra: list[dict[str, Any]] = []
        for i, row in enumerate(rows):
            if isinstance(row, str):
                self.texts.append(row)
                extra.append({})
            elif isinstance(row, Mapping) and isinstance(row.get("prompt"), str):
                self.texts.append(row["prompt"])
                extra.append({k: v for k, v in row.items() if k != "prompt"})
            elif chat and isinstance(row, Mapping) and _is_messages(row.get("messages")):
                self.texts.append(render_chat(tokenizer, row["messages"]))
                extra.append({k: v for k, v in row.items() if k != "messages"})
                continue
            else:
                raise PromptError(
                    f"prompt row {i} of {origin} is {type(row).__name__} {row!r:.80}; "
                    "expected a string or a mapping with a string 'prompt' field"
                    + (" or a 'messages' list of {'role', 'content'} dicts" if chat else "")
                )
            if chat:
                self.texts[-1] = render_chat(tokenizer, [{"role": "user", "content": self.texts[-1]}])
        keys = sorted({k for e in extra for k in e})
        for k in keys:
            missing = [i for i, e in enumerate(extra) if k not in e]
            if missing:
                raise PromptError(f"field {k!r} is missing from prompt rows {missing[:5]} of {origin}")
        self.fields: dict[str, list[Any]] = {k: [e[k] for e in extra] for k in keys}

        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        # a rendered chat holds its own special tokens (a bos the template writes): add none
        encoded = tokenizer(self.texts, add_special_tokens=not chat)["input_ids"]
        self.ids: list[np.ndarray] = []
        for i, ids in enumerate(encoded):
            if not ids:  # the empty prompt starts from the bos (or eos) token
                ids = [start]
            if len(ids) > max_prompt_tokens:
                if not truncate:
                    raise PromptError(
                        f"prompt {i} ({self.texts[i][:60]!r}...) is {len(ids)} tokens long, more than the "
                        f"{max_prompt_tokens} that fit (context_length - max_new_tokens); shorten it, raise "
                        "context_length, lower max_new_tokens, or pass truncate_prompts=True to keep its end"
                    )
                ids = ids[-max_prompt_tokens:]
            self.ids.append(np.asarray(ids, dtype=np.int64))
        self.max_len = max(len(x) for x in self.ids)
        self._tokenizer, self._max_prompt, self._truncate, self._start = tokenizer, max_prompt_tokens, truncate, start
        self._chat = chat

    def encode_extra(self, text: str) -> np.ndarray:
        """Token ids of an ad-hoc prompt (``reset(options={"prompt": ...})``), with the same length rules."""
        if not isinstance(text, str):
            raise PromptError(f"options['prompt'] must be a string, got {type(text).__name__}")
        if self._chat:
            text = render_chat(self._tokenizer, [{"role": "user", "content": text}])
        ids = self._tokenizer(text, add_special_tokens=not self._chat)["input_ids"] or [self._start]
        if len(ids) > self._max_prompt:
            if not self._truncate:
                raise PromptError(
                    f"prompt {text[:60]!r} is {len(ids)} tokens long, more than the {self._max_prompt} that fit"
                )
            ids = ids[-self._max_prompt :]
        return np.asarray(ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.texts)

    def index_of(self, prompt: str) -> int:
        """Index of a prompt given by its text (for ``reset(options={"prompt": ...})``)."""
        try:
            return self.texts.index(prompt)
        except ValueError:
            raise PromptError(f"prompt {prompt!r:.80} is not in the env's prompt set") from None

    def row_fields(self, indices: Iterable[int]) -> dict[str, list[Any]]:
        """The extra fields of the given prompt rows, column-wise."""
        idx = list(indices)
        return {k: [v[i] for i in idx] for k, v in self.fields.items()}
