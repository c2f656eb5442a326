"""Guarded training: what an agent does when NaN/inf turns up in the numbers of an update.

NaN/inf in the KL penalty, the rewards, values, advantages/returns, a loss or the gradients stops the run with a
:class:`NonFiniteError` naming what was non-finite and where, before that update is applied and before anything
is saved (``nonfinite="raise"``), or discards the batch and counts it in ``charts/skipped_batches``
(``nonfinite="skip"``). Separate from the loop in :mod:`agents.base` (which only catches :class:`SkipBatch`)
because subclasses' ``train`` call these checks at every step of an update.
"""

from __future__ import annotations

from typing import NoReturn

import torch


class NonFiniteError(FloatingPointError):
    """NaN/inf in rewards, values, advantages, a loss or gradients; the message says which and where."""


class SkipBatch(Exception):
    """Raised inside an iteration to discard its batch (``nonfinite="skip"``); caught by ``learn``."""


class GuardMixin:
    """Non-finite checks, guarded optimizer step; expects ``config``, ``optimizer``, ``policy``, ``iteration``,
    ``runtime``."""

    def nonfinite(self, message: str) -> NoReturn:
        """Stop (``nonfinite="raise"``: :class:`NonFiniteError`) or discard this batch (``"skip"``)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.nonfinite == "skip":
            raise SkipBatch(message)
        raise NonFiniteError(
            f"{message}; stopped before applying it (no checkpoint was written for this iteration; "
            "nonfinite='skip' discards such batches instead)"
        )

    def check_finite(self, what: str, x: torch.Tensor) -> None:
        """Call :meth:`nonfinite` when ``x`` holds NaN or inf, naming ``what`` and how many values.

        Data parallel: every process makes this check at the same point of the update, and the count of bad
        values is summed over them, so all skip (or stop) together: one process must never skip a batch while
        the others wait for its gradients."""
        bad = int((~torch.isfinite(x.detach())).sum())
        where = ""
        if self.runtime.distributed:
            counts = torch.tensor([bad, x.numel()], dtype=torch.float64)
            self.runtime.all_reduce(counts)
            local, (bad, total) = bad, map(int, counts.tolist())
            where = f" across {self.runtime.world_size} processes ({local} on rank {self.runtime.rank})"
        else:
            total = x.numel()
        if bad:
            self.nonfinite(f"non-finite {what} at iteration {self.iteration + 1} ({bad} of {total} values{where})")

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``; data parallel: the gradients' all-reduce starts bucket by bucket during it
        (:class:`textrl.runtime.GradientSync`), and :meth:`clip_and_step` waits for it."""
        if not self.runtime.distributed:
            loss.backward()
            return
        if getattr(self, "_grad_sync", None) is None:
            self._grad_sync = self.runtime.gradient_sync(self.policy.trainable_parameters())
        with self._grad_sync.armed():
            loss.backward()

    def clip_and_step(self) -> float:
        """Clip gradients, take an optimizer step; return the pre-clip gradient norm.

        A non-finite gradient is not applied: :meth:`nonfinite` names the first parameter that has one.
        """
        params = self.policy.trainable_parameters()
        if self.runtime.distributed:
            # each process's loss is its share of the whole batch's (token counts are global), so the sum of
            # the gradients is the gradient of the whole batch: the same step on every process
            self._grad_sync.finish()
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if not torch.isfinite(norm):  # checked before clipping, which would spread the NaN to every tensor
            names = [
                name
                for name, p in self.policy.named_parameters()
                if p.grad is not None and not torch.isfinite(p.grad).all()
            ]
            where = f" (first in {names[0]}; {len(names)} tensors affected)" if names else ""
            self.nonfinite(f"non-finite gradient norm ({norm.item()}) at iteration {self.iteration + 1}{where}")
        limit = self.config.max_grad_norm or float("inf")
        # torch's coefficient, clamped at 1 (a multiply by exactly 1 changes nothing, so it is skipped: a pass over
        # every gradient fewer whenever the norm is within the limit)
        if limit / (norm + 1e-6) < 1:
            torch.nn.utils.clip_grads_with_norm_(params, limit, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)
