"""textrl against its peers on one workload: generated tokens/s of a full RL iteration and of the rollout.

Systems (``--systems``), all on the same model, prompts, reward and sampling:

- ``ppo``: textrl PPO, one optimisation step per batch (``n_epochs=1``, ``minibatch_size=B``);
- ``reinforce``: textrl REINFORCE, RLOO baseline over groups of 4 samples of a prompt;
- ``textrl-grpo``, ``textrl-grpo-mu2``: textrl GRPO with TRL GRPOTrainer's settings (``group_size=4``, one
  minibatch of B per pass, ``loss_type="dapo"``, ``scale_rewards="group"``, ``epsilon=0.2``, the k3 KL in the
  loss with ``kl_coef`` = TRL's ``beta``) and ``num_iterations`` (GRPO's mu) 1 or 2: mu optimisation steps per
  generation batch;
- ``grpo``, ``rloo``: TRL ``GRPOTrainer`` / ``RLOOTrainer`` (the installed TRL), B completions per step as B/4
  prompts x ``num_generations=4``, one optimisation step per generation batch (see ``trl_systems.py``);
- ``grpo-mu2``: TRL ``GRPOTrainer`` as ``grpo`` with ``num_iterations=2``: each generation batch is reused for
  2 optimisation steps (``steps_per_generation=1``, so both steps take the whole batch, as ``textrl-grpo-mu2``;
  TRL then adds a no-grad old-log-prob pass to the rollout, which textrl takes from the sampling instead);
- ``trl-ppo``: TRL 1.12's ``PPOTrainer`` (removed from TRL after 1.12), run by ``--trl-ppo-python``: the
  reward function wrapped as a parameter-free "reward model", a separate value model, one epoch of one
  minibatch;
- ``sb3-policy``: stable-baselines3 PPO with ``agents.sb3.TransformerActorCriticPolicy`` over B ``TextGenEnv``;
- ``sb3``: SB3 PPO with a naive features extractor (the full model trunk over every prefix, no KV cache);
- ``plain``: a plain PyTorch loop: HF ``generate`` (KV cache) + one REINFORCE step (with the KL term: a
  reference forward).

The textrl, plain-loop and SB3 systems are ``rl_speed.py``'s runners; see its docstring for their details.

Workload: the embedded ``tiny`` (4-layer GPT-2, 4.27M parameters; ``--tiny-random`` for a 2-layer toy; ``--arch``
for a random model of another family with the embedded tokenizer; ``--lm FOLDER`` for any HF causal LM with its
own tokenizer, which then makes the prompts and gives the eos id suppressed), exported once as an HF folder
with every dropout probability 0 and loaded from there by every system;
64 prompts of exactly 8 tokens; exactly 32 new tokens per prompt (eos suppressed everywhere: textrl's
``suppress_tokens``, SB3's logits, ``min_new_tokens`` for ``generate``/GRPO/RLOO, an LM-head hook for TRL PPO),
temperature 1, no top-k/top-p; the reward is the fraction of the completion's words that are "the"; Adam(W) at lr 5e-5.
KL (``--kl``, default on, textrl's default): textrl ``kl_coef=0.05`` (a reference pass per batch), TRL
``beta=0.05`` (GRPO/RLOO) and ``kl_coef=0.05`` (PPO), the plain loop a frozen reference copy and GRPO's KL
term in its loss (coefficient 0.05); SB3 has no reference model.
With ``--kl off`` every coefficient is 0 and the reference model is dropped, except TRL PPO's, which always runs.
``--lora-rank R`` (default 0: full fine-tuning) trains LoRA adapters (peft) of rank R, alpha 2R, dropout 0, on
every linear layer of the blocks (not the LM head) instead of every weight, in the systems that can: textrl PPO
REINFORCE and GRPO (``lora_rank``/``lora_alpha``; their reference is the base with the adapters off) and TRL GRPO
and RLOO (``peft_config``); it is then the default set of ``--systems``, and naming another (``plain``, ``sb3``,
``sb3-policy``, ``trl-ppo``) is an argparse error. The FLOP bound (which counts full fine-tuning's weight
gradients) is skipped.

Measurement: every (system, B) run is a subprocess of its own (its peak RSS, ``ru_maxrss``, is its own),
runs are interleaved round by round (round 1: every system and B, then round 2, ...) so drifts in machine
load hit all alike; a run does ``--warmup`` iterations, then ``--iters`` timed ones; the table gives the
median over rounds of each run's median, the spread (half the range over rounds, as a percentage) and
each figure's ratio to textrl PPO at the same B. "Rollout" is everything before the first gradient pass
(generation, reward, and the reference/old-log-prob passes where a system has them; the plain loop runs its
reference forward inside its update), measured inside the same iterations. An iteration is one generation
batch and every optimisation step taken on it (two for the mu=2 systems: TRL's two trainer steps are summed
into one row), and tokens/s counts its B x T generated tokens once in every system. Naive SB3 runs only up to
``--sb3-max-batch`` (16) with ``--sb3-iters`` (1) timed iteration after one warm-up (~20 s an iteration and
~3.6 GB at B = 16). The FLOP bound (``flop_bound.py``; GPT-2 and the dense Llama-style families) is measured
in its own subprocess each round too; the best round's is reported, with every system's fraction of it, its
streaming ceiling (the decode's matmuls timed as a decode reads its weights) and the issue's speed targets
ticked, each with the largest ratio that ceiling allows. The report is printed and written to ``--out``
(default ``benchmarks/results/peers-<date>.md``).

    python benchmarks/peers.py                                   # the full table (~20 min on 2 cores)
    python benchmarks/peers.py --batch-sizes 16 --systems ppo grpo --rounds 1 --iters 2   # a quick look
    python benchmarks/peers.py --learning                        # wall-clock to a reward: textrl PPO vs GRPO
    python benchmarks/peers.py --systems textrl-grpo grpo textrl-grpo-mu2 grpo-mu2   # GRPO, mu = 1 and 2
    python benchmarks/peers.py --arch llama --size small         # a random Llama, 8 layers x 512 (engine_decode.py)
    python benchmarks/peers.py --arch llama --size large --lora-rank 16 --batch-sizes 16   # LoRA, a ~150M Llama
    python benchmarks/peers.py --lm ~/models/Qwen2.5-0.5B --batch-sizes 16 --systems ppo grpo   # any HF causal LM
    python benchmarks/peers.py --device cuda --dtype bf16 --shape qwen2-0.5b --batch-sizes 64 \
        --prompt-tokens 128 --new-tokens 256 --systems reinforce ppo grpo plain --decode-step graph   # a GPU

On a GPU (``--device cuda``; ``benchmarks/gpu.sh`` runs the H200 set): ``--dtype bf16`` loads every system's
model in bf16 (textrl's weights through its runtime dtype, TRL with ``model_init_kwargs`` dtype bf16 and
``bf16=True``, the plain loop's), so weights, activations and Adam's state are bf16 everywhere; ``--shape`` is a
random model of a real model's shape (``engine_decode.SHAPES``: ``qwen2-0.5b``, ``llama-1b``) with the embedded
tokenizer widened to its vocabulary by placeholder tokens (prompts encode as before; every vocabulary entry
can be sampled, as with a real tokenizer); ``--decode-step`` sets textrl's decode step (``graph``: CUDA
graphs). The report then adds, per system, the peak GPU memory (``torch.cuda.max_memory_allocated`` of its
process), the update's time (iteration minus rollout) and its MFU: model FLOPs of the update
(``flop_bound.update_flops``: forward and backward over B x (P + T - 1) positions, the usual 6N per token, and
mu times that for GRPO with mu passes) per second over ``--peak-tflops`` (989, an H200's dense bf16); and a decode
measurement in a process of its own: the engine's decode steps (eager, and ``--decode-step``) and HF
``generate``'s, prefill timed apart, against the memory-bandwidth bound (every matmul weight and the KV cache
so far read once per step, ``flop_bound.decode_bytes``, at ``--peak-bandwidth``, 4.8 TB/s); then the GPU targets.
``--kernels N`` (CPU) runs N more iterations of each system (not naive SB3, TRL RLOO or TRL PPO) after its
timed ones under ``torch.profiler`` and
reports the seconds per iteration spent in matmul and attention kernels (:func:`is_kernel`; compiled code's
included) beside its whole iteration, and each target's ratio with textrl's iteration cut to those kernels: the
most that removing all of its other work could reach (peak RSS is read before profiling).
``--log FILE`` appends every run's result as a JSON line as it finishes. SIGTERM (``timeout``) or Ctrl-C stops the
measuring and the report of the runs done so far is written, saying so.

TRL PPO needs its own venv (TRL 1.12; install torch first, or pip pulls a CUDA build):
``python3 -m venv ../.venv-trl112 && ../.venv-trl112/bin/pip install torch==2.13.0 &&
../.venv-trl112/bin/pip install trl==1.12.0 accelerate datasets``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # rl_speed.py, trl_systems.py, flop_bound.py, learning.py beside this file
import flop_bound  # noqa: E402
import peer_report  # noqa: E402
import rl_speed  # noqa: E402
import trl_systems  # noqa: E402

SYSTEMS = {
    "ppo": "textrl PPO (1 epoch, 1 minibatch)",
    "reinforce": "textrl REINFORCE (RLOO, group 4)",
    "textrl-grpo": "textrl GRPO (group 4, mu=1)",
    "textrl-grpo-mu2": "textrl GRPO (group 4, mu=2)",
    "grpo": "TRL GRPOTrainer (4 generations)",
    "grpo-mu2": "TRL GRPOTrainer (4 generations, mu=2)",
    "rloo": "TRL RLOOTrainer (4 generations)",
    "trl-ppo": "TRL 1.12 PPOTrainer (1 epoch, 1 minibatch)",
    "sb3-policy": "SB3 PPO + TransformerActorCriticPolicy",
    "sb3": "SB3 PPO, naive (no KV cache)",
    "plain": "PyTorch loop: HF generate + REINFORCE",
}
"""System name (``--systems``) -> table label."""
KL_COEF = 0.05
"""KL coefficient of every system that has a reference model, with ``--kl on`` (textrl's default)."""
DEFAULT_TRL_PPO_PYTHON = HERE.parents[1] / ".venv-trl112" / "bin" / "python"
TEXTRL_SYSTEMS = ("ppo", "reinforce", "textrl-grpo", "textrl-grpo-mu2")
"""The systems that run on textrl's engine (``--decode-step`` applies to them)."""
LORA_SYSTEMS = ("ppo", "reinforce", "textrl-grpo", "textrl-grpo-mu2", "grpo", "grpo-mu2", "rloo")
"""The systems that train LoRA adapters with ``--lora-rank``; the others train every weight only."""
SHAPE_NAMES = ["qwen2-0.5b", "llama-1b", "qwen2-tiny"]
"""``--shape`` (``engine_decode.SHAPES``; imported late, so this list is checked against it in the tests)."""
GRPO_PASSES = {"textrl-grpo": 1, "textrl-grpo-mu2": 2, "grpo": 1, "grpo-mu2": 2}
"""GRPO systems -> ``num_iterations`` (GRPO's mu): optimisation steps per generation batch."""
GPU_SYSTEMS = ("ppo", "reinforce", "textrl-grpo", "textrl-grpo-mu2", "grpo", "grpo-mu2", "rloo", "plain")
"""The systems that run on a GPU (``--device cuda``); TRL 1.12 PPO and SB3 run on the CPU only."""
H200_TFLOPS = 989.0
"""Dense bf16 TFLOP/s of an NVIDIA H200 (SXM; the datasheet's 1,979 is with 2:4 sparsity)."""
H200_TBS = 4.8
"""HBM3e TB/s of an NVIDIA H200."""
DEFAULT_PLACE = {
    "device": "cpu",
    "dtype": "fp32",
    "decode_step": "eager",
    "replay_memory_mb": None,
    "activation_checkpointing": False,
    "kernels": 0,
}
"""Where and how the systems run (``--device``, ``--dtype``, textrl's ``--decode-step`` and
``--replay-memory-mb``, and ``--activation-checkpointing`` for textrl and TRL), and ``--kernels``: how many
profiled iterations follow the timed ones."""
KERNEL_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv"})
"""The matmul operators whose profiled self time is kernel time (``--kernels``), besides attention."""


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def textrl_overrides(place: dict) -> dict:
    """textrl config fields from the placement: the decode step, and the replay budget when given."""
    out = {"decode_step": place["decode_step"]}
    if place.get("activation_checkpointing"):
        out["activation_checkpointing"] = True
    if place.get("replay_memory_mb") is not None:
        out["replay_memory_mb"] = place["replay_memory_mb"]
    return out


def is_kernel(name: str) -> bool:
    """Whether a profiler event named ``name`` is a matmul or an attention kernel: an ATen matmul
    (``aten::mm``, ``aten::addmm_``, ...), the same called from compiled code (``aoti_torch_cpu_mm_out``), or
    scaled-dot-product attention; not an inductor kernel fused around one (``graph_0_cpp_fused_...``), which
    is elementwise work."""
    if name.startswith("graph_") or "cpp_fused" in name:
        return False
    if "scaled_dot_product" in name:
        return True
    return name.rpartition("::")[2].removeprefix("aoti_torch_cpu_").removesuffix("_out").strip("_") in KERNEL_OPS


def kernel_seconds(prof) -> float:
    """Seconds of matmul and attention kernels (:func:`is_kernel`) in a finished ``torch.profiler`` run: the
    sum of their self CPU times (a CPU kernel runs on the calling thread and its workers, so its self time is
    its wall time)."""
    return sum(e.self_cpu_time_total for e in prof.key_averages() if is_kernel(e.key)) / 1e6


def profiler():
    """A CPU ``torch.profiler.profile`` (not started) for :func:`kernel_seconds`."""
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU])


