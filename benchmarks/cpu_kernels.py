"""Paired A/B of textrl's CPU kernels (:mod:`textrl.kernels`) against torch's own matmul and ops.

Several parts, all in one process and interleaved round by round (medians of ``--rounds`` after one untimed round,
which also compiles):

- the decode-step matmul shapes of one random model of ``--arch`` / ``--size`` (each block linear and the head,
  B rows, and each group of weights that read the same rows: q, k and v; gate and up): microseconds per call
  through torch's matmul and through the kernel, each linear's weight in the layout the engine stores it
  (input-major);
- the same single matmuls with their weights read from memory (256 MB of distinct copies of each weight, taken
  in turn), as a decode step reads them: us per call and the kernel's weight rate in GB/s;
- the other kernels against torch's ops: RMSNorm and SwiGLU's product over a decode step's rows and a reference
  pass's, and a decode step's attention over the cache: us per call;
- the reference pass's and the update's matmuls (each linear's forward and input gradient at B x (P + T) rows:
  torch's ``mm`` against oneDNN's, :func:`textrl.kernels.onednn_mm`) and RMSNorm and SwiGLU's product forward and
  backward under autograd (torch's ops against textrl's row kernels): us per call;
- whole decode steps of that model through the engine, each ``--decode-step`` mode, the kernel on against off
  (``TEXTRL_CPU_KERNELS``; a compiled step decides when it is made, so each side has its own engine), fed the
  same tokens: ms per step and the largest difference between their logits;
- eager decode steps as one C++ call each (:attr:`textrl.engine.Engine.fused_step`) against op by op,
  the kernels on in both: ms per step, and whether the logits are equal bit for bit;
- with ``--iterations N``, whole textrl REINFORCE iterations on a random model of the same family and size
  (``peers.py``'s workload and model), two agents, kernel on and off, alternating: seconds per iteration.

    python benchmarks/cpu_kernels.py --arch llama --size small --batch-sizes 16 64
    python benchmarks/cpu_kernels.py --arch llama --size small --batch-sizes 16 --decode-step compile --iterations 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_decode

from textrl import kernels, ops
from textrl.arch import describe
from textrl.engine import Engine
from textrl.ops import in_out_weight, input_major


def _median_us(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def matmul_times(model, B: int, rounds: int, calls: int = 50) -> list[dict]:
    """Per distinct (in, out) shape of the model's decode matmuls, and per distinct group of weights that read
    the same rows (q, k, v; gate, up: one :func:`textrl.kernels.split_mm_group` call, against one torch
    matmul per weight): us per call, torch's and the kernel's."""
    spec = describe(model)
    input_major(spec, model)
    work: dict[tuple, list[torch.Tensor]] = {}
    for layer in spec.layers:
        for m in layer.linears():
            w = in_out_weight(m).detach()
            work.setdefault(tuple(w.shape), [w])
    head = spec.head.weight.detach().t()
    work.setdefault(tuple(head.shape), [head])
    for layer in spec.layers:
        for group in layer.groups():
            ws = [in_out_weight(m).detach() for m in group]
            work.setdefault((ws[0].shape[0], tuple(w.shape[1] for w in ws)), ws)
    rows = []
    for (k, n), ws in work.items():
        x = torch.randn(B, k)
        if len(ws) == 1:
            ours = lambda x=x, w=ws[0]: kernels.split_mm(x, w)  # noqa: E731
        else:
            ours = lambda x=x, ws=ws: kernels.split_mm_group(x, ws, [None] * len(ws))  # noqa: E731
        times: dict[str, list[float]] = {"torch": [], "split": []}
        for r in range(rounds + 1):
            calls_of = {"torch": lambda x=x, ws=ws: [torch.mm(x, w) for w in ws], "split": ours}
            for name, fn in calls_of.items():
                us = _median_us(fn, calls)
                if r:
                    times[name].append(us)
        torch_us, split_us = statistics.median(times["torch"]), statistics.median(times["split"])
        out = str(n) if len(ws) == 1 else "(" + " + ".join(map(str, n)) + ")"
        taken = kernels.wants_split(x, *ws)
        rows.append({"shape": f"{B} x {k} x {out}", "torch": torch_us, "split": split_us, "taken": taken})
    return rows


def streaming_times(model, B: int, rounds: int, megabytes: int = 256) -> list[dict]:
    """Per distinct (in, out) shape of the model's single decode matmuls (block linears and the head, in the
    engine's layout): us per call and the rate the weight is read (GB/s), torch's and the kernel's, over
    ``megabytes`` of distinct copies of the weight taken in turn, so that each call reads its weight from
    memory, as a decode step does, and not from a cache a repeated call keeps warm."""
    spec = describe(model)
    input_major(spec, model)
    shapes: dict[tuple, torch.Tensor] = {}
    for layer in spec.layers:
        for m in layer.linears():
            w = in_out_weight(m).detach()
            shapes.setdefault(tuple(w.shape), w)
    head = spec.head.weight.detach().t()
    shapes.setdefault(tuple(head.shape), head)
    rows = []
    for (k, n), w in shapes.items():
        copies = max(2, -(-megabytes * 2**20 // w.nbytes))
        # each copy in the source's layout (input-major: contiguous transpose), in memory of its own
        ws = [w.t().contiguous().t() if not w.is_contiguous() else w.clone() for _ in range(copies)]
        x = torch.randn(B, k)
        calls_of = {
            "torch": lambda x=x, ws=ws: [torch.mm(x, w) for w in ws],
            "split": lambda x=x, ws=ws: [kernels.split_mm(x, w) for w in ws],
        }
        times: dict[str, list[float]] = {"torch": [], "split": []}
        for r in range(rounds + 1):
            for name, fn in calls_of.items():
                us = _median_us(fn, 3) / copies
                if r:
                    times[name].append(us)
        torch_us, split_us = statistics.median(times["torch"]), statistics.median(times["split"])
        rows.append(
            {
                "shape": f"{B} x {k} x {n}",
                "copies": copies,
                "torch": torch_us,
                "split": split_us,
                "gbps": w.nbytes / split_us / 1e3,
                "taken": kernels.wants_split(x, w),
            }
        )
        del ws
    return rows


def _paired_steps(engines: dict, model, B: int, P: int, T: int, rounds: int, before=None) -> tuple[dict, dict]:
    """Decode sessions of every engine in turn, fed the same tokens, ``rounds`` timed rounds after an untimed one
    (which also compiles); ``before(name)`` runs before each engine's session. Returns ms per step by engine
    (medians) and each engine's last logits."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (B, P), generator=gen)
    tokens = torch.randint(0, model.config.vocab_size, (T - 1, B), generator=gen)
    logits, times = {}, {name: [] for name in engines}
    with torch.no_grad():
        for r in range(rounds + 1):
            for name, core in engines.items():
                if before is not None:
                    before(name)
                with core.start(ids, torch.ones_like(ids), P + T, record=True) as session:
                    start = time.perf_counter()
                    logits[name] = torch.stack([session.step(t)[0].clone() for t in tokens])
                    if r:
                        times[name].append((time.perf_counter() - start) / (T - 1))
    return {name: statistics.median(seconds) * 1e3 for name, seconds in times.items()}, logits


