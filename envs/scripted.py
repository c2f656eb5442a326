"""``textrl/SayWord-v0``: a scripted user whose next message depends on what the agent said. The user asks for
a word; said, it asks for the next one, otherwise it repeats the request."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from envs.dialogue import MultiTurnEnv, MultiTurnVectorEnv, Reply

WORDS = ("love", "king", "night", "heart", "sweet", "blood", "gold", "sea", "lord", "death")
"""Words the user asks for: each a single token of the embedded tokenizer (with its leading space) and common in
its training text, so the agent can say them, and has to learn which one and when."""


def user_reply(state: dict[str, Any], turn: str) -> Reply:
    """The scripted user: reward 1 when the turn says the requested word (a whole word, any case), then ask for
    the next word of the episode's list ("Good. Say: king."), or end the episode after the last; otherwise
    repeat the request ("No. Say: love."), reward 0."""
    state.setdefault("asked", 0)
    words = state["words"]
    wanted = words[state["asked"]]
    if re.search(rf"\b{wanted}\b", turn, re.IGNORECASE):
        state["asked"] += 1
        if state["asked"] == len(words):
            return Reply(None, reward=1.0, done=True)
        return Reply(f"Good. Say: {words[state['asked']]}.", reward=1.0)
    return Reply(f"No. Say: {wanted}.", reward=0.0)


def _keywords(n_prompts: int, n_words: int, seed: int, max_turns: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    if not 1 <= n_words <= len(WORDS):
        raise ValueError(f"n_words must be in 1..{len(WORDS)}, got {n_words}")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_prompts):
        words = rng.choice(WORDS, n_words, replace=False).tolist()
        rows.append({"prompt": f"Say: {words[0]}.\n", "words": words})
    defaults = {
        "prompts": rows,
        "respond": user_reply,
        "max_turns": max_turns,
        "max_turn_tokens": 3,
        "turn_stop": "\n",
        "reply_template": "\n{reply}\n",
    }
    return defaults | kwargs


class SayWordEnv(MultiTurnEnv):
    """Say the word the scripted user asks for; the user's next message depends on what the agent said.

    ## Description
    A scripted user as a multi-turn env (:mod:`envs.dialogue`). The prompt asks for a word ("Say: love.").
    After each agent turn (up to 3 tokens; a newline ends it) the user checks it. If the turn has the word,
    the user asks for the next word of the episode's list ("Good. Say: king."). If not, the user repeats
    the request ("No. Say: love.").

    ## Rewards
    1 per turn that says the requested word.

    ## Episode End
    Every word said (terminated), or ``max_turns`` turns (truncated; default 4).

    ## Arguments
    ``n_prompts`` (64) word lists of ``n_words`` (2) words from :data:`WORDS`, drawn with ``seed`` (0);
    ``max_turns`` (4). Any :class:`envs.MultiTurnEnv` keyword overrides what the task uses.

    ## Solved
    ``reward_threshold`` 1.5: on average more than one of the two words said within the 4 turns.
    """

    def __init__(
        self, lm: str = "tiny", n_prompts: int = 64, n_words: int = 2, seed: int = 0, max_turns: int = 4, **kwargs
    ):
        super().__init__(lm=lm, **_keywords(n_prompts, n_words, seed, max_turns, kwargs))

    @classmethod
    def vector(cls, num_envs: int = 1, lm: str = "tiny", **kwargs: Any) -> MultiTurnVectorEnv:
        """The natively batched env with the same options (Gymnasium's ``vector_entry_point``)."""
        task = {"n_prompts": 64, "n_words": 2, "seed": 0, "max_turns": 4}
        task |= {k: kwargs.pop(k) for k in list(task) if k in kwargs}
        return MultiTurnVectorEnv(num_envs, lm=lm, **_keywords(**task, kwargs=kwargs))