def synchronize(place: dict) -> None:
    """Wait for queued GPU work (timers read wall-clock time)."""
    if place["device"].startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def training(lora_rank: int, checkpointing: bool = False) -> str:
    """What is trained, as the report's header says it."""
    what = f"LoRA rank {lora_rank} (alpha {2 * lora_rank}, all linear layers)" if lora_rank > 0 else "full fine-tuning"
    if checkpointing:
        what += ", activation checkpointing in textrl's and TRL's updates"
    return what


def with_training(text: str, lora_rank: int, checkpointing: bool = False) -> str:
    """The report with what is trained added to its header line (the ``Model:`` line)."""
    lines = text.split("\n")
    i = next(i for i, line in enumerate(lines) if line.startswith("Model: "))
    anchor = "one optimisation step per batch;"
    if anchor in lines[i]:
        lines[i] = lines[i].replace(anchor, f"{anchor} {training(lora_rank, checkpointing)};", 1)
    else:
        lines[i] += f" {training(lora_rank, checkpointing)}."
    return "\n".join(lines)


# --- the workload ---------------------------------------------------------------------------------------


def export_lm(source: str, folder: Path, dtype: str = "fp32"):
    """Save ``source`` as a plain HF folder (model + tokenizer, pad and eos set) with all dropout at 0, its
    weights in ``dtype``: ``(model, tokenizer)`` as saved."""
    from transformers.utils import logging

    from textrl.lm import load_lm

    logging.disable_progress_bar()  # "Writing model shards"
    model, tokenizer = load_lm(source, dtype=torch_dtype(dtype))
    for name, value in model.config.to_dict().items():  # GPT-2's attn_pdrop ..., Llama's attention_dropout, ...
        if name.endswith(("pdrop", "dropout")) and isinstance(value, float):
            setattr(model.config, name, 0.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def describe(model) -> str:
    """``"llama, 2 layers x 64, 0.1M parameters"``: the model type, its shape and size."""
    config = model.config
    layers, width = getattr(config, "num_hidden_layers", "?"), getattr(config, "hidden_size", "?")
    n = sum(p.numel() for p in model.parameters())  # a tied LM head counted once
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    return f"{config.model_type}, {layers} layers x {width}, {size} parameters"


def folder_workload(
    lm: str, folder: Path, prompt_tokens: int, new_tokens: int, seed: int, dtype: str = "fp32"
) -> rl_speed.Workload:
    """The HF causal LM in ``lm`` with its own tokenizer, exported to ``folder`` (weights in ``dtype``); prompts of
    exactly ``prompt_tokens`` tokens of that tokenizer. A folder that is not a causal LM with a tokenizer:
    SystemExit."""
    from textrl import corpus
    from textrl.checkpoint import CheckpointError
    from textrl.lm import LMNotFoundError, NotACausalLMError, load_tokenizer

    def fail(error: Exception) -> SystemExit:
        message = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(" :")
        unloadable = "cannot load a tokenizer from "  # transformers' own error, often many lines
        if message.startswith(unloadable):
            message = f"no tokenizer in it that loads ({message.split(': ', 1)[-1]}); save the tokenizer there too"
        return SystemExit(f"peers.py: error: --lm {lm}: {message}")

    try:
        load_tokenizer(lm)  # before the weights: a folder without a tokenizer fails at once
        model, tokenizer = export_lm(lm, folder, dtype)
    except (LMNotFoundError, NotACausalLMError, CheckpointError) as e:
        raise fail(e) from None
    try:
        docs = corpus.load_documents()
    except corpus.CorpusError:
        docs = rl_speed._pseudo_english(2000, seed)
    prompts = rl_speed.make_prompts(tokenizer, docs, 64, prompt_tokens, seed)
    source = f"`{lm}` ({describe(model)}; its own {len(tokenizer)}-token tokenizer)"
    return rl_speed.Workload(str(folder), source, prompts, prompt_tokens, new_tokens)


def random_model(arch: str, size: str, folder: Path) -> tuple[str, str]:
    """A randomly initialised ``arch`` model of ``size`` with the embedded tokenizer, saved to ``folder``:
    ``(folder, description)``. Shapes are ``engine_decode.py``'s."""
    import engine_decode
    from transformers.utils import logging

    from textrl.lm import load_tokenizer

    logging.disable_progress_bar()
    tokenizer = load_tokenizer("tiny")
    model = engine_decode.build(arch, size, len(tokenizer), 256, 16, tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    layers, width = engine_decode.SIZES[size]
    n = sum(p.numel() for p in model.parameters()) / 1e6
    shape = f"{layers} layers x {width}, {n:.1f}M parameters, embedded tokenizer"
    return str(folder), f"a random {type(model).__name__} ({shape})"


def shape_model(name: str, folder: Path, dtype: str, device: str = "cpu") -> tuple[str, str]:
    """A randomly initialised model of a real model's shape (``engine_decode.SHAPES``) with the embedded
    tokenizer widened to its vocabulary, saved to ``folder`` in ``dtype`` (no dropout in these families):
    ``(folder, description)``. Initialised on ``device`` (a GPU draws a billion weights in a moment)."""
    import engine_decode
    import torch
    from transformers.utils import logging

    from textrl.lm import load_tokenizer

    logging.disable_progress_bar()
    tokenizer = load_tokenizer("tiny")
    with torch.device(device):
        model = engine_decode.build_shape(name, tokenizer.eos_token_id)
    model = model.to("cpu", torch_dtype(dtype))
    wide = engine_decode.widen_tokenizer(tokenizer, model.config.vocab_size)
    model.save_pretrained(folder)
    wide.save_pretrained(folder)
    c = model.config
    n = sum(p.numel() for p in model.parameters())  # the tied head counted once
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    heads = f"{c.num_attention_heads} heads, {c.num_key_value_heads} kv heads"
    shape = f"{c.num_hidden_layers} layers x {c.hidden_size}, {heads}"
    what = f"{shape}, vocabulary {c.vocab_size:,}, {size} parameters, {dtype}"
    return str(folder), f"a random {type(model).__name__} of {name}'s shape ({what}; embedded tokenizer widened)"


def build(workdir: Path, args) -> rl_speed.Workload:
    if args.lm:  # the prompts are made with the folder's own tokenizer
        P, T = args.prompt_tokens, args.new_tokens
        work = folder_workload(args.lm, workdir / "hf-model", P, T, args.seed, args.dtype)
    else:
        work = rl_speed.build_workload(workdir, args.tiny_random, args.prompt_tokens, args.new_tokens, args.seed)
        if args.shape:  # the prompts are the embedded tokenizer's, which the widened one encodes alike
            work.lm, work.source = shape_model(args.shape, workdir / "hf-model", args.dtype, args.device)
        else:
            if args.arch:  # the prompts are made with the embedded tokenizer, which the random model shares
                work.lm, work.source = random_model(args.arch, args.size, workdir / "arch-model")
            export_lm(work.lm, workdir / "hf-model", args.dtype)
            work.lm = str(workdir / "hf-model")
    (workdir / "workload.json").write_text(json.dumps(asdict(work)))
    return work


# --- a worker: one system at one batch size -------------------------------------------------------------


class Stopwatch:
    """Accumulates the time spent in the methods it wraps (the rollout part of an iteration)."""

    def __init__(self, place: dict | None = None):
        self.seconds = 0.0
        self.place = place or DEFAULT_PLACE

    def wrap(self, owner, name: str) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                synchronize(self.place)  # the GPU work it queued counts as its own
                self.seconds += time.perf_counter() - t0

        setattr(owner, name, timed)

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class GRPORunner(rl_speed.TextRLRunner):
    """textrl GRPO with TRL GRPOTrainer's settings, as ``trl_systems.run_group_trainer`` sets them: groups of
    ``GROUP_SIZE`` samples, ``num_iterations`` passes of one minibatch (the whole batch) each, loss ``"dapo"``,
    rewards scaled by the group's std, clip 0.2, the k3 KL in the loss (``kl_coef`` as TRL's ``beta``; 0 drops
    the reference model), no entropy bonus, gradient norm clipped at 1; eos suppressed as in
    ``rl_speed.TextRLRunner``. An iteration (``iteration()``) is one rollout and its ``num_iterations`` steps."""

    def __init__(
        self,
        work,
        batch: int,
        seed: int,
        num_iterations: int,
        kl_coef: float,
        lora_rank: int = 0,
        place: dict | None = None,
    ):
        from agents import GRPO, GRPOConfig
        from envs import TextGenEnv
        from textrl.runtime import Runtime

        place = place or DEFAULT_PLACE

        env = TextGenEnv(lm=work.lm, prompts=work.prompts, reward=rl_speed.the_fraction, max_new_tokens=work.new_tokens)
        lora = {"lora_rank": lora_rank, "lora_alpha": 2.0 * lora_rank} if lora_rank > 0 else {}
        config = GRPOConfig(
            batch_size=batch,
            learning_rate=rl_speed.LEARNING_RATE,
            device=place["device"],
            suppress_tokens=[env.engine.tokenizer.eos_token_id],
            group_size=trl_systems.GROUP_SIZE,
            num_iterations=num_iterations,
            minibatch_size=None,  # TRL: per_device_train_batch_size = generation batch, steps_per_generation=1
            loss_type="dapo",
            scale_rewards="group",
            epsilon=0.2,
            kl_coef=kl_coef,
            kl_estimator="k3",
            kl_in="loss",
            ent_coef=0.0,
            max_grad_norm=1.0,
            **lora,
            **textrl_overrides(place),
        )
        runtime = Runtime.local(place["device"], torch_dtype(place["dtype"]))
        self.agent = GRPO(env, config=config, seed=seed, verbose=0, runtime=runtime)


def trl_grpo_rows(
    system: str, work, batch: int, steps: int, seed: int, kl: bool, lora_rank: int = 0, place: dict | None = None
) -> tuple[list[dict], dict]:
    """TRL GRPOTrainer (``grpo``, ``grpo-mu2``) with ``num_iterations`` = ``GRPO_PASSES[system]``: ``steps``
    rows, each one generation batch and its mu trainer steps (their times summed); then ``place["kernels"]``
    more iterations under the profiler. Second: ``kernel_seconds`` (matmul and attention seconds per
    profiled iteration) and ``rss`` (peak RSS MB before profiling), or nothing without ``kernels``."""
    from transformers import TrainerCallback

    mu = GRPO_PASSES[system]
    place = place or DEFAULT_PLACE
    kernels, found = place.get("kernels", 0), {}

    class Profiled(TrainerCallback):
        """The profiler over the trainer steps after the timed ones (``global_step`` counts steps done)."""

        prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            if kernels and state.global_step == steps * mu and self.prof is None:
                found["rss"] = rl_speed.peak_rss_mb()  # the profiler's event records are not the system's
                self.prof = profiler()
                self.prof.__enter__()

        def on_train_end(self, args, state, control, **kwargs):
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
                found["kernel_seconds"] = kernel_seconds(self.prof) / kernels

    rows = trl_systems.run_group_trainer(
        "grpo",
        work.lm,
        work.prompts,
        rl_speed.the_fraction,
        batch,
        work.new_tokens,
        (steps + kernels) * mu,
        learning_rate=rl_speed.LEARNING_RATE,
        beta=KL_COEF if kl else 0.0,
        seed=seed,
        callbacks=[Profiled()],
        lora_rank=lora_rank,
        num_iterations=mu,
        device=place["device"],
        bf16=place["dtype"] == "bf16",
        gradient_checkpointing=place.get("activation_checkpointing", False),
    )
    out = []
    for i in range(0, steps * mu, mu):
        chunk = rows[i : i + mu]
        if [r["tokens"] > 0 for r in chunk] != [True] + [False] * (mu - 1):
            raise RuntimeError(f"{system}: trainer steps {i + 1}-{i + mu} do not generate once, at the first")
        out.append({key: sum(r[key] for r in chunk) for key in ("tokens", "seconds", "rollout_seconds")})
    return out, found


def stepwise_rows(
    system: str, work, batch: int, steps: int, seed: int, kl: bool, lora_rank: int = 0, place: dict | None = None
) -> tuple[list[dict], dict]:
    """textrl, the plain loop and SB3: ``rl_speed`` runners, one ``iteration()`` per step; then (not for naive
    SB3) ``place["kernels"]`` more iterations under the profiler. Second: as :func:`trl_grpo_rows`'s."""
    if lora_rank > 0 and system not in LORA_SYSTEMS:
        raise ValueError(f"{system} cannot train LoRA adapters")
    place = place or DEFAULT_PLACE
    watch = Stopwatch(place)
    device, dtype = place["device"], torch_dtype(place["dtype"])
    if system in ("ppo", "reinforce"):
        kl_coef = KL_COEF if kl else 0.0
        runner = rl_speed.TextRLRunner(
            system, work, batch, seed, kl_coef, lora_rank, device, dtype, overrides=textrl_overrides(place)
        )
        watch.wrap(runner.agent, "collect")  # rollout + reward + reference pass
    elif system in ("textrl-grpo", "textrl-grpo-mu2"):
        runner = GRPORunner(work, batch, seed, GRPO_PASSES[system], KL_COEF if kl else 0.0, lora_rank, place)
        watch.wrap(runner.agent, "collect")  # rollout + reward + reference pass
    elif system == "plain":
        runner = rl_speed.PlainRunner(work, batch, seed, device, dtype, kl_coef=KL_COEF if kl else 0.0)
        watch.wrap(runner, "_generate")  # generate + decode + reward (its reference forward is in the update)
    else:
        runner = rl_speed.SB3Runner(work, batch, seed, cached=system == "sb3-policy")
        watch.wrap(runner.model, "collect_rollouts")
    rows = []
    for _ in range(steps):
        watch.take()
        t0 = time.perf_counter()
        tokens = runner.iteration()
        synchronize(place)
        rows.append({"tokens": tokens, "seconds": time.perf_counter() - t0, "rollout_seconds": watch.take()})
    kernels = place.get("kernels", 0) if system != "sb3" else 0
    if not kernels:
        return rows, {}
    rss = rl_speed.peak_rss_mb()  # before the profiler's event records
    with profiler() as prof:
        for _ in range(kernels):
            runner.iteration()
    return rows, {"kernel_seconds": kernel_seconds(prof) / kernels, "rss": rss}


def library_versions() -> dict[str, str]:
    names = ["torch", "transformers", "trl", "accelerate", "datasets", "stable-baselines3", "textrl-suite"]
    out = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def measure(
    system: str,
    work,
    batch: int,
    steps: int,
    warmup: int,
    threads: int,
    seed: int,
    kl: bool,
    lora_rank: int = 0,
    place: dict | None = None,
) -> dict:
    """Build one system and run ``steps`` iterations (the first ``warmup`` are not timed); per-step rows.
    ``lora_rank > 0``: LoRA adapters of that rank (``LORA_SYSTEMS`` only); ``place``: device, dtype, textrl's
    decode step and replay budget (:data:`DEFAULT_PLACE`); on a GPU also its peak memory (``gpu_peak_mb``)."""
    import torch

    place = place or DEFAULT_PLACE
    cuda = place["device"].startswith("cuda")
    if cuda and system not in GPU_SYSTEMS:
        raise ValueError(f"{system} runs on the CPU only")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trl_systems.quiet()
    if threads:
        torch.set_num_threads(threads)
    if place.get("kernels") and place["decode_step"] == "compile":  # compiled code reports its kernel calls too
        import torch._inductor.config

        torch._inductor.config.cpp.enable_kernel_profile = True
    t0 = time.perf_counter()
    profiled = {}  # with --kernels: seconds per iteration in kernels, and the peak RSS before profiling
    if system in ("grpo", "grpo-mu2"):
        rows, profiled = trl_grpo_rows(system, work, batch, steps, seed, kl, lora_rank, place)
    elif system == "rloo":
        rows = trl_systems.run_group_trainer(
            "rloo",
            work.lm,
            work.prompts,
            rl_speed.the_fraction,
            batch,
            work.new_tokens,
            steps,
            learning_rate=rl_speed.LEARNING_RATE,
            beta=KL_COEF if kl else 0.0,
            seed=seed,
            lora_rank=lora_rank,
            device=place["device"],
            bf16=place["dtype"] == "bf16",
        )
    elif system == "trl-ppo":
        if lora_rank > 0:
            raise ValueError("trl-ppo cannot train LoRA adapters")
        rows = trl_systems.run_trl_ppo(
            work.lm,
            work.prompts,
            rl_speed.the_fraction,
            batch,
            work.new_tokens,
            steps,
            learning_rate=rl_speed.LEARNING_RATE,
            kl_coef=KL_COEF if kl else 0.0,
            seed=seed,
        )
    else:
        rows, profiled = stepwise_rows(system, work, batch, steps, seed, kl, lora_rank, place)
    expected = batch * work.new_tokens
    for i, row in enumerate(rows):
        if row["tokens"] != expected:
            raise RuntimeError(f"{system} iteration {i} generated {row['tokens']} tokens, expected B x T = {expected}")
    if len(rows) != steps:
        raise RuntimeError(f"{system} ran {len(rows)} iterations, expected {steps}")
    return {
        "system": system,
        "batch": batch,
        "rows": rows[warmup:],
        "warmup_seconds": sum(row["seconds"] for row in rows[:warmup]),  # one-time costs (compilation) land here
        "wall_seconds": time.perf_counter() - t0,
        "rss_peak_mb": profiled.get("rss", rl_speed.peak_rss_mb()),
        "threads": torch.get_num_threads(),
        "versions": library_versions(),
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "kernel_seconds": profiled.get("kernel_seconds"),
    }


def measure_decode(work, batch: int, place: dict, repeats: int = 2) -> dict:
    """The decode alone (``engine_decode.decode_times``): textrl's engine with the eager step and with
    ``place``'s decode step, and HF ``generate``; the bytes its steps must read (``flop_bound.decode_bytes``)."""
    import engine_decode
    import torch

    from textrl.lm import load_lm

    model, _ = load_lm(work.lm, device=place["device"], dtype=torch_dtype(place["dtype"]))
    modes = list(dict.fromkeys(["eager", place["decode_step"]]))
    times = engine_decode.decode_times(model, batch, work.prompt_tokens, work.new_tokens, modes, repeats=repeats)
    shape = flop_bound.Shape.from_config(json.loads((Path(work.lm) / "config.json").read_text()))
    element = torch.finfo(torch_dtype(place["dtype"])).bits // 8
    moved = flop_bound.decode_bytes(shape, batch, work.prompt_tokens, work.new_tokens, element)
    return {"decoders": times, "bytes": moved, "steps": work.new_tokens - 1}


def measure_flops(work, batch: int, threads: int, kl: bool) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    shape = flop_bound.Shape.from_config(json.loads((Path(work.lm) / "config.json").read_text()))
    # groups of GROUP_SIZE samples per prompt, as REINFORCE/GRPO/RLOO draw them: prompt work counted once
    return flop_bound.measure(shape, batch, work.prompt_tokens, work.new_tokens, kl, group=trl_systems.GROUP_SIZE)


# --- the driver -----------------------------------------------------------------------------------------


def gpu_name() -> str:
    import torch

    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}"


def num(x: float) -> str:
    """``1,234`` from 100 on, else 3 significant digits (``0.0123``)."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def gpu_section(runs: dict, decodes: dict, args, config: dict, work, peaks: dict) -> list[str]:
    """The report's GPU part: per B, each system's update (time, model TFLOP/s, MFU at ``peaks["tflops"]``)
    and peak GPU memory; the decode alone against the bandwidth bound at ``peaks["bandwidth"]``; the targets."""
    P, T = work.prompt_tokens, work.new_tokens
    dense = not any(k in config for k in ("num_experts", "num_local_experts"))  # experts: FLOPs per token differ
    shape = flop_bound.Shape.from_config(config) if dense else None
    tflops, bandwidth = peaks["tflops"], peaks["bandwidth"]
    lines = ["## GPU: the update's MFU, peak memory, the decode's bandwidth", ""]
    lines.append(
        f"Update = iteration - rollout (its optimisation step(s), advantages included); model FLOPs per update "
        f"(forward + backward over B x {P + T - 1} positions, 6N per token plus attention; x mu for GRPO with mu "
        f"passes) / its time; MFU against {f'{tflops:g} TFLOP/s' if tflops else 'no peak given (--peak-tflops)'}. "
        "Peak GPU memory: `torch.cuda.max_memory_allocated()` of the system's process."
    )
    lines.append("")
    found: dict[tuple[str, int], dict] = {}
    for batch in args.batch_sizes:
        flops = flop_bound.update_flops(shape, batch, P, T) if shape else None
        lines += [
            f"### B = {batch}" + (f": {num(flops / 1e12)} TFLOP per update" if flops else ""),
            "",
            "| system | iteration tok/s | update s | update TFLOP/s | MFU | peak GPU MB | vs TRL GRPO |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for system in args.systems:
            ok = [r for r in runs.get((system, batch), []) if "error" not in r]
            if not ok:
                continue
            rate = statistics.median(statistics.median(x["tokens"] / x["seconds"] for x in r["rows"]) for r in ok)
            update = statistics.median(
                statistics.median(max(x["seconds"] - x["rollout_seconds"], 1e-9) for x in r["rows"]) for r in ok
            )
            peak = max((r.get("gpu_peak_mb") or 0 for r in ok), default=0) or None
            speed = GRPO_PASSES.get(system, 1) * flops / update / 1e12 if flops else None
            found[system, batch] = {"iteration": rate, "speed": speed, "peak": peak}
        base = found.get(("grpo", batch))
        for system in args.systems:
            f = found.get((system, batch))
            if f is None:
                continue
            mfu = f"{100 * f['speed'] / tflops:.0f}%" if f["speed"] and tflops else "-"
            memory = f"{f['peak']:,.0f}" if f["peak"] else "-"
            versus = f"{f['peak'] / base['peak']:.2f}x" if f["peak"] and base and base["peak"] else "-"
            update_s = GRPO_PASSES.get(system, 1) * flops / (f["speed"] * 1e12) if f["speed"] else None
            cells = [SYSTEMS[system], f"{f['iteration']:,.0f}", f"{update_s:.3f}" if update_s else "-"]
            cells += [num(f["speed"]) if f["speed"] else "-", mfu, memory, versus]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        decode = decodes.get(batch)
        if decode:
            moved = decode["bytes"]
            bound = f"{num(moved / (bandwidth * 1e12) * 1e3)} ms at {bandwidth:g} TB/s" if bandwidth else "-"
            lines += [
                f"Decode alone at B = {batch} ({decode['steps']} steps after a {P}-token prefill, timed apart): "
                f"{num(moved / 1e9)} GB to read (every matmul weight once per step, and the KV cache so far); "
                f"bound {bound}.",
                "",
                "| decoder | prefill ms | ms/step | decode tok/s | GB/s | % of bandwidth bound |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for name, d in decode["decoders"].items():
                speed = moved / d["decode"]
                frac = f"{100 * speed / (bandwidth * 1e12):.0f}%" if bandwidth else "-"
                cells = [name, f"{1e3 * d['prefill']:.1f}", f"{1e3 * d['decode'] / d['steps']:.3f}"]
                cells += [f"{batch * d['steps'] / d['decode']:,.0f}", num(speed / 1e9), frac]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    targets = []
    for batch in args.batch_sizes:
        mine, theirs = found.get(("reinforce", batch)), found.get(("grpo", batch))
        if mine and theirs:
            ratio = mine["iteration"] / theirs["iteration"]
            tick = "x" if ratio >= 2 else " "
            targets.append(f"- [{tick}] B = {batch}: textrl REINFORCE / TRL GRPO = {ratio:.2f}x (target >= 2x)")
        if mine and mine["speed"] and tflops:
            mfu = mine["speed"] / tflops
            tick = "x" if mfu >= 0.35 else " "
            targets.append(f"- [{tick}] B = {batch}: textrl REINFORCE's update at {100 * mfu:.0f}% MFU (target >= 35%)")
        decode = decodes.get(batch)
        engines = {k: v for k, v in (decode or {}).get("decoders", {}).items() if k.startswith("engine")}
        if engines and bandwidth:
            name, d = min(engines.items(), key=lambda kv: kv[1]["decode"])
            frac = decode["bytes"] / d["decode"] / (bandwidth * 1e12)
            tick = "x" if frac >= 0.5 else " "
            what = f"the decode ({name}) at {100 * frac:.0f}% of the bandwidth bound"
            targets.append(f"- [{tick}] B = {batch}: {what} (target >= 50%)")
        if mine and theirs and mine["peak"] and theirs["peak"]:
            tick = "x" if mine["peak"] <= theirs["peak"] else " "
            targets.append(
                f"- [{tick}] B = {batch}: textrl REINFORCE's peak GPU memory {mine['peak']:,.0f} MB vs TRL GRPO's "
                f"{theirs['peak']:,.0f} MB (target <=)"
            )
    if targets:
        lines += ["### GPU targets", "", *targets, ""]
    return lines


def interpreter(system: str, args) -> str | None:
    if system != "trl-ppo":
        return sys.executable
    path = args.trl_ppo_python
    return str(path) if path and Path(path).exists() else None


def placement(args) -> dict:
    """The systems' placement from the command line (:data:`DEFAULT_PLACE`'s keys)."""
    return {
        "device": args.device,
        "dtype": args.dtype,
        "decode_step": args.decode_step,
        "replay_memory_mb": args.replay_memory_mb,
        "activation_checkpointing": args.activation_checkpointing,
        "kernels": args.kernels,
    }


def run(job: tuple[str, int], args, workdir: Path, work) -> dict:
    """One measurement, in its own subprocess (or in this process with ``--in-process``)."""
    system, batch = job
    steps, warmup = args.warmup + args.iters, args.warmup
    if system == "sb3":  # ~15 s per naive iteration at B=16
        steps, warmup = 1 + min(args.iters, args.sb3_iters), 1
    if args.in_process:
        if system == "flops":
            return measure_flops(work, batch, args.threads, args.kl == "on")
        if system == "decode":
            return measure_decode(work, batch, placement(args), args.decode_repeats)
        kl = args.kl == "on"
        return measure(system, work, batch, steps, warmup, args.threads, args.seed, kl, args.lora_rank, placement(args))
    command = [interpreter(system, args), __file__, "--worker", system, "--batch", str(batch)]
    command += ["--workdir", str(workdir), "--steps", str(steps), "--warmup", str(warmup)]
    command += ["--threads", str(args.threads), "--seed", str(args.seed), "--kl", args.kl]
    command += ["--lora-rank", str(args.lora_rank), "--device", args.device, "--dtype", args.dtype]
    command += ["--decode-step", args.decode_step, "--decode-repeats", str(args.decode_repeats)]
    command += ["--kernels", str(args.kernels)]
    if args.replay_memory_mb is not None:
        command += ["--replay-memory-mb", str(args.replay_memory_mb)]
    if args.activation_checkpointing:
        command += ["--activation-checkpointing"]
    env = {**os.environ, **trl_systems.QUIET_ENV}
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within --timeout {args.timeout:.0f} s"}
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64], help="values of B")
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=list(SYSTEMS),
        help="what to run (default: all; with --lora-rank: those with LoRA)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one run per system and B each)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per run before the timed ones")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--kl", choices=["on", "off"], default="on", help="KL penalty to a reference model")
    parser.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        metavar="R",
        help="train LoRA adapters of rank R (alpha 2R, all linear layers) in "
        + ", ".join(LORA_SYSTEMS)
        + " (0 = full)",
    )
    parser.add_argument("--sb3-max-batch", type=int, default=16, help="largest B for naive SB3 (~4 GB RSS at 16)")
    parser.add_argument("--sb3-iters", type=int, default=1, help="timed iterations of naive SB3 (~15 s each)")
    parser.add_argument("--trl-ppo-python", type=Path, default=DEFAULT_TRL_PPO_PYTHON, help="python with trl 1.12")
    parser.add_argument("--new-tokens", type=int, default=32, help="T, tokens generated per prompt")
    parser.add_argument("--prompt-tokens", type=int, default=8, help="P, tokens per prompt")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, prompts and sampling")
    parser.add_argument("--tiny-random", action="store_true", help="a tiny random model instead (for tests)")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--shape", choices=SHAPE_NAMES, help="a random model of this real model's shape instead")
    model.add_argument(
        "--arch", choices=["gpt2", "llama", "mistral", "qwen2", "qwen3"], help="a random model of this family instead"
    )
    model.add_argument(
        "--lm", metavar="FOLDER", help="an HF causal-LM folder with its tokenizer instead (makes the prompts too)"
    )
    parser.add_argument(
        "--size",
        choices=["tiny", "small", "medium", "large"],
        default="tiny",
        help="its size (with --arch; large: 12 x 1024)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the GPU (the systems that can run there)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="every system's weights")
    parser.add_argument(
        "--decode-step",
        choices=["eager", "static", "graph", "compile"],
        default="eager",
        help="textrl's decode step (compile: torch.compile, after a one-time compilation; graph: CUDA graphs)",
    )
    parser.add_argument("--replay-memory-mb", type=float, help="textrl's replay_memory_mb (default: its default)")
    parser.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute activations in the backward: textrl's activation_checkpointing, TRL's gradient_checkpointing",
    )
    parser.add_argument(
        "--peak-tflops", type=float, help="for the update's MFU (default on CUDA: 989, an H200's dense bf16)"
    )
    parser.add_argument(
        "--peak-bandwidth", type=float, help="TB/s, for the decode's bound (default on CUDA: 4.8, an H200's)"
    )
    parser.add_argument("--decode-repeats", type=int, default=2, help="timed rollouts of the decode measurement")
    parser.add_argument(
        "--kernels",
        type=int,
        default=0,
        metavar="N",
        help="after the timed iterations, N more under torch's profiler: each system's seconds in matmul and "
        "attention kernels (CPU)",
    )
    parser.add_argument("--log", type=Path, help="append every run's result here as a JSON line when it finishes")
    parser.add_argument("--in-process", action="store_true", help="run every system in this process (tests)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP-bound measurement")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a run is abandoned")
    parser.add_argument("--out", type=Path, help="markdown file (default benchmarks/results/peers-<date>.md)")
    parser.add_argument("--learning", action="store_true", help="wall-clock to a reward instead (learning.py)")
    parser.add_argument("--learning-seconds", type=float, default=180, help="training budget per system")
    parser.add_argument("--learning-threshold", type=float, default=0.5, help="mean reward to reach")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.lm and args.tiny_random:
        parser.error("argument --lm: not allowed with argument --tiny-random")
    if args.lora_rank < 0:
        parser.error(f"argument --lora-rank: must be >= 0 (0 = full fine-tuning), got {args.lora_rank}")
    if args.lora_rank > 0 and args.learning:
        parser.error("argument --lora-rank: not allowed with argument --learning")
    if args.shape and args.tiny_random:
        parser.error("argument --shape: not allowed with argument --tiny-random")
    try:
        from textrl.device import resolve_device

        cuda = resolve_device(args.device).type == "cuda"
    except ValueError as e:
        parser.error(f"argument --device: {e}")
    if cuda and args.learning:
        parser.error("argument --device: --learning runs on the CPU only")
    if args.kernels < 0:
        parser.error(f"argument --kernels: must be >= 0, got {args.kernels}")
    if cuda and args.kernels:
        parser.error("argument --kernels: it times CPU kernels; on a GPU the report gives the update's MFU")
    off_gpu = [s for s in args.systems or () if s not in GPU_SYSTEMS]
    if cuda and off_gpu:
        parser.error(f"argument --systems: {', '.join(off_gpu)} run on the CPU only, not with --device {args.device}")
    if args.systems is None:
        args.systems = [s for s in SYSTEMS if s in LORA_SYSTEMS or not args.lora_rank]
        args.systems = [s for s in args.systems if s in GPU_SYSTEMS or not cuda]
    cannot = [s for s in args.systems if s not in LORA_SYSTEMS]
    if args.lora_rank > 0 and cannot:
        parser.error(
            f"argument --lora-rank: {', '.join(cannot)} cannot train LoRA adapters (only {', '.join(LORA_SYSTEMS)}); "
            "leave them out of --systems"
        )

    if args.worker:  # a subprocess: one measurement, printed as JSON on the last line
        trl_systems.quiet(logs=True)
        work = rl_speed.Workload(**json.loads((args.workdir / "workload.json").read_text()))
        if args.worker == "flops":
            result = measure_flops(work, args.batch, args.threads, args.kl == "on")
        elif args.worker == "decode":
            result = measure_decode(work, args.batch, placement(args), args.decode_repeats)
        elif args.worker.startswith("learn-"):
            import peer_learning

            result = peer_learning.worker(args.worker, work, args)
        else:
            kl, lora = args.kl == "on", args.lora_rank
            steps, warmup, threads, place = args.steps, args.warmup, args.threads, placement(args)
            result = measure(args.worker, work, args.batch, steps, warmup, threads, args.seed, kl, lora, place)
        print(json.dumps(result))
        return
    if args.learning:
        import peer_learning

        peer_learning.main(args, build=build, script=__file__, versions=library_versions())
        return

    load_start = os.getloadavg()[0]
    skipped = []
    systems = list(args.systems)
    if "trl-ppo" in systems and (args.in_process or interpreter("trl-ppo", args) is None):
        systems.remove("trl-ppo")
        skipped.append(
            f"TRL PPO skipped: no interpreter with trl 1.12 at {args.trl_ppo_python} (--trl-ppo-python)"
            if not args.in_process
            else "TRL PPO skipped: it runs in its own venv, not with --in-process"
        )
    several = [SYSTEMS[s] for s in systems if GRPO_PASSES.get(s, 1) > 1]
    if several:
        skipped.append(
            f"{', '.join(several)}: two optimisation steps per generation batch (num_iterations=2, each over the "
            "whole batch); an iteration is the rollout and both steps, its B x T generated tokens counted once; "
            "the FLOP bound counts one step"
        )
    jobs = [(s, b) for b in args.batch_sizes for s in systems if s != "sb3" or b <= args.sb3_max_batch]
    if "sb3" in systems and any(b > args.sb3_max_batch for b in args.batch_sizes):
        skipped.append(f"naive SB3 run only up to B = {args.sb3_max_batch} (--sb3-max-batch): its update re-reads")
        skipped[-1] += " every prefix (B x T full forwards), ~4x the time and memory per 4x B"
    with tempfile.TemporaryDirectory(prefix="textrl-peers-") as tmp:
        work = build(Path(tmp), args)
        model_type = json.loads((Path(work.lm) / "config.json").read_text()).get("model_type")
        if model_type not in flop_bound.DENSE_TYPES and not args.no_flops:  # flop_bound.py counts dense blocks
            args.no_flops = True
            skipped.append(f"FLOP bound skipped: it counts dense GPT-2 and Llama-style blocks, not {model_type}'s")
        if args.lora_rank > 0 and not args.no_flops:
            args.no_flops = True
            skipped.append(
                "FLOP bound skipped: it counts full fine-tuning's weight gradients, which LoRA does not take"
            )
        if cuda and not args.no_flops:
            args.no_flops = True
            skipped.append("FLOP bound skipped: it times the CPU's matmuls; on the GPU see the MFU below")
        if not args.no_flops:
            jobs += [("flops", b) for b in args.batch_sizes]
        peaks = {
            "tflops": args.peak_tflops or (H200_TFLOPS if cuda else None),
            "bandwidth": args.peak_bandwidth or (H200_TBS if cuda else None),
        }
        if peaks["bandwidth"]:  # the decode alone, against the memory-bandwidth bound
            jobs = [("decode", b) for b in args.batch_sizes] + jobs
        if cuda:
            skipped.append(f"GPU: {gpu_name()}")
        if args.decode_step != "eager" and any(s in TEXTRL_SYSTEMS for s in systems):
            skipped.append(f"textrl's decode step: {args.decode_step} (see the warm-up line for its one-time cost)")
        runs: dict[tuple[str, int], list[dict]] = {job: [] for job in jobs}
        # SIGTERM (a time limit: `timeout`) ends the measuring as Ctrl-C does: the report of the runs done is written
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            for i in range(args.rounds):  # interleaved, so drifts in machine load hit every system alike
                for job in jobs:
                    t0 = time.perf_counter()
                    runs[job].append(run(job, args, Path(tmp), work))
                    elapsed = time.perf_counter() - t0
                    print(f"round {i + 1}/{args.rounds}: {job[0]} B={job[1]} {elapsed:.0f} s", file=sys.stderr)
                    if args.log:
                        line = {"job": job[0], "batch": job[1], "round": i + 1, **runs[job][-1]}
                        with args.log.open("a") as log:
                            log.write(json.dumps(line) + "\n")
        except KeyboardInterrupt:
            done, total = sum(map(len, runs.values())), args.rounds * len(jobs)
            skipped.append(f"STOPPED (SIGTERM or Ctrl-C) after {done} of {total} runs: the rest is missing")
            print(f"peers.py: {skipped[-1]}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGTERM, previous)
        config = json.loads((Path(work.lm) / "config.json").read_text())
    results, errors, bounds, decodes = {}, {}, {}, {}
    for (system, batch), rs in runs.items():
        if system == "flops":
            ok = [r for r in rs if "error" not in r]
            if ok:  # the best round: the bound is what the machine can do
                bounds[batch] = max(ok, key=lambda r: r["ceiling"])
            continue
        if system == "decode":
            ok = [r for r in rs if "error" not in r]
            if ok:  # per decoder, its best round
                decodes[batch] = {"bytes": ok[0]["bytes"], "steps": ok[0]["steps"], "decoders": {}}
                for name in ok[0]["decoders"]:
                    best = min((r["decoders"][name] for r in ok), key=lambda d: d["decode"])
                    decodes[batch]["decoders"][name] = best
            elif rs:
                errors[system, batch] = f"{len(rs)} of {len(rs)} runs: {rs[-1]['error']}"
            continue
        failed = [r["error"] for r in rs if "error" in r]
        if failed:
            errors[system, batch] = f"{len(failed)} of {len(rs)} runs: {failed[-1]}"
        summary = peer_report.summarise(rs)
        if summary is not None:
            results[system, batch] = summary
    load = (load_start, os.getloadavg()[0])
    text = peer_report.report(
        results, bounds, errors, args, work, skipped, load, labels=SYSTEMS, kl_coef=KL_COEF, versions=library_versions()
    )
    text = with_training(text, args.lora_rank, args.activation_checkpointing)
    if several:  # the header's "one optimisation step per batch;"
        text = text.replace("optimisation step per batch;", "optimisation step per batch (mu=2: two);", 1)
    if peaks["tflops"] or peaks["bandwidth"] or cuda:
        text += "\n" + "\n".join(gpu_section(runs, decodes, args, config, work, peaks)) + "\n"
    print(text)
    out = args.out or HERE / "results" / f"peers-{datetime.date.today().isoformat()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
