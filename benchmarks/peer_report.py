"""The report of ``peers.py``: per-run medians, the markdown table per batch size, the FLOP bound, the targets."""

from __future__ import annotations

import datetime
import os
import statistics


def summarise(runs: list[dict]) -> dict | None:
    """Median over runs of each run's median (tokens/s, rollout tokens/s, s/iteration); max peak RSS."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return None
    per_run = {"iteration": [], "rollout": [], "seconds": []}
    for r in ok:
        per_run["iteration"].append(statistics.median(x["tokens"] / x["seconds"] for x in r["rows"]))
        per_run["rollout"].append(statistics.median(x["tokens"] / max(x["rollout_seconds"], 1e-9) for x in r["rows"]))
        per_run["seconds"].append(statistics.median(x["seconds"] for x in r["rows"]))
    out = {k: statistics.median(v) for k, v in per_run.items()}
    its = per_run["iteration"]
    out["spread"] = (max(its) - min(its)) / 2 / out["iteration"]
    out["rss_peak_mb"] = max(r["rss_peak_mb"] for r in ok)
    warm = [r["warmup_seconds"] for r in ok if "warmup_seconds" in r]
    if warm:
        out["warmup_seconds"] = statistics.median(warm)
    kernel = [r["kernel_seconds"] for r in ok if r.get("kernel_seconds")]
    if kernel:  # seconds per iteration in matmul and attention kernels (peers.py --kernels)
        out["kernel_seconds"] = statistics.median(kernel)
    out["runs"], out["versions"], out["threads"] = len(ok), ok[0]["versions"], ok[0]["threads"]
    return out


def fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.2f}"


def milliseconds(seconds: float) -> str:
    """``894 ms``, ``1,234 ms``; 3 significant digits below 100 ms (``8.71 ms``)."""
    ms = 1e3 * seconds
    return f"{ms:,.0f} ms" if ms >= 100 else f"{ms:.3g} ms"


TARGETS = [
    (16, "reinforce", "grpo", 2.0),
    (16, "ppo", "trl-ppo", 3.0),
    (16, "ppo", "grpo", 1.5),
    (64, "reinforce", "grpo", 3.0),
]
"""The issue's speed targets for the full iteration: (B, system, peer, minimum ratio of tokens/s)."""


def read_clause(rollout: dict) -> str:
    """How fast the streamed decode matmuls draw their weights from memory, beside a plain read of them."""
    if not rollout.get("decode_read"):
        return ""
    moved = rollout["decode_weight_bytes"]
    return (
        f"; their weights arrive at {moved / rollout['decode_streamed'] / 1e9:.1f} GB/s, where a plain read of the "
        f"same weights (`torch.sum`) runs at {moved / rollout['decode_read'] / 1e9:.1f} GB/s"
    )


def target_lines(results: dict, bounds: dict, labels: dict[str, str]) -> list[str]:
    """The issue's targets that this run's results can decide, each ticked or not."""
    checks = list(TARGETS)
    batches = sorted({b for _, b in results})
    checks += [(b, a, "sb3", 20.0) for b in batches for a in ("ppo", "reinforce")]
    checks += [(b, a, "plain", 1.0) for b in batches for a in ("ppo", "reinforce")]
    lines = []
    for batch, system, peer, goal in checks:
        mine, theirs = results.get((system, batch)), results.get((peer, batch))
        if mine and theirs:
            ratio = mine["iteration"] / theirs["iteration"]
            ok = ratio > goal if goal == 1.0 else ratio >= goal
            bar = "> 1x (faster)" if goal == 1.0 else f">= {goal:g}x"
            names = f"{labels[system]} / {labels[peer]}"
            reach = ""
            if bounds.get(batch) and "streaming_ceiling" in bounds[batch]:
                reach = f"; at the streaming ceiling {bounds[batch]['streaming_ceiling'] / theirs['iteration']:.2f}x"
            if mine.get("kernel_seconds"):
                reach += f"; at its kernel time alone {theirs['seconds'] / mine['kernel_seconds']:.2f}x"
            lines.append(f"- [{'x' if ok else ' '}] B = {batch}: {names} = {ratio:.2f}x (target {bar}{reach})")
    r, bound = results.get(("reinforce", 64)), bounds.get(64)
    if r and bound:
        frac = r["iteration"] / bound["ceiling"]
        lines.append(
            f"- [{'x' if frac >= 0.5 else ' '}] B = 64: {labels['reinforce']} at {100 * frac:.0f}% of the FLOP "
            "bound (target >= 50%)"
        )
    return lines


