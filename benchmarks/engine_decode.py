"""Rollout tokens/s of one architecture: HF ``generate``, :class:`textrl.core.HFCore` and ``make_core``'s core.

A rollout samples ``--new-tokens`` tokens (32) after ``--prompt-len``-token prompts (8) for B rows, with
plain sampling (temperature 1, no top-k/top-p), and is timed whole: prefill + 31 decode steps (the last
sampled token is not fed back, as in ``generate``). The three systems run the same randomly initialised
model (``--arch``, ``--size``; the embedded tokenizer's 4096-token vocabulary) and the same prompts:

- ``generate``: ``model.generate(do_sample=True, min_new_tokens=max_new_tokens=32)`` with HF's KV cache;
- ``HFCore``: textrl's generic core (the HF forward with a ``DynamicCache``), prefill + decode;
- ``make_core``: the core textrl picks (:class:`textrl.engine.Engine`); shown as
  ``-`` when that is ``HFCore`` itself (a model the engine does not run).

Rounds are interleaved (each round times every system at every B); the table gives medians over
``--rounds`` after ``--warmup`` untimed rounds, and the make_core/HFCore and make_core/generate ratios.

    python benchmarks/engine_decode.py --arch llama --size small --rounds 3
    python benchmarks/engine_decode.py --arch qwen3 --size tiny --batch-sizes 2 --new-tokens 4 --rounds 1  # smoke

``--decode-steps MODE ...`` measures the decode alone instead (:func:`decode_times`): the engine with each
decode step (``eager``; ``static``, ``graph`` = CUDA graphs, ``compile`` = torch.compile + CUDA graphs: see
:mod:`textrl.engine`) and HF ``generate``, the prefill timed apart, in ms per step and against the
memory-bandwidth bound (every matmul weight and the KV cache so far read once per step,
``flop_bound.decode_bytes``; ``--peak-bandwidth`` TB/s, 4.8 on CUDA), on ``--device`` in ``--dtype``, optionally
with a real model's shape (``--shape qwen2-0.5b``, ``llama-1b``; :data:`SHAPES`):

    python benchmarks/engine_decode.py --device cuda --dtype bf16 --shape qwen2-0.5b --batch-sizes 64 \
        --prompt-len 128 --new-tokens 256 --rounds 2 --decode-steps eager graph compile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from textrl.core import HFCore, make_core
from textrl.lm import load_tokenizer

SHAPES = {
    "qwen2-0.5b": (
        "qwen2",
        {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14}
        | {"num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1e6}
        | {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
    ),
    "llama-1b": (
        "llama",
        {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32}
        | {"num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True}
        | {"rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072},
    ),
    "qwen2-tiny": (
        "qwen2",
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
        | {"num_key_value_heads": 1, "vocab_size": 6000, "tie_word_embeddings": True, "rope_theta": 1e6}
        | {"max_position_embeddings": 512},
    ),
}
"""``--shape`` -> (family, config): randomly initialised models of real models' shapes. ``qwen2-0.5b`` is
Qwen2-0.5B's (24 layers x 896, 14 heads, 2 kv heads, SwiGLU 4864, 151,936-token vocabulary, tied head;
494M parameters), ``llama-1b`` Llama-3.2-1B's (16 layers x 2048, 32 heads, 8 kv heads, SwiGLU 8192, 128,256
tokens, tied head; 1.24B parameters; without its rope scaling, which changes no cost); ``qwen2-tiny`` a toy of
the Qwen2 family with a vocabulary wider than the embedded tokenizer (tests)."""
SIZES = {"tiny": (4, 256), "small": (8, 512), "medium": (12, 768), "large": (12, 1024)}
"""name -> (layers, width); heads are width / 64, kv heads half the heads (Llama-style families). ``large`` is
a ~148M-parameter Llama (the LoRA memory comparison of ``peers.py --lora-rank``)."""
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
"""--arch -> the transformers class prefix (``LlamaConfig``, ``LlamaForCausalLM``, ...)."""


def build(arch: str, size: str, vocab: int, context: int, window: int, eos: int) -> torch.nn.Module:
    """A randomly initialised model of the family and size (fp32, eval mode)."""
    layers, width = SIZES[size]
    heads = width // 64
    torch.manual_seed(0)
    if arch == "gpt2":
        shape = {"n_positions": context, "n_embd": width, "n_layer": layers, "n_head": heads}
        config = transformers.GPT2Config(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, **shape)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config_cls = getattr(transformers, f"{FAMILIES[arch]}Config")
        model_cls = getattr(transformers, f"{FAMILIES[arch]}ForCausalLM")
        extra = {"sliding_window": window} if arch == "mistral" else {}
        shape = {"hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": heads, "head_dim": 64}
        shape |= {"intermediate_size": round(2.7 * width / 64) * 64, "num_key_value_heads": max(1, heads // 2)}
        config = config_cls(vocab_size=vocab, max_position_embeddings=context, **shape, **extra)
        model = model_cls(config)
    model.config.bos_token_id = model.config.eos_token_id = model.config.pad_token_id = eos
    return model.eval()


def build_shape(name: str, eos: int) -> torch.nn.Module:
    """A randomly initialised model of the shape ``name`` (:data:`SHAPES`) (fp32, eval mode; HF's own
    initialisation)."""
    family, shape = SHAPES[name]
    torch.manual_seed(0)
    config_cls = getattr(transformers, f"{FAMILIES[family]}Config")
    model_cls = getattr(transformers, f"{FAMILIES[family]}ForCausalLM")
    config = config_cls(**shape, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    return model_cls(config).eval()


def widen_tokenizer(tokenizer, vocab_size: int):
    """``tokenizer`` (a byte-level BPE) with placeholder entries up to ``vocab_size`` ids (`` unused4096``, ...),
    so that a model's whole vocabulary is a token space: text encodes exactly as before (no merge makes a
    placeholder), and a sampled placeholder decodes to its name."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    taken = set(vocab.values()) | {a["id"] for a in data["added_tokens"]}
    for i in range(max(taken) + 1, vocab_size):
        vocab[f"\u0120unused{i}"] = i  # \u0120: byte-level BPE's space
    backend = Tokenizer.from_str(json.dumps(data))
    wide = PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer.special_tokens_map)
    if len(wide) != vocab_size:
        raise ValueError(f"widened to {len(wide)} tokens, expected {vocab_size}")
    return wide


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a timer reads wall-clock time; CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rollout_generate(model, ids, mask, new_tokens: int, eos: int) -> None:
    sampling = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0}
    lengths = {"min_new_tokens": new_tokens, "max_new_tokens": new_tokens, "pad_token_id": eos, "eos_token_id": eos}
    out = model.generate(input_ids=ids, attention_mask=mask, **sampling, **lengths)
    assert out.shape[1] == ids.shape[1] + new_tokens


