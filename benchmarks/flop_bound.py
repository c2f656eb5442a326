"""The physical limit of one RL iteration on this machine: matmul throughput at the model's shapes.

What is counted (GPT-2: L layers, width E, vocabulary V, feed-forward 4E; B rows, P prompt and T new tokens):

- **rollout**: the prompt prefill (B·P positions through the blocks, the LM head at the last one) and T-1
  KV-cached decode steps (B positions each, blocks and head): every token but the last is fed once;
- **training**: the backward over the B·(P+T-1) positions that predict the T new tokens (the LM head only
  on those B·T positions): two matmuls per weight matmul of the forward (input and weight gradients),
  ``2MKN`` each. The update's *forward* matmuls are not counted: with one on-policy optimisation step per
  batch they compute exactly what the rollout already computed, and a system may take them from there
  (textrl's rollout replay does; :mod:`textrl.core`). A system that recomputes them does ~1/3 more
  training FLOPs than counted;
- **reference** (only with the KL penalty): one forward like the training one, without backward;
- **shared prompts** (``group`` samples of each prompt, as GRPO/RLOO and textrl REINFORCE draw them): a
  prompt's positions are the same computation in every sample of it, so they are counted once per distinct
  prompt (B / group): the prefill, and the first P-1 positions of the training and reference passes (the
  last prompt position predicts each sample's first token and is counted per row; textrl shares exactly
  these: :meth:`textrl.engine.Engine._shared_prefix`);
- **attention** scores and mixing (``4·L·E`` per query and key position, causal) are added to each phase's
  FLOPs and costed at that phase's matmul rate; layer norms, softmax, GELU, embeddings, the value head and
  the optimizer step are not counted (a few percent at this size).

Nothing a system may skip is counted (old-log-prob passes, a separate value trunk, re-reading prefixes),
so the bound is the same for every system. The time of each phase is the sum over its weight matmuls of
the measured time of ``torch.matmul`` at exactly that shape (for training also the two backward shapes),
best of several repeats; the ceiling is ``B·T / (t_rollout + t_training [+ t_reference])`` generated
tokens/s.

Timed one shape at a time, a matmul keeps its weight in the core's cache across calls, which a decode step
never does: it reads every layer's weights once and moves on, so at M = B rows its matmuls wait on memory,
not on arithmetic. The **streaming ceiling** times the T - 1 decode steps as a decode runs them
(:func:`time_decode_steps`: every layer's own weights, in order, then the head) and is otherwise the
ceiling; it is the tighter limit on CPU, where a small model's decode matmuls run about twice as long as
their one-weight timing. Neither counts anything but matmuls and attention, so a system's iteration can
only approach them; a peer's time over the streaming ceiling's is the largest ratio any system could reach
over that peer on this machine.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

DENSE_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
"""HF ``model_type``s whose matmuls :class:`Shape` counts: GPT-2 and the dense Llama-style families (biases,
q/k norms and tied heads change no matmul; a mixture of experts would)."""


@dataclass(frozen=True)
class Shape:
    """The architecture numbers the count needs (from a GPT-2 ``config.json``; or a Llama-style one, with
    grouped-query attention and a SwiGLU MLP: ``gated``)."""

    n_layer: int
    n_embd: int
    vocab_size: int
    n_inner: int
    n_head: int = 0
    """Query heads (0: GPT-2's, n_embd / 64 or whatever: only the width H x D = n_embd matters there)."""
    n_kv_head: int = 0
    head_dim: int = 0
    gated: bool = False
    """A Llama-style block: separate q, k, v (H x D, G x D, G x D wide), SwiGLU (gate, up, down)."""

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        if "n_embd" in config:  # GPT-2
            inner = config.get("n_inner") or 4 * config["n_embd"]
            return cls(config["n_layer"], config["n_embd"], config["vocab_size"], inner)
        e, h = config["hidden_size"], config["num_attention_heads"]
        g, d = config.get("num_key_value_heads") or h, config.get("head_dim") or e // h
        return cls(config["num_hidden_layers"], e, config["vocab_size"], config["intermediate_size"], h, g, d, True)

    @property
    def attention_width(self) -> int:
        """H x D: the width of queries (and of the attention's output)."""
        return self.n_head * self.head_dim if self.gated else self.n_embd

    @property
    def kv_width(self) -> int:
        """G x D: the width of the keys (and of the values) a position keeps in the KV cache."""
        return self.n_kv_head * self.head_dim if self.gated else self.n_embd

    def block_matmuls(self, m: int) -> list[tuple[int, int, int]]:
        """One layer's weight matmuls ``(M, K, N)`` for M positions: qkv, attention out, fc (gate and up), mlp
        out."""
        e, f = self.n_embd, self.n_inner
        if self.gated:
            a, kv = self.attention_width, self.kv_width
            return [(m, e, a + 2 * kv), (m, a, e), (m, e, 2 * f), (m, f, e)]
        return [(m, e, 3 * e), (m, e, e), (m, e, f), (m, f, e)]

    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token: the blocks' and the LM head's (tied or not)."""
        return self.n_layer * sum(k * n for _, k, n in self.block_matmuls(1)) + self.n_embd * self.vocab_size


FORWARD = ("fwd",)
BACKWARD = ("dx", "dw")
"""Matmul layouts of a phase: the forward ``X @ W``; the backward ``dY @ W^T`` and ``X^T @ dY``."""


def phases(shape: Shape, batch: int, prompt: int, new: int, group: int = 1) -> dict[str, dict]:
    """Per phase: ``matmuls`` as ``[(M, K, N, count, layouts)]`` (the rollout's decode steps also apart, as
    ``decode``) and ``attention`` FLOPs, for one iteration of ``batch`` rows that are ``group`` samples each
    of ``batch / group`` distinct prompts."""
    L, E, V = shape.n_layer, shape.n_embd, shape.vocab_size
    A = shape.attention_width  # E for GPT-2
    B, P, T = batch, prompt, new
    if group < 1 or B % group:
        raise ValueError(f"batch {B} is not a multiple of group {group}")
    U = B // group  # distinct prompts

    def grouped(m: int, head_m: int, layouts: tuple[str, ...], count: int = 1) -> list[tuple]:
        rows = [(*mkn, L * count, layouts) for mkn in shape.block_matmuls(m)]
        return [*rows, (head_m, E, V, count, layouts)]

    decode_ctx = sum(P + t for t in range(1, T))  # keys each decode step attends to
    decode = grouped(B, B, FORWARD, count=T - 1)
    rollout = {
        "matmuls": grouped(U * P, U, FORWARD) + decode,
        "decode": decode,  # the decode steps' share of the matmuls
        "attention": 4 * L * A * (U * P * (P + 1) // 2 + B * decode_ctx),
    }
    S = P + T - 1  # positions of a training sequence: the first P - 1 shared within a group, T per row
    positions = U * (P - 1) + B * T
    pairs = U * (P - 1) * P // 2 + B * (S * (S + 1) // 2 - (P - 1) * P // 2)  # (query, key) pairs, causal
    train_attn = 4 * L * A * pairs
    training = {"matmuls": grouped(positions, B * T, BACKWARD), "attention": 2 * train_attn}
    reference = {"matmuls": grouped(positions, B * T, FORWARD), "attention": train_attn}
    return {"rollout": rollout, "training": training, "reference": reference}


def update_flops(shape: Shape, batch: int, prompt: int, new: int) -> float:
    """Model FLOPs of one update on B sequences of P + T - 1 positions: the forward and its backward (twice the
    forward's matmuls), the blocks at every position, the LM head at the T that predict a new token, causal
    attention; ``3 x forward``, the usual "6 N per token" count. What a system skips (textrl's replayed
    forward matmuls, a shared prompt's positions) is counted all the same: MFU is model FLOPs over time."""
    L, B, T, S = shape.n_layer, batch, new, prompt + new - 1
    blocks = 2 * B * S * (shape.matmul_params() - shape.n_embd * shape.vocab_size)
    head = 2 * B * T * shape.n_embd * shape.vocab_size
    attention = 4 * L * shape.attention_width * B * S * (S + 1) // 2
    return 3.0 * (blocks + head + attention)


def decode_bytes(shape: Shape, batch: int, prompt: int, new: int, element_bytes: int) -> float:
    """Bytes the T - 1 decode steps of a rollout must read from memory at least: every matmul weight once per
    step (the blocks' and the LM head's), and the keys and values of every position so far (the step feeding
    position P + t - 1 attends to P + t), ``element_bytes`` each (2 for bf16)."""
    weights = shape.matmul_params() * element_bytes
    per_position = 2 * shape.n_layer * batch * shape.kv_width * element_bytes  # keys and values, every layer
    return sum(weights + per_position * (prompt + t) for t in range(1, new))


def phase_flops(phase: dict) -> float:
    mm = sum(2 * m * k * n * count * len(layouts) for m, k, n, count, layouts in phase["matmuls"])
    return mm + phase["attention"]


def _time_matmul(m: int, k: int, n: int, transpose: str, min_seconds: float, repeats: int) -> float:
    """Best mean seconds of one ``torch.matmul`` with the given operand layout at (M, K) x (K, N)."""
    import torch

    g = torch.Generator().manual_seed(0)
    if transpose == "fwd":  # X @ W
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    elif transpose == "dx":  # dY @ W^T: (M, N) x (N, K)
        a, b = torch.randn(m, n, generator=g), torch.randn(k, n, generator=g).t()
    else:  # dW = X^T @ dY: (K, M) x (M, N)
        a, b = torch.randn(m, k, generator=g).t(), torch.randn(m, n, generator=g)
    for _ in range(3):
        torch.matmul(a, b)
    reps = 1
    while True:  # enough calls per sample to be well above the timer's resolution
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        if time.perf_counter() - t0 >= min_seconds:
            break
        reps *= 2
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def time_decode_steps(shape: Shape, batch: int, steps: int, repeats: int = 5) -> float:
    """Best seconds of ``steps`` decode steps' weight matmuls at M = ``batch`` rows, run as a decode runs them:
    each layer with weights of its own, layer after layer, then the LM head. The block weights are (K, N)
    contiguous, the head (V, E) multiplies the (E, B) hidden states: the fastest CPU layouts at few rows (those
    of textrl's engine, :func:`textrl.ops.input_major`); each matmul through textrl's split kernel where the
    engine's decode takes it (:func:`textrl.kernels.wants_split`), torch's own elsewhere."""
    import torch

    from textrl import kernels

    g = torch.Generator().manual_seed(0)
    layers = [[torch.randn(k, n, generator=g) for _, k, n in shape.block_matmuls(batch)] for _ in range(shape.n_layer)]
    inputs = {k: torch.randn(batch, k, generator=g) for _, k, _ in shape.block_matmuls(batch)}
    head, hidden = torch.randn(shape.vocab_size, shape.n_embd, generator=g), torch.randn(shape.n_embd, batch)
    with torch.no_grad():
        split = {id(w): kernels.wants_split(inputs[w.shape[0]], w) for weights in layers for w in weights}
        split_head = kernels.wants_split(hidden.t(), head.t())

    def run() -> None:
        for _ in range(steps):
            for weights in layers:
                for w in weights:
                    (kernels.split_mm if split[id(w)] else torch.mm)(inputs[w.shape[0]], w)
            if split_head:
                kernels.split_mm(hidden.t(), head.t())
            else:
                torch.mm(head, hidden)

    return best_seconds(run, repeats)


def best_seconds(run, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``run()``, after one untimed call."""
    run()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def time_weight_reads(shape: Shape, batch: int, steps: int, repeats: int = 5) -> tuple[float, int]:
    """Best seconds of ``steps`` plain reads (``torch.sum``) of the weights that :func:`time_decode_steps`
    multiplies, in the same order, and the bytes read per step: what this machine's memory delivers to a
    simple streaming kernel, beside what the decode's matmuls draw from it."""
    import torch

    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(k, n, generator=g) for _ in range(shape.n_layer) for _, k, n in shape.block_matmuls(batch)]
    weights.append(torch.randn(shape.vocab_size, shape.n_embd, generator=g))

    def run() -> None:
        for _ in range(steps):
            for w in weights:
                w.sum()

    return best_seconds(run, repeats), sum(w.numel() * w.element_size() for w in weights)


def measure(
    shape: Shape, batch: int, prompt: int, new: int, kl: bool, group: int = 1, min_seconds: float = 0.01
) -> dict:
    """Time every phase's matmuls on this machine (this process's torch threads); the ceiling in tokens/s, and
    the streaming ceiling (the decode steps timed by :func:`time_decode_steps`)."""
    import torch

    cache: dict[tuple, float] = {}

    def timed(m: int, k: int, n: int, layout: str) -> float:
        if (m, k, n, layout) not in cache:
            cache[m, k, n, layout] = _time_matmul(m, k, n, layout, min_seconds, repeats=5)
        return cache[m, k, n, layout]

    out: dict = {"threads": torch.get_num_threads(), "shape": asdict(shape), "phases": {}, "group": group}
    for name, phase in phases(shape, batch, prompt, new, group).items():
        seconds = 0.0
        for m, k, n, count, layouts in phase["matmuls"]:
            seconds += count * sum(timed(m, k, n, layout) for layout in layouts)
        mm_flops = phase_flops({**phase, "attention": 0})
        rate = mm_flops / seconds
        seconds += phase["attention"] / rate
        out["phases"][name] = {"flops": phase_flops(phase), "seconds": seconds, "gflops": rate / 1e9}
        if name == "rollout":  # the decode steps' matmuls again, streamed; the prefill and attention as timed
            hot = sum(count * timed(m, k, n, "fwd") for m, k, n, count, _ in phase["decode"])
            streamed = time_decode_steps(shape, batch, new - 1) if new > 1 else 0.0
            out["phases"][name] |= {"decode_hot": hot, "decode_streamed": streamed}
            if new > 1:  # the same weights read plainly: the bandwidth the matmuls could draw on
                read, step_bytes = time_weight_reads(shape, batch, new - 1)
                out["phases"][name] |= {"decode_read": read, "decode_weight_bytes": step_bytes * (new - 1)}
            out["phases"][name]["streamed_seconds"] = seconds - hot + streamed
    used = ["rollout", "training"] + (["reference"] if kl else [])
    tokens = batch * new
    rollout_used = ["rollout"] + (["reference"] if kl else [])
    out["counted"] = used
    out["flops_per_token"] = {name: out["phases"][name]["flops"] / tokens for name in out["phases"]}
    out["ceiling"] = tokens / sum(out["phases"][name]["seconds"] for name in used)
    out["rollout_ceiling"] = tokens / sum(out["phases"][name]["seconds"] for name in rollout_used)

    def streamed(names: list[str]) -> float:
        return sum(out["phases"][n].get("streamed_seconds", out["phases"][n]["seconds"]) for n in names)

    out["streaming_ceiling"] = tokens / streamed(used)
    out["rollout_streaming_ceiling"] = tokens / streamed(rollout_used)
    return out
