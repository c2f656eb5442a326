"""``textrl/GuessNumber-v0``: a game with feedback. The env thinks of a number, the agent guesses, the env says
"Higher." or "Lower." until the agent finds it or runs out of turns."""

from __future__ import annotations

import re
from typing import Any

from envs.dialogue import MultiTurnEnv, MultiTurnVectorEnv, Reply

NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT = "I think of a number from one to {high}. Guess it.\nGuess:"
"""The prompt: the same for every secret, so the agent can only find the number from the env's replies. Numbers
are words: the embedded model, trained on Shakespeare and the King James Bible, says "seven" far more readily
than "7", which is what makes the game learnable from scratch."""
_NUMBER = re.compile(r"\b(" + "|".join(NUMBERS) + r")\b|([1-9])", re.IGNORECASE)


def guess_reply(state: dict[str, Any], turn: str) -> Reply:
    """The game's rules: a turn's first number (a word from one to nine, or a digit) is its guess. Right:
    reward 1 (+ 0.1 for the guess) and the episode ends; wrong: 0.1 for a well-formed guess and
    "Higher."/"Lower."; no number: "Say a number." and 0."""
    found = _NUMBER.search(turn)
    if found is None:
        return Reply("Say a number.")
    word, digit = found.groups()
    guess = NUMBERS.index(word.lower()) + 1 if word else int(digit)
    if guess == state["secret"]:
        return Reply(None, reward=1.1, done=True)
    return Reply("Higher." if guess < state["secret"] else "Lower.", reward=0.1)


def _keywords(high: int, repeats: int, max_turns: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    if not 2 <= high <= 9:
        raise ValueError(f"high must be in 2..9, got {high}")
    rows = [{"prompt": PROMPT.format(high=NUMBERS[high - 1]), "secret": s} for s in range(1, high + 1)] * repeats
    defaults = {
        "prompts": rows,
        "respond": guess_reply,
        "max_turns": max_turns,
        "max_turn_tokens": 3,
        "turn_stop": "\n",
        "reply_template": " {reply}\nGuess:",
    }
    return defaults | kwargs


class GuessNumberEnv(MultiTurnEnv):
    """Find the env's number from its "Higher."/"Lower." replies.

    ## Description
    A game with feedback as a multi-turn env (:mod:`envs.dialogue`). The prompt is the same for every secret
    number, so the agent can only find it by reading the env's replies. Each agent turn is up to 3 tokens (a
    newline ends it); its first number, a word from "one" to "nine" or a digit, is the guess.

    ## Rewards
    Per turn: 0.1 for a well-formed guess, 1 more when it is right; 0 for a turn without a number.

    ## Episode End
    The right guess (terminated), or ``max_turns`` turns (truncated; default 5).

    ## Arguments
    ``high`` (9): the secret is in ``1..high``. ``repeats`` (1): copies of the prompt set. ``max_turns`` (5).
    Any :class:`envs.MultiTurnEnv` keyword overrides what the game uses.

    ## Solved
    ``reward_threshold`` 1.0: the number found in most episodes. Guessing at random without repeats finds it
    within 5 turns in 5 of 9 episodes; halving the range finds it within 4 turns every time (1.4 on average).
    """

    def __init__(self, lm: str = "tiny", high: int = 9, repeats: int = 1, max_turns: int = 5, **kwargs: Any):
        super().__init__(lm=lm, **_keywords(high, repeats, max_turns, kwargs))

    @classmethod
    def vector(cls, num_envs: int = 1, lm: str = "tiny", **kwargs: Any) -> MultiTurnVectorEnv:
        """The natively batched env with the same options (Gymnasium's ``vector_entry_point``)."""
        game = {k: kwargs.pop(k) for k in ("high", "repeats", "max_turns") if k in kwargs}
        keywords = _keywords(game.get("high", 9), game.get("repeats", 1), game.get("max_turns", 5), kwargs)
        return MultiTurnVectorEnv(num_envs, lm=lm, **keywords)