def rollout_core(core, ids, mask, new_tokens: int) -> None:
    with core.start(ids, mask, ids.shape[1] + new_tokens) as session:
        logits = session.logits
        for t in range(new_tokens):
            token = torch.multinomial(logits.softmax(-1), 1)[:, 0]
            if t < new_tokens - 1:
                logits, _ = session.step(token)


def decode_times(model, B: int, P: int, T: int, modes=("eager",), generate: bool = True, repeats: int = 3) -> dict:
    """Seconds of the prefill alone and of the whole rollout (prefill + T - 1 decode steps, textrl's sampler),
    median of ``repeats`` after one warm-up, per decoder: the engine with each ``decode_step`` of ``modes``
    (``"engine"``, ``"engine (graph)"``, ...) and, with ``generate``, HF ``generate``. The decode is their
    difference. Random prompt ids of ``P`` tokens; ``T`` tokens sampled at temperature 1."""
    from textrl.engine import Engine
    from textrl.policy import sample

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (B, P), generator=gen, device=device)
    mask = torch.ones_like(ids)
    eos = model.config.eos_token_id

    def engine_rollout(core, steps: int):
        with core.start(ids, mask, P + T) as session:
            logits = session.logits
            for t in range(steps):
                token = sample(logits.float().softmax(-1), gen)
                if t < steps - 1:
                    logits, _ = session.step(token)

    systems = {}
    core = Engine(model) if Engine.supports(model) else None
    for mode in modes if core is not None else ():
        name = "engine" if mode == "eager" else f"engine ({mode})"
        systems[name] = (mode, lambda: engine_rollout(core, 1), lambda: engine_rollout(core, T))
    if generate:
        systems["generate"] = (
            None,
            lambda: rollout_generate(model, ids, mask, 1, eos),
            lambda: rollout_generate(model, ids, mask, T, eos),
        )
    out = {}
    with torch.no_grad():
        for name, (mode, prefill, rollout) in systems.items():
            if core is not None and mode is not None:
                core.decode_step = mode
            times = {"prefill": [], "rollout": []}
            for r in range(repeats + 1):
                for kind, fn in (("prefill", prefill), ("rollout", rollout)):
                    synchronize(device)
                    start = time.perf_counter()
                    fn()
                    synchronize(device)
                    if r:  # the first round warms up (and captures what a static decode step captures)
                        times[kind].append(time.perf_counter() - start)
            prefill_s, rollout_s = statistics.median(times["prefill"]), statistics.median(times["rollout"])
            out[name] = {"prefill": prefill_s, "rollout": rollout_s, "decode": max(rollout_s - prefill_s, 1e-9)}
            out[name]["steps"] = T - 1
    if core is not None:
        core.decode_step = "eager"
    return out


