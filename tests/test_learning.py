"""Slow learning tests on the embedded LM (``pytest -m slow``): both agents raise a keyword reward.

The task: continue the default prompts; reward 1 when the completion contains "love" (keyword_reward).
The embedded model says "love" in a minority of its completions; each agent must take the mean reward
from its starting level to near its maximum, while the KL to the reference stays finite and is reported.
"""

from __future__ import annotations

import numpy as np
import pytest

from agents import PPO, REINFORCE, PPOConfig, REINFORCEConfig
from envs import TextGenEnv
from textrl.rewards import keyword_reward

pytestmark = pytest.mark.slow

LORA = {"lora_rank": 16, "lora_alpha": 32.0}
BUDGET = 60_000  # generated tokens; a few minutes on 2 cores


@pytest.mark.parametrize(
    ("cls", "config"),
    [
        (REINFORCE, REINFORCEConfig(batch_size=32, group_size=4, learning_rate=2e-4, kl_coef=0.02)),
        (PPO, PPOConfig(batch_size=32, minibatch_size=16, n_epochs=2, learning_rate=1e-4, kl_coef=0.02)),
        # LoRA adapters (rank 16, every linear layer) with a learning rate ten times larger
        (REINFORCE, REINFORCEConfig(batch_size=32, group_size=4, learning_rate=2e-3, kl_coef=0.02, **LORA)),
        (PPO, PPOConfig(batch_size=32, minibatch_size=16, n_epochs=2, learning_rate=1e-3, kl_coef=0.02, **LORA)),
    ],
    ids=["reinforce", "ppo", "reinforce-lora", "ppo-lora"],
)
def test_agent_raises_keyword_reward_on_tiny(cls, config, capsys):
    env = TextGenEnv(lm="tiny", reward=keyword_reward(include=["love"]), max_new_tokens=24)
    agent = cls(env, config=config, seed=0)
    history: list[tuple[float, float]] = []
    agent.learn(BUDGET, callback=lambda a, s: history.append((s["rollout/reward_mean"], s["rollout/kl_ref"])))
    rewards = np.array([r for r, _ in history])
    start, end = rewards[:5].mean(), rewards[-5:].mean()
    kl_end = np.mean([k for _, k in history[-5:]])
    with capsys.disabled():
        print(f"\n{cls.__name__}: reward {start:.3f} -> {end:.3f}, KL to reference {kl_end:.3f} nats/episode")
    assert start < 0.5
    assert end > 0.8, f"{cls.__name__} reward {start:.3f} -> {end:.3f}"
    assert np.isfinite(kl_end)


# Every built-in task: REINFORCE with the settings of benchmarks/tasks.py and a rise of the evaluation reward
# (the task's first 64 prompts, fixed sampling seed) of at least about half of what the benchmark measured.
TASK_RUNS = {
    "textrl/Sentiment-v0": (30_000, {}, 0.3),
    "textrl/Keywords-v0": (30_000, {}, 0.3),
    "textrl/Arithmetic-v0": (20_000, {"batch_size": 64}, 0.05),
    "textrl/Reference-v0": (40_000, {}, 0.015),
    "textrl/Similarity-v0": (30_000, {}, 0.1),
}


@pytest.mark.parametrize("env_id", list(TASK_RUNS))
def test_reinforce_learns_every_task(env_id, capsys):
    import gymnasium as gym

    import envs  # noqa: F401  (registers the tasks)
    from textrl.evaluation import evaluate_agent

    budget, overrides, min_gain = TASK_RUNS[env_id]
    settings = {"batch_size": 32, "group_size": 4, "learning_rate": 2e-4, "kl_coef": 0.02} | overrides
    agent = REINFORCE(gym.make(env_id), config=REINFORCEConfig(**settings), seed=0, verbose=0)
    before = evaluate_agent(agent, episodes=64)
    agent.learn(budget)
    after = evaluate_agent(agent, episodes=64)
    with capsys.disabled():
        print(f"\n{env_id}: reward {before.mean:.3f} -> {after.mean:.3f} (s.e. {after.stderr:.3f})")
    assert after.mean - before.mean > min_gain, f"{env_id}: reward {before.mean:.3f} -> {after.mean:.3f}"