def report(
    results: dict,
    bounds: dict,
    errors: dict,
    args,
    work,
    notes: list[str],
    load: tuple[float, float],
    *,
    labels: dict[str, str],
    kl_coef: float,
    versions: dict[str, str],
) -> str:
    """The markdown report: set-up, the table per B, the FLOP bound, the targets, notes, versions.

    ``labels``: system -> table label; ``versions``: this interpreter's libraries (a run under another
    interpreter adds its own where they differ); ``load``: load average at the start and the end.
    """
    versions = dict(versions)
    kl = args.kl == "on"
    lines = [
        f"# textrl vs peers, {datetime.date.today().isoformat()}",
        "",
        f"Model: {work.source} (exported HF folder, dropout 0); {len(work.prompts)} prompts of {work.prompt_tokens} "
        f'tokens; exactly {work.new_tokens} new tokens (eos suppressed); temperature 1; reward: fraction of "the"; '
        f"one optimisation step per batch; KL {'on: coefficient ' + str(kl_coef) if kl else 'off'}.",
        f"Median over {args.rounds} interleaved round(s) of each run's median over {args.iters} timed iteration(s) "
        f"after {args.warmup} warm-up (naive SB3: {min(args.iters, args.sb3_iters)} after 1); "
        + ("all in one process (so peak RSS is not per system)." if args.in_process else "one subprocess per run."),
        f"Machine: {os.cpu_count()} CPUs; load average {load[0]:.2f} at the start, {load[1]:.2f} at the end.",
        "",
    ]
    for batch in args.batch_sizes:
        base = results.get(("ppo", batch))
        bound = bounds.get(batch)
        lines += [
            f"## B = {batch}",
            "",
            "| system | iteration tok/s | vs PPO | rollout tok/s | vs PPO | s/iteration | vs PPO | peak RSS MB "
            "| vs PPO | % of FLOP bound |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for system in args.systems:
            r = results.get((system, batch))
            if r is None:
                continue
            cells = [labels[system], f"{fmt(r['iteration'])} ±{100 * r['spread']:.0f}%"]
            for key in ("iteration", "rollout", "seconds", "rss_peak_mb"):
                if key != "iteration":
                    cells.append(fmt(r[key]) if key != "seconds" else f"{r[key]:.3f}")
                cells.append(f"{r[key] / base[key]:.2f}x" if base else "-")
            cells.append(f"{100 * r['iteration'] / bound['ceiling']:.0f}%" if bound else "-")
            lines.append("| " + " | ".join(cells) + " |")
        if bound:
            ph, fpt = bound["phases"], bound["flops_per_token"]
            counted = " + ".join(bound["counted"])
            lines += [
                "",
                f"FLOP bound at B = {batch} ({bound['threads']} threads): `torch.matmul` at the model's shapes runs "
                f"{ph['rollout']['gflops']:.0f} GFLOP/s for the rollout (prefill and M = B decode steps), "
                f"{ph['training']['gflops']:.0f} GFLOP/s for training (M = B·T + B/g·(P-1) positions, both backward "
                "matmuls; the update's forward matmuls repeat the rollout's and are not counted). Prompts come in "
                f"groups of g = {bound.get('group', 1)} samples: a prompt's positions are counted once per distinct "
                "prompt in the prefill, training and reference passes. FLOPs per generated token: "
                f"rollout {fpt['rollout'] / 1e6:.1f}M, training "
                f"{fpt['training'] / 1e6:.1f}M, reference {fpt['reference'] / 1e6:.1f}M; counted: {counted} = "
                f"{sum(fpt[k] for k in bound['counted']) / 1e6:.1f}M. Ceiling: **{bound['ceiling']:,.0f} tok/s** for "
                f"the full iteration, {bound['rollout_ceiling']:,.0f} tok/s for the rollout"
                + (" (with the reference pass)" if kl else "")
                + "."
                + (
                    f" textrl PPO reaches {100 * base['iteration'] / bound['ceiling']:.0f}% of it"
                    f" ({100 * base['rollout'] / bound['rollout_ceiling']:.0f}% for the rollout)."
                    if base
                    else ""
                ),
            ]
            if "streaming_ceiling" in bound:
                r = ph["rollout"]
                lines += [
                    "",
                    f"Streaming ceiling: the same with the {args.new_tokens - 1} decode steps' matmuls timed as a "
                    "decode runs them, every layer's own weights in turn "
                    f"({1e3 * r['decode_streamed']:.0f} ms per rollout, against {1e3 * r['decode_hot']:.0f} ms "
                    f"with each shape's weight kept in cache{read_clause(r)}): "
                    f"**{bound['streaming_ceiling']:,.0f} tok/s** for the "
                    f"full iteration, {bound['rollout_streaming_ceiling']:,.0f} tok/s for the rollout. Only matmuls "
                    "and attention are counted; this ceiling over a peer's tokens/s is the largest ratio any system "
                    "could reach against that peer here"
                    + (
                        f"; textrl PPO reaches {100 * base['iteration'] / bound['streaming_ceiling']:.0f}% of it."
                        if base
                        else "."
                    ),
                ]
        warm = [(s, results[s, batch]) for s in args.systems if "warmup_seconds" in results.get((s, batch), {})]
        if warm and args.warmup:
            lines += [
                "",
                f"Warm-up at B = {batch} (the {args.warmup} untimed iterations, one-time costs such as compilation "
                "included; median over rounds): "
                + ", ".join(f"{labels[s]} {r['warmup_seconds']:.2f} s" for s, r in warm)
                + ".",
            ]
        timed = [(s, results[s, batch]) for s in args.systems if "kernel_seconds" in results.get((s, batch), {})]
        if timed:
            lines += [
                "",
                f"Kernel time at B = {batch} ({args.kernels} iteration(s) under `torch.profiler` after the timed ones; "
                "the self time of matmul and attention kernels, compiled code's included; median over rounds): "
                + ", ".join(
                    f"{labels[s]} {milliseconds(r['kernel_seconds'])} of its {milliseconds(r['seconds'])} "
                    f"({100 * r['kernel_seconds'] / r['seconds']:.0f}%)"
                    for s, r in timed
                )
                + ". The rest is everything else: elementwise kernels, Python, the optimizer, sampling, rewards. A "
                "target's \"at its kernel time alone\" is the ratio with textrl's iteration cut to those kernels, at "
                "the speed they run there: the most that removing all of its other work could reach.",
            ]
        lines.append("")
    targets = target_lines(results, bounds, labels)
    if targets:
        lines += ["## Targets (full iteration tokens/s)", "", *targets, ""]
    for (system, batch), error in errors.items():
        lines.append(f"- {labels[system]} at B = {batch} failed: `{error}`")
    lines += [f"- {note}" for note in notes]
    for (system, _), r in results.items():
        for name, version in r["versions"].items():
            if versions.get(name) != version:  # TRL PPO's own venv
                versions.setdefault(f"{name} (for {labels[system]})", version)
    threads = sorted({r["threads"] for r in results.values()})
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; torch threads {threads}."]
    return "\n".join(lines) + "\n"
