"""What an agent reports: the per-iteration rollout statistics, TensorBoard/console logs and evaluations.

Separate from the loop in :mod:`agents.base`, which only calls :meth:`ReportingMixin._log` and
:meth:`ReportingMixin.evaluate_and_log` once an iteration's numbers are in.
"""

from __future__ import annotations

import json

from textrl.rollout import Rollout


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

    def _rollout_stats(self, rollout: Rollout, episode_kl: float, tokens: int, elapsed: float, t_rollout: float):
        returns = rollout.episode_returns.cpu().numpy()
        stats = {
            "rollout/reward_mean": float(returns.mean()),
            "rollout/reward_std": float(returns.std()),
            "rollout/episode_length": float(rollout.lengths.float().mean()),
            "rollout/kl_ref": episode_kl,
            "charts/kl_coef": self.kl_ctl.coef,
            "charts/learning_rate": self.optimizer.param_groups[0]["lr"],
            "charts/tokens_per_second": tokens / elapsed,
            "charts/rollout_tokens_per_second": tokens / t_rollout,
            "charts/skipped_batches": self.skipped_batches,
        }
        for name, values in rollout.components.items():
            stats[f"rollout/reward/{name}"] = float(values.mean())
        return stats

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