def step_times(model, B: int, P: int, T: int, rounds: int, mode: str) -> dict:
    """ms per decode step with the kernel (``"on"``) and without (``"off"``), and the largest logit difference."""
    switch = {"on": "1", "off": "0"}

    def set_switch(name: str) -> None:
        os.environ["TEXTRL_CPU_KERNELS"] = switch[name]

    engines = {}
    try:
        for name in switch:
            set_switch(name)
            engines[name] = Engine(model)
            engines[name].decode_step = mode
        out, logits = _paired_steps(engines, model, B, P, T, rounds, set_switch)
    finally:
        os.environ.pop("TEXTRL_CPU_KERNELS", None)
    out["max_diff"] = (logits["on"] - logits["off"]).abs().max().item()
    return out


def fused_times(model, B: int, P: int, T: int, rounds: int) -> dict:
    """ms per eager decode step as one C++ call (``"fused"``, :attr:`Engine.fused_step`) and op by
    op (``"ops"``), the kernels on in both, fed the same tokens in alternating sessions; ``"equal"``: whether
    their logits are equal bit for bit."""
    engines = {"fused": Engine(model), "ops": Engine(model)}
    engines["ops"].fused_step = False
    out, logits = _paired_steps(engines, model, B, P, T, rounds)
    out["equal"] = torch.equal(logits["fused"], logits["ops"])
    return out


