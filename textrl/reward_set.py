"""Combining and checking rewards: :class:`RewardSet`, the weighted sum an env scores episodes with.

Each reward of an env's ``reward=`` becomes a :class:`RewardTerm`; every call's output is checked (NaN,
inf, a wrong length, a non-numeric value or an exception is a :class:`textrl.rewards.RewardError` naming
the reward and the sample), and immediate rewards get only the context arguments they name.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from textrl.rewards import REWARDS, Kind, RewardError, RewardSpec, reward_kind, reward_name


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


def _resolve(item: Callable | str) -> Callable:
    if isinstance(item, str):
        if item.startswith("reward_model:"):  # a learned reward: "reward_model:FOLDER" (e.g. from --env-kwargs)
            from textrl.reward_model import reward_model

            return reward_model(item.split(":", 1)[1])
        if item not in REWARDS:
            raise ValueError(
                f"unknown reward {item!r}; built-in rewards: {sorted(REWARDS)}, "
                "or reward_model:FOLDER for a learned one"
            )
        return REWARDS[item]()
    if not callable(item):
        raise TypeError(f"a reward must be callable or the name of a built-in, got {type(item).__name__}")
    return item


class RewardSet:
    """A weighted combination of rewards: ``total = sum(weight * component)``.

    Components are reported unweighted under their names (duplicates get ``_2``, ``_3``...).

    >>> from textrl.rewards import keyword_reward
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
