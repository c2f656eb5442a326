"""Dynamic sampling (DAPO, Yu et al. 2025): train only on prompt groups whose samples disagree.

With a group baseline (GRPO's group-relative advantage, REINFORCE's ``rloo`` or ``grpo``), a group whose ``k``
samples all score the same has zero advantage on every token: it gives exactly zero policy gradient, yet it
counts in the batch (it dilutes the token means and the effective batch shrinks as the policy gets better or
stays hopeless). Dynamic sampling drops such groups after each rollout and collects fresh groups until the
batch is full again, or ``max_resample`` extra rounds have been collected; then the update runs on what was
kept (a smaller batch) or, when nothing was kept, is skipped.

:class:`DynamicSamplingMixin` implements it once for every agent with group baselines: it wraps
:meth:`agents.base.BaseAgent.collect` and reports the rounds. What it decides on and what it reports:

- A group is **tied** when its samples' episode scores (:meth:`DynamicSamplingMixin.tie_scores`: the env's
  reward summed over the episode, plus any shaping the agent adds, without the KL penalty) span at most
  ``1e-6``. With immediate (per-token) rewards a tied group can still carry a signal at later tokens (its
  returns-to-go differ); it is dropped all the same, as DAPO's filter is on the outcome.
- Every generated token counts in ``num_timesteps``, the dropped groups' included; the ``rollout/`` figures
  are those of the first round (an unfiltered sample of the current policy), so learning curves compare
  with agents that do not filter.
- ``charts/groups_dropped`` (share of the groups collected that were tied), ``charts/effective_batch`` (rows
  trained on, whole batch), ``charts/resample_rounds`` (extra rounds collected) and ``charts/update_skipped``.

Data parallel: each process filters its own groups, and the processes agree on the rounds (one
``Runtime.any`` per round: a round happens when any process still lacks groups; a process already full draws
that round's prompts without collecting, so the shared prompt stream stays in step). After the last round
every process keeps the smallest number of groups any process has kept, so all take the same minibatch
steps; when that number is 0 every process skips the update.

The kept rows of several rounds are merged into one :class:`textrl.rollout.Rollout` by
:func:`concat_rollouts` (prompts re-left-padded, completions re-right-padded): a merged batch's update runs
its forward instead of replaying the rollout record, which holds only the last round.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from textrl.rollout import Rollout

TIE_TOLERANCE = 1e-6
"""Groups whose scores span at most this much are tied."""


def take_rows(rollout: Rollout, rows: np.ndarray) -> Rollout:
    """The rollout restricted to ``rows`` (indices, in the order given)."""
    idx = torch.as_tensor(rows, dtype=torch.long, device=rollout.ids.device)
    per_row = {
        name: getattr(rollout, name)[idx]
        for name in ("ids", "attention_mask", "actions", "logprobs", "values", "rewards", "action_mask")
    }
    return rollout._replace(
        **per_row,
        prompt_index=rollout.prompt_index[rows],
        prompts=[rollout.prompts[i] for i in rows],
        completions=[rollout.completions[i] for i in rows],
        components={name: values[rows] for name, values in rollout.components.items()},
        terminated=rollout.terminated[rows],
    )


def pad_steps(x: torch.Tensor, steps: int, value: Any = 0) -> torch.Tensor:
    """``x`` (B, T, ...) right-padded with ``value`` to ``steps`` columns."""
    if x.shape[1] == steps:
        return x
    pad = x.new_full((x.shape[0], steps - x.shape[1], *x.shape[2:]), value)
    return torch.cat([x, pad], dim=1)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout of the rows of ``parts`` in order: prompts left-padded to the longest prompt, completions
    right-padded to the longest completion, as :func:`textrl.rollout.collect_rollout` lays a batch out."""
    if len(parts) == 1:
        return parts[0]
    P = max(r.prompt_len for r in parts)
    T = max(r.actions.shape[1] for r in parts)
    ids, attention = [], []
    for r in parts:
        B, left = r.ids.shape[0], P - r.prompt_len
        prompt = torch.cat([r.ids.new_full((B, left), pad_id), r.ids[:, : r.prompt_len]], dim=1)
        prompt_mask = torch.cat([r.attention_mask.new_zeros(B, left), r.attention_mask[:, : r.prompt_len]], dim=1)
        ids.append(torch.cat([prompt, pad_steps(r.ids[:, r.prompt_len :], T, pad_id)], dim=1))
        attention.append(torch.cat([prompt_mask, pad_steps(r.attention_mask[:, r.prompt_len :], T, 0)], dim=1))

    def steps(name: str, value: Any = 0) -> torch.Tensor:
        return torch.cat([pad_steps(getattr(r, name), T, value) for r in parts])

    return Rollout(
        ids=torch.cat(ids),
        attention_mask=torch.cat(attention),
        prompt_len=P,
        actions=steps("actions", pad_id),
        logprobs=steps("logprobs"),
        values=steps("values"),
        rewards=steps("rewards"),
        action_mask=steps("action_mask", False),
        prompt_index=np.concatenate([r.prompt_index for r in parts]),
        prompts=[p for r in parts for p in r.prompts],
        completions=[c for r in parts for c in r.completions],
        components={name: np.concatenate([r.components[name] for r in parts]) for name in parts[0].components},
        terminated=np.concatenate([r.terminated for r in parts]),
    )


