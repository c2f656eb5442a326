"""Learning curves of the built-in tasks on the embedded LM, for PPO and REINFORCE.

For every task and agent: the mean episode reward of the policy before and after training on a fixed
evaluation set (the first ``--eval-episodes`` prompts of the task, sampled at temperature 1 with a fixed
seed, the policy's own rollout distribution), the KL to the reference model over the last iterations, the
wall-clock time of training, and sample completions before and after. Training writes TensorBoard runs
under ``--runs`` (render them with ``textrl plot``). Each row also prints the ``textrl train`` command that
reproduces the training run exactly (same seed, same machine).

    python benchmarks/tasks.py                                  # every task, both agents
    python benchmarks/tasks.py --tasks Arithmetic --agents reinforce
    python benchmarks/tasks.py --tasks Arithmetic --arithmetic-ablation   # per-digit reward on vs off
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
from agents import PPO, REINFORCE, PPOConfig, REINFORCEConfig
from textrl.evaluation import evaluate_agent

AGENTS = {
    "reinforce": (
        REINFORCE,
        REINFORCEConfig(batch_size=32, group_size=4, learning_rate=2e-4, kl_coef=0.02, sample_interval=20),
    ),
    "ppo": (
        PPO,
        PPOConfig(batch_size=32, minibatch_size=16, n_epochs=2, learning_rate=1e-4, kl_coef=0.02, sample_interval=20),
    ),
}
TASKS = {  # task -> (id, training budget in generated tokens, agent-config overrides)
    "Sentiment": ("textrl/Sentiment-v0", 50_000, {}),
    "Keywords": ("textrl/Keywords-v0", 50_000, {}),
    # answers are 1-3 tokens: bigger batches keep the per-iteration overhead down
    "Arithmetic": ("textrl/Arithmetic-v0", 40_000, {"batch_size": 64}),
    "Reference": ("textrl/Reference-v0", 40_000, {}),
    "Similarity": ("textrl/Similarity-v0", 40_000, {}),
}


def cli_command(env_id: str, env_kwargs: dict, agent: str, config, budget: int, seed: int) -> str:
    defaults = type(config)()
    flags = [
        f"--{f.name.replace('_', '-')} {getattr(config, f.name)}"
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != getattr(defaults, f.name) and f.name != "sample_interval"
    ]
    kw = f" --env-kwargs '{json.dumps(env_kwargs)}'" if env_kwargs else ""
    return f"textrl train --env {env_id}{kw} --agent {agent} --total-timesteps {budget} --seed {seed} " + " ".join(
        flags
    )


def run(task: str, agent_name: str, args, env_kwargs: dict | None = None, label: str | None = None) -> dict:
    env_id, budget, overrides = TASKS[task]
    budget = args.budget or budget
    env_kwargs = env_kwargs or {}
    cls, config = AGENTS[agent_name]
    config = dataclasses.replace(config, **overrides)
    env = gym.make(env_id, **env_kwargs)
    agent = cls(env, config=config, seed=args.seed, tensorboard_log=args.runs, verbose=0)
    before = evaluate_agent(agent, args.eval_episodes)
    history: list[tuple[int, float, float]] = []
    t0 = time.perf_counter()
    agent.learn(
        budget,
        callback=lambda a, s: history.append((a.num_timesteps, s["rollout/reward_mean"], s["rollout/kl_ref"])),
        tb_log_name=f"{task}__{agent_name}{'__' + label if label else ''}__{args.seed}",
    )
    wall = time.perf_counter() - t0
    after = evaluate_agent(agent, args.eval_episodes)
    tail = history[-max(1, len(history) // 10) :]
    return {
        "task": task + (f" ({label})" if label else ""),
        "agent": agent_name,
        "before": before.mean,
        "before_se": before.stderr,
        "after": after.mean,
        "after_se": after.stderr,
        "components_before": before.components,
        "components_after": after.components,
        "kl": float(np.mean([k for _, _, k in tail])),
        "train_first": history[0][1],
        "train_last": float(np.mean([r for _, r, _ in tail])),
        "wall": wall,
        "tokens": agent.num_timesteps,
        "iterations": len(history),
        "threshold": gym.spec(env_id).reward_threshold,
        "command": cli_command(env_id, env_kwargs, agent_name, config, budget, args.seed),
        "run_dir": str(agent.run_dir),
        "samples": [(p, b, a) for (p, b, _), (_, a, _) in zip(before.samples[:3], after.samples[:3], strict=True)],
    }


def table(results: list[dict]) -> str:
    lines = [
        "| task | agent | reward before | reward after | KL to ref (nats/episode) | wall-clock (s) | tokens |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['task']} | {r['agent']} | {r['before']:.3f} ± {r['before_se']:.3f} | "
            f"{r['after']:.3f} ± {r['after_se']:.3f} | {r['kl']:.2f} | {r['wall']:.0f} | {r['tokens']:,} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--agents", nargs="+", default=list(AGENTS), choices=list(AGENTS))
    parser.add_argument("--budget", type=int, default=0, help="generated tokens per run (0 = the task's default)")
    parser.add_argument("--eval-episodes", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="runs/tasks", help="TensorBoard parent folder")
    parser.add_argument("--arithmetic-ablation", action="store_true", help="also train Arithmetic with digit_weight=0")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; envs from {Path(envs.__file__).parent}")
    results = []
    for task in args.tasks:
        for agent_name in args.agents:
            results.append(run(task, agent_name, args))
            r = results[-1]
            print(
                f"{r['task']:<12} {agent_name:<9} {r['before']:.3f} -> {r['after']:.3f}  KL {r['kl']:.2f}  "
                f"{r['wall']:.0f} s  ({r['iterations']} iterations)\n  {r['command']}",
                flush=True,
            )
            if task == "Arithmetic" and args.arithmetic_ablation:
                results.append(run(task, agent_name, args, {"digit_weight": 0.0}, label="exact match only"))
                r = results[-1]
                print(f"  exact-match only: {r['before']:.3f} -> {r['after']:.3f}  {r['wall']:.0f} s", flush=True)
    for r in results:
        if len(r["components_after"]) > 1:
            parts = ", ".join(
                f"{k} {r['components_before'][k]:.3f} -> {v:.3f}" for k, v in r["components_after"].items()
            )
            print(f"{r['task']} / {r['agent']} components (unweighted): {parts}")
    print("\n" + table(results) + "\n")
    for r in results:
        print(f"### {r['task']} / {r['agent']}")
        for prompt, before, after in r["samples"]:
            print(f"- prompt {prompt!r}\n  - before: {before!r}\n  - after: {after!r}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
