"""What an agent reports: the per-iteration rollout statistics, TensorBoard/console logs and evaluations.

Separate from the loop in :mod:`agents.base`, which only calls :meth:`ReportingMixin._log` and
:meth:`ReportingMixin.evaluate_and_log` once an iteration's numbers are in.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np
import torch

from textrl.rollout import Rollout


class IterationTotals(NamedTuple):
    """An iteration's figures over the whole batch (all processes)."""

    stats: dict[str, float]
    """The ``rollout/`` and ``charts/`` scalars."""
    tokens: int
    """Generated tokens (valid env steps) of the whole batch."""
    stop: bool
    """Whether a stop was requested (a signal) on any process."""
    stop_signal: int
    """The signal to report on a process that did not receive one itself (SIGTERM, 15: a launcher's stop)."""


class ReportingMixin:
    """Logs, evaluations; expects ``config``, ``env``, ``logger``, ``kl_ctl``, ``optimizer``, ``verbose``, counters."""

    def evaluate_and_log(self) -> dict[str, float]:
        """Evaluate on the held-out prompts (``eval_prompts``), greedy and sampled; log under ``eval/``.

        Sampling uses its own fixed seed, so the numbers compare across evaluations and training draws the
        same random numbers as without evaluation. Returns the ``eval/...`` scalars.
        """
        from textrl.evaluation import evaluate_agent

        env = self._evaluation_env()
        episodes = min(self.config.eval_episodes, len(env.prompts))
        stats: dict[str, float] = {}
        results = {}
        for mode in ("greedy", "sampled"):
            result = evaluate_agent(self, episodes=episodes, greedy=mode == "greedy", env=env)
            results[mode] = result
            stats[f"eval/{mode}/reward_mean"] = result.mean
            stats[f"eval/{mode}/reward_stderr"] = result.stderr
            stats[f"eval/{mode}/episode_length"] = result.length
            for name, value in result.components.items():
                stats[f"eval/{mode}/reward/{name}"] = value
        if self.logger is not None:
            self.logger.scalars(stats, self.num_timesteps)
            self.logger.eval_samples(results["greedy"].samples, results["sampled"].samples, self.num_timesteps)
        return stats

    def _evaluation_env(self):
        """The vector env evaluations run on: the training env, or a copy of it on ``eval_prompts``."""
        if self.config.eval_prompts is None:
            return self.env
        if self._eval_env is None:
            kwargs = {**self.env.init_kwargs, "prompts": self.config.eval_prompts, "tokenizer": self.env.tokenizer}
            self._eval_env = type(self.env)(num_envs=self.config.batch_size, **kwargs)
        return self._eval_env

    def _rollout_stats(
        self, rollout: Rollout, kl: torch.Tensor | None, elapsed: float, t_rollout: float, stop: bool
    ) -> IterationTotals:
        """The iteration's rollout figures, over the whole batch: with many processes one all-reduce sums
        the tokens and averages the per-row means (every process has the same number of rows), and carries
        the stop requests."""
        returns = rollout.episode_returns.cpu().numpy()
        tokens = int(rollout.action_mask.sum())
        means = {
            "rollout/reward_mean": float(returns.mean()),
            "rollout/episode_length": float(rollout.lengths.float().mean()),
            "rollout/kl_ref": float((kl.sum(1)).mean()) if kl is not None else 0.0,
        }
        for name, values in rollout.components.items():
            means[f"rollout/reward/{name}"] = float(values.mean())
        std, stop_signal = float(returns.std()), 0
        if self.runtime.distributed:
            squares = float((returns.astype(np.float64) ** 2).mean())
            vector = torch.tensor([*means.values(), squares, tokens, float(stop)], dtype=torch.float64)
            self.runtime.all_reduce(vector)
            *summed, squares, tokens, stops = vector.tolist()
            means = {key: value / self.runtime.world_size for key, value in zip(means, summed, strict=True)}
            mean, squares = means["rollout/reward_mean"], squares / self.runtime.world_size
            std, tokens, stop, stop_signal = max(0.0, squares - mean * mean) ** 0.5, int(tokens), stops > 0, 15
        stats = {
            "rollout/reward_mean": means.pop("rollout/reward_mean"),
            "rollout/reward_std": std,
            **means,
            "charts/learning_rate": self.optimizer.param_groups[0]["lr"],
            "charts/tokens_per_second": tokens / elapsed,
            "charts/rollout_tokens_per_second": tokens / t_rollout,
            "charts/skipped_batches": self.skipped_batches,
        }
        return IterationTotals(stats, tokens, bool(stop), stop_signal)

    def _log(self, rollout: Rollout, stats: dict[str, float]) -> None:
        if self.verbose >= 2:
            print(f"iter {self.iteration} tokens {self.num_timesteps} " + json.dumps(stats))
        if self.logger is None:
            return
        if self.iteration % self._log_interval == 0:
            self.logger.scalars(stats, self.num_timesteps)
            self.logger.histogram("rollout/rewards", rollout.episode_returns.cpu().numpy(), self.num_timesteps)
        if self.config.sample_interval and (self.iteration == 1 or self.iteration % self.config.sample_interval == 0):
            returns = rollout.episode_returns.cpu().numpy()
            self.logger.samples(rollout.prompts, rollout.completions, returns, self.num_timesteps)
