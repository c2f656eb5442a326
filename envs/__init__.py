"""Gymnasium environments for token-level text generation.

``import envs`` registers ``textrl/TextGen-v0``: the generic env, configured through ``gymnasium.make``
keywords (``prompts``, ``reward``, ``max_new_tokens``, ...) and working out of the box on the embedded LM::

    env = gymnasium.make("textrl/TextGen-v0", reward=my_reward)
    envs = gymnasium.make_vec("textrl/TextGen-v0", num_envs=16, vectorization_mode="vector_entry_point")
"""

import gymnasium

from envs.engine import DEFAULT_PROMPTS, TokenBatch
from envs.prompts import PromptError, PromptSet
from envs.textgen import TextGenEnv
from envs.vector import TextGenVectorEnv

__all__ = ["DEFAULT_PROMPTS", "PromptError", "PromptSet", "TextGenEnv", "TextGenVectorEnv", "TokenBatch"]

ENV_IDS: dict[str, dict] = {
    "textrl/TextGen-v0": {
        "entry_point": "envs.textgen:TextGenEnv",
        "vector_entry_point": "envs.vector:TextGenVectorEnv",
        "kwargs": {"lm": "tiny", "max_new_tokens": 32},
    },
}
"""Registered ids -> ``gymnasium.register`` arguments."""

for _id, _spec in ENV_IDS.items():
    if _id not in gymnasium.registry:
        gymnasium.register(id=_id, **_spec)
