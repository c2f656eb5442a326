"""The reward API: sequence rewards (scored once an episode ends) and immediate rewards (scored per token).

A **sequence reward** is called on a batch of finished episodes, by keyword, exactly the way TRL's
``GRPOTrainer`` calls its reward functions, so a reward written for TRL (e.g. those in ``trl.rewards``)
plugs in unchanged::

    def my_reward(prompts, completions, completion_ids, **fields) -> list[float]: ...

``fields`` are the prompt rows' extra columns (e.g. ``reference=[...]``), one list entry per sample.

An **immediate reward** is called at every step on the batch of sub-envs that just took a token and returns
one float per sub-env. It receives only the arguments its signature names (a ``**kwargs`` parameter gets
them all), so a reward that needs only the new token never pays for decoding whole prefixes:

=================  ====================================================================
``new_token_ids``  ``np.ndarray`` (B,): the token each sub-env just took
``new_tokens``     ``list[str]``: those tokens' text
``completion_ids`` ``list[list[int]]``: the completion so far, new token included
``completions``    ``list[str]``: the decoded completion so far, new token included
``prompts``        ``list[str]``: the prompts
``step``           ``np.ndarray`` (B,): index of the new token in the completion (0-based)
``**fields``       the prompt rows' extra columns
=================  ====================================================================

A bare function is a sequence reward; :func:`immediate` marks an immediate one (and :func:`sequence`
exists for symmetry). A class instance works the same way; give it ``kind = "immediate"`` or decorate it.
Several rewards combine as a list (weights 1) or a ``{reward: weight}`` dict; each component is reported.

A learned reward model (any local Hugging Face sequence-classification folder, e.g. one made by
``textrl reward-train``) is :func:`reward_model` (from :mod:`textrl.reward_model`, imported on first use).

Every output is checked: NaN, inf, a wrong length, a non-numeric value or an exception raises
:class:`RewardError` naming the reward and the offending sample; there is never a silent zero (the
combining and checking live in :mod:`textrl.reward_set`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Kind = Literal["sequence", "immediate"]
IMMEDIATE_ARGS = ("new_token_ids", "new_tokens", "completion_ids", "completions", "prompts", "step")


@runtime_checkable
class SequenceReward(Protocol):
    """Scores finished episodes, one float per sample (TRL's reward-function convention)."""

    def __call__(
        self, *, prompts: list[str], completions: list[str], completion_ids: list[list[int]], **fields: Any
    ) -> Sequence[float]: ...


@runtime_checkable
class ImmediateReward(Protocol):
    """Scores the token each sub-env just took; receives the subset of :data:`IMMEDIATE_ARGS` it names."""

    kind: Literal["immediate"]

    def __call__(self, **context: Any) -> Sequence[float]: ...


class RewardError(ValueError):
    """A reward function raised, or returned something that is not one finite float per sample."""


def immediate(fn: Callable) -> Callable:
    """Mark ``fn`` as an immediate (per-token) reward.

    >>> @immediate
    ... def newline_bonus(new_tokens, **_):
    ...     return [1.0 if "\\n" in t else 0.0 for t in new_tokens]
    >>> reward_kind(newline_bonus)
    'immediate'
    """
    fn.kind = "immediate"  # type: ignore[attr-defined]
    return fn


def sequence(fn: Callable) -> Callable:
    """Mark ``fn`` as a sequence reward (the default for a bare function)."""
    fn.kind = "sequence"  # type: ignore[attr-defined]
    return fn


def reward_kind(fn: Callable) -> Kind:
    """``"immediate"`` for rewards marked so (decorator or a ``kind`` attribute), else ``"sequence"``."""
    kind = getattr(fn, "kind", "sequence")
    if kind not in ("sequence", "immediate"):
        raise ValueError(f"reward {reward_name(fn)!r} has kind={kind!r}; expected 'sequence' or 'immediate'")
    return kind


def reward_name(fn: Callable) -> str:
    """A reward's display name: ``__name__`` of a function, the class name of an instance."""
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return name if name != "<lambda>" else "lambda"


def conversational(fn: Callable) -> Callable:
    """Adapt a reward written for TRL's *conversational* format (messages, not strings).

    The wrapped reward sees ``completions=[[{"role": "assistant", "content": text}], ...]`` and
    ``prompts=[[{"role": "user", "content": text}], ...]``, as TRL passes them for chat datasets
    (e.g. ``trl.rewards.think_format_reward``).

    >>> def first_content(completions, **_):
    ...     return [float(len(c[0]["content"])) for c in completions]
    >>> conversational(first_content)(prompts=["p"], completions=["abc"], completion_ids=[[1, 2]])
    [3.0]
    """

    def wrapped(*, prompts, completions, **kwargs):
        return fn(
            prompts=[[{"role": "user", "content": p}] for p in prompts],
            completions=[[{"role": "assistant", "content": c}] for c in completions],
            **kwargs,
        )

    wrapped.__name__ = reward_name(fn)
    wrapped.kind = reward_kind(fn)  # type: ignore[attr-defined]
    return wrapped


RewardSpec = Callable | str | Sequence[Callable | str] | Mapping[Any, float] | None
"""What an env's ``reward=`` takes: a reward, a built-in's name, a list of them, or ``{reward: weight}``."""


# ---------------------------------------------------------------------------------------------------------
# Built-in rewards


def _words(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


@dataclass(eq=False)  # eq=False: hashable by identity, usable as a {reward: weight} key
class length_penalty:
    """Sequence reward: ``-per_token`` for every completion token beyond ``max_tokens`` (0 otherwise).

    >>> length_penalty(max_tokens=3, per_token=0.5)(prompts=["", ""], completions=["", ""],
    ...                                              completion_ids=[[1, 2], [1, 2, 3, 4, 5]])
    [0.0, -1.0]
    """

    max_tokens: int = 32
    """Completions up to this many tokens are not penalised."""
    per_token: float = 1.0
    """Penalty per extra token."""

    def __call__(self, completion_ids: list[list[int]], **_: Any) -> list[float]:
        return [
            -self.per_token * (len(ids) - self.max_tokens) if len(ids) > self.max_tokens else 0.0
            for ids in completion_ids
        ]


@dataclass(eq=False)
class target_length:
    """Sequence reward: ``1 - |tokens - target| / target``, clipped at 0, i.e. 1.0 at exactly ``target``.

    >>> target_length(target=4)(completion_ids=[[1] * 4, [1] * 2, [1] * 12])
    [1.0, 0.5, 0.0]
    """

    target: int = 16
    """Ideal completion length in tokens."""

    def __call__(self, completion_ids: list[list[int]], **_: Any) -> list[float]:
        return [max(0.0, 1.0 - abs(len(ids) - self.target) / self.target) for ids in completion_ids]


@dataclass(eq=False)
class keyword_reward:
    """Sequence reward: the fraction of ``include`` words present minus the number of ``avoid`` words present.

    Matching is on whole words, case-insensitive.

    >>> r = keyword_reward(include=["love", "night"], avoid=["death"])
    >>> r(completions=["Love the night", "love and death", "nothing"])
    [1.0, -0.5, 0.0]
    """

    include: list[str] = field(default_factory=lambda: ["love"])
    """Words to include (each present adds 1/len(include))."""
    avoid: list[str] = field(default_factory=list)
    """Words to avoid (each present subtracts 1)."""

    def __call__(self, completions: list[str], **_: Any) -> list[float]:
        inc = {w.lower() for w in self.include}
        avo = {w.lower() for w in self.avoid}
        out = []
        for text in completions:
            words = set(_words(text))
            out.append((len(words & inc) / len(inc) if inc else 0.0) - len(words & avo))
        return out


@dataclass(eq=False)
class repetition_penalty:
    """Sequence reward: ``max_penalty * (1 - unique n-grams / n-grams)`` over completion token ids.

    The same measure as TRL's ``get_repetition_penalty_reward`` (0 for no repeats, towards
    ``max_penalty`` for fully repetitive text).

    >>> repetition_penalty(ngram_size=2)(completion_ids=[[1, 2, 3, 4], [5, 5, 5, 5, 5]])
    [0.0, -0.75]
    """

    ngram_size: int = 3
    """n-gram length."""
    max_penalty: float = -1.0
    """Reward of a fully repetitive completion (must be <= 0)."""

    def __post_init__(self):
        if self.max_penalty > 0:
            raise ValueError(f"max_penalty must be <= 0, got {self.max_penalty}")

    def __call__(self, completion_ids: list[list[int]], **_: Any) -> list[float]:
        out = []
        for ids in completion_ids:
            ids = list(ids)
            grams = list(zip(*[ids[i:] for i in range(self.ngram_size)]))  # noqa: B905
            out.append(self.max_penalty * (1 - len(set(grams)) / len(grams)) + 0.0 if grams else 0.0)
        return out


@dataclass(eq=False)
class token_keyword_shaping:
    """Immediate reward: ``+bonus`` when the token just taken is an ``include`` word, ``-bonus`` for ``avoid``.

    Tokens are compared as stripped, lower-cased text, so it shapes towards words that are single tokens.

    >>> r = token_keyword_shaping(include=["love"], avoid=["hate"], bonus=0.5)
    >>> r(new_tokens=[" Love", " hate", "ly"])
    [0.5, -0.5, 0.0]
    """

    include: list[str] = field(default_factory=lambda: ["love"])
    """Words rewarded as soon as they are generated."""
    avoid: list[str] = field(default_factory=list)
    """Words penalised as soon as they are generated."""
    bonus: float = 0.1
    """Reward magnitude per matching token."""
    kind: str = field(default="immediate", init=False, repr=False)

    def __call__(self, new_tokens: list[str]) -> list[float]:
        inc = {w.lower() for w in self.include}
        avo = {w.lower() for w in self.avoid}
        out = []
        for t in new_tokens:
            t = t.strip().lower()
            out.append(self.bonus if t in inc else -self.bonus if t in avo else 0.0)
        return out


@dataclass(eq=False)
class repeated_token_penalty:
    """Immediate reward: ``-penalty`` when the token just taken already occurs in the last ``window`` tokens.

    >>> repeated_token_penalty(window=2, penalty=1.0)(completion_ids=[[1, 2, 3], [4, 5, 4], [7]])
    [0.0, -1.0, 0.0]
    """

    window: int = 4
    """How many preceding completion tokens to look back over."""
    penalty: float = 0.1
    """Penalty per repeated token."""
    kind: str = field(default="immediate", init=False, repr=False)

    def __call__(self, completion_ids: list[list[int]]) -> list[float]:
        return [-self.penalty if ids[-1] in ids[-1 - self.window : -1] else 0.0 for ids in completion_ids]


REWARDS: dict[str, Callable[[], Callable]] = {
    "length_penalty": length_penalty,
    "target_length": target_length,
    "keyword_reward": keyword_reward,
    "repetition_penalty": repetition_penalty,
    "token_keyword_shaping": token_keyword_shaping,
    "repeated_token_penalty": repeated_token_penalty,
}
"""Built-in rewards by name (usable as ``reward="keyword_reward"``): name -> class with defaults."""

from textrl.reward_library import LIBRARY_REWARDS  # noqa: E402  (no cycle: it imports nothing from here)

REWARDS.update(LIBRARY_REWARDS)


def __getattr__(name: str) -> Any:
    """``reward_model`` and ``RewardModel`` from :mod:`textrl.reward_model`, imported on first use (they load
    models; importing them here would also make a cycle)."""
    if name in ("reward_model", "RewardModel"):
        from textrl import reward_model as module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
