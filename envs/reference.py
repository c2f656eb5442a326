"""``textrl/Reference-v0``: continue a held-out corpus line toward its true continuation."""

from __future__ import annotations

from typing import Any, ClassVar

from envs.task import TaskEnv, line_splits


class ReferenceEnv(TaskEnv):
    """Continue the opening of a held-out corpus line; the reward scores overlap with the true rest of
    the line.

    ## Description
    A reference-based task in the spirit of RL4LMs' summarisation/translation tasks, offline: lines come
    from the *held-out* documents of the pre-training split (never seen by the embedded model), each cut
    into a prompt (its first ``prompt_words`` words) and a reference (the rest of the line). The reward
    is a standard metric from a metric library: chrF (``sacrebleu``, the default: smooth at the sentence
    level), BLEU (``sacrebleu``, smoothed) or ROUGE (``rouge-score``).

    ## Action Space
    ``Discrete(len(tokenizer))``: the next token.

    ## Observation Space
    ``Dict(input_ids, attention_mask)``, right-padded, as in :class:`envs.TextGenEnv`.

    ## Rewards
    Sequence reward on the last step: ``metric`` of the completion against the prompt row's ``reference``
    column, in [0, 1]; plus ``fluency`` x the misspelling-rate guard.

    ## Starting State
    One of ``n_prompts`` held-out lines of at least 12 words, drawn with ``seed``.

    ## Episode End
    eos, a newline (the reference is one line), or ``max_new_tokens`` (default 16) tokens.

    ## Arguments
    - ``n_prompts`` (256), ``prompt_words`` (6), ``seed`` (0): the prompt set.
    - ``metric`` ("chrf"): ``"chrf"``, ``"chrf++"``, ``"bleu"``, ``"rouge1"``, ``"rouge2"`` or ``"rougeL"``.
    - ``fluency`` (0.0): weight of the misspelling-rate guard; any :class:`envs.TextGenEnv` keyword overrides.

    ## Solved
    ``reward_threshold`` 0.3 (chrF 30 against a single reference line).

    ## Version History
    - v0: initial version.
    """

    options: ClassVar[dict[str, Any]] = {"n_prompts": 256, "prompt_words": 6, "seed": 0, "metric": "chrf"}

    @classmethod
    def build(cls, n_prompts, prompt_words, seed, metric) -> dict[str, Any]:
        from textrl import reward_library as lib

        metrics = {
            "chrf": lambda: lib.chrf(),
            "chrf++": lambda: lib.chrf(word_order=2),
            "bleu": lambda: lib.bleu(),
            "rouge1": lambda: lib.rouge(variant="rouge1"),
            "rouge2": lambda: lib.rouge(variant="rouge2"),
            "rougeL": lambda: lib.rouge(variant="rougeL"),
        }
        if metric not in metrics:
            raise ValueError(f"metric must be one of {sorted(metrics)}, got {metric!r}")
        rows = [{"prompt": p, "reference": r} for p, r in line_splits(n_prompts, prompt_words, seed)]
        return {"prompts": rows, "reward": metrics[metric](), "max_new_tokens": 16, "stop": "\n"}
