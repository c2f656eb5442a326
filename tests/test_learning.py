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

BUDGET = 60_000  # generated tokens; a few minutes on 2 cores


@pytest.mark.parametrize(
    ("cls", "config"),
    [
        (REINFORCE, REINFORCEConfig(batch_size=32, group_size=4, learning_rate=2e-4, kl_coef=0.02)),
        (PPO, PPOConfig(batch_size=32, minibatch_size=16, n_epochs=2, learning_rate=1e-4, kl_coef=0.02)),
    ],
    ids=["reinforce", "ppo"],
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
