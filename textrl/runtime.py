"""Where an agent runs: the device and dtype, and which process of how many (rank, world size), with the
collectives the training loop needs across processes.

:meth:`Runtime.local` is the one-process runtime: rank 0 of 1, where every collective returns its input
unchanged. :meth:`Runtime.from_env` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and joins ``torch.distributed``'s default process group (gloo on CPU, nccl
on CUDA, one GPU per local rank), so the agents' code does not change between one process and many: each
process trains on its own rows, gradients and logged figures are reduced through the runtime, and only the
main process (:attr:`Runtime.is_main`) writes logs and checkpoints.

Every collective has a timeout (``timeout`` seconds, :data:`DEFAULT_TIMEOUT` unless set): a peer that died or
stopped answering ends the job with a :class:`DistributedError` naming this rank and the collective, instead
of a hang. A peer that died usually fails the next collective at once (its connections close); the timeout
bounds a peer that hangs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from textrl.device import resolve_device

DEFAULT_TIMEOUT = 600.0
"""Seconds a collective waits for the other processes (checkpoint writes and evaluations on rank 0 make the
others wait at their next collective, so it bounds those too)."""

BUCKET_BYTES = 64 << 20
"""Tensors are flattened into buckets of at most this many bytes per collective: one call for many small
tensors, and a bounded extra buffer for big models."""


def buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` in order, grouped into runs of one dtype of at most about :data:`BUCKET_BYTES` each: what one
    collective on a flattened buffer carries."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        if not out or size >= BUCKET_BYTES or out[-1][-1].dtype != t.dtype:
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.numel() * t.element_size()
    return out


@torch.no_grad()
def unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy the consecutive parts of ``flat`` back into ``tensors`` (``copy_`` writes through any layout, e.g.
    the engine's input-major weights)."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()


class DistributedError(RuntimeError):
    """A collective across processes failed: a peer process died, hung past the timeout, or the group broke."""


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
    timeout: float = DEFAULT_TIMEOUT
    """Seconds any collective waits for the other processes."""
    comm: dict[str, float] = field(default_factory=lambda: {"seconds": 0.0, "calls": 0}, compare=False, repr=False)
    """Wall-clock seconds spent in collectives and how many ran (for benchmarks and the logs)."""

    @classmethod
    def local(cls, device: str | torch.device = "auto", dtype: torch.dtype = torch.float32) -> Runtime:
        """One process on ``device`` (a name :func:`textrl.device.resolve_device` accepts)."""
        return cls(resolve_device(device), dtype)

    @classmethod
    def from_env(
        cls, device: str | torch.device = "auto", dtype: torch.dtype = torch.float32, timeout: float | None = None
    ) -> Runtime:
        """The runtime torchrun's environment describes: :meth:`local` without it (or with ``WORLD_SIZE=1``),
        else this process's rank in a process group it joins (or the one already initialised).

        On CUDA each process takes the GPU of its local rank (``cuda:LOCAL_RANK``) and the group uses nccl; on
        CPU, gloo. ``timeout``: seconds a collective waits (default: ``TEXTRL_DIST_TIMEOUT`` from the
        environment, else :data:`DEFAULT_TIMEOUT`).
        """
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls.local(device, dtype)
        import torch.distributed as dist

        if timeout is None:
            timeout = float(os.environ.get("TEXTRL_DIST_TIMEOUT", DEFAULT_TIMEOUT))
        if timeout <= 0:
            raise ValueError(f"the collective timeout must be > 0 seconds, got {timeout}")
        resolved = resolve_device(device)
        if resolved.type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if resolved.index is None:
                resolved = resolve_device(f"cuda:{local_rank}")
            torch.cuda.set_device(resolved)
        if not dist.is_initialized():
            missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise DistributedError(
                    f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the processes with torchrun "
                    "(torchrun --nproc-per-node N -m textrl train ...), which sets them"
                )
            backend = "nccl" if resolved.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        if dist.get_world_size() != world:
            raise DistributedError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} processes")
        return cls(resolved, dtype, rank=dist.get_rank(), world_size=world, timeout=timeout)

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs and checkpoints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @contextmanager
    def _collective(self, what: str) -> Iterator[Any]:
        """Run one collective: time it, and turn a failure into a :class:`DistributedError` naming it."""
        import torch.distributed as dist

        if not dist.is_initialized():
            raise DistributedError(
                f"a runtime of {self.world_size} processes needs torch.distributed's process group "
                "(make it with Runtime.from_env() under torchrun)"
            )
        t0 = time.perf_counter()
        try:
            yield dist
        except DistributedError:
            raise
        except RuntimeError as e:  # gloo/nccl report a dead or hung peer as RuntimeError (DistBackendError)
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed after {time.perf_counter() - t0:.1f} s: "
                f"another process died or did not answer within the {self.timeout:g} s timeout "
                f"(torchrun's report names the rank that failed first) [{type(e).__name__}: {str(e)[:300]}]"
            ) from e
        self.comm["seconds"] += time.perf_counter() - t0
        self.comm["calls"] += 1

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``tensor`` reduced over all processes (``op``: ``"sum"``, ``"mean"``, ``"max"`` or ``"min"``), in
        place, and returned. One process: the tensor itself."""
        if op not in ("sum", "mean", "max", "min"):
            raise ValueError(f"unknown reduction {op!r}; use 'sum', 'mean', 'max' or 'min'")
        if not self.distributed:
            return tensor
        with self._collective(f"all_reduce({op}) of {tuple(tensor.shape)}") as dist:
            ops = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            dist.all_reduce(tensor, op=ops.get(op, dist.ReduceOp.SUM))
        if op == "mean":
            tensor /= self.world_size
        return tensor

    def reduce_float(self, value: float, op: str = "mean") -> float:
        """A Python number reduced over all processes (``all_reduce`` on a one-element tensor)."""
        if not self.distributed:
            return value
        return float(self.all_reduce(torch.tensor([value], dtype=torch.float64, device=self.device), op)[0])

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process: one decision every process takes together."""
        if not self.distributed:
            return bool(flag)
        return self.reduce_float(1.0 if flag else 0.0, "max") > 0

    def broadcast_(self, tensors: Iterable[torch.Tensor], src: int = 0) -> None:
        """Overwrite each tensor in place with rank ``src``'s values (strides kept), in buckets."""
        if not self.distributed:
            return
        for bucket in buckets(list(tensors)):
            flat = torch.cat([x.detach().reshape(-1) for x in bucket])
            with self._collective(f"broadcast from rank {src}") as dist:
                dist.broadcast(flat, src)
            unflatten_into(flat, bucket)

    def gradient_sync(self, params: Iterable[torch.Tensor]) -> GradientSync:
        """A :class:`GradientSync` over ``params`` (every process passes the same list, in the same order)."""
        return GradientSync(self, list(params))

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s picklable ``obj`` on every process (small things: a path, a seed)."""
        if not self.distributed:
            return obj
        box = [obj]
        with self._collective(f"broadcast of a {type(obj).__name__} from rank {src}") as dist:
            dist.broadcast_object_list(box, src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's picklable ``obj``, in rank order (small things: RNG states)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self._collective(f"all_gather of a {type(obj).__name__}") as dist:
            dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.distributed:
            with self._collective("barrier") as dist:
                dist.barrier()


class GradientSync:
    """Sums the gradients of ``params`` over all processes while the backward pass is still running.

    textrl's update runs through its own forward (the engine), so DDP's wrapper never sees it; this does
    what DDP does, on the parameters themselves. The parameters are grouped into buckets of at most
    :data:`BUCKET_BYTES`, last parameter first (the backward pass produces gradients roughly in that
    order). Each parameter gets a post-accumulate-grad hook. When every parameter of a bucket has its
    gradient, the bucket is flattened and its all-reduce starts asynchronously, so the communication of
    the later layers overlaps the backward pass of the earlier ones. Buckets start strictly in index order,
    so all processes issue the same collectives in the same order even when their backward passes differ.
    :meth:`finish` starts what is left (parameters no loss reached count as zero gradients), waits, and
    writes the sums back into ``.grad``.

    The hooks act only inside :meth:`armed`; any other backward pass leaves them idle.
    """

    def __init__(self, runtime: Runtime, params: list[torch.Tensor]):
        self.runtime, self.params = runtime, params
        self.buckets = buckets(params[::-1])
        self.index = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket}
        self.active = False
        self._reset()
        self.handles = [p.register_post_accumulate_grad_hook(self._ready) for p in params]

    def _reset(self) -> None:
        self.waiting = [len(bucket) for bucket in self.buckets]  # parameters whose gradient has not arrived
        self.started: list[tuple[torch.Tensor, Any]] = []  # (flat buffer, async work) per started bucket

    @contextmanager
    def armed(self) -> Iterator[None]:
        """Let the hooks start the all-reduces during the backward pass run inside this block."""
        self._reset()
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def _ready(self, param: torch.Tensor) -> None:
        if not self.active:
            return
        self.waiting[self.index[id(param)]] -= 1
        while len(self.started) < len(self.buckets) and self.waiting[len(self.started)] == 0:
            self._start(len(self.started))

    def _start(self, b: int) -> None:
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.buckets[b]]
        flat = torch.cat([g.detach().reshape(-1) for g in grads])
        with self.runtime._collective(f"all_reduce of gradient bucket {b}") as dist:
            self.started.append((flat, dist.all_reduce(flat, async_op=True)))

    def finish(self) -> None:
        """Start the buckets not started yet, wait for all, and write the sums into the ``.grad`` fields."""
        try:
            while len(self.started) < len(self.buckets):
                self._start(len(self.started))
            for b, (flat, work) in enumerate(self.started):
                with self.runtime._collective(f"all_reduce of gradient bucket {b}"):
                    work.wait()
                for p in self.buckets[b]:
                    if p.grad is None:
                        p.grad = torch.empty_like(p)
                unflatten_into(flat, [p.grad for p in self.buckets[b]])
        finally:
            self._reset()

    def remove(self) -> None:
        """Take the hooks off the parameters."""
        for handle in self.handles:
            handle.remove()
