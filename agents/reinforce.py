"""REINFORCE with baselines: ``loss = -log pi(a_t | s_t) * (G_t - b) - ent_coef * H``, token-averaged.

Reads top to bottom like a CleanRL script; rollout collection, the KL penalty and the loop live in
:class:`agents.base.BaseAgent`.

Baselines (``baseline=``):
- ``"none"``: ``b = 0``.
- ``"moving_average"``: ``b`` = exponential moving average of past batches' mean episode return.
- ``"rloo"``: leave-one-out over the ``group_size`` samples of the same prompt (Ahmadian et al. 2024):
  ``b_i = mean_{j != i} G^j``.
- ``"grpo"``: group-normalised (Shao et al. 2024): ``(G_t - mean_group G) / std_group G``.

``G_t`` is the discounted per-token return of the KL-penalised rewards (immediate + sequence); a
sample's group score is its episode return ``G_0``. A baseline that does not depend on the sample's own
actions keeps the gradient unbiased.

Dynamic sampling (``dynamic_sampling``, with ``rloo`` or ``grpo``): groups whose samples all score the same,
which give zero gradient under a group baseline, are dropped and replaced by fresh ones
(:mod:`agents.dynamic_sampling`).

Guards (``nonfinite``): the returns (before they update the moving average), the advantages, the loss
and the gradient are checked before the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from agents.base import BaseAgent
from agents.config import AgentConfig
from agents.dynamic_sampling import DynamicSamplingMixin, dynamic_sampling_errors
from textrl.advantages import discounted_returns, group_baseline, masked_mean
from textrl.rollout import Rollout


@dataclass
class REINFORCEConfig(AgentConfig):
    """REINFORCE settings (plus the shared :class:`agents.config.AgentConfig`)."""

    baseline: Literal["none", "moving_average", "rloo", "grpo"] = "rloo"
    """Variance-reduction baseline (rloo and grpo need group_size >= 2)."""
    baseline_decay: float = 0.9
    """Decay of the moving-average baseline."""
    group_size: int = 4
    """Samples of each prompt per iteration."""
    dynamic_sampling: bool = False
    """Drop groups whose samples all score the same (zero gradient under rloo and grpo) and collect fresh
    groups until the batch is full (DAPO's dynamic sampling, Yu et al. 2025; agents.dynamic_sampling)."""
    max_resample: int = 4
    """Dynamic sampling: most extra rollouts per iteration; then the update runs on what was kept (none:
    no update)."""

    def validate(self) -> None:
        super().validate()
        for message in dynamic_sampling_errors(self):
            raise ValueError(f"REINFORCEConfig: {message}")
        if self.dynamic_sampling and self.baseline not in ("rloo", "grpo"):
            raise ValueError("REINFORCEConfig: dynamic_sampling needs a group baseline (rloo or grpo)")
        if self.baseline not in ("none", "moving_average", "rloo", "grpo"):
            raise ValueError(f"REINFORCEConfig: unknown baseline {self.baseline!r}")
        if self.baseline == "rloo" and self.group_size < 2:
            raise ValueError("REINFORCEConfig: baseline='rloo' needs group_size >= 2")
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ValueError("REINFORCEConfig: baseline_decay must be in [0, 1)")


class REINFORCE(DynamicSamplingMixin, BaseAgent):
    """Monte-Carlo policy gradient on a Transformer policy. See the module docstring."""

    name: ClassVar[str] = "reinforce"
    config_class: ClassVar[type[AgentConfig]] = REINFORCEConfig
    config: REINFORCEConfig

    def __init__(self, env, lm=None, config: REINFORCEConfig | None = None, **kwargs):
        super().__init__(env, lm=lm, config=config, **kwargs)
        self.moving_average: float | None = None

    def advantages(self, rollout: Rollout, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G_t - b) / scale`` per token (B, T), zero on padding, and the episode returns (B,)."""
        cfg = self.config
        returns = discounted_returns(rewards, rollout.action_mask, cfg.gamma)  # (B, T)
        self.check_finite("returns", returns)
        scores = returns[:, 0]  # (B,) each sample's episode return
        if cfg.baseline == "none":
            base, scale = torch.zeros_like(scores), torch.ones_like(scores)
        elif cfg.baseline == "moving_average":
            base = torch.full_like(scores, self.moving_average if self.moving_average is not None else 0.0)
            scale = torch.ones_like(scores)
        else:
            base, scale = group_baseline(scores, cfg.group_size, cfg.baseline)
        return (returns - base[:, None]) / scale[:, None] * rollout.action_mask, scores

    def train(self, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        adv, scores = self.advantages(rollout, rewards)  # (B, T), (B,)
        self.check_finite("advantages", adv)
        with self.autocast():
            logits, _ = self.policy.logits_and_values(
                rollout.ids, rollout.attention_mask, rollout.prompt_len, need_values=False
            )
        logprobs, entropy = self.logprobs_and_entropy(logits, rollout.actions)  # (B, T) each
        mask = rollout.action_mask
        count = self.batch_count(mask)  # data parallel: token means are over the whole batch
        pg_loss = -masked_mean(logprobs * adv, mask, count)
        entropy_mean = masked_mean(entropy, mask, count)
        loss = pg_loss - self.config.ent_coef * entropy_mean
        router = self.policy.router_loss
        if router is not None:  # MoE: keep the routing balanced (router_aux_coef)
            loss = loss + self.config.router_aux_coef * router
        pg, ent = self.batch_total(torch.stack([pg_loss, entropy_mean])).tolist()  # whole-batch figures
        if not math.isfinite(pg - self.config.ent_coef * ent):
            self.nonfinite(
                f"non-finite REINFORCE loss at iteration {self.iteration + 1} (policy loss {pg}, entropy {ent})"
            )
        self.backward(loss)
        grad_norm = self.clip_and_step()
        if self.config.baseline == "moving_average":  # only a batch that was applied moves the baseline
            mean, d = self.runtime.reduce_float(float(scores.mean())), self.config.baseline_decay
            self.moving_average = mean if self.moving_average is None else d * self.moving_average + (1 - d) * mean
        valid_adv = adv[mask].double()
        approx_kl = masked_mean(rollout.logprobs - logprobs.detach(), mask, count)
        parts = [approx_kl.double(), valid_adv.new_tensor(valid_adv.numel()), valid_adv.sum(), (valid_adv**2).sum()]
        kl, n, total, squares = self.batch_total(torch.stack(parts)).tolist()
        figures = {
            "losses/policy_loss": pg,
            "losses/entropy": ent,
            "losses/approx_kl": kl,
            "losses/grad_norm": grad_norm,
            "losses/advantage_std": max(0.0, (squares - total * total / n) / (n - 1)) ** 0.5 if n > 1 else 0.0,
        }
        if router is not None:
            figures["losses/router_balance"] = self.runtime.reduce_float(router.item())
        return figures

    def extra_state(self):
        return {"moving_average": self.moving_average}

    def load_extra_state(self, state):
        self.moving_average = state.get("moving_average")
