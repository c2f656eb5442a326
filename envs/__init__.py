"""Gymnasium environments for token-level text generation.

``import envs`` registers ``textrl/TextGen-v0``, the generic env, ``textrl/MultiTurn-v0``, the multi-turn env
(:mod:`envs.dialogue`: give it ``respond=``), configured through ``gymnasium.make``
keywords (``prompts``, ``reward``, ``max_new_tokens``, ...) and working out of the box on the embedded LM::

    env = gymnasium.make("textrl/TextGen-v0", reward=my_reward)
    envs = gymnasium.make_vec("textrl/TextGen-v0", num_envs=16, vectorization_mode="vector_entry_point")

and the built-in tasks, one module each, with their own prompts and rewards (see :mod:`envs.task`):
``textrl/Sentiment-v0``, ``textrl/Keywords-v0``, ``textrl/Arithmetic-v0``, ``textrl/Reference-v0`` and
``textrl/Similarity-v0``.
"""

import gymnasium

from envs.arithmetic import ArithmeticEnv
from envs.calculator import CalculatorEnv
from envs.dialogue import MultiTurnEnv, MultiTurnVectorEnv, Reply, RespondError
from envs.engine import DEFAULT_PROMPTS, TokenBatch
from envs.guess import GuessNumberEnv
from envs.keywords import KeywordsEnv
from envs.prompts import PromptError, PromptSet
from envs.reference import ReferenceEnv
from envs.scripted import SayWordEnv
from envs.sentiment import SentimentEnv
from envs.similarity import SimilarityEnv
from envs.task import TaskEnv
from envs.textgen import TextGenEnv
from envs.vector import TextGenVectorEnv

__all__ = [
    "DEFAULT_PROMPTS",
    "ArithmeticEnv",
    "CalculatorEnv",
    "GuessNumberEnv",
    "KeywordsEnv",
    "MultiTurnEnv",
    "MultiTurnVectorEnv",
    "PromptError",
    "PromptSet",
    "ReferenceEnv",
    "Reply",
    "RespondError",
    "SayWordEnv",
    "SentimentEnv",
    "SimilarityEnv",
    "TaskEnv",
    "TextGenEnv",
    "TextGenVectorEnv",
    "TokenBatch",
]

ENV_IDS: dict[str, dict] = {
    "textrl/TextGen-v0": {
        "entry_point": "envs.textgen:TextGenEnv",
        "vector_entry_point": "envs.vector:TextGenVectorEnv",
        "kwargs": {"lm": "tiny", "max_new_tokens": 32},
    },
    "textrl/MultiTurn-v0": {
        "entry_point": "envs.dialogue:MultiTurnEnv",
        "vector_entry_point": "envs.dialogue:MultiTurnVectorEnv",
        "kwargs": {"lm": "tiny"},
    },
}
"""Registered ids -> ``gymnasium.register`` arguments."""

# The built-in tasks: one module each; the vector entry point builds the batched env from the same options.
TASKS: dict[str, tuple[type[TaskEnv], float]] = {
    "textrl/Sentiment-v0": (SentimentEnv, 0.5),
    "textrl/Keywords-v0": (KeywordsEnv, 1.5),
    "textrl/Arithmetic-v0": (ArithmeticEnv, 1.4),
    "textrl/Reference-v0": (ReferenceEnv, 0.3),
    "textrl/Similarity-v0": (SimilarityEnv, 0.5),
}
"""Task ids -> (env class, reward_threshold)."""

# The multi-turn tasks (envs.dialogue): games, tools and scripted users that answer the agent.
MULTI_TURN_TASKS: dict[str, tuple[type[MultiTurnEnv], float]] = {
    "textrl/GuessNumber-v0": (GuessNumberEnv, 1.0),
    "textrl/SayWord-v0": (SayWordEnv, 1.5),
    "textrl/Calculator-v0": (CalculatorEnv, 1.0),
}
"""Task ids -> (env class, reward_threshold)."""
for _id, (_cls, _threshold) in {**TASKS, **MULTI_TURN_TASKS}.items():
    ENV_IDS[_id] = {
        "entry_point": _cls,
        "vector_entry_point": _cls.vector,
        "reward_threshold": _threshold,
        "kwargs": {"lm": "tiny"},
    }

for _id, _spec in ENV_IDS.items():
    if _id not in gymnasium.registry:
        gymnasium.register(id=_id, **_spec)
