"""textrl's own CPU kernels (``textrl/csrc``), compiled on first use and used only where they measurably win.

One kernel so far, :func:`split_mm`: a matmul of few rows (a decode step: one token of each of B rows)
split by output columns over the intra-op threads, each chunk one single-threaded BLAS call. The BLAS
library's own threading splits a matmul's rows, so at 16 rows each of two threads packs the whole weight
matrix for 8 rows; split by columns, each packs its own half once. ``benchmarks/cpu_kernels.py`` measures it
(decode-step matmuls, whole decode steps and whole REINFORCE iterations, paired in one process).

The kernel is built with ``torch.utils.cpp_extension.load`` (a C++ compiler and ninja; the build is cached
per machine under ``TORCH_EXTENSIONS_DIR``; about 30 s on 2 cores the first time). Where it cannot be built, a warning
names the cause once and every matmul stays torch's own. ``TEXTRL_CPU_KERNELS=0`` switches it off.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
NAME = "textrl_cpu_kernels"
"""The extension's name: its build lives in torch's extension cache under it."""

MAX_ROWS = 64
"""Rows up to which :func:`wants_split` takes the split matmul (``benchmarks/cpu_kernels.py``: whole decode
steps of a Llama 8 x 512 1.14-1.21x faster at 16 and 64 rows; at 128 the gain was within the noise)."""
MIN_WEIGHT = 1 << 17
"""Weight elements (in x out) from which it does: 256 x 688 gains, 256 x 256 loses (a call's own overhead)."""

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": whether the kernels loaded (tried once per process); "error": why not
_fake_registered = False


def enabled() -> bool:
    """Whether the kernels may be used at all (``TEXTRL_CPU_KERNELS`` unset, or anything but 0/false/off)."""
    return os.environ.get("TEXTRL_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "off", "no")


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


def _compile() -> None:
    """Build the extension (or take the cached build) and load it: its ops register as ``torch.ops.textrl``."""
    from torch.utils.cpp_extension import load as load_extension

    if not _built_before():
        print("textrl: building the CPU matmul kernel (once on this machine, about 30 s)", file=sys.stderr, flush=True)
    # -fopenmp: at::parallel_for runs the chunks on torch's OpenMP threads; without it, one after another
    load_extension(
        name=NAME,
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-fopenmp"],
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


def wants_split(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``x @ w`` should take :func:`split_mm`: float32 on a CPU with two or more threads, at most
    :data:`MAX_ROWS` rows, a weight of at least :data:`MIN_WEIGHT` elements, no autograd (the kernel has no
    backward), no autocast, and the kernel built."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and x.shape[0] <= MAX_ROWS
        and w.shape[0] * w.shape[1] >= MIN_WEIGHT
        and torch.get_num_threads() > 1
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        and not torch.is_autocast_enabled("cpu")  # autocast's casts are torch's matmul's, not this kernel's
        and enabled()
        and load()
    )


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