def iteration_times(arch: str, size: str, B: int, mode: str, iters: int, folder: Path) -> dict:
    """Seconds per textrl REINFORCE iteration (``peers.py``'s workload: 8-token prompts, 32 new tokens, RLOO
    groups of 4, KL 0.05) with the kernel on and off: two agents on the same random model, alternating
    iterations after 3 untimed ones each (compilation included); medians, and each pair's ratio."""
    import peers
    import rl_speed

    lm, _ = peers.random_model(arch, size, folder / "model")
    work = rl_speed.build_workload(folder, False, 8, 32, 0)
    work = rl_speed.Workload(lm, work.source, work.prompts, 8, 32)
    runners = {}
    try:
        for name, value in (("on", "1"), ("off", "0")):
            os.environ["TEXTRL_CPU_KERNELS"] = value
            overrides = {"decode_step": mode}
            runners[name] = rl_speed.TextRLRunner("reinforce", work, B, 0, kl_coef=0.05, overrides=overrides)
        times: dict[str, list[float]] = {name: [] for name in runners}
        for i in range(3 + iters):
            for name, runner in runners.items():
                os.environ["TEXTRL_CPU_KERNELS"] = "1" if name == "on" else "0"
                start = time.perf_counter()
                runner.iteration()
                if i >= 3:
                    times[name].append(time.perf_counter() - start)
    finally:
        os.environ.pop("TEXTRL_CPU_KERNELS", None)
    pairs = [off / on for on, off in zip(times["on"], times["off"], strict=True)]
    return {"on": statistics.median(times["on"]), "off": statistics.median(times["off"]), "pairs": pairs}


def row_times(model, B: int, P: int, T: int, rounds: int, calls: int = 50) -> list[dict]:
    """The decode's other kernels against torch's ops, us per call: RMSNorm and SwiGLU's product over a decode
    step's B rows and over a reference pass's B x (P + T) (models with them), and one query per row's attention
    over a cache of P + T positions (grouped queries as the model has them)."""
    spec = describe(model)
    E, H, G, D, S = spec.embed.weight.shape[1], spec.n_head, spec.n_kv_head, spec.head_dim, P + T
    gen = torch.Generator().manual_seed(B)
    work = []
    layer = spec.layers[0]
    if not isinstance(layer.norm1, torch.nn.LayerNorm):
        w, eps = layer.norm1.weight.detach(), layer.norm1.variance_epsilon
        for rows in (B, B * S):
            x = torch.randn(rows, E, generator=gen)
            work.append(
                (
                    f"RMSNorm {rows} x {E}",
                    lambda x=x: F.rms_norm(x, (E,), w, eps),
                    lambda x=x: kernels.rms_norm(x, w, eps),
                )
            )
    if layer.gate is not None:
        width = in_out_weight(layer.gate).shape[1]
        for rows in (B, B * S):
            g, u = torch.randn(2, rows, width, generator=gen)
            work.append(
                (
                    f"silu(gate) * up {rows} x {width}",
                    lambda g=g, u=u: F.silu(g) * u,
                    lambda g=g, u=u: kernels.silu_mul(g, u),
                )
            )
    q = torch.randn(B, H, 1, D, generator=gen)
    k, v = torch.randn(2, B, G, S, D, generator=gen)
    seen = torch.ones(B, 1, 1, S, dtype=torch.bool)
    gqa = {"enable_gqa": True} if G != H else {}
    work.append(
        (
            f"attention {B} x {H} heads ({G} kv) x {S} keys",
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=seen, **gqa),
            lambda: kernels.decode_attention(q, k, v, seen),
        )
    )
    times: dict[str, dict[str, list[float]]] = {name: {"torch": [], "kernel": []} for name, *_ in work}
    with torch.no_grad():
        for _ in range(rounds + 1):
            for name, ours, theirs in work:
                times[name]["torch"].append(_median_us(ours, calls))
                times[name]["kernel"].append(_median_us(theirs, calls))
    return [
        {"op": name, "torch": statistics.median(t["torch"][1:]), "kernel": statistics.median(t["kernel"][1:])}
        for name, t in times.items()
    ]


