"""Learning efficiency (``peers.py --learning``): wall-clock to a mean reward, textrl PPO against TRL GRPO.

The task of ``learning.py`` and ``tests/test_learning.py``: continue the env's default prompts (up to 24 new
tokens, eos ends a completion, as it would in use); reward 1 when the completion contains the word "love"
(``textrl.rewards.keyword_reward``; GRPO gets a plain function that calls the same object). Same model for
both: the embedded ``tiny`` exported as an HF folder (dropout 0), 32 completions per optimisation step.

- textrl PPO: ``learning.py``'s config (batch 32, minibatch 16, 2 epochs, lr 1e-4, KL penalty 0.02);
- TRL GRPO: 8 prompts x 4 generations per step, one optimisation step per generation batch, lr 1e-4,
  ``beta=0.02``, temperature 1, fp32 (see ``trl_systems.run_group_trainer``).

Each runs in its own subprocess, one after the other, for at most ``--learning-seconds`` of training
(set-up excluded, reported apart) and stops once the mean reward over its last 3 iterations reaches
``--learning-threshold``; the clock is read after each optimisation step.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, NEW_TOKENS, LEARNING_RATE, KL = 32, 24, 1e-4, 0.02
SMOOTH = 3
"""Iterations averaged for the threshold test."""
SYSTEMS = {
    "learn-ppo": "textrl PPO (batch 32, minibatch 16, 2 epochs, lr 1e-4, KL 0.02)",
    "learn-grpo": "TRL GRPOTrainer (8 prompts x 4, 1 step per batch, lr 1e-4, beta 0.02)",
}


def reached(rows: list[dict], threshold: float) -> bool:
    return len(rows) >= SMOOTH and statistics.mean(r["reward"] for r in rows[-SMOOTH:]) >= threshold


def worker(name: str, work, args) -> dict:
    """Train one system until the threshold or the budget; rows of (seconds, tokens, reward) per iteration."""
    import torch
    import trl_systems

    from envs import DEFAULT_PROMPTS
    from textrl.rewards import keyword_reward

    trl_systems.quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict] = []
    clock = {"setup": time.perf_counter(), "start": 0.0}

    def done() -> bool:
        return reached(rows, args.learning_threshold) or rows[-1]["seconds"] >= args.learning_seconds

    if name == "learn-ppo":
        from learning import CONFIGS

        from envs import TextGenEnv

        cls, config = CONFIGS["ppo"]
        env = TextGenEnv(lm=work.lm, reward=keyword_reward(include=["love"]), max_new_tokens=NEW_TOKENS)
        agent = cls(env, config=config, seed=args.seed, verbose=0)

        def callback(agent, stats):
            rows.append(
                {
                    "seconds": time.perf_counter() - clock["start"],
                    "tokens": agent.num_timesteps,
                    "reward": stats["rollout/reward_mean"],
                }
            )
            return not done()

        clock["start"] = time.perf_counter()
        agent.learn(10**12, callback=callback)
    else:
        from transformers import TrainerCallback

        love = keyword_reward(include=["love"])
        last = {"reward": 0.0, "tokens": 0}

        def love_reward(completions, completion_ids, **_):  # a plain function, as a TRL user would write
            scores = love(completions=completions)
            last.update(reward=statistics.mean(scores), tokens=last["tokens"] + sum(map(len, completion_ids)))
            return scores

        class Recorder(TrainerCallback):
            def on_train_begin(self, *_, **__):
                clock["start"] = time.perf_counter()

            def on_step_end(self, _args, _state, control, **__):
                rows.append({"seconds": time.perf_counter() - clock["start"], **last})
                if done():
                    control.should_training_stop = True

        trl_systems.run_group_trainer(
            "grpo",
            work.lm,
            list(DEFAULT_PROMPTS),
            love_reward,
            BATCH,
            NEW_TOKENS,
            10**6,
            learning_rate=LEARNING_RATE,
            beta=KL,
            seed=args.seed,
            suppress_eos=False,
            callbacks=[Recorder()],
        )
    return {"system": name, "setup_seconds": clock["start"] - clock["setup"], "rows": rows}


def summary_rows(results: dict[str, dict], threshold: float, marks: list[float]) -> list[str]:
    header = ["system", "set-up s", f"time to reward >= {threshold} (s)", "iterations", "tokens"]
    header += [f"reward first {SMOOTH} -> last {SMOOTH} iterations", *(f"reward at {m:.0f} s" for m in marks)]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name, r in results.items():
        rows = r["rows"]
        if not rows:
            lines.append(f"| {SYSTEMS[name]} | {r['setup_seconds']:.1f} | no iteration |" + " |" * (len(header) - 3))
            continue
        hit = next((i for i in range(len(rows)) if reached(rows[: i + 1], threshold)), None)
        first = statistics.mean(x["reward"] for x in rows[:SMOOTH])
        last = statistics.mean(x["reward"] for x in rows[-SMOOTH:])
        at = []
        for mark in marks:
            window = [x["reward"] for x in rows if x["seconds"] <= mark][-SMOOTH:]
            at.append(f"{statistics.mean(window):.2f}" if window and rows[-1]["seconds"] >= mark * 0.9 else "-")
        when = f"**{rows[hit]['seconds']:.1f}**" if hit is not None else f"not in {rows[-1]['seconds']:.0f}"
        end = hit if hit is not None else len(rows) - 1
        lines.append(
            f"| {SYSTEMS[name]} | {r['setup_seconds']:.1f} | {when} | {end + 1} | {rows[end]['tokens']:,} | "
            f"{first:.2f} -> {last:.2f} |" + "".join(f" {a} |" for a in at)
        )
    return lines


def main(args, *, build, script: str, versions: dict[str, str]) -> None:
    """Train each system in a subprocess of ``script`` (peers.py) on the workload ``build`` makes; print the table."""
    import trl_systems

    results = {}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="textrl-peers-learning-") as tmp:
        work = build(Path(tmp), args)
        for name in SYSTEMS:
            command = [sys.executable, script, "--worker", name, "--workdir", tmp, "--seed", str(args.seed)]
            command += ["--threads", str(args.threads), "--learning-seconds", str(args.learning_seconds)]
            command += ["--learning-threshold", str(args.learning_threshold)]
            env = {**os.environ, **trl_systems.QUIET_ENV}
            proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
            if proc.returncode:
                raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    marks = [m for m in (15, 30, 60, 120, 180, 300) if m <= args.learning_seconds]
    text = "\n".join(
        [
            f"# Learning efficiency, {datetime.date.today().isoformat()}",
            "",
            f'Task: reward 1 when the completion contains "love" (up to {NEW_TOKENS} new tokens, the default '
            f"prompts); {work.source}, exported (dropout 0); {BATCH} completions per optimisation step; "
            f"training budget {args.learning_seconds:.0f} s per system, stopping once the mean reward of the last "
            f"{SMOOTH} iterations reaches {args.learning_threshold}; wall-clock from the start of training "
            f"(set-up apart); seed {args.seed}; load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the "
            "end.",
            "",
            *summary_rows(results, args.learning_threshold, marks),
            "",
            f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}.",
        ]
    )
    print(text)
    out = args.out or Path(script).parent / "results" / f"peers-learning-{datetime.date.today().isoformat()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
