"""The env protocol: what textrl's agents, rollouts, evaluation and SB3 bridge use of a text env.

Everything above the core reaches a text-generation env through this interface and nothing else; the
batched :class:`envs.TextGenVectorEnv` implements it (and a single :class:`envs.TextGenEnv` is made into one
by the agents), so an env written from scratch that implements it trains the same way.

Observations are dicts of right-padded arrays: ``"input_ids"`` (num_envs, L) and ``"attention_mask"``
(num_envs, L), the prompt followed by the tokens taken so far. Actions are token ids (num_envs,).

``reset(seed=None, options=None)``: Gymnasium's vector reset. ``options={"prompt_index": ints (num_envs,)}``
starts row ``i`` on prompt ``prompt_index[i]`` of :attr:`prompts` (the agents lay out groups of samples of
one prompt this way).

``step(actions)``: Gymnasium's vector step, ``(obs, reward, terminated, truncated, info)``, autoresetting
finished rows on the next step (``AutoresetMode.NEXT_STEP``). ``info`` keys the agents read:

- ``"completion"``: (num_envs,) text of each row's completion, valid where its episode ended this step;
- ``"reward_components"``: ``{name: (num_envs,)}`` each reward term's unweighted value this step (names as
  :attr:`reward_names`); optional.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class TextVectorEnv(Protocol):
    """A batched text-generation env as textrl's agents use it (see the module docstring)."""

    num_envs: int
    """Rows stepped together (the agent's batch size)."""
    single_action_space: Any
    """``gymnasium.spaces.Discrete`` over the token ids an action may take."""
    tokenizer: Any
    """The env's tokenizer: its ids are the actions, its text is what rewards read."""
    init_kwargs: dict[str, Any]
    """The keywords that rebuild this env (checkpoints store them; evaluation builds copies from them)."""

    @property
    def prompts(self) -> Sequence[str]:
        """The prompt set, indexed by ``options["prompt_index"]``."""
        ...

    @property
    def max_new_tokens(self) -> int:
        """Most actions per episode."""
        ...

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings: an episode ends once its completion's text contains one."""
        ...

    @property
    def pad_id(self) -> int:
        """The token id of padding in observations."""
        ...

    @property
    def reward_names(self) -> tuple[str, ...]:
        """Names of the reward terms (empty: the env has no reward)."""
        ...

    def prompt_text(self, row: int) -> str:
        """The prompt text that ``row`` started its current episode on."""
        ...

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]: ...

    def step(self, actions: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, dict]: ...
