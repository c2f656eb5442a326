"""Learning curves on the embedded LM: mean episode reward and KL to the reference against tokens trained.

The task of ``tests/test_learning.py``: continue the default prompts (24 new tokens); reward 1 when the
completion contains "love" (``keyword_reward``). Prints a markdown table per agent: reward and KL every
``--every`` generated tokens, then the wall-clock time, and sample completions before and after.

    python benchmarks/learning.py                          # REINFORCE and PPO, 60k tokens each
    python benchmarks/learning.py --agents ppo --budget 20000
    python benchmarks/learning.py --lora-rank 16 --lora-lr-scale 10   # LoRA adapters (all-linear), lr x 10
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from agents import PPO, REINFORCE, PPOConfig, REINFORCEConfig
from envs import TextGenEnv
from textrl.rewards import keyword_reward

CONFIGS = {
    "reinforce": (REINFORCE, REINFORCEConfig(batch_size=32, group_size=4, learning_rate=2e-4, kl_coef=0.02)),
    "ppo": (PPO, PPOConfig(batch_size=32, minibatch_size=16, n_epochs=2, learning_rate=1e-4, kl_coef=0.02)),
}
PROMPTS = ["ROMEO:\n", "And God said", "My lord,"]


def run(name: str, budget: int, every: int, seed: int, lora_rank: int = 0, lora_lr_scale: float = 1.0) -> None:
    cls, config = CONFIGS[name]
    if lora_rank:  # adapters on every linear layer; they usually want a larger learning rate
        lr = config.learning_rate * lora_lr_scale
        config = dataclasses.replace(config, lora_rank=lora_rank, lora_alpha=2.0 * lora_rank, learning_rate=lr)
    env = TextGenEnv(lm="tiny", reward=keyword_reward(include=["love"]), max_new_tokens=24)
    agent = cls(env, config=config, seed=seed)
    before = agent.generate(PROMPTS, deterministic=False)
    rows: list[tuple[int, float, float]] = []
    t0 = time.perf_counter()
    agent.learn(
        budget, callback=lambda a, s: rows.append((a.num_timesteps, s["rollout/reward_mean"], s["rollout/kl_ref"]))
    )
    wall = time.perf_counter() - t0
    print(f"\n### {cls.__name__} ({config})\n")
    print("| tokens | reward (mean of window) | KL to reference (nats/episode) |")
    print("|---:|---:|---:|")
    edges = list(range(every, budget + every, every))
    for lo, hi in zip([0, *edges[:-1]], edges, strict=True):
        window = [(r, k) for n, r, k in rows if lo < n <= hi]
        if window:
            print(f"| {hi:,} | {np.mean([r for r, _ in window]):.3f} | {np.mean([k for _, k in window]):.2f} |")
    first = np.mean([r for _, r, _ in rows[:5]])
    last = np.mean([r for _, r, _ in rows[-5:]])
    print(f"\nreward {first:.3f} -> {last:.3f} (first / last 5 iterations) in {wall:.0f} s, {len(rows)} iterations")
    after = agent.generate(PROMPTS, deterministic=False)
    for p, b, a in zip(PROMPTS, before, after, strict=True):
        print(f"- {p!r}: before {b!r}\n  after {a!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--budget", type=int, default=60_000, help="generated tokens per agent")
    parser.add_argument("--every", type=int, default=10_000, help="table row width in tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0 = all weights)")
    parser.add_argument("--lora-lr-scale", type=float, default=1.0, help="learning-rate multiplier with LoRA")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.agents:
        run(name, args.budget, args.every, args.seed, args.lora_rank, args.lora_lr_scale)


if __name__ == "__main__":
    main()
