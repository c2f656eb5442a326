"""``textrl/Keywords-v0``: lexically constrained generation — use the given words, avoid others."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from envs.task import TaskEnv, line_openings

INCLUDE_POOL = ("love", "king", "night", "heart", "sweet", "blood", "gold", "sea")
"""Words a prompt may ask for (each a single token of the embedded tokenizer, with its leading space)."""
AVOID_POOL = ("the", "and", "of")
"""Words a prompt may forbid: the commonest words of the corpus, so avoiding them is a real constraint."""


class KeywordsEnv(TaskEnv):
    """Continue a corpus line using the words the prompt asks for and none of the words it forbids.

    ## Description
    Lexical constraints in the style of CommonGen / constrained decoding, as an RL task. Each prompt
    states its constraints on a first line, e.g. ``"Use: love, night. Avoid: the.\\nAnd God said"``, and
    carries them as ``include`` / ``avoid`` columns for the rewards, so the policy has to read them.

    ## Action Space
    ``Discrete(len(tokenizer))``: the next token.

    ## Observation Space
    ``Dict(input_ids, attention_mask)``, right-padded, as in :class:`envs.TextGenEnv`.

    ## Rewards
    - immediate (per token, :class:`textrl.reward_library.lexical_shaping`): ``+0.25`` the first time an
      include word's token is taken, ``-0.25`` whenever an avoid word's token is (weight ``shaping``);
    - sequence (:class:`textrl.reward_library.lexical_constraints`): the fraction of include words present,
      minus 1 per avoid word present, plus 0.5 when all constraints are met;
    - plus ``fluency`` x the misspelling-rate guard.

    ## Starting State
    One of ``n_prompts`` line openings with ``n_include`` words drawn from :data:`INCLUDE_POOL` and
    ``n_avoid`` from :data:`AVOID_POOL`, all drawn with ``seed``.

    ## Episode End
    eos or ``max_new_tokens`` (default 24) tokens.

    ## Arguments
    - ``n_prompts`` (256), ``prompt_words`` (4), ``seed`` (0): the prompt set.
    - ``n_include`` (1), ``n_avoid`` (1): constraints per prompt.
    - ``shaping`` (1.0): weight of the per-token shaping (0 = sequence reward only).
    - ``fluency`` (0.0): weight of the misspelling-rate guard; any :class:`envs.TextGenEnv` keyword overrides.

    ## Solved
    ``reward_threshold`` 1.5: on average every constraint met (1 + 0.5 bonus) with shaping on top.

    ## Version History
    - v0: initial version.
    """

    options: ClassVar[dict[str, Any]] = {
        "n_prompts": 256,
        "prompt_words": 4,
        "seed": 0,
        "n_include": 1,
        "n_avoid": 1,
        "shaping": 1.0,
    }

    @classmethod
    def build(cls, n_prompts, prompt_words, seed, n_include, n_avoid, shaping) -> dict[str, Any]:
        from textrl.reward_library import lexical_constraints, lexical_shaping

        if not 1 <= n_include <= len(INCLUDE_POOL) or not 0 <= n_avoid <= len(AVOID_POOL):
            raise ValueError(f"need 1 <= n_include <= {len(INCLUDE_POOL)} and 0 <= n_avoid <= {len(AVOID_POOL)}")
        rng = np.random.default_rng(seed + 1)
        rows = []
        for opening in line_openings(n_prompts, prompt_words, seed):
            include = sorted(rng.choice(INCLUDE_POOL, n_include, replace=False).tolist())
            avoid = sorted(rng.choice(AVOID_POOL, n_avoid, replace=False).tolist())
            header = f"Use: {', '.join(include)}." + (f" Avoid: {', '.join(avoid)}." if avoid else "")
            rows.append({"prompt": f"{header}\n{opening}", "include": include, "avoid": avoid})
        reward: dict[Any, float] = {lexical_constraints(bonus=0.5): 1.0}
        if shaping:
            reward[lexical_shaping(bonus=0.25)] = float(shaping)
        return {"prompts": rows, "reward": reward, "max_new_tokens": 24}
