"""Where an agent runs: the device and dtype, and which process of how many (rank, world size), with the
reductions the training loop needs across processes.

:meth:`Runtime.local` is the one-process runtime every agent gets by default: rank 0 of 1, where every
reduction returns its input unchanged. A data-parallel runtime over ``torch.distributed`` fills in the same
fields and reductions, so the agents' code does not change between one process and many: each process
trains on its own rows, gradients and logged figures are reduced through the runtime, and only the main
process (:attr:`Runtime.is_main`) writes logs and checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from textrl.device import resolve_device


@dataclass(frozen=True)
class Runtime:
    """Device, dtype and process layout of a training run (see the module docstring)."""

    device: torch.device
    """Where the model, rollouts and updates live."""
    dtype: torch.dtype = torch.float32
    """Parameter dtype of the policy."""
    rank: int = 0
    """This process's index among ``world_size`` (0 in one process)."""
    world_size: int = 1
    """How many processes train together."""

    @classmethod
    def local(cls, device: str | torch.device = "auto", dtype: torch.dtype = torch.float32) -> Runtime:
        """One process on ``device`` (a name :func:`textrl.device.resolve_device` accepts)."""
        return cls(resolve_device(device), dtype)

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs and checkpoints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``tensor`` reduced over all processes (``op``: ``"sum"``, ``"mean"``, ``"max"`` or ``"min"``), in
        place where it can be, and returned. One process: the tensor itself."""
        if op not in ("sum", "mean", "max", "min"):
            raise ValueError(f"unknown reduction {op!r}; use 'sum', 'mean', 'max' or 'min'")
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError(
                f"a runtime of {self.world_size} processes needs torch.distributed's process group "
                "(start under torchrun and call torch.distributed.init_process_group first)"
            )
        dist.all_reduce(tensor, op={"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}.get(op, dist.ReduceOp.SUM))
        if op == "mean":
            tensor /= self.world_size
        return tensor

    def reduce_float(self, value: float, op: str = "mean") -> float:
        """A Python number reduced over all processes (``all_reduce`` on a one-element tensor)."""
        if not self.distributed:
            return value
        return float(self.all_reduce(torch.tensor([value], dtype=torch.float64, device=self.device), op)[0])
