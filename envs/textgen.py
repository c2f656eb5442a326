"""The single text-generation env, :class:`TextGenEnv` (observation layout: see :mod:`envs.engine`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.engine import ENV_KEYWORDS, TokenBatch, _action_error, _observation_space, _prompt_choice, build_engine
from envs.prompts import PromptSource
from envs.render import text_frame
from textrl.rewards import RewardSpec


class TextGenEnv(gym.Env):
    """Generate text one token at a time; rewards score each token and the finished text.

    ## Description
    An episode continues one prompt. Each action appends one token; the episode ends at the eos token,
    a stop string, or ``max_new_tokens``. Rewards come from the reward functions given (see
    :mod:`textrl.rewards`): immediate ones score every token, sequence ones the finished completion.

    ## Action Space
    ``Discrete(len(tokenizer))``: the id of the next token.

    ## Observation Space
    ``Dict(input_ids=Box(0, V-1, (C,), int64), attention_mask=Box(0, 1, (C,), int8))``: prompt + completion
    so far, right-padded with the pad token to the context width ``C`` (see the module docstring for why).

    ## Starting State
    A prompt drawn uniformly from the prompt set with the env's seeded RNG, or named by
    ``reset(options={"prompt": text})`` (any text) or ``options={"prompt_index": i}``.

    ## Rewards
    Each step: the weighted sum of the immediate rewards for the new token; on the last step, plus the
    weighted sum of the sequence rewards for the whole completion. ``info["reward_components"]`` has every
    reward's unweighted value for the step (sequence rewards are 0 before the last step).

    ## Episode End
    ``terminated``: the eos token was taken, or the completion contains a ``stop`` string.
    ``truncated``: ``max_new_tokens`` tokens were generated (or the context is full). The last step's
    ``info`` carries ``prompt``, ``completion`` (decoded tokens, special tokens skipped, stop string
    kept) and ``prompt_index`` (-1 for an ad-hoc prompt). Stepping a finished episode is an error, and
    so is stepping after a reward raised :class:`textrl.rewards.RewardError` (reset first). Bound episodes
    with ``max_new_tokens`` rather than a ``TimeLimit`` wrapper: a wrapper that truncates earlier ends the
    episode before the env pays the sequence rewards.

    ## Arguments
    - ``lm``: embedded model name or local HF folder whose tokenizer (and context length) the env uses.
    - ``prompts``: list of strings or rows (``{"prompt": ..., **fields}``), a ``.txt``/``.jsonl`` path, or
      any iterable such as a ``datasets.Dataset``. Extra fields are passed to sequence rewards.
    - ``reward``: one reward, a list, or a ``{reward: weight}`` dict; callables or built-in names.
    - ``tokenizer``: use this tokenizer instead of loading ``lm``'s.
    - ``max_new_tokens``: completion length limit (truncation).
    - ``stop``: string(s) that end the episode (termination).
    - ``context_length``: observation width ``C``; default: the longest prompt + ``max_new_tokens``.
    - ``truncate_prompts``: over-long prompts keep their last tokens (True) or raise (False, default).
    - ``render_mode``: ``"ansi"`` (``render()`` returns the prompt + completion so far as a string),
      ``"human"`` (prints it) or ``"rgb_array"`` (draws it: a ``(288, 512, 3)`` ``uint8`` frame of fixed size,
      word-wrapped, prompt and completion in different colours, newest lines kept; see :mod:`envs.render`).
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi", "human", "rgb_array"], "render_fps": 4}

    def __init__(
        self,
        lm: str = "tiny",
        prompts: PromptSource | None = None,
        reward: RewardSpec = None,
        *,
        tokenizer=None,
        max_new_tokens: int = 32,
        stop: str | Sequence[str] | None = None,
        context_length: int | None = None,
        truncate_prompts: bool = False,
        render_mode: str | None = None,
        _engine: Callable[[], TokenBatch] | None = None,
    ):
        self.init_kwargs = {k: v for k, v in locals().items() if k in ENV_KEYWORDS}
        """The keywords this env was built with (agents build batched copies from them)."""
        # a subclass's engine (e.g. envs.dialogue's, with turns), else the generic one
        self.engine = _engine() if _engine is not None else build_engine(1, **self.init_kwargs)
        self.tokenizer = self.engine.tokenizer
        self.action_space = spaces.Discrete(self.engine.vocab_size)
        self.observation_space = _observation_space(self.engine)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.render_mode = render_mode
        self._row = np.zeros(1, dtype=np.int64)
        self._done = True

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        index, text = _prompt_choice(self.engine, options, self.np_random)
        self.engine.load(0, index, text)
        self._done = False
        info = {"prompt_index": int(self.engine.prompt_idx[0]), "prompt": self.engine.row_text[0], "reset": True}
        return self.engine.observation(0), info

    def step(self, action):
        if self._done:
            raise RuntimeError("step() called on a finished episode (or before reset()); call reset() first")
        problem = _action_error(action, self.engine.vocab_size)
        if problem:
            raise ValueError(problem)
        self._done = True  # until the step succeeds: after a RewardError the episode must be reset
        reward, terminated, truncated, components, ends = self.engine.step(self._row, np.array([int(action)]))
        info: dict[str, Any] = {"reward_components": {k: float(v[0]) for k, v in components.items()}}
        info.update(ends.get(0, {}))
        self._done = bool(terminated[0] or truncated[0])
        if self.render_mode == "human":
            self.render()
        return self.engine.observation(0), float(reward[0]), bool(terminated[0]), bool(truncated[0]), info

    def render(self):
        if self.render_mode == "rgb_array":
            return text_frame(self.engine.row_text[0], self.engine.completion_text(0))
        text = self.engine.row_text[0] + self.engine.completion_text(0)
        if self.render_mode == "human":
            print(text)
            return None
        return text
