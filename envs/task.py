"""What the built-in tasks share: the task-env base class and the offline prompt sources.

A task is a :class:`TextGenEnv` whose prompts and rewards are built by the task itself. Each task module
(``envs/sentiment.py``, ``envs/keywords.py``, ...) subclasses :class:`TaskEnv`, declares its options with
defaults in ``options`` and implements :meth:`TaskEnv.build`, which turns the options into the generic
env's keywords. The same options work for the single env and for the natively batched vector env::

    env = gymnasium.make("textrl/Sentiment-v0", n_prompts=128)
    envs = gymnasium.make_vec("textrl/Sentiment-v0", num_envs=32, vectorization_mode="vector_entry_point")

Every task also takes ``fluency``: the weight of the :class:`~textrl.reward_library.misspelling_rate`
guard added to its reward (0, the default, leaves it out); any generic keyword (``max_new_tokens``,
``reward``, ``stop``, ...) overrides what the task would use.

Prompt sets are built offline from the pre-training corpus packages (Shakespeare's plays and the King James
Bible, see :mod:`textrl.corpus`), split by document exactly as ``textrl pretrain`` splits them, so a task
can draw evaluation text the embedded model never saw in training.
"""

from __future__ import annotations

import functools
import re
from typing import Any, ClassVar

import numpy as np

from envs.engine import ENV_KEYWORDS
from envs.textgen import TextGenEnv
from envs.vector import TextGenVectorEnv

_SPEAKER = re.compile(r"^[A-Z][A-Za-z .'-]*:$")
_WORDS = re.compile(r"\S+")


class TaskEnv(TextGenEnv):
    """Base class of the built-in tasks (see the module docstring)."""

    options: ClassVar[dict[str, Any]] = {}
    """The task's own options and their defaults (``fluency`` and ``lm`` are added for every task)."""

    def __init__(self, lm: str = "tiny", **kwargs: Any):
        super().__init__(lm=lm, **self.env_keywords(**kwargs))

    @classmethod
    def build(cls, **options: Any) -> dict[str, Any]:
        """The generic env keywords (``prompts``, ``reward``, ``max_new_tokens``, ``stop``...) for the options."""
        raise NotImplementedError

    @classmethod
    def _split(cls, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        known = {**cls.options, "fluency": 0.0}
        generic = set(ENV_KEYWORDS) | {"render_mode"}
        unknown = sorted(set(kwargs) - set(known) - generic)
        if unknown:
            raise TypeError(
                f"{cls.__name__} got unknown option(s) {unknown}; task options: {sorted(known)}, "
                f"env keywords: {sorted(generic - {'lm'})}"
            )
        options = known | {k: v for k, v in kwargs.items() if k in known}
        return options, {k: v for k, v in kwargs.items() if k in generic}

    @classmethod
    def env_keywords(cls, **kwargs: Any) -> dict[str, Any]:
        """Task options + generic overrides -> the keywords of :class:`TextGenEnv` (``lm`` excluded)."""
        options, overrides = cls._split(kwargs)
        fluency = options.pop("fluency")
        if not isinstance(fluency, (int, float)) or fluency < 0:
            raise ValueError(f"fluency must be a weight >= 0, got {fluency!r}")
        built = cls.build(**options)
        if fluency and "reward" not in overrides:
            from textrl.reward_library import misspelling_rate
            from textrl.reward_set import RewardSet

            terms = RewardSet(built["reward"]).terms
            built["reward"] = {t.fn: t.weight for t in terms} | {misspelling_rate(): float(fluency)}
        return built | overrides

    @classmethod
    def vector(cls, num_envs: int = 1, lm: str = "tiny", **kwargs: Any) -> TextGenVectorEnv:
        """The natively batched vector env of this task (the registered ``vector_entry_point``)."""
        vector_only = ("autoreset_mode", "copy", "max_episode_steps")
        extra = {k: kwargs.pop(k) for k in vector_only if k in kwargs}
        return TextGenVectorEnv(num_envs, lm=lm, **cls.env_keywords(**kwargs), **extra)


# ---------------------------------------------------------------------------------------------------------
# Offline prompt sources


@functools.cache
def corpus_lines(split: str = "train") -> tuple[str, ...]:
    """The corpus's lines of text (speaker tags, scene headings and stage directions dropped) from the
    ``train`` or ``heldout`` documents of the pre-training split, or ``all``."""
    from textrl import corpus
    from textrl.pretrain import PretrainConfig

    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be train, heldout or all, got {split!r}")
    docs = corpus.load_documents()
    if split != "all":
        cfg = PretrainConfig()
        train, heldout = corpus.split_documents(docs, cfg.heldout_fraction, cfg.seed)
        docs = train if split == "train" else heldout
    lines = []
    for doc in docs:
        for line in doc.splitlines():
            line = line.strip()
            if not line or _SPEAKER.match(line) or line.isupper() or line.startswith(("SCENE", "ACT ", "Enter ")):
                continue
            lines.append(line)
    return tuple(lines)


def line_openings(n: int, words: int, seed: int, split: str = "train", min_words: int = 8) -> list[str]:
    """``n`` distinct openings (first ``words`` words) of corpus lines that have at least ``min_words``."""
    lines = [ln for ln in corpus_lines(split) if len(_WORDS.findall(ln)) >= min_words]
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen: set[str] = set()
    for i in rng.permutation(len(lines)):
        opening = " ".join(_WORDS.findall(lines[i])[:words])
        if opening not in seen:
            seen.add(opening)
            out.append(opening)
            if len(out) == n:
                break
    return out


def line_splits(n: int, words: int, seed: int, split: str = "heldout", min_words: int = 12) -> list[tuple[str, str]]:
    """``n`` corpus lines split as (first ``words`` words, the rest of the line): prompt and reference."""
    lines = sorted({ln for ln in corpus_lines(split) if len(_WORDS.findall(ln)) >= min_words})
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.permutation(len(lines))[:n]:
        tokens = _WORDS.findall(lines[i])
        out.append((" ".join(tokens[:words]), " ".join(tokens[words:])))
    return out
