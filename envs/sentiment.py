"""``textrl/Sentiment-v0``: continue a line of Shakespeare or the Bible with positive sentiment."""

from __future__ import annotations

from typing import Any, ClassVar

from envs.task import TaskEnv, line_openings


class SentimentEnv(TaskEnv):
    """Continue the opening of a corpus line so that the continuation reads as positive.

    ## Description
    The classic RLHF warm-up task (as in TRL's and RL4LMs' IMDB sentiment examples), offline: the prompts
    are the first words of lines from the pre-training corpus and the reward is VADER's sentiment of the
    completion (Hutto & Gilbert, 2014; the ``vaderSentiment`` package ships its lexicon).

    ## Action Space
    ``Discrete(len(tokenizer))``: the next token.

    ## Observation Space
    ``Dict(input_ids, attention_mask)``, right-padded, as in :class:`envs.TextGenEnv`.

    ## Rewards
    Sequence reward on the last step: VADER ``compound`` score of the completion, in [-1, 1]
    (:class:`textrl.reward_library.vader_sentiment`); plus ``fluency`` x the misspelling-rate guard.

    ## Starting State
    One of ``n_prompts`` line openings (``prompt_words`` words) from the training documents of the
    corpus, drawn with ``seed``.

    ## Episode End
    eos or ``max_new_tokens`` (default 24) tokens.

    ## Arguments
    - ``n_prompts`` (256), ``prompt_words`` (4), ``seed`` (0): the prompt set.
    - ``negate`` (False): reward negative sentiment instead.
    - ``fluency`` (0.0): weight of the misspelling-rate guard; any :class:`envs.TextGenEnv` keyword overrides.

    ## Solved
    ``reward_threshold`` 0.5: a mean compound sentiment of 0.5 (clearly positive text).

    ## Version History
    - v0: initial version.
    """

    options: ClassVar[dict[str, Any]] = {"n_prompts": 256, "prompt_words": 4, "seed": 0, "negate": False}

    @classmethod
    def build(cls, n_prompts, prompt_words, seed, negate) -> dict[str, Any]:
        from textrl.reward_library import vader_sentiment

        return {
            "prompts": line_openings(n_prompts, prompt_words, seed),
            "reward": vader_sentiment(negate=negate),
            "max_new_tokens": 24,
        }
