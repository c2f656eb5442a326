"""Whole textrl iterations with the C allocator tuned (:func:`textrl.allocator.keep_freed_blocks`, the agents'
default on a CPU) against glibc's defaults (``TEXTRL_MALLOC_TUNE=0``) and against the same thresholds given
through glibc's environment variables.

The setting is per process, so each side runs in processes of its own, one per side per round, in turn, on one
random model of ``--arch`` / ``--size`` (``peers.py``'s workload: 8-token prompts, exactly 32 new tokens, KL 0.05;
``--agent`` REINFORCE with RLOO groups of 4, or PPO): each process runs ``--warmup`` iterations, then ``--iters``
timed ones. Printed per side: the median over processes of each one's median seconds per iteration, its ratio to
the tuned process of the same round (median and each round's), and, over the timed iterations, page faults
(``ru_minflt``) and system CPU seconds per iteration (the kernel's time, where page faults are served), and the
peak RSS (``ru_maxrss``). Faults and system time are the steady figures on a noisy machine; wall time follows
them only where they are a large enough share of it.

    python benchmarks/allocator.py --arch llama --size small --pairs 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


SIDES = [("tuned", "1"), ("default", "0"), ("glibc env", "0")]
"""(side, TEXTRL_MALLOC_TUNE): the agent's setting, glibc's defaults, and the same thresholds set through glibc's
environment variables at process start (what a benchmark can give another program)."""
GLIBC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def child(args: argparse.Namespace) -> None:
    """One process's run: warm-up and timed iterations, printed as one JSON line."""
    import rl_speed
    import torch

    torch.set_num_threads(args.threads)
    work = rl_speed.build_workload(Path(args.folder), False, 8, 32, 0)
    work = rl_speed.Workload(args.lm, work.source, work.prompts, 8, 32)
    runner = rl_speed.TextRLRunner(args.agent, work, args.batch_size, 0, kl_coef=0.05)
    from textrl import allocator

    times = []
    for i in range(args.warmup + args.iters):
        if i == args.warmup:
            before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        runner.iteration()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    row = {"seconds": statistics.median(times), "rss_mb": after.ru_maxrss / 1024, "tuned": allocator._done.get("ok")}
    row["faults"] = (after.ru_minflt - before.ru_minflt) / args.iters  # page faults per timed iteration
    row["sys"] = (after.ru_stime - before.ru_stime) / args.iters  # seconds in the kernel per iteration
    print(json.dumps(row))


def run_pairs(args: argparse.Namespace) -> dict:
    """Alternating tuned / default processes: per side the list of (median seconds, peak RSS MB)."""
    import peers

    results: dict[str, list[dict]] = {side: [] for side, _ in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        lm, _ = peers.random_model(args.arch, args.size, Path(tmp) / "model")
        for _ in range(args.pairs):
            for side, value in SIDES:
                argv = [sys.executable, __file__, "--child", "--lm", lm, "--folder", tmp, "--agent", args.agent]
                argv += ["--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--iters", str(args.iters)]
                argv += ["--threads", str(args.threads)]
                env = dict(os.environ, TEXTRL_MALLOC_TUNE=value)
                if side == "glibc env":
                    env |= GLIBC_ENV
                out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                if row["tuned"] != (value == "1"):
                    raise RuntimeError(f"the {side} process had the allocator tuned={row['tuned']}")
                results[side].append(row)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="llama", help="model family (peers.py --arch)")
    parser.add_argument("--size", default="small", help="tiny 4x256, small 8x512, ... (peers.py --size)")
    parser.add_argument("--agent", choices=["reinforce", "ppo"], default="reinforce")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=4, help="rounds of one process per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per process")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per process")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lm", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    results = run_pairs(args)
    print(f"textrl {args.agent}, {args.arch} {args.size}, B = {args.batch_size}; {args.pairs} process rounds, each")
    print(f"process's median of {args.iters} iterations after {args.warmup}; {args.threads} torch threads\n")
    print("| allocator | s/iteration | / tuned, median of the rounds (each round's) ", end="")
    print("| page faults / iteration | system CPU s / iteration | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    names = {"tuned": "tuned by the agent (keep_freed_blocks)", "default": "glibc defaults"}
    names["glibc env"] = "glibc's environment variables, same thresholds"
    for side, rows in results.items():
        seconds = statistics.median(r["seconds"] for r in rows)
        rss = statistics.median(r["rss_mb"] for r in rows)
        ratios = [r["seconds"] / t["seconds"] for r, t in zip(rows, results["tuned"], strict=True)]
        each = ", ".join(f"{x:.2f}" for x in ratios)
        faults = statistics.median(r["faults"] for r in rows)
        system = statistics.median(r["sys"] for r in rows)
        print(f"| {names[side]} | {seconds:.3f} | {statistics.median(ratios):.3f}x ({each}) | {faults:,.0f} ", end="")
        print(f"| {system:.3f} | {rss:,.0f} |")


if __name__ == "__main__":
    main()
