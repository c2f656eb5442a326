"""Data-parallel scaling on one machine: 2 processes x 1 thread (torchrun, gloo) against 1 process x 1 thread
and 1 process x 2 threads, full RL iteration tokens/s and the time spent in collectives per iteration.

Workloads (``--workloads``, ``model:batch``): the embedded ``tiny`` (4 layers x 256) at B=16 and B=64, and a
random Llama of 8 layers x 512 (``llama-small``, ~28M parameters, embedded tokenizer) at B=16. The agent is
textrl REINFORCE with RLOO groups of 4 and KL 0.05, 8-token prompts and exactly 32 new tokens (eos
suppressed), as in ``rl_speed.py`` and ``peers.py``. Under 2 processes each takes B/2 rows (whole groups), and
the gradient is all-reduced every iteration.

Measurement: every (workload, layout) run is a fresh subprocess (``torch.distributed.run --standalone`` for
2 processes), one warm-up iteration, then ``--iters`` timed iterations; runs are interleaved round-robin over
``--repeats`` so that drifts in machine load hit every layout alike; the table has the median over repeats of
each run's median, and each ratio the median of the ratios within a round (runs next to each other in
time), so that drifts in the machine's speed cancel. "Collectives" is the wall time rank 0 spends inside
torch.distributed calls per iteration (the gradient all-reduce, the small reductions of counts and logged
figures), waiting for the other process included. ``2x1-free`` (two independent runs of B/2 at once, no
communication) is the ceiling any data-parallel layout can reach on the machine: two processes contend for
memory bandwidth and caches even without talking.

    python benchmarks/distributed.py                       # the table (about 10 minutes on 2 cores)
    python benchmarks/distributed.py --workloads tiny:16 --iters 2 --repeats 1   # a quick smoke run
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
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import rl_speed  # noqa: E402  (a sibling script)

LAYOUTS = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1), "2x1-free": (2, 1), "1x1-half": (1, 1), "2x1-weak": (2, 1)}
"""name -> (processes, threads per process). ``2x1-free`` is the machine's ceiling for any data-parallel
scheme: two independent one-process runs of B/2 rows each at the same time, with no communication at all
(their tokens/s summed). ``1x1-half`` is one process on B/2 rows alone: twice its tokens/s is what 2
processes of B/2 rows could reach with neither communication nor any contention between them (a decode
step streams every weight whatever the rows, so halving the rows does not halve a process's time).
``2x1-weak`` is data parallelism that grows the batch instead: 2 processes of B rows each (2B in all)."""


def build(workdir: Path, model: str, seed: int) -> rl_speed.Workload:
    """The workload of ``model`` (``tiny`` or ``llama-small``), written to ``workdir/<model>.json``."""
    work = rl_speed.build_workload(workdir, False, 8, 32, seed)
    if model == "llama-small":
        import peers

        work.lm, work.source = peers.random_model("llama", "small", workdir / "llama-small")
    elif model != "tiny":
        raise SystemExit(f"distributed.py: error: unknown model {model!r}; use tiny or llama-small")
    (workdir / f"{model}.json").write_text(json.dumps(asdict(work)))
    return work


def worker(work_file: Path, batch: int, iters: int, threads: int, out: Path, seed: int) -> None:
    """One run (in each process of it): warm up, time ``iters`` iterations; rank 0 writes the figures."""
    import torch

    torch.set_num_threads(threads)
    work = rl_speed.Workload(**json.loads(work_file.read_text()))
    runner = rl_speed.TextRLRunner("reinforce", work, batch, seed, kl_coef=0.05)
    agent = runner.agent
    runner.iteration()  # warm-up
    rows = []
    for _ in range(iters):
        comm0, t0 = agent.runtime.comm["seconds"], time.perf_counter()
        tokens = runner.iteration()
        seconds = time.perf_counter() - t0
        rows.append((tokens / seconds, seconds, agent.runtime.comm["seconds"] - comm0))
        if tokens != batch * work.new_tokens:
            raise SystemExit(f"an iteration generated {tokens} tokens, not {batch} x {work.new_tokens}")
    if agent.runtime.is_main:
        out.write_text(
            json.dumps(
                {
                    "tokens_per_second": statistics.median(r[0] for r in rows),
                    "iteration_seconds": statistics.median(r[1] for r in rows),
                    "collective_seconds": statistics.median(r[2] for r in rows),
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "world_size": agent.runtime.world_size,
                }
            )
        )


def run(work_file: Path, layout: str, batch: int, iters: int, out: Path, seed: int) -> dict:
    procs, threads = LAYOUTS[layout]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}

    def args(rows: int, result: Path) -> list[str]:
        worker = [str(work_file), str(rows), str(iters), str(threads), str(result)]
        return [str(Path(__file__).resolve()), "--worker", *worker, "--seed", str(seed)]

    if layout == "1x1-half":
        batch //= 2
    elif layout == "2x1-weak":
        batch *= 2
    if layout == "2x1-free":  # two independent runs at once; each is its own "rank 0"
        outs = [out.with_suffix(f".{i}.json") for i in range(procs)]
        jobs = [subprocess.Popen([sys.executable, *args(batch // procs, o)], env=env) for o in outs]
        if any(job.wait(timeout=1800) for job in jobs):
            raise SystemExit(f"{layout} on {work_file.stem} B={batch} failed")
        rows = [json.loads(o.read_text()) for o in outs]
        merged = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
        return merged | {"tokens_per_second": sum(r["tokens_per_second"] for r in rows), "collective_seconds": 0.0}
    command = args(batch, out)
    if procs > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *command]
    done = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{layout} on {work_file.stem} B={batch} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="tiny:16,tiny:64,llama-small:16")
    parser.add_argument("--layouts", default="1x1,1x2,1x1-half,2x1,2x1-free,2x1-weak")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", nargs=5, metavar=("WORK", "BATCH", "ITERS", "THREADS", "OUT"))
    args = parser.parse_args(argv)
    if args.worker:
        work_file, batch, iters, threads, out = args.worker
        worker(Path(work_file), int(batch), int(iters), int(threads), Path(out), args.seed)
        return
    workloads = [(m, int(b)) for m, _, b in (w.partition(":") for w in args.workloads.split(","))]
    layouts = args.layouts.split(",")
    results: dict[tuple[str, int, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        sources = {m: build(workdir, m, args.seed).source for m in dict.fromkeys(m for m, _ in workloads)}
        for _ in range(args.repeats):
            for model, batch in workloads:
                for layout in layouts:
                    out = workdir / "result.json"
                    row = run(workdir / f"{model}.json", layout, batch, args.iters, out, args.seed)
                    results.setdefault((model, batch, layout), []).append(row)
                    print(f"  {model} B={batch} {layout}: {row['tokens_per_second']:.0f} tok/s", file=sys.stderr)
    print(f"# Data parallel on {os.cpu_count()} cores: REINFORCE (RLOO groups of 4, KL 0.05), 8-token prompts,")
    print(f"# 32 new tokens; medians over {args.repeats} interleaved runs of {args.iters} iterations each")
    for model, source in sources.items():
        print(f"# {model}: {source}")
    print()
    head = ["workload", "layout", "tokens/s", "x 1 process x 1 thread", "of the ceiling", "of the bound"]
    print("| " + " | ".join([*head, "iteration ms", "collectives ms/iter"]) + " |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for model, batch in workloads:
        for layout in layouts:
            rows = results[(model, batch, layout)]
            tps = statistics.median(r["tokens_per_second"] for r in rows)
            ms = statistics.median(r["iteration_seconds"] for r in rows) * 1000
            comm = statistics.median(r["collective_seconds"] for r in rows) * 1000
            procs, threads = LAYOUTS[layout]
            name = f"{procs} process{'es' if procs > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"
            name = {
                "2x1-free": "2 independent processes x 1 thread, B/2 each (the machine's ceiling)",
                "1x1-half": "1 process x 1 thread, B/2 rows alone (x 2: the bound without contention)",
                "2x1-weak": "2 processes x 1 thread, B rows each (2B in all)",
            }.get(layout, name)
            dp = layout == "2x1"
            ceiling = ratio(results, model, batch, layout, "2x1-free") if dp else "-"
            bound = ratio(results, model, batch, layout, "1x1-half", 0.5) if dp else "-"
            comm_text = f"{comm:.1f}" if layout in ("2x1", "2x1-weak") else "-"
            speedup = ratio(results, model, batch, layout, "1x1", 2.0 if layout == "1x1-half" else 1.0)
            cells = [f"{model} B={batch}", name, f"{tps:,.0f}", speedup, ceiling.rstrip("x"), bound.rstrip("x")]
            cells += [f"{ms:,.0f}", comm_text]
            print("| " + " | ".join(cells) + " |")


def ratio(results: dict, model: str, batch: int, layout: str, base: str, scale: float = 1.0) -> str:
    """``scale`` x ``layout``'s tokens/s over ``base``'s: the median of the ratios within each round (runs next
    to each other in time), so that drifts in the machine's speed cancel."""
    a, b = results.get((model, batch, layout), []), results.get((model, batch, base), [])
    if not a or not b:
        return "-"
    ratios = [scale * x["tokens_per_second"] / y["tokens_per_second"] for x, y in zip(a, b, strict=True)]
    return f"{statistics.median(ratios):.2f}x"


if __name__ == "__main__":
    main()