def update_times(model, B: int, P: int, T: int, rounds: int, calls: int = 20) -> list[dict]:
    """The reference pass's and the update's kernels against torch's, us per call, at B x (P + T) rows: each
    distinct block linear and the head as a forward matmul (``x @ W``) and as the backward's input gradient
    (``g @ W.T``), torch's ``mm`` against oneDNN's (:func:`textrl.kernels.onednn_mm`); and RMSNorm and SwiGLU's
    product forward and backward under autograd, torch's ops against textrl's row kernels
    (:func:`textrl.ops.norm` and :func:`textrl.ops.swiglu` with their C++ backwards); and whether the engine
    takes textrl's side there (oneDNN's matmul above :data:`textrl.kernels.MAX_ROWS` rows)."""
    spec = describe(model)
    N, E = B * (P + T), spec.embed.weight.shape[1]
    gen = torch.Generator().manual_seed(B)
    work = []
    mm = kernels.onednn_mm
    weights = {
        tuple(in_out_weight(m).shape): in_out_weight(m).detach() for layer in spec.layers for m in layer.linears()
    }
    weights[tuple(in_out_weight(spec.head).shape)] = in_out_weight(spec.head).detach()
    for (k, n), w in weights.items():
        x, g = torch.randn(N, k, generator=gen), torch.randn(N, n, generator=gen)
        work.append(
            (f"x @ W, {N} x {k} x {n}", lambda x=x, w=w: x @ w, lambda x=x, w=w: mm(x, w), kernels.wants_onednn(x, w))
        )
        wt = w.t()
        work.append(
            (
                f"g @ W.T, {N} x {n} x {k}",
                lambda g=g, w=wt: g @ w,
                lambda g=g, w=wt: mm(g, w),
                kernels.wants_onednn(g, wt),
            )
        )
    layer = spec.layers[0]
    if not isinstance(layer.norm1, torch.nn.LayerNorm):
        norm, x = layer.norm1, torch.randn(N, E, generator=gen, requires_grad=True)
        w, eps, g = norm.weight, norm.variance_epsilon, torch.randn(N, E, generator=gen)
        work.append(
            (
                f"RMSNorm forward + backward {N} x {E}",
                lambda x=x, g=g: torch.autograd.grad(F.rms_norm(x, (E,), w, eps), (x, w), g),
                lambda x=x, g=g: torch.autograd.grad(ops.norm(x, norm), (x, w), g),
                kernels.wants_rows(x, w, autograd=True),
            )
        )
    if layer.gate is not None:
        width = in_out_weight(layer.gate).shape[1]
        gate, up = torch.randn(2, N, width, generator=gen).unbind(0)
        gate.requires_grad_(), up.requires_grad_()
        g = torch.randn(N, width, generator=gen)
        work.append(
            (
                f"silu(gate) * up forward + backward {N} x {width}",
                lambda g=g: torch.autograd.grad(F.silu(gate) * up, (gate, up), g),
                lambda g=g: torch.autograd.grad(ops.swiglu(gate, up), (gate, up), g),
                kernels.wants_rows(gate, up, autograd=True),
            )
        )
    times: dict[str, dict[str, list[float]]] = {name: {"torch": [], "textrl": []} for name, *_ in work}
    for _ in range(rounds + 1):
        for name, theirs, ours, _taken in work:
            times[name]["torch"].append(_median_us(theirs, calls))
            times[name]["textrl"].append(_median_us(ours, calls))
    return [
        {
            "op": name,
            "torch": statistics.median(times[name]["torch"][1:]),
            "textrl": statistics.median(times[name]["textrl"][1:]),
            "taken": taken,
        }
        for name, _, _, taken in work
    ]


