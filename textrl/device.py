"""Device names: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``, checked against this machine.

A device that torch knows but this machine lacks (``cuda`` on a CPU-only build, ``cuda:3`` with two GPUs)
is a :class:`ValueError` whose message says why and what to pass instead, before any model is loaded.
"""

from __future__ import annotations

import torch

ACCEPTED = "'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:N' (N = GPU index) or 'mps'"
"""The accepted device names, as error messages list them."""


def resolve_device(name: str | torch.device) -> torch.device:
    """The ``torch.device`` for a device name, after checking that this machine has it.

    Args:
        name: ``"auto"`` (the first CUDA GPU when there is one, else the CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"`` or ``"mps"``.

    Returns:
        The device.

    Raises:
        ValueError: an unknown name, or a device this machine does not have (the message says why:
            a PyTorch build without CUDA, no GPU, or how many GPUs there are for a bad index).
    """
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    kind, _, index = text.partition(":")
    if kind == "cuda" and (not index or index.isdigit()):
        return _cuda(text, int(index) if index else None)
    if text in ("mps", "mps:0"):
        if not torch.backends.mps.is_available():
            why = "this PyTorch build has no MPS support" if not torch.backends.mps.is_built() else "no Apple GPU"
            raise ValueError(f"device {name!r}: MPS is not available on this machine ({why}); use --device cpu")
        return torch.device("mps")
    raise ValueError(f"unknown device {name!r}; use {ACCEPTED}")


def _cuda(name: str, index: int | None) -> torch.device:
    if not torch.cuda.is_available():
        if not torch.backends.cuda.is_built():
            why = f"this PyTorch build ({torch.__version__}) has no CUDA support"
        else:
            why = "no CUDA GPU found"
        raise ValueError(
            f"device {name!r}: CUDA is not available on this machine ({why}); use --device cpu, "
            "or --device auto to take a GPU when there is one"
        )
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        gpus = "1 CUDA GPU (cuda:0)" if count == 1 else f"{count} CUDA GPUs (cuda:0 to cuda:{count - 1})"
        raise ValueError(f"device {name!r}: this machine has {gpus}")
    return torch.device(name)
