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

Every output is checked: NaN, inf, a wrong length, a non-numeric value or an exception raises
:class:`RewardError` naming the reward and the offending sample; there is never a silent zero.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

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


# ---------------------------------------------------------------------------------------------------------
# Combining and checking


@dataclass
class RewardTerm:
    """One reward in a combination."""

    name: str
    fn: Callable
    weight: float
    kind: Kind
    wants: frozenset[str] | None = None
    """Immediate rewards: the context arguments the function names (None = all, it takes **kwargs)."""


def _wants(fn: Callable) -> frozenset[str] | None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


RewardSpec = Callable | str | Sequence[Callable | str] | Mapping[Any, float] | None


def _resolve(item: Callable | str) -> Callable:
    if isinstance(item, str):
        if item not in REWARDS:
            raise ValueError(f"unknown reward {item!r}; built-in rewards: {sorted(REWARDS)}")
        return REWARDS[item]()
    if not callable(item):
        raise TypeError(f"a reward must be callable or the name of a built-in, got {type(item).__name__}")
    return item


class RewardSet:
    """A weighted combination of rewards: ``total = sum(weight * component)``.

    Components are reported unweighted under their names (duplicates get ``_2``, ``_3``...).

    >>> rs = RewardSet({keyword_reward(include=["love"]): 2.0, "repetition_penalty": 1.0})
    >>> rs.names
    ['keyword_reward', 'repetition_penalty']
    >>> total, parts = rs.sequence(["p"], ["I love you"], [[5, 6, 7]])
    >>> total.tolist(), {k: v.tolist() for k, v in parts.items()}
    ([2.0], {'keyword_reward': [1.0], 'repetition_penalty': [0.0]})
    """

    def __init__(self, reward: RewardSpec = None):
        if reward is None:
            items: list[tuple[Any, float]] = []
        elif isinstance(reward, RewardSet):
            items = [(t.fn, t.weight) for t in reward.terms]
        elif isinstance(reward, Mapping):
            items = list(reward.items())
        elif isinstance(reward, str) or callable(reward):
            items = [(reward, 1.0)]
        elif isinstance(reward, Iterable):
            items = [(r, 1.0) for r in reward]
        else:
            raise TypeError(f"reward must be a callable, a name, a list or a dict, got {type(reward).__name__}")
        self.terms: list[RewardTerm] = []
        seen: dict[str, int] = {}
        for item, weight in items:
            fn = _resolve(item)
            if not isinstance(weight, numbers.Real) or not math.isfinite(weight):
                raise ValueError(f"the weight of reward {reward_name(fn)!r} must be a finite number, got {weight!r}")
            base = reward_name(fn)
            seen[base] = seen.get(base, 0) + 1
            name = base if seen[base] == 1 else f"{base}_{seen[base]}"
            kind = reward_kind(fn)
            self.terms.append(RewardTerm(name, fn, float(weight), kind, _wants(fn) if kind == "immediate" else None))
        self.immediate_terms = [t for t in self.terms if t.kind == "immediate"]
        self.sequence_terms = [t for t in self.terms if t.kind == "sequence"]
        self.names = [t.name for t in self.terms]

    def __repr__(self) -> str:
        return "RewardSet(" + ", ".join(f"{t.name}[{t.kind}]*{t.weight:g}" for t in self.terms) + ")"

    def sequence(
        self,
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]],
        fields: Mapping[str, list[Any]] | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Score finished episodes; returns ``(total (B,), {name: component (B,)})``."""
        n = len(completions)
        kwargs = dict(fields or {}, prompts=prompts, completions=completions, completion_ids=completion_ids)
        total = np.zeros(n)
        parts: dict[str, np.ndarray] = {}
        for t in self.sequence_terms:
            values = _call_checked(t, kwargs, n, prompts, completions)
            parts[t.name] = values
            total += t.weight * values
        return total, parts

    def immediate(self, context: Mapping[str, Callable[[], Any]], n: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Score the tokens just taken. ``context`` maps each argument name to a zero-argument function
        that computes it (called at most once, and only if some reward asks for it)."""
        total = np.zeros(n)
        parts: dict[str, np.ndarray] = {}
        cache: dict[str, Any] = {}

        def get(key: str) -> Any:
            if key not in cache:
                cache[key] = context[key]()
            return cache[key]

        for t in self.immediate_terms:
            keys = context.keys() if t.wants is None else [k for k in context if k in t.wants]
            kwargs = {k: get(k) for k in keys}
            values = _call_checked(t, kwargs, n, lambda: get("prompts"), lambda: get("completions"))
            parts[t.name] = values
            total += t.weight * values
        return total, parts


def _slice(kwargs: Mapping[str, Any], i: int) -> dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        out[k] = v[i : i + 1] if isinstance(v, (list, tuple, np.ndarray)) else v
    return out


def _describe(i: int, prompts, completions) -> str:
    prompts = prompts() if callable(prompts) else prompts
    completions = completions() if callable(completions) else completions
    return f"sample {i} (prompt={prompts[i]!r}, completion={completions[i]!r})"


def _call_checked(term: RewardTerm, kwargs: Mapping[str, Any], n: int, prompts, completions) -> np.ndarray:
    """Call a reward and return its output as a float array, or raise :class:`RewardError`."""
    what = f"{term.kind} reward {term.name!r}"
    try:
        out = term.fn(**kwargs)
    except Exception as e:
        bad = None
        if n > 1:  # find the sample that breaks it, so the error can name it
            for i in range(n):
                try:
                    term.fn(**_slice(kwargs, i))
                except Exception:
                    bad = i
                    break
        where = _describe(bad, prompts, completions) if bad is not None else f"a batch of {n} samples"
        raise RewardError(f"{what} raised {type(e).__name__}: {e} on {where}") from e
    if isinstance(out, np.ndarray):
        if out.dtype.kind not in "biuf":
            raise RewardError(f"{what} returned an array of dtype {out.dtype}; expected {n} floats")
        values = out.astype(np.float64).reshape(-1) if out.ndim <= 1 else None
        if values is None:
            raise RewardError(f"{what} returned an array of shape {out.shape}; expected ({n},)")
    elif isinstance(out, (str, bytes, Mapping)):
        raise RewardError(f"{what} returned {type(out).__name__} {out!r:.80}; expected a list of {n} floats")
    else:
        try:
            items = list(out)
        except TypeError:
            raise RewardError(f"{what} returned {type(out).__name__}; expected a list of {n} floats") from None
        for i, v in enumerate(items[:n]):
            if not isinstance(v, numbers.Real):
                raise RewardError(
                    f"{what} returned {type(v).__name__} {v!r} for {_describe(i, prompts, completions)}; "
                    "expected a float"
                    + (" (TRL's 'None = skip' is not supported: return 0.0 explicitly)" if v is None else "")
                )
        values = np.asarray(items, dtype=np.float64)
    if values.shape != (n,):
        raise RewardError(f"{what} returned {values.size} values for {n} samples")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        raise RewardError(f"{what} returned {values[i]} for {_describe(i, prompts, completions)}")
    return values


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