def _print_matmuls(rows: list[dict], extra: dict | None = None) -> None:
    """A markdown table of matmul rows: shape, us per call of torch and of the kernel, their ratio, the ``extra``
    columns (name -> formatter of a row), and whether the engine takes the kernel there."""
    extra = extra or {}
    heads = ["rows x in x out", "torch", "split", "torch / split", *extra, "taken by the engine"]
    print("| " + " | ".join(heads) + " |")
    print("|---|" + "---:|" * (len(heads) - 2) + "---|")
    for row in rows:
        cells = [row["shape"], f"{row['torch']:.0f}", f"{row['split']:.0f}", f"{row['torch'] / row['split']:.2f}x"]
        cells += [cell(row) for cell in extra.values()] + ["yes" if row["taken"] else "no"]
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    engine_decode.paired_step_arguments(parser, size="small", rounds=5)
    modes = ["eager", "static", "compile"]
    parser.add_argument("--decode-step", nargs="+", default=["eager", "compile"], choices=modes)
    parser.add_argument(
        "--iterations", type=int, default=0, help="also time this many REINFORCE iterations each, kernel on and off"
    )
    args = parser.parse_args(argv)
    if not kernels.load():
        raise SystemExit(f"cpu_kernels.py: the kernel cannot be built here: {kernels._state.get('error')}")
    model = engine_decode.paired_step_model(args)
    P, T = args.prompt_len, args.new_tokens
    print(f"textrl's split matmul against torch's, {args.arch} {args.size}; {args.threads} torch threads;", end=" ")
    print(f"median of {args.rounds} interleaved rounds")
    how = "the direct kernel" if kernels.direct() else "one BLAS call per thread (no AVX-512: no direct kernel)"
    print(f"Input-major weights run through {how}.\n")
    print("Decode-step matmuls (rows x in x out; a group of weights of one input: one call, against torch's")
    print("matmul per weight), us per call:\n")
    _print_matmuls([row for B in args.batch_sizes for row in matmul_times(model, B, args.rounds)])
    print("\nThe same single matmuls with their weights read from memory (distinct copies of each weight, 256 MB")
    print("in all, taken in turn: a decode step reads every weight once, from memory unless the model fits in")
    print("cache), us per call and the kernel's weight rate:\n")
    streamed = [row for B in args.batch_sizes for row in streaming_times(model, B, args.rounds)]
    _print_matmuls(streamed, {"copies": lambda r: str(r["copies"]), "split GB/s": lambda r: f"{r['gbps']:.1f}"})
    print("\nThe other kernels (no autograd: decode steps, reference passes) against torch's ops, us per call:\n")
    print("| op | torch | kernel | torch / kernel |")
    print("|---|---:|---:|---:|")
    for B in args.batch_sizes:
        for row in row_times(model, B, P, T, args.rounds):
            ratio = row["torch"] / row["kernel"]
            print(f"| {row['op']} | {row['torch']:.1f} | {row['kernel']:.1f} | {ratio:.2f}x |")
    what = (
        "oneDNN's matmul and textrl's row kernels"
        if kernels.wants_onednn(torch.ones(1000, 1), torch.ones(1, 1))
        else "textrl's row kernels (oneDNN's matmul is not at hand here: the matmuls are torch's on both sides)"
    )
    print(f"\nThe reference pass's and the update's matmuls and row ops, torch's against {what}, us per call:\n")
    print("| op | torch | textrl | torch / textrl | taken by the engine |")
    print("|---|---:|---:|---:|---|")
    for B in args.batch_sizes:
        for row in update_times(model, B, P, T, args.rounds):
            ratio, taken = row["torch"] / row["textrl"], "yes" if row["taken"] else "no"
            print(f"| {row['op']} | {row['torch']:.1f} | {row['textrl']:.1f} | {ratio:.2f}x | {taken} |")
    print(f"\nWhole decode steps, {P} + {T} positions, ms per step (every kernel on against all off):\n")
    print("| B | decode step | kernel on | kernel off | off / on | max logit difference |")
    print("|---:|---|---:|---:|---:|---:|")
    for B in args.batch_sizes:
        for mode in args.decode_step:
            row = step_times(model, B, P, T, args.rounds, mode)
            ratio = row["off"] / row["on"]
            print(f"| {B} | {mode} | {row['on']:.2f} | {row['off']:.2f} | {ratio:.3f}x | {row['max_diff']:.1e} |")
    if "eager" in args.decode_step:
        print("\nEager decode steps as one C++ call (textrl.kernels.decode_plan) against op by op (the kernels on")
        print("in both), ms per step:\n")
        print("| B | fused | op by op | op by op / fused | logits equal bit for bit |")
        print("|---:|---:|---:|---:|---|")
        for B in args.batch_sizes:
            row = fused_times(model, B, P, T, args.rounds)
            ratio = row["ops"] / row["fused"]
            print(f"| {B} | {row['fused']:.2f} | {row['ops']:.2f} | {ratio:.3f}x | {row['equal']} |")
    if args.iterations:
        print(f"\nWhole REINFORCE iterations (peers.py's workload), median of {args.iterations} alternating pairs:\n")
        print("| B | decode step | kernel on s | kernel off s | off / on | each pair's off / on |")
        print("|---:|---|---:|---:|---:|---|")
        with tempfile.TemporaryDirectory() as tmp:
            for B in args.batch_sizes:
                for mode in args.decode_step:
                    row = iteration_times(args.arch, args.size, B, mode, args.iterations, Path(tmp) / f"{B}-{mode}")
                    pairs = ", ".join(f"{r:.2f}" for r in row["pairs"])
                    ratio = row["off"] / row["on"]
                    print(f"| {B} | {mode} | {row['on']:.3f} | {row['off']:.3f} | {ratio:.3f}x | {pairs} |")


if __name__ == "__main__":
    main()
