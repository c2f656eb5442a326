"""Paired A/B of the compiled CPU decode step's attention: :func:`textrl.ops.decode_attention` (what the engine
runs: the one query's attention written as broadcast products and sums, which inductor fuses into a few loops)
against the same compiled step calling torch's ``scaled_dot_product_attention`` (its CPU flash-attention kernel).

Both engines run ``decode_step="compile"`` on one random model of ``--arch`` / ``--size``
(``engine_decode.build``; the embedded tokenizer's 4096-token vocabulary), are fed the same tokens, and are timed
interleaved (one rollout of each per round; medians of ``--rounds`` after one untimed round, which compiles):
ms per decode step over ``--prompt-len`` + ``--new-tokens`` positions for each B, and the largest difference
between their logits. Compiling takes tens of seconds per engine and B.

    python benchmarks/decode_attention.py --arch llama --size tiny --batch-sizes 16 64
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
from textrl.engine import Engine


def step_times(model, B: int, P: int, T: int, rounds: int) -> dict:
    """ms per compiled decode step with ``decode_attention`` (``"ours"``) and with torch's SDPA (``"sdpa"``),
    and the largest logit difference between the two (``"max_diff"``)."""
    engines = {"ours": Engine(model), "sdpa": Engine(model)}
    make_static = engine_module._StaticStep.__init__

    def with_sdpa(static, engine, cache, key):  # the same step, calling torch's attention kernel instead
        make_static(static, engine, cache, key)
        if engine is engines["sdpa"]:
            static.attention = engine._sdpa

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (B, P), generator=gen)
    tokens = torch.randint(0, model.config.vocab_size, (T - 1, B), generator=gen)
    logits, times = {}, {name: [] for name in engines}
    for core in engines.values():
        core.decode_step = "compile"
    engine_module._StaticStep.__init__ = with_sdpa
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
    out["max_diff"] = (logits["ours"] - logits["sdpa"]).abs().max().item()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    engine_decode.paired_step_arguments(parser, size="tiny", rounds=10)
    args = parser.parse_args(argv)
    model = engine_decode.paired_step_model(args)
    P, T = args.prompt_len, args.new_tokens
    print(f"Compiled decode step, {args.arch} {args.size}; {P} + {T} positions; {args.threads} torch threads;", end=" ")
    print(f"median of {args.rounds} interleaved rounds\n")
    print("| B | decode_attention ms/step | SDPA ms/step | SDPA / decode_attention | max logit difference |")
    print("|---:|---:|---:|---:|---:|")
    for B in args.batch_sizes:
        row = step_times(model, B, P, T, args.rounds)
        ratio = row["sdpa"] / row["ours"]
        print(f"| {B} | {row['ours']:.3f} | {row['sdpa']:.3f} | {ratio:.3f}x | {row['max_diff']:.1e} |")


if __name__ == "__main__":
    main()
