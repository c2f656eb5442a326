"""GRPO (with and without dynamic sampling) against REINFORCE and PPO at equal generated tokens.

For every task and agent: the mean episode reward of the policy before and after training on a fixed evaluation
set (the first ``--eval-episodes`` prompts, sampled at temperature 1 with a fixed seed), the KL to the reference
over the last tenth of the iterations, the wall-clock time of training, and for dynamic sampling the share of
groups dropped as tied. Every agent trains on the same budget of generated tokens (the tokens of groups that
dynamic sampling dropped count). Tasks: the built-in ones (``envs``) and ``QuestionMark``, a sparse reward: 1
when the completion ends with a question mark, with no stop strings (a completion ends at eos or
``max_new_tokens``), so most groups of the untrained model score 0 throughout and give no gradient.

    python benchmarks/grpo_learning.py                                   # every task, every agent, 40k tokens
    python benchmarks/grpo_learning.py --tasks QuestionMark --agents grpo grpo-dynamic --budget 20000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import envs
from agents import GRPO, PPO, REINFORCE, GRPOConfig, PPOConfig, REINFORCEConfig
from envs import TextGenEnv
from textrl.evaluation import evaluate_agent

_GRPO = GRPOConfig(
    batch_size=32,
    group_size=4,
    learning_rate=2e-4,
    kl_coef=0.02,
    num_iterations=2,
    minibatch_size=16,
    epsilon_high=0.28,
    sample_interval=20,
)
AGENTS = {
    "reinforce": (
        REINFORCE,
        REINFORCEConfig(batch_size=32, group_size=4, learning_rate=2e-4, kl_coef=0.02, sample_interval=20),
    ),
    "ppo": (
        PPO,
        PPOConfig(batch_size=32, minibatch_size=16, n_epochs=2, learning_rate=1e-4, kl_coef=0.02, sample_interval=20),
    ),
    "grpo": (GRPO, _GRPO),
    "grpo-dynamic": (GRPO, dataclasses.replace(_GRPO, dynamic_sampling=True)),
}
"""Agent label -> (class, config); the batch and learning rates are benchmarks/tasks.py's."""

TASKS = {  # task -> (env id or None for a TextGenEnv built here, agent-config overrides)
    "Sentiment": ("textrl/Sentiment-v0", {}),
    "Keywords": ("textrl/Keywords-v0", {}),
    "Arithmetic": ("textrl/Arithmetic-v0", {"batch_size": 64}),  # 1-3 token answers: bigger batches
    "Reference": ("textrl/Reference-v0", {}),
    "Similarity": ("textrl/Similarity-v0", {}),
    "QuestionMark": (None, {}),
}


def ends_with_question_mark(completions, **_):
    """1 when the completion ends with "?" (sparse: the untrained model rarely stops there)."""
    return [1.0 if c.rstrip().endswith("?") else 0.0 for c in completions]


def make_env(task: str, lm: str | None):
    env_id, _ = TASKS[task]
    if env_id is None:
        return TextGenEnv(lm=lm or "tiny", reward=ends_with_question_mark, max_new_tokens=16, stop=None)
    return gym.make(env_id, **({"lm": lm} if lm else {}))


def run(task: str, agent_name: str, args) -> dict:
    cls, config = AGENTS[agent_name]
    config = dataclasses.replace(config, **TASKS[task][1])
    if args.batch_size:
        minibatch = {"minibatch_size": args.batch_size // 2} if hasattr(config, "minibatch_size") else {}
        config = dataclasses.replace(config, batch_size=args.batch_size, **minibatch)
    agent = cls(make_env(task, args.lm), config=config, seed=args.seed, tensorboard_log=args.runs, verbose=0)
    before = evaluate_agent(agent, args.eval_episodes)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    agent.learn(args.budget, callback=lambda a, s: history.append(s), tb_log_name=f"{task}__{agent_name}__{args.seed}")
    wall = time.perf_counter() - t0
    after = evaluate_agent(agent, args.eval_episodes)
    tail = history[-max(1, len(history) // 10) :]
    dropped = [s["charts/groups_dropped"] for s in history if "charts/groups_dropped" in s]
    return {
        "task": task,
        "agent": agent_name,
        "before": before.mean,
        "before_se": before.stderr,
        "after": after.mean,
        "after_se": after.stderr,
        "kl": float(np.mean([s["rollout/kl_ref"] for s in tail])),
        "train_first": history[0]["rollout/reward_mean"],
        "train_last": float(np.mean([s["rollout/reward_mean"] for s in tail])),
        "groups_dropped": float(np.mean(dropped)) if dropped else None,
        "skipped_updates": int(sum(s.get("charts/update_skipped", 0) for s in history)),
        "wall": wall,
        "tokens": agent.num_timesteps,
        "iterations": len(history),
        "run_dir": str(agent.run_dir),
        "samples": [(p, b, a) for (p, b, _), (_, a, _) in zip(before.samples[:3], after.samples[:3], strict=True)],
    }


def table(results: list[dict]) -> str:
    lines = [
        "| task | agent | reward before | reward after | KL to ref (nats/episode) | groups dropped | "
        "wall-clock (s) | tokens | iterations |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        dropped = "-" if r["groups_dropped"] is None else f"{r['groups_dropped']:.0%}"
        lines.append(
            f"| {r['task']} | {r['agent']} | {r['before']:.3f} ± {r['before_se']:.3f} | "
            f"{r['after']:.3f} ± {r['after_se']:.3f} | {r['kl']:.2f} | {dropped} | {r['wall']:.0f} | "
            f"{r['tokens']:,} | {r['iterations']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--agents", nargs="+", default=list(AGENTS), choices=list(AGENTS))
    parser.add_argument("--budget", type=int, default=40_000, help="generated tokens per run (every agent the same)")
    parser.add_argument("--eval-episodes", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lm", default=None, help="policy LM for every task (default: each task's own, 'tiny')")
    parser.add_argument("--batch-size", type=int, default=0, help="override every agent's batch (0 = keep)")
    parser.add_argument("--runs", default="runs/grpo", help="TensorBoard parent folder")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; envs from {Path(envs.__file__).parent}")
    results = []
    for task in args.tasks:
        for agent_name in args.agents:
            results.append(run(task, agent_name, args))
            r = results[-1]
            extra = "" if r["groups_dropped"] is None else f"  {r['groups_dropped']:.0%} groups dropped"
            print(
                f"{task:<12} {agent_name:<13} {r['before']:.3f} -> {r['after']:.3f}  KL {r['kl']:.2f}  "
                f"{r['wall']:.0f} s  ({r['iterations']} iterations, {r['tokens']:,} tokens){extra}",
                flush=True,
            )
    print("\n" + table(results) + "\n")
    for r in results:
        print(f"### {r['task']} / {r['agent']}")
        for prompt, before, after in r["samples"]:
            print(f"- prompt {prompt!r}\n  - before: {before!r}\n  - after: {after!r}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
