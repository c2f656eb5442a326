"""textrl's own CPU kernels (``textrl/csrc``), compiled on first use and used only where they measurably win.

:func:`split_mm`: a matmul of few rows (a decode step: one token of each of B rows) split by output columns
over the intra-op threads. The BLAS library's own threading splits a matmul's rows, so at 16 rows each of two
threads packs the whole weight matrix for 8 rows; split by columns, each thread reads its own share once.
Where the weight is input-major ((in, out), unit column stride: every block weight on a CPU,
:func:`textrl.ops.input_major`), that share runs through a direct kernel that multiplies the weight where
it lies, 8 rows x 32 columns at a time in registers, instead of packing it into a buffer first as a BLAS
call does (at a decode step's few rows the copy costs about as much as the multiply). Other layouts (the
LM head's (out, in) weight) take one single-threaded BLAS call per thread's share.
:func:`split_mm_group` does the same for the weights that read the same rows (q, k and v; gate and up) in
one parallel region. Results equal torch's matmul to float32 rounding (the sums run in another order).
``benchmarks/cpu_kernels.py`` measures them (decode-step matmuls, whole decode steps and whole REINFORCE
iterations, paired in one process).

The kernels are built with ``torch.utils.cpp_extension.load`` (a C++ compiler and ninja; ``-march=native``,
as the build is for the machine it runs on; cached per machine under ``TORCH_EXTENSIONS_DIR``; about 30 s on
2 cores the first time). Where they cannot be built, a warning names the cause once and every matmul stays
torch's own. ``TEXTRL_CPU_KERNELS=0`` switches them off.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"


def _cpu_tag() -> str:
    """A short fingerprint of this CPU's instruction sets (``/proc/cpuinfo``'s flags; ``generic`` where there is
    none): a build with ``-march=native`` runs only on CPUs like the one it was made on, so machines that share
    a home directory (a cluster's nodes) each get their own build in torch's extension cache."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return hashlib.sha1(flags.encode()).hexdigest()[:10] if flags else "generic"


NAME = f"textrl_cpu_kernels_{_cpu_tag()}"
"""The extension's name: its build lives in torch's extension cache under it (one per kind of CPU)."""

MAX_ROWS = 256
"""Rows up to which :func:`wants_split` takes the kernel (``benchmarks/cpu_kernels.py``, 2 threads: a
512 x 1408 weight 1.6-2x faster than torch's matmul at 16 rows, 1.3x at 128, 1.2x at 256, 1.1x at 640, where
the BLAS library's own blocking catches up)."""
MIN_WEIGHT = 1 << 12
"""Weight elements (in x out, a group's in all) from which it does: a 64 x 64 weight at 16 rows gains
(about 1.1x), smaller ones are a call's overhead."""

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": whether the kernels loaded (tried once per process); "error": why not
_fake_registered = False


def switched_on(variable: str) -> bool:
    """Whether an on-by-default switch in the environment is on: unset, or anything but 0/false/off/no."""
    return os.environ.get(variable, "1").strip().lower() not in ("0", "false", "off", "no")


def enabled() -> bool:
    """Whether the kernels may be used at all (``TEXTRL_CPU_KERNELS``, :func:`switched_on`)."""
    return switched_on("TEXTRL_CPU_KERNELS")


def load() -> bool:
    """Build (first time on this machine) and load the kernels; True when ``torch.ops.textrl`` has them.
    A build that fails warns once with its cause and is not tried again in this process."""
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _build()
    return bool(_state["ok"])


def _build() -> bool:
    if not _loaded():
        try:
            _compile()
        except Exception as e:  # no compiler, no ninja, no Python headers: torch's own matmul everywhere
            _state["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
            warnings.warn(
                f"textrl's CPU matmul kernel could not be built here, so decode steps use torch's own matmul "
                f"(set TEXTRL_CPU_KERNELS=0 to skip the attempt): {_state['error']}",
                RuntimeWarning,
                stacklevel=4,
            )
            return False
    global _fake_registered
    if not _fake_registered:
        _register_fake()
        _fake_registered = True
    return True


def _loaded() -> bool:
    """Whether the ops are registered in this process already (by an earlier build or load)."""
    return hasattr(torch.ops.textrl, "split_mm")


def _built_before() -> bool:
    """Whether a build of the kernel is in torch's extension cache already (then loading it takes a moment)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(NAME, False)) / f"{NAME}.so").is_file()
    except Exception:  # a private helper of torch's: without it, no notice either way
        return True


STALE_LOCK_SECONDS = 600
"""Age from which a build's lock file in torch's extension cache is taken as left by a build that never finished
(a process killed while building): a build takes well under a minute, and torch waits for a lock for ever."""


def _clear_stale_lock(build_dir: Path) -> None:
    """Remove the lock a killed build left in ``build_dir`` (older than :data:`STALE_LOCK_SECONDS`), with a warning
    naming it; a younger lock is a build in progress, which torch waits for."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:  # no lock: nothing to clear
        return
    if age > STALE_LOCK_SECONDS:
        warnings.warn(
            f"removing {lock}, left {age / 60:.0f} min ago by a build of textrl's CPU kernels that did not finish "
            f"(a killed process); building again",
            RuntimeWarning,
            stacklevel=2,
        )
        lock.unlink(missing_ok=True)


def _compile() -> None:
    """Build the extension (or take the cached build) and load it: its ops register as ``torch.ops.textrl``."""
    from torch.utils.cpp_extension import _get_build_directory
    from torch.utils.cpp_extension import load as load_extension

    _clear_stale_lock(Path(_get_build_directory(NAME, False)))
    if not _built_before():
        print("textrl: building the CPU matmul kernels (once on this machine, about 30 s)", file=sys.stderr, flush=True)
    # -fopenmp: at::parallel_for runs the chunks on torch's OpenMP threads; without it, one after another.
    # -march=native (x86-64: the direct kernel is AVX-512's): its vectors in this machine's widest registers
    # (it is built where it runs); -ffp-contract=fast: its multiply-adds fused (ISO C++ leaves them apart)
    native = ["-march=native"] if platform.machine().lower() in ("x86_64", "amd64") else []
    load_extension(
        name=NAME,
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-fopenmp", *native, "-ffp-contract=fast"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def _register_fake() -> None:
    """Shapes for ``torch.compile`` (the compiled decode step calls the kernel as an external op)."""

    @torch.library.register_fake("textrl::split_mm")
    def _(x, w, bias):
        return x.new_empty(x.shape[0], w.shape[1])

    @torch.library.register_fake("textrl::split_mm_out")
    def _(x, w, bias, out):
        return None

    @torch.library.register_fake("textrl::split_mm_cat")
    def _(x, ws, biases):
        return x.new_empty(x.shape[0], sum(w.shape[1] for w in ws))

    @torch.library.register_fake("textrl::split_mm_group_out")
    def _(x, ws, biases, outs):
        return None

    @torch.library.register_fake("textrl::decode_attention")
    def _(q, k, v, mask):
        return q.new_empty(q.shape[0], q.shape[1], 1, q.shape[3])

    @torch.library.register_fake("textrl::rms_norm")
    def _(x, weight, eps):
        return x.new_empty(x.shape)

    @torch.library.register_fake("textrl::silu_mul")
    def _(gate, up):
        return gate.new_empty(gate.shape)

    @torch.library.register_fake("textrl::gelu_tanh")
    def _(x):
        return x.new_empty(x.shape)


def direct() -> bool:
    """Whether the kernels were built with the direct kernel for input-major weights (a CPU with AVX-512);
    without it, each thread's share is one BLAS call."""
    return load() and bool(torch.ops.textrl.has_direct())


def wants_split(x: torch.Tensor, *ws: torch.Tensor) -> bool:
    """Whether ``x @ w`` should take :func:`split_mm` (one weight), or ``x @ w`` for every weight of a group
    :func:`split_mm_group`: float32 on a CPU with two or more threads, at most :data:`MAX_ROWS` rows, at least
    :data:`MIN_WEIGHT` weight elements in all, no autograd (the kernel has no backward), no autocast, and the
    kernel built."""
    return (
        x.shape[0] <= MAX_ROWS
        and sum(w.shape[0] * w.shape[1] for w in ws) >= MIN_WEIGHT
        and torch.get_num_threads() > 1
        and _takes(x, *ws)
    )


def _cpu_float32(*ts: torch.Tensor, autograd: bool = False) -> bool:
    """What every CPU op here needs of its inputs ``ts``: float32 CPU tensors, no autograd through any of them (the
    ops have no backward of their own) unless ``autograd`` (the caller wraps the op in an autograd Function with
    its backward), and no autocast (its casts are torch's ops')."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ts)
        and (autograd or not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)))
        and not torch.is_autocast_enabled("cpu")
    )


def _takes(*ts: torch.Tensor, autograd: bool = False) -> bool:
    """What every kernel needs: :func:`_cpu_float32` inputs and the kernels built."""
    return _cpu_float32(*ts, autograd=autograd) and enabled() and load()


def wants_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a @ b`` should take :func:`onednn_mm`: more than :data:`MAX_ROWS` rows (fewer take
    :func:`split_mm`), float32 on a CPU, no autograd through either (the op has no backward: a forward without
    autograd, or a matmul inside a backward), no autocast, not inside ``torch.compile``, torch built with oneDNN,
    and ``TEXTRL_ONEDNN`` not ``0``."""
    return a.shape[0] > MAX_ROWS and _cpu_float32(a, b) and not torch.compiler.is_compiling() and _onednn()


def _onednn() -> bool:
    if "onednn" not in _state:
        _state["onednn"] = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    return bool(_state["onednn"]) and switched_on("TEXTRL_ONEDNN")


def onednn_mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` (+ ``bias``) for a (M, K) and b (K, N) through oneDNN's matmul (torch's ``mkldnn`` linear op):
    on a CPU with AVX-512 it runs the update's and the reference pass's shapes faster than the BLAS library
    torch's ``mm`` calls (``benchmarks/cpu_kernels.py`` prints the pairing). Equal to it to float32 rounding.
    Call only where :func:`wants_onednn` said so."""
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), bias, "none", [], "")


def split_mm(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ w (+ bias)`` for x (M, K), w (K, N) of any strides (an ``nn.Linear`` weight's ``.t()`` view
    included), bias (N,) or None; into ``out`` (M, N, unit column stride) when given. Call only where
    :func:`wants_split` said so."""
    if out is None:
        return torch.ops.textrl.split_mm(x, w, bias)
    torch.ops.textrl.split_mm_out(x, w, bias, out)
    return out


def split_mm_group(
    x: torch.Tensor,
    ws: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    outs: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """``x @ ws[i] (+ biases[i])`` for every weight of a group that reads the same rows (a layer's q, k and v;
    its gate and up) in one parallel region: the group's output columns, end to end, are cut into one chunk
    per thread. Fewer, wider calls than one :func:`split_mm` per weight, and weights too small to split on
    their own share the threads. Into ``outs`` when given; otherwise the outputs are views of one (M, sum of
    widths) tensor. Call only where :func:`wants_split` said so for the whole group."""
    if outs is None:
        y = torch.ops.textrl.split_mm_cat(x, ws, biases)
        return list(y.split([w.shape[1] for w in ws], 1))
    torch.ops.textrl.split_mm_group_out(x, ws, biases, outs)
    return outs


def wants_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether a decode step's attention (one query per row, q (B, H, 1, D) over keys k (B, G, S, D)) should take
    :func:`decode_attention`: float32 on a CPU, no autograd (the kernel has no backward), no autocast, and the
    kernels built."""
    return q.dim() == 4 and q.shape[2] == 1 and _takes(q, k)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)`` for one query per row: q
    (B, H, 1, D); k, v (B, G, S, D), G dividing H; ``mask`` boolean (B or 1, H or 1, 1, S), True where a key is
    seen (at least one per row). Each thread takes whole (row, key head) pairs, where torch's CPU kernel, made
    for many queries, spends most of a call on set-up. Equal to torch's to float32 rounding. Call only where
    :func:`wants_attention` said so."""
    return torch.ops.textrl.decode_attention(q, k, v, mask)


def wants_rows(*xs: torch.Tensor, autograd: bool = False) -> bool:
    """Whether a row-wise op on ``xs`` (RMSNorm, SwiGLU's product, the tanh GELU) should take :func:`rms_norm`,
    :func:`silu_mul` or :func:`gelu_tanh`: float32 on a CPU, no autograd (decode steps and reference passes) or,
    with ``autograd``, under an autograd Function whose backward is the matching backward kernel
    (:func:`rms_norm_backward`, :func:`silu_mul_backward`: the update), no autocast, not inside ``torch.compile``
    (inductor fuses torch's ops with their neighbours), and the kernels built. One pass over each row where
    torch runs several elementwise ops (six for its CPU RMSNorm), each with its own set-up and threading."""
    return not torch.compiler.is_compiling() and _takes(*xs, autograd=autograd)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.rms_norm(x, (E,), weight, eps)`` (HF's RMSNorm in float32) over x (..., E), one row per thread's
    chunk. Equal to torch's to float32 rounding. Call only where :func:`wants_rows` said so."""
    return torch.ops.textrl.rms_norm(x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` (SwiGLU's product) in one pass. Equal to torch's to float32 rounding. Call only
    where :func:`wants_rows` said so."""
    return torch.ops.textrl.silu_mul(gate, up)


def rms_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`rms_norm` with respect to x and the weight, given the output's ``grad``: one pass
    over each row (the weight's gradient summed per thread, then over the threads). Equal to torch's autograd
    to float32 rounding. Call only where :func:`wants_rows` said so (with ``autograd``)."""
    return torch.ops.textrl.rms_norm_backward(grad, x, weight, eps)


def silu_mul_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`silu_mul` with respect to gate and up, given the output's ``grad``, in one pass
    (torch's autograd runs three elementwise ops and a SiLU backward). Equal to torch's to float32 rounding. Call
    only where :func:`wants_rows` said so (with ``autograd``)."""
    return torch.ops.textrl.silu_mul_backward(grad, gate, up)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU, ``x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))`` (:func:`textrl.ops.gelu`'s form), in one
    pass. Equal to torch's to float32 rounding. Call only where :func:`wants_rows` said so."""
    return torch.ops.textrl.gelu_tanh(x)


def wants_sampler(logits: torch.Tensor) -> bool:
    """Whether a rollout step's plain sampling (no top-k, no top-p, not greedy) should take :func:`sample_into`:
    float32 logits on a CPU, no autograd, no autocast, and the kernels built."""
    return logits.dim() == 2 and _takes(logits)


def sample_into(
    logits: torch.Tensor,
    n: int,
    suppressed: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None,
    tokens: torch.Tensor,
    logprobs: torch.Tensor,
) -> None:
    """One sampling step in one call: the first ``n`` columns of ``logits`` (B, V) with the ``suppressed`` ids at
    -inf, over ``temperature``, softmax, one inverse-CDF draw per row (:func:`textrl.policy.sample`) and the drawn
    token's log-probability, into ``tokens`` (B,) and ``logprobs`` (B,). The same ATen ops in the same order as
    the Python-level step, so the same tokens and log-probabilities bit for bit, and the same draws from
    ``generator``. Call only where :func:`wants_sampler` said so."""
    torch.ops.textrl.sample_into(logits, n, suppressed, temperature, generator, tokens, logprobs)


def decode_plan(
    embed: torch.Tensor,
    positions: torch.Tensor | None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None,
    final_norm: tuple[torch.Tensor, torch.Tensor | None, float, bool],
    head: tuple[torch.Tensor | None, torch.Tensor | None, bool],
    keymask: torch.Tensor,
):
    """A whole decode step as one C++ call (``torch.classes.textrl.DecodePlan``), made once for a session's buffers
    (the engine keeps it for later sessions on the same ones): the token embeddings ``embed`` (V, E), the learned
    ``positions`` (N, E) or the ``rotary`` tables (cos, signed sin) (N, D), ``final_norm`` as (weight, bias, eps,
    whether a LayerNorm), ``head`` as (weight (E, V) or None, bias, whether split over the threads) and the
    cache's ``keymask`` (B, 1, 1, max_len). ``plan.add_layer(window,
    *args)`` adds a block (its :func:`decode_layer_op` arguments after the per-step ones; window -1: none);
    ``plan.step(tokens, pos, t, col, ids, out)`` feeds tokens (B,) at cache column t and returns ``(logits,
    hidden)`` (logits None without a head). Call only where :func:`wants_rows` holds for every block weight."""
    cos, sin = rotary if rotary is not None else (None, None)
    return torch.classes.textrl.DecodePlan(embed, positions, cos, sin, *final_norm, *head, keymask)


def decode_layer_op():
    """``torch.ops.textrl.decode_layer``: one decode step's Transformer block in one call, in place on the
    residual stream (the arguments are :meth:`textrl.engine.Engine._fused_args`'). Call only where :func:`wants_rows`
    holds for the block's weights."""
    return torch.ops.textrl.decode_layer.default
