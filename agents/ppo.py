"""PPO on a Transformer policy (Schulman et al. 2017; the RLHF recipe of Ziegler et al. 2019).

Reads top to bottom like CleanRL's ``ppo.py``; rollout collection, the per-token KL penalty to the
reference and the loop live in :class:`agents.base.BaseAgent`.

1. advantages: GAE(gamma, lambda) over the KL-penalised per-token rewards, with the rollout's values;
2. ``n_epochs`` passes over shuffled minibatches of whole episodes:
   clipped surrogate ``-min(r A, clip(r, 1 +- eps) A)``, clipped value loss, entropy bonus,
   gradient clipping; stop the epochs early once the approximate KL to the rollout policy exceeds
   ``1.5 * target_kl`` (as SB3 does).

Guards (``nonfinite``): the rollout's values, the advantages and returns are checked before any update,
each minibatch's loss before its backward pass and its gradient before its step. With ``"skip"``, a
non-finite minibatch is not applied and ends the iteration's updates (minibatch steps already taken in
that iteration, on finite numbers, stay).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from agents.base import BaseAgent
from agents.config import AgentConfig
from textrl.advantages import (
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    masked_mean,
    masked_whiten,
)
from textrl.rollout import Rollout


@dataclass
class PPOConfig(AgentConfig):
    """PPO settings (plus the shared :class:`agents.config.AgentConfig`)."""

    n_epochs: int = 4
    """Passes over each rollout."""
    minibatch_size: int = 8
    """Episodes per minibatch."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """Policy ratio clip epsilon."""
    clip_range_vf: float | None = 0.2
    """Value clip around the rollout's values (None = no value clipping)."""
    vf_coef: float = 0.5
    """Value loss coefficient."""
    normalize_advantage: bool = True
    """Whiten advantages over each rollout's valid tokens."""
    target_kl: float | None = None
    """Stop the epochs early when the approximate KL to the rollout policy exceeds 1.5x this."""

    def validate(self) -> None:
        super().validate()
        checks = [
            (self.n_epochs >= 1, "n_epochs must be >= 1"),
            (1 <= self.minibatch_size <= self.batch_size, "minibatch_size must be in [1, batch_size]"),
            (0.0 <= self.gae_lambda <= 1.0, "gae_lambda must be in [0, 1]"),
            (self.clip_range > 0, "clip_range must be > 0"),
            (self.clip_range_vf is None or self.clip_range_vf > 0, "clip_range_vf must be > 0 (or None)"),
            (self.vf_coef >= 0, "vf_coef must be >= 0"),
            (self.target_kl is None or self.target_kl > 0, "target_kl must be > 0 (or None)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"PPOConfig: {message}")


class PPO(BaseAgent):
    """Proximal policy optimisation with a value head, GAE and a KL penalty. See the module docstring."""

    name: ClassVar[str] = "ppo"
    config_class: ClassVar[type[AgentConfig]] = PPOConfig
    config: PPOConfig

    def __init__(self, env, lm=None, config: PPOConfig | None = None, **kwargs):
        super().__init__(env, lm=lm, config=config, **kwargs)
        world = self.runtime.world_size
        if self.config.minibatch_size % world:
            raise ValueError(
                f"PPOConfig: minibatch_size {self.config.minibatch_size} does not split over {world} processes "
                f"(each takes an equal share of every minibatch: use a multiple of {world})"
            )

    def train(self, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        cfg = self.config
        valid = rollout.action_mask
        self.check_finite("values (critic)", rollout.values)
        advantages, returns = gae(rewards, rollout.values, valid, cfg.gamma, cfg.gae_lambda)  # (B, T) each
        total = self.runtime.all_reduce if self.runtime.distributed else None  # whole-batch moments
        if cfg.normalize_advantage:
            advantages = masked_whiten(advantages, valid, total=total)
        self.check_finite("advantages", advantages)
        self.check_finite("returns", returns)

        B = rollout.ids.shape[0]
        # data parallel: each process takes its share of every minibatch (minibatch_size / world_size rows of
        # its own), so the processes take the same number of steps, each on the whole minibatch's gradient
        size = cfg.minibatch_size // self.runtime.world_size
        stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "ent", "kl", "clip", "gn")}
        stop = False
        for _epoch in range(cfg.n_epochs):
            order = torch.randperm(B, generator=self.generator, device=self.generator.device).to(rollout.ids.device)
            for start in range(0, B, size):
                mb = order[start : start + size].sort().values  # in rollout order: replay slices
                m = valid[mb]
                with self.autocast():
                    logits, values = self.policy.logits_and_values(
                        rollout.ids[mb], rollout.attention_mask[mb], rollout.prompt_len, rows=mb
                    )
                logprobs, entropy = self.logprobs_and_entropy(logits, rollout.actions[mb])  # (b, T)
                values = values.float()

                count = self.batch_count(m)
                pg_loss, clipfrac = clipped_policy_loss(
                    logprobs, rollout.logprobs[mb], advantages[mb], m, cfg.clip_range, count
                )
                v_loss = clipped_value_loss(values, rollout.values[mb], returns[mb], m, cfg.clip_range_vf, count)
                ent = masked_mean(entropy, m, count)
                loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * ent
                if self.policy.router_loss is not None:  # MoE: keep the routing balanced
                    loss = loss + cfg.router_aux_coef * self.policy.router_loss
                with torch.no_grad():
                    log_ratio = logprobs - rollout.logprobs[mb]
                    approx_kl = masked_mean(log_ratio.exp() - 1 - log_ratio, m, count)  # k3 estimate of KL(old || new)
                figures = self.batch_total(torch.stack([pg_loss, v_loss, ent, approx_kl, clipfrac])).tolist()
                pg, vf, en, kl, _clip = figures  # the whole minibatch's, the same on every process
                if not math.isfinite(pg + cfg.vf_coef * vf - cfg.ent_coef * en):
                    parts = f"policy loss {pg}, value loss {vf}, entropy {en}"
                    self.nonfinite(
                        f"non-finite PPO loss at iteration {self.iteration + 1}, epoch {_epoch + 1} ({parts})"
                    )
                self.backward(loss)
                stats["gn"].append(self.clip_and_step())
                if self.policy.router_loss is not None:
                    stats.setdefault("router", []).append(self.runtime.reduce_float(self.policy.router_loss.item()))
                for key, value in zip(("pg", "vf", "ent", "kl", "clip"), figures, strict=True):
                    stats[key].append(value)
                if cfg.target_kl is not None and kl > 1.5 * cfg.target_kl:
                    stop = True
                    break
            if stop:
                break

        ev = explained_variance(rollout.values[valid], returns[valid], total)
        return {
            "losses/policy_loss": float(np.mean(stats["pg"])),
            "losses/value_loss": float(np.mean(stats["vf"])),
            "losses/entropy": float(np.mean(stats["ent"])),
            "losses/approx_kl": float(np.mean(stats["kl"])),
            "losses/clipfrac": float(np.mean(stats["clip"])),
            "losses/explained_variance": ev,
            "losses/grad_norm": float(np.mean(stats["gn"])),
            "losses/epochs": _epoch + 1,
        } | ({"losses/router_balance": float(np.mean(stats["router"]))} if "router" in stats else {})