def max_difference(core, reference, ids, mask, new_tokens: int) -> float:
    """Largest |logit difference| of two cores over a prefill and the decode steps, fed the same tokens."""
    sessions = [c.start(ids, mask, ids.shape[1] + new_tokens) for c in (core, reference)]
    a, b = (s.logits for s in sessions)
    worst = (a - b).abs().max().item()
    for _ in range(new_tokens - 1):
        token = b.argmax(-1)
        a, b = (s.step(token)[0] for s in sessions)
        worst = max(worst, (a - b).abs().max().item())
    for s in sessions:
        s.close()
    return worst


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""``--dtype`` -> parameter dtype."""
DECODE_STEPS = ("eager", "static", "graph", "compile")
"""The engine's decode steps (:attr:`textrl.engine.Engine.decode_step`)."""
H200_BANDWIDTH = 4.8
"""TB/s of HBM3e bandwidth of an NVIDIA H200 (the datasheet's figure)."""


def decode_table(args) -> None:
    """``--decode-steps``: the decode alone, per B and decoder (see :func:`decode_times`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # flop_bound.py beside this file
    import flop_bound

    from textrl.device import resolve_device

    device = resolve_device(args.device)
    tokenizer_eos = load_tokenizer("tiny").eos_token_id
    context = max(64, args.prompt_len + args.new_tokens)
    with torch.device(device):  # initialised where it runs (a GPU draws a billion weights in a moment)
        if args.shape:
            model = build_shape(args.shape, tokenizer_eos)
            what = args.shape
        else:
            model = build(args.arch, args.size, len(load_tokenizer("tiny")), context, args.window, tokenizer_eos)
            what = f"{args.arch} {args.size}"
    model = model.to(device=device, dtype=DTYPES[args.dtype])
    shape = flop_bound.Shape.from_config(model.config.to_dict())
    element = torch.finfo(DTYPES[args.dtype]).bits // 8
    bandwidth = args.peak_bandwidth or (H200_BANDWIDTH if device.type == "cuda" else None)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    P, T = args.prompt_len, args.new_tokens
    print(f"Decode alone, {what} ({params:.1f}M parameters, {args.dtype}) on {device}: {P}-token prompts, {T}")
    print(f"sampled tokens (prefill timed apart; {T - 1} decode steps); median of {args.rounds} after 1 warm-up;")
    bound = f"{bandwidth:g} TB/s" if bandwidth else "no bandwidth given (--peak-bandwidth)"
    print(f"bytes read per step: every matmul weight and the KV cache so far; bound at {bound}\n")
    print("| B | decoder | prefill ms | ms/step | decode tok/s | vs engine | GB/s | % of bandwidth bound |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for B in args.batch_sizes:
        times = decode_times(model, B, P, T, args.decode_steps, repeats=args.rounds)
        moved = flop_bound.decode_bytes(shape, B, P, T, element)
        base = times.get("engine")
        for name, r in times.items():
            rate = B * r["steps"] / r["decode"]
            ratio = f"{base['decode'] / r['decode']:.2f}x" if base else "-"
            speed = moved / r["decode"]
            frac = f"{100 * speed / (bandwidth * 1e12):.0f}%" if bandwidth else "-"
            cells = [str(B), name, f"{1e3 * r['prefill']:.1f}", f"{1e3 * r['decode'] / r['steps']:.3f}"]
            print("| " + " | ".join([*cells, f"{rate:,.0f}", ratio, f"{speed / 1e9:,.1f}", frac]) + " |")


def paired_step_arguments(parser: argparse.ArgumentParser, size: str, rounds: int) -> None:
    """The options of the paired decode-step A/Bs (``decode_attention.py``, ``cpu_kernels.py``): the random
    model (``--arch``, ``--size``), ``--batch-sizes``, ``--prompt-len``, ``--new-tokens``, ``--rounds``,
    ``--threads``."""
    parser.add_argument("--arch", choices=["gpt2", *FAMILIES], default="llama")
    parser.add_argument("--size", choices=list(SIZES), default=size)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=rounds, help="timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")


def paired_step_model(args: argparse.Namespace) -> torch.nn.Module:
    """For those A/Bs: torch's threads set from ``--threads``, and the random model of ``--arch`` / ``--size``
    (vocabulary 4096, context for the prompt and new tokens, at least 256)."""
    torch.set_num_threads(args.threads)
    return build(args.arch, args.size, 4096, max(256, args.prompt_len + args.new_tokens), 16, 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["gpt2", *FAMILIES], default="llama", help="model family")
    parser.add_argument(
        "--size", choices=list(SIZES), default="small", help="tiny 4x256, small 8x512, medium 12x768, large 12x1024"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64], help="values of B")
    parser.add_argument("--prompt-len", type=int, default=8, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=32, help="sampled tokens per row")
    parser.add_argument("--window", type=int, default=16, help="Mistral's sliding window (acts inside a rollout)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--shape", choices=list(SHAPES), help="a real model's shape instead of --arch/--size")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="parameter dtype")
    parser.add_argument(
        "--decode-steps",
        nargs="+",
        choices=list(DECODE_STEPS),
        metavar="MODE",
        help="instead of the table: the decode alone (ms per step, GB/s, %% of the memory-bandwidth bound) of the "
        f"engine with each decode step ({', '.join(DECODE_STEPS)}) and of HF generate",
    )
    parser.add_argument(
        "--peak-bandwidth", type=float, help="memory bandwidth in TB/s for the bound (default: 4.8, an H200's, on CUDA)"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.decode_steps:
        decode_table(args)
        return
    tokenizer = load_tokenizer("tiny")
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    model = build(args.arch, args.size, vocab, max(64, args.prompt_len + args.new_tokens), args.window, eos)
    picked = make_core(model)
    label = type(picked).__name__ + (f" ({picked.arch})" if hasattr(picked, "arch") else "")
    hf_core = HFCore(model)
    systems = {
        "generate": lambda ids, mask: rollout_generate(model, ids, mask, args.new_tokens, eos),
        "HFCore": lambda ids, mask: rollout_core(hf_core, ids, mask, args.new_tokens),
    }
    if not isinstance(picked, HFCore):
        systems["make_core"] = lambda ids, mask: rollout_core(picked, ids, mask, args.new_tokens)

    gen = torch.Generator().manual_seed(0)
    agreement = ""
    if "make_core" in systems:
        with torch.no_grad():
            ids = torch.randint(0, vocab, (2, args.prompt_len), generator=gen)
            worst = max_difference(picked, hf_core, ids, torch.ones_like(ids), args.new_tokens)
        agreement = f"; its logits differ from HFCore's by at most {worst:.1e} (prefill + decode, 2 rows)"
    times = {(name, B): [] for name in systems for B in args.batch_sizes}
    with torch.no_grad():
        for r in range(args.warmup + args.rounds):
            for B in args.batch_sizes:
                ids = torch.randint(0, vocab, (B, args.prompt_len), generator=gen)
                mask = torch.ones_like(ids)
                for name, run in systems.items():
                    start = time.perf_counter()
                    run(ids, mask)
                    if r >= args.warmup:
                        times[name, B].append(time.perf_counter() - start)

    layers, width = SIZES[args.size]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    shape = f"{layers} layers x {width}, {params:.1f}M parameters, vocab {vocab}"
    print(f"Rollout tokens/s, {args.arch} {args.size} ({shape}); {args.prompt_len}-token prompts + {args.new_tokens}")
    print(f"sampled tokens; median of {args.rounds} interleaved rounds after {args.warmup} warm-up;", end=" ")
    print(f"{torch.get_num_threads()} torch threads; make_core runs {label}{agreement}\n")
    print("| B | generate | HFCore | make_core | make_core/HFCore | make_core/generate |")
    print("|---:|---:|---:|---:|---:|---:|")
    for B in args.batch_sizes:
        rate = {name: B * args.new_tokens / statistics.median(times[name, B]) for name in systems}
        if "make_core" in rate:
            core = rate["make_core"]
            cells = f"{core:,.0f} | {core / rate['HFCore']:.2f}x | {core / rate['generate']:.2f}x"
        else:
            cells = "- | - | -"
        print(f"| {B} | {rate['generate']:,.0f} | {rate['HFCore']:,.0f} | {cells} |")


if __name__ == "__main__":
    main()
