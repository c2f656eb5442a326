"""Token-level text generation as a Gymnasium environment, single and natively batched.

Both envs share one array engine, :class:`TokenBatch`, that holds every sub-env's tokens in one
``(B, C)`` array: a step writes one column entry per row, so the hot path has no per-env Python objects.
The envs know nothing about models or KV caches; the vector env's ``info["reset"]`` tells a policy which
rows now hold a fresh prompt so it can drop their cache.

Observation layout (both envs): ``{"input_ids": (C,) int64, "attention_mask": (C,) int8}``, **right-padded**
with the tokenizer's pad token: the prompt starts at index 0 and token ``t`` of the completion sits at
``prompt_length + t``. Right padding was chosen because the prefix never moves as the episode grows (a
step writes one entry instead of shifting the whole row), array index equals position id for absolute
position embeddings, and a policy's KV cache stays aligned with the observation. The number of valid
tokens is ``attention_mask.sum()``; the newest token is at that index minus one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from gymnasium import spaces

from envs.prompts import PromptError, PromptSet, PromptSource
from textrl.reward_set import RewardSet
from textrl.rewards import RewardSpec

DEFAULT_PROMPTS = [
    "ROMEO:\n",
    "JULIET:\n",
    "HAMLET:\n",
    "And God said",
    "The king",
    "My lord,",
    "In the beginning",
    "I love",
    "What is",
    "The night",
    "O, ",
    "Good morrow,",
]
"""Prompts used when none are given (suited to the embedded model's Shakespeare + KJV training text)."""


def _action_error(action: Any, n: int) -> str | None:
    """Why ``action`` is not a token id in ``[0, n)``, or None when it is one."""
    if isinstance(action, (bool, np.bool_)):
        return f"action {action!r} is a bool; expected an integer token id"
    if isinstance(action, (int, np.integer)) or (isinstance(action, np.ndarray) and action.shape == ()):
        if isinstance(action, np.ndarray) and action.dtype.kind not in "iu":
            return f"action {action!r} has dtype {action.dtype}; expected an integer token id"
        if not 0 <= int(action) < n:
            return f"action {int(action)} is out of range: token ids are 0..{n - 1}"
        return None
    return f"action {action!r} ({type(action).__name__}) is not an integer token id"


class TokenBatch:
    """The shared engine: ``B`` rows of prompt + completion tokens, stepped together as arrays.

    Args:
        num_rows: ``B``.
        tokenizer: a ``PreTrainedTokenizerFast``.
        prompts: the :class:`PromptSet`.
        rewards: the :class:`RewardSet`.
        max_new_tokens: completion length at which an episode is truncated.
        stop: strings that end an episode (terminated) once the completion contains one.
        context_length: ``C``, the observation width.
    """

    def __init__(
        self, num_rows, tokenizer, prompts: PromptSet, rewards: RewardSet, max_new_tokens, stop, context_length
    ):
        self.tokenizer, self.prompts, self.rewards = tokenizer, prompts, rewards
        self.max_new_tokens, self.stop, self.C = max_new_tokens, tuple(stop), context_length
        self.vocab_size = len(tokenizer)
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.tokens = np.full((num_rows, context_length), self.pad_id, dtype=np.int64)  # (B, C)
        self.mask = np.zeros((num_rows, context_length), dtype=np.int8)  # (B, C)
        self.length = np.zeros(num_rows, dtype=np.int64)  # valid tokens per row
        self.prompt_len = np.zeros(num_rows, dtype=np.int64)
        self.turn_start = np.zeros(num_rows, dtype=np.int64)  # where the agent's current turn began
        self.prompt_idx = np.zeros(num_rows, dtype=np.int64)
        self.row_text: list[str] = [""] * num_rows  # prompt text per row
        self.row_fields: list[dict[str, Any]] = [{} for _ in range(num_rows)]
        self._token_text: list[str] | None = None
        self._stop_window = max((4 * len(s) for s in self.stop), default=0)
        self._is_special = np.zeros(self.vocab_size, dtype=bool)  # special tokens decode to no text
        self._is_special[tokenizer.all_special_ids] = True

    # --- prompts ------------------------------------------------------------------------------------

    def load(self, row: int, index: int | None, text: str | None = None) -> None:
        """Start ``row`` on prompt ``index`` of the set, or on an ad-hoc ``text`` (no extra fields)."""
        if index is None:
            ids = self.prompts.encode_extra(text)
            fields: dict[str, Any] = {k: None for k in self.prompts.fields}
            index = -1
        else:
            ids, text = self.prompts.ids[index], self.prompts.texts[index]
            fields = {k: v[index] for k, v in self.prompts.fields.items()}
        n = len(ids)
        self.tokens[row].fill(self.pad_id)
        self.tokens[row, :n] = ids
        self.mask[row].fill(0)
        self.mask[row, :n] = 1
        self.length[row] = self.prompt_len[row] = self.turn_start[row] = n
        self.prompt_idx[row] = index
        self.row_text[row] = text
        self.row_fields[row] = fields

    def completion_ids(self, row: int) -> list[int]:
        return self.tokens[row, self.prompt_len[row] : self.length[row]].tolist()

    def completion_text(self, row: int) -> str:
        return self.tokenizer.decode(self.completion_ids(row), skip_special_tokens=True)

    @property
    def token_text(self) -> list[str]:
        """Decoded text of every token id (built once, on first use)."""
        if self._token_text is None:
            self._token_text = self.tokenizer.batch_decode([[i] for i in range(self.vocab_size)])
        return self._token_text

    # --- stepping ------------------------------------------------------------------------------------

    def step(self, rows: np.ndarray, actions: np.ndarray):
        """Append ``actions`` (k,) to ``rows`` (k,); return rewards, terminated, truncated, components, ends.

        ``ends`` maps each finished row's position in ``rows`` to its end-of-episode info.
        """
        k = len(rows)
        pos = self.length[rows]
        self.tokens[rows, pos] = actions
        self.mask[rows, pos] = 1
        self.length[rows] = pos + 1
        generated = self.length[rows] - self.prompt_len[rows]

        names = self.rewards.names
        components = {name: np.zeros(k) for name in names}
        reward = np.zeros(k)
        if self.rewards.immediate_terms:
            total, parts = self.rewards.immediate(self._context(rows, actions, generated), k)
            reward += total
            components.update(parts)

        terminated = actions == self.eos_id
        if self.stop:
            for j in np.flatnonzero(~terminated):
                terminated[j] = self._stopped(rows[j])
        truncated = ~terminated & ((generated >= self.max_new_tokens) | (self.length[rows] >= self.C))
        ends = self._finish(rows, np.flatnonzero(terminated | truncated), reward, components)
        return reward, terminated, truncated, components, ends

    def _stopped(self, row: int) -> bool:
        """Whether the text since ``turn_start`` (the completion; a multi-turn env's current turn) contains a
        stop string. Only the last few tokens are decoded: a new stop string ends in them."""
        seg = self.tokens[row, self.turn_start[row] : self.length[row]]
        text_pos = np.flatnonzero(~self._is_special[seg])  # the window counts tokens that have text
        start = text_pos[-self._stop_window] if text_pos.size > self._stop_window else 0
        tail = self.tokenizer.decode(seg[start:], skip_special_tokens=True)
        return any(s in tail for s in self.stop)

    def _finish(self, rows: np.ndarray, done: np.ndarray, reward: np.ndarray, components) -> dict[int, dict[str, Any]]:
        """Pay the sequence rewards of the episodes of ``rows[done]``, which ended this step (into ``reward`` and
        ``components`` at ``done``); return their end-of-episode info by position in ``rows``."""
        ends: dict[int, dict[str, Any]] = {}
        if not done.size:
            return ends
        done_rows = rows[done]
        prompts = [self.row_text[r] for r in done_rows]
        ids = [self.completion_ids(r) for r in done_rows]
        completions = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        fields = {key: [self.row_fields[r][key] for r in done_rows] for key in self.prompts.fields}
        if self.rewards.sequence_terms:
            total, parts = self.rewards.sequence(prompts, completions, ids, fields)
            reward[done] += total
            for name, values in parts.items():
                components[name][done] = values
        for n, (j, r) in enumerate(zip(done, done_rows, strict=True)):
            ends[int(j)] = {
                "prompt": prompts[n],
                "completion": completions[n],
                "prompt_index": int(self.prompt_idx[r]),
                **self._end_info(r),
            }
        return ends

    def _end_info(self, row: int) -> dict[str, Any]:
        """What a subclass adds to a finished episode's info (a multi-turn env: its number of turns)."""
        return {}

    def _context(self, rows: np.ndarray, actions: np.ndarray, generated: np.ndarray) -> dict[str, Any]:
        """Lazy arguments for immediate rewards: each is computed only if some reward names it."""
        ctx: dict[str, Any] = {
            "new_token_ids": lambda: actions,
            "new_tokens": lambda: [self.token_text[a] for a in actions.tolist()],
            "completion_ids": lambda: [self.completion_ids(r) for r in rows],
            "completions": lambda: [self.completion_text(r) for r in rows],
            "prompts": lambda: [self.row_text[r] for r in rows],
            "step": lambda: generated - 1,
        }
        for key in self.prompts.fields:
            ctx[key] = lambda key=key: [self.row_fields[r][key] for r in rows]
        return ctx

    def observation(self, rows: slice | np.ndarray = slice(None), copy: bool = True) -> dict[str, np.ndarray]:
        ids, mask = self.tokens[rows], self.mask[rows]
        return {"input_ids": ids.copy() if copy else ids, "attention_mask": mask.copy() if copy else mask}


ENV_KEYWORDS = ("lm", "prompts", "reward", "tokenizer", "max_new_tokens", "stop", "context_length", "truncate_prompts")
"""The keywords shared by both envs (documented in :class:`envs.TextGenEnv`)."""


def build_engine(
    num_rows: int,
    *,
    lm: str,
    prompts: PromptSource | None,
    reward: RewardSpec,
    tokenizer,
    max_new_tokens: int,
    stop: str | Sequence[str] | None,
    context_length: int | None,
    truncate_prompts: bool,
    max_episode_steps: int | None = None,
    engine: type[TokenBatch] | None = None,
    chat: bool = False,
    **engine_options: Any,
) -> TokenBatch:
    """Validate the env keywords and build the engine (shared by both envs): a :class:`TokenBatch`, or the
    ``engine`` subclass given, which gets ``engine_options`` as well (e.g. :class:`envs.dialogue.DialogueBatch`)."""
    from textrl.lm import lm_context_length, load_tokenizer

    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if context_length is not None and (not isinstance(context_length, (int, np.integer)) or context_length < 1):
        raise ValueError(f"context_length must be a positive integer or None, got {context_length!r}")
    if max_episode_steps is not None:
        max_new_tokens = min(int(max_new_tokens), int(max_episode_steps))
    if tokenizer is None:
        tokenizer = load_tokenizer(lm)
        model_context = lm_context_length(lm)
    else:
        model_context = getattr(tokenizer, "textrl_context_length", None)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    limit = context_length or model_context
    if context_length is not None and model_context is not None and context_length > model_context:
        raise ValueError(f"context_length={context_length} exceeds the model's context of {model_context} tokens")
    if limit is not None and limit <= max_new_tokens:
        raise ValueError(f"context_length ({limit}) must exceed max_new_tokens ({max_new_tokens})")
    max_prompt = limit - max_new_tokens if limit is not None else 1 << 30
    source = DEFAULT_PROMPTS if prompts is None else prompts
    prompt_set = PromptSet(source, tokenizer, max_prompt, truncate_prompts, chat=chat)
    # Observation width: given, else just wide enough for the longest prompt plus the completion.
    width = context_length or min(limit or 1 << 30, prompt_set.max_len + max_new_tokens)
    prompt_set._max_prompt = width - max_new_tokens  # ad-hoc prompts from reset(options) must fit the width
    if isinstance(stop, str):
        stop = [stop]
    stop = [s for s in (stop or []) if s]
    engine = engine or TokenBatch
    return engine(
        num_rows, tokenizer, prompt_set, RewardSet(reward), int(max_new_tokens), stop, width, **engine_options
    )


def _observation_space(engine: TokenBatch) -> spaces.Dict:
    return spaces.Dict(
        {
            "input_ids": spaces.Box(0, engine.vocab_size - 1, (engine.C,), np.int64),
            "attention_mask": spaces.Box(0, 1, (engine.C,), np.int8),
        }
    )


def _prompt_choice(engine: TokenBatch, options: Mapping[str, Any] | None, rng: np.random.Generator):
    """(index, text) of the prompt to start: ``options["prompt"]`` (text) or ``["prompt_index"]``, else random."""
    options = options or {}
    if "prompt_index" in options:
        i = int(options["prompt_index"])
        if not 0 <= i < len(engine.prompts):
            raise PromptError(f"prompt_index {i} is out of range: the env has {len(engine.prompts)} prompts")
        return i, None
    if "prompt" in options:
        text = options["prompt"]
        if text in engine.prompts.texts:
            return engine.prompts.texts.index(text), None
        return None, text
    return int(rng.integers(len(engine.prompts))), None
