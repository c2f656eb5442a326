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
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from textrl.core import HFCore, make_core
from textrl.lm import load_tokenizer

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
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
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
