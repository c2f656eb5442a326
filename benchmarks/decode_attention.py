"""Paired A/B of the CPU decode step's attention (one query per row over the KV cache): textrl's kernel
(:func:`textrl.kernels.decode_attention`, what the engine runs where the kernels are built), torch's
``scaled_dot_product_attention`` (its CPU flash-attention kernel) and, in the compiled step,
:func:`textrl.ops.decode_attention` (the attention written out as broadcast products and sums for inductor to
fuse; what the compiled step runs where the kernels cannot be built).

For each ``--modes`` decode step (``eager``, the default one, and ``compile``), one engine per attention runs on
the same random model of ``--arch`` / ``--size`` (``engine_decode.build``; the embedded tokenizer's 4096-token
vocabulary), is fed the same tokens, and is timed interleaved (one rollout of each per round; medians of
``--rounds`` after one untimed round, which compiles): ms per decode step over ``--prompt-len`` +
``--new-tokens`` positions for each B, and the largest difference between their logits. Compiling takes tens of
seconds per engine and B.

    python benchmarks/decode_attention.py --arch llama --size small --batch-sizes 16 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_decode

import textrl.engine as engine_module
from textrl import kernels, ops
from textrl.engine import Engine


def step_times(model, mode: str, B: int, P: int, T: int, rounds: int) -> dict:
    """ms per decode step (``mode``: ``"eager"`` or ``"compile"``) for each attention the mode runs: textrl's
    kernel (``"kernel"``), torch's SDPA (``"sdpa"``) and, compiled, the written-out one (``"written"``); and the
    largest logit difference from the kernel's (``"max_diff"``)."""
    names = ["kernel", "written", "sdpa"] if mode == "compile" else ["kernel", "sdpa"]
    engines = {name: Engine(model) for name in names}
    functions = {"kernel": kernels.decode_attention, "written": ops.decode_attention}
    make_static = engine_module._StaticStep.__init__

    def with_attention(static, engine, cache, key):  # the same step, with this engine's attention
        make_static(static, engine, cache, key)
        name = next(n for n, e in engines.items() if e is engine)
        static.attention = functions.get(name, engine._sdpa)

    for name, core in engines.items():
        core.decode_step = "compile" if mode == "compile" else "eager"
        if name == "sdpa":  # the eager step's attention
            core._attend_one = core._sdpa
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (B, P), generator=gen)
    tokens = torch.randint(0, model.config.vocab_size, (T - 1, B), generator=gen)
    logits, times = {}, {name: [] for name in engines}
    engine_module._StaticStep.__init__ = with_attention
    try:
        with torch.no_grad():
            for r in range(rounds + 1):
                for name, core in engines.items():
                    with core.start(ids, torch.ones_like(ids), P + T) as session:
                        start = time.perf_counter()
                        logits[name] = torch.stack([session.step(t)[0].clone() for t in tokens])
                        if r:  # the first round compiles
                            times[name].append((time.perf_counter() - start) / (T - 1))
    finally:
        engine_module._StaticStep.__init__ = make_static
    out = {name: statistics.median(seconds) * 1e3 for name, seconds in times.items()}
    out["max_diff"] = max((logits[n] - logits["kernel"]).abs().max().item() for n in engines)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    engine_decode.paired_step_arguments(parser, size="small", rounds=10)
    parser.add_argument("--modes", nargs="+", choices=["eager", "compile"], default=["eager", "compile"])
    args = parser.parse_args(argv)
    model = engine_decode.paired_step_model(args)
    if not kernels.load():
        raise SystemExit("textrl's CPU kernels could not be built here: nothing to compare")
    P, T = args.prompt_len, args.new_tokens
    print(f"Decode step attention, {args.arch} {args.size}; {P} + {T} positions;", end=" ")
    print(f"{args.threads} torch threads;", end=" ")
    print(f"median of {args.rounds} interleaved rounds\n")
    print("| step | B | kernel ms/step | written out ms/step | SDPA ms/step | SDPA / kernel | max logit difference |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode in args.modes:
        for B in args.batch_sizes:
            row = step_times(model, mode, B, P, T, args.rounds)
            written = f"{row['written']:.3f}" if "written" in row else "-"
            ratio = row["sdpa"] / row["kernel"]
            print(
                f"| {mode} | {B} | {row['kernel']:.3f} | {written} | {row['sdpa']:.3f} | {ratio:.3f}x "
                f"| {row['max_diff']:.1e} |"
            )


if __name__ == "__main__":
    main()