def tied_groups(scores: torch.Tensor, group_size: int, tolerance: float = TIE_TOLERANCE) -> torch.Tensor:
    """Which groups (consecutive ``group_size`` rows of ``scores``) have all their scores within ``tolerance``.

    >>> tied_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2).tolist()
    [True, False, True]
    """
    g = scores.detach().double().view(-1, group_size)
    return (g.max(1).values - g.min(1).values) <= tolerance


@dataclasses.dataclass
class SamplingReport:
    """What dynamic sampling did in one iteration (this process's figures)."""

    first: Rollout
    """The first round's rollout, unfiltered (the ``rollout/`` figures are its)."""
    first_kl: torch.Tensor | None
    """Its per-token KL to the reference (or None)."""
    tokens: int
    """Tokens generated in every round."""
    groups_seen: int
    """Groups collected in every round."""
    groups_dropped: int
    """Of them, tied (dropped)."""
    rounds: int
    """Extra rounds collected after the first."""
    rows: int
    """Rows kept for the update."""


class DynamicSamplingMixin:
    """Dynamic sampling around :meth:`agents.base.BaseAgent.collect` (see the module docstring).

    Expects ``config.dynamic_sampling``, ``config.max_resample`` and ``config.group_size``. An agent adds
    per-token tensors the update needs (B, T) by overriding :meth:`collect_round`; they are filtered and
    merged with the rows and left in :attr:`round_extras` for ``train``.
    """

    round_extras: dict[str, torch.Tensor]
    sampling_report: SamplingReport | None = None

    def collect_round(self) -> tuple[Rollout, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """One rollout, as :meth:`agents.base.BaseAgent.collect`, plus per-token extras (none here)."""
        rollout, rewards, kl = super().collect()  # type: ignore[misc]
        return rollout, rewards, kl, {}

    def tie_scores(self, rollout: Rollout, rewards: torch.Tensor) -> torch.Tensor:
        """Each row's episode score (B,) that decides ties: the env's reward summed over the episode."""
        return rollout.episode_returns

    def collect(self) -> tuple[Rollout, torch.Tensor, torch.Tensor | None]:
        """A rollout with the KL-penalised rewards (B, T) and the per-token KL (or None); with
        ``dynamic_sampling``, of the untied groups of as many rounds as it takes (see the module docstring)."""
        self.sampling_report = None
        if not getattr(self.config, "dynamic_sampling", False):
            rollout, rewards, kl, self.round_extras = self.collect_round()
            return rollout, rewards, kl
        group = self.config.group_size
        target = self.env.num_envs // group  # this process's groups
        parts: list[tuple[tuple, np.ndarray]] = []  # (round, its kept group indices)
        kept = seen = dropped = tokens = rounds = 0
        first = None
        while True:
            if kept < target:
                round_ = self.collect_round()
                rollout, rewards = round_[0], round_[1]
                if first is None:
                    first = round_
                tokens += int(rollout.action_mask.sum())
                tied = tied_groups(self.tie_scores(rollout, rewards), group).cpu().numpy()
                seen, dropped = seen + len(tied), dropped + int(tied.sum())
                good = np.flatnonzero(~tied)[: target - kept]
                if len(good):
                    parts.append((round_, good))
                    kept += len(good)
            else:  # data parallel: full here while another process collects; keep the prompt stream in step
                self._draw_prompts()
            if rounds == self.config.max_resample or not self.runtime.any(kept < target):
                break
            rounds += 1
        if self.runtime.distributed:  # every process trains on as many groups as the one that kept fewest
            kept = int(self.runtime.reduce_float(float(kept), "min"))
        self.sampling_report = SamplingReport(first[0], first[2], tokens, seen, dropped, rounds, kept * group)
        if kept == 0:  # nothing to learn from: the update is skipped (see _guarded_train)
            rollout, rewards, kl, self.round_extras = first
            return rollout, rewards, kl
        return self._merge(parts, kept, group)

    def _merge(self, parts: list[tuple[tuple, np.ndarray]], kept: int, group: int):
        """The first ``kept`` kept groups of ``parts`` as one batch (rollout, rewards, KL; extras set)."""
        chosen, left = [], kept
        for round_, good in parts:
            if left == 0:
                break
            good = good[:left]
            left -= len(good)
            chosen.append((round_, (good[:, None] * group + np.arange(group)).reshape(-1)))
        if len(chosen) == 1 and len(chosen[0][1]) == chosen[0][0][0].ids.shape[0]:  # one whole round, as it was
            rollout, rewards, kl, self.round_extras = chosen[0][0]
            return rollout, rewards, kl
        T = max(round_[0].actions.shape[1] for round_, _ in chosen)
        idx = [torch.as_tensor(rows, device=round_[1].device) for round_, rows in chosen]
        rollout = concat_rollouts([take_rows(round_[0], rows) for round_, rows in chosen], self.env.pad_id)

        def merged(x: list[torch.Tensor | None]) -> torch.Tensor | None:
            if x[0] is None:
                return None
            return torch.cat([pad_steps(t[i], T) for t, i in zip(x, idx, strict=True)])

        rewards = merged([round_[1] for round_, _ in chosen])
        kl = merged([round_[2] for round_, _ in chosen])
        self.round_extras = {name: merged([round_[3][name] for round_, _ in chosen]) for name in chosen[0][0][3]}
        return rollout, rewards, kl

    def _guarded_train(self, rollout: Rollout, rewards: torch.Tensor, kl: torch.Tensor | None) -> dict[str, float]:
        report = self.sampling_report
        if report is not None and report.rows == 0:
            if self.verbose and self.runtime.is_main:
                print(
                    f"dynamic sampling: every group tied in {report.rounds + 1} rounds "
                    f"(max_resample={self.config.max_resample}); no update at iteration {self.iteration + 1}"
                )
            return {}
        return super()._guarded_train(rollout, rewards, kl)  # type: ignore[misc]

    def _rollout_stats(self, rollout: Rollout, kl: torch.Tensor | None, elapsed: float, t_rollout: float, stop: bool):
        report = self.sampling_report
        if report is None:
            return super()._rollout_stats(rollout, kl, elapsed, t_rollout, stop)  # type: ignore[misc]
        totals = super()._rollout_stats(report.first, report.first_kl, elapsed, t_rollout, stop)  # type: ignore[misc]
        first_tokens = int(report.first.action_mask.sum())
        figures = torch.tensor(
            [report.tokens - first_tokens, report.groups_seen, report.groups_dropped, report.rows],
            dtype=torch.float64,
        )
        if self.runtime.distributed:
            self.runtime.all_reduce(figures)
        more, seen, dropped, rows = figures.tolist()
        tokens = totals.tokens + int(more)
        stats = totals.stats | {
            "charts/tokens_per_second": tokens / elapsed,
            "charts/rollout_tokens_per_second": tokens / t_rollout,
            "charts/groups_dropped": dropped / max(seen, 1.0),
            "charts/effective_batch": rows,
            "charts/resample_rounds": float(report.rounds),
            "charts/update_skipped": float(report.rows == 0),
        }
        return totals._replace(stats=stats, tokens=tokens)


def dynamic_sampling_errors(config) -> list[str]:
    """What is wrong with a config's dynamic-sampling settings (empty: nothing)."""
    checks = [
        (config.max_resample >= 0, "max_resample must be >= 0"),
        (not config.dynamic_sampling or config.group_size >= 2, "dynamic_sampling needs group_size >= 2"),
    ]
    return [message for ok, message in checks if not ok]
