"""GRPO and its successors: a critic-free clipped policy gradient with group-relative advantages.

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) samples ``group_size`` completions of each
prompt and uses each one's score relative to its group as the advantage of every token, in PPO's clipped
surrogate, without a value model. Later papers changed its pieces; each change is an option here, named as
TRL's ``GRPOTrainer`` names it, so that a recipe moves between the two unchanged:

- **Advantages** (:meth:`GRPO.advantages`): ``(R_i - mean_group R) / (std_group R + 1e-4)`` on every token
  (``scale_rewards="group"``), or without the division (``"none"``: Dr. GRPO, Liu et al. 2025, which finds
  that the std favours too easy and too hard prompts). The score is the episode return of the env's rewards,
  so immediate (per-token) rewards work too: token ``t`` gets its own return-to-go ``G_t`` (discounted by
  ``gamma``) minus the group baseline, the group's mean episode return (``token_baseline="episode"``, what
  REINFORCE's ``grpo`` baseline does) or the group's mean return-to-go at the same step over the rows still
  generating (``"step"``). With a sequence reward and ``gamma=1`` both are GRPO's advantage exactly.
- **Surrogate** (:func:`grpo_loss`): ``-min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A)`` per token;
  ``epsilon_high > epsilon`` is DAPO's clip-higher (Yu et al. 2025: 0.28), which leaves low-probability tokens
  room to grow and keeps entropy from collapsing. The ratio ``r`` is per token, or per sequence
  (``importance_sampling_level="sequence"``: GSPO, Zheng et al. 2025, ``r_i = exp(mean_t log r_{i,t})``, clipped
  per sequence).
- **Loss normalisation** (``loss_type``), over a minibatch's tokens ``L_{i,t}`` under the loss mask:
  ``"grpo"`` (the paper's): mean over each sequence's tokens, then over sequences (long sequences' tokens
  weigh less: a length bias); ``"bnpo"``: sum over the minibatch's tokens / their count; ``"dr_grpo"``: sum /
  (sequences x ``max_new_tokens``), a constant; ``"dapo"`` (TRL's default): sum / tokens of the whole batch (all
  minibatches, all processes), so every token weighs the same whatever its sequence's length.
- **KL to the reference** (``kl_coef`` as GRPO's beta, ``kl_estimator``, ``kl_in``): GRPO puts the k3 estimate
  ``pi_ref / pi - log(pi_ref / pi) - 1`` of the current policy's KL in the loss, per token, normalised as the
  surrogate (``kl_in="loss"``, the default here; TRL's ``beta``); ``kl_in="reward"`` subtracts it from the
  per-token rewards before the advantages, as REINFORCE and PPO do (textrl's KL controller drives either).
  k1 in the loss has zero expected gradient on-policy (``E[grad log pi] = 0``): use k1 in the reward.
- **Several passes** (``num_iterations``, GRPO's mu) over each batch in minibatches (``minibatch_size``), one
  optimizer step each; the old log-probs are the rollout's, and the first pass replays the rollout record.
- **Dynamic sampling** (``dynamic_sampling``, DAPO): groups whose samples all score the same are dropped and
  replaced (:mod:`agents.dynamic_sampling`).
- **Overlong completions** (``overlong``): ``"mask"`` drops completions cut at ``max_new_tokens`` (truncated,
  not ended by eos or a stop string) from the loss, still counting in their group's statistics (DAPO's
  overlong filtering, TRL's ``mask_truncated_completions``); ``"soft"`` adds DAPO's soft overlong punishment
  to the score: 0 up to ``max_new_tokens - overlong_buffer`` tokens, then falling linearly to
  ``-overlong_penalty`` at ``max_new_tokens``.
- **Entropy bonus** (``ent_coef``): minus ``ent_coef`` times the mean per-token entropy, over the minibatch's
  loss tokens (``"dapo"``: over the whole batch's, as TRL).

With one pass, one minibatch, ``loss_type="bnpo"`` (or ``"dapo"``) and ``kl_in="reward"``, the first pass's
ratio is 1 and the gradient is REINFORCE's with the ``grpo`` baseline (a test checks it).

Logged: ``losses/`` policy loss, KL term (``kl_in="loss"``), entropy, approximate KL to the rollout policy,
``clipfrac_low`` / ``clipfrac_high`` (share of loss tokens where the lower bound binds, ratio below
``1 - epsilon`` with a negative advantage, or the upper one, above ``1 + epsilon_high`` with a positive
advantage), ratio mean/max/min, gradient norm; dynamic sampling's ``charts/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

import numpy as np
import torch

from agents.base import BaseAgent
from agents.config import AgentConfig
from agents.dynamic_sampling import DynamicSamplingMixin, dynamic_sampling_errors
from textrl.advantages import discounted_returns, group_baseline, masked_mean
from textrl.rollout import Rollout, collect_rollout


@dataclass
class GRPOConfig(AgentConfig):
    """GRPO settings (plus the shared :class:`agents.config.AgentConfig`); see :mod:`agents.grpo`."""

    group_size: int = 4
    """Samples of each prompt per iteration (GRPO's G; TRL's num_generations); >= 2."""
    scale_rewards: Literal["group", "none"] = "group"
    """Divide each advantage by its group's reward std (GRPO, Shao et al. 2024), or not (Dr. GRPO, Liu et al.
    2025: the std favours prompts that are too easy or too hard)."""
    token_baseline: Literal["episode", "step"] = "episode"
    """Per-token returns (immediate rewards): subtract the group's mean episode return (as REINFORCE's grpo
    baseline), or the group's mean return-to-go at the same step over its rows still generating."""
    epsilon: float = 0.2
    """Clip range of the importance ratio: [1 - epsilon, 1 + epsilon_high] (PPO's; GRPO's)."""
    epsilon_high: float | None = None
    """Upper clip epsilon (None = epsilon); DAPO's clip-higher (Yu et al. 2025) uses 0.28."""
    num_iterations: int = 1
    """Passes over each batch (GRPO's mu); the old log-probs are the rollout's."""
    minibatch_size: int | None = None
    """Episodes per optimizer step (None = the whole batch: one step per pass)."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """Importance ratio per token, or per sequence: exp of the mean log-ratio over its tokens, clipped per
    sequence (GSPO, Zheng et al. 2025; use it with loss_type grpo, as the paper)."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """Loss normalisation: grpo = mean per sequence, then over sequences (Shao et al. 2024); bnpo = over the
    minibatch's tokens (TRL); dr_grpo = sum / (sequences x max_new_tokens) (Liu et al. 2025); dapo = over the
    whole batch's tokens (Yu et al. 2025; TRL's default)."""
    kl_coef: float = 0.04
    """KL coefficient (GRPO's beta, 0.04 in Shao et al. 2024; initial value when adaptive); 0 drops the
    reference model (TRL's default)."""
    kl_estimator: Literal["k1", "k3"] = "k3"
    """KL estimator: k3 = pi_ref/pi - log(pi_ref/pi) - 1 (GRPO's, in the loss), k1 = log pi - log pi_ref."""
    kl_in: Literal["loss", "reward"] = "loss"
    """Where the KL to the reference goes: a per-token term of the loss, normalised as the surrogate (GRPO),
    or subtracted from the per-token rewards before the advantages (as REINFORCE and PPO)."""
    overlong: Literal["none", "mask", "soft"] = "none"
    """Completions cut at max_new_tokens: kept as they are, masked out of the loss (DAPO's overlong filtering,
    TRL's mask_truncated_completions), or softly penalised by length (DAPO's soft overlong punishment)."""
    overlong_buffer: int = 4
    """Soft overlong punishment: the last tokens before max_new_tokens over which the penalty grows (DAPO's
    L_cache)."""
    overlong_penalty: float = 1.0
    """Soft overlong punishment: the penalty at max_new_tokens tokens (added to the score as -penalty)."""
    dynamic_sampling: bool = False
    """Drop groups whose samples all score the same (zero advantage) and collect fresh groups until the batch
    is full (DAPO's dynamic sampling; agents.dynamic_sampling)."""
    max_resample: int = 4
    """Dynamic sampling: most extra rollouts per iteration; then the update runs on what was kept (none:
    no update)."""

    def validate(self) -> None:
        super().validate()
        checks = [
            (self.group_size >= 2, "group_size must be >= 2 (advantages are relative to the group)"),
            (self.scale_rewards in ("group", "none"), "scale_rewards must be 'group' or 'none'"),
            (self.token_baseline in ("episode", "step"), "token_baseline must be 'episode' or 'step'"),
            (self.epsilon > 0, "epsilon must be > 0"),
            (self.epsilon_high is None or self.epsilon_high > 0, "epsilon_high must be > 0 (or None)"),
            (self.num_iterations >= 1, "num_iterations must be >= 1"),
            (
                self.minibatch_size is None or 1 <= self.minibatch_size <= self.batch_size,
                "minibatch_size must be in [1, batch_size] (or None)",
            ),
            (
                self.importance_sampling_level in ("token", "sequence"),
                "importance_sampling_level must be 'token' or 'sequence'",
            ),
            (self.loss_type in LOSS_TYPES, f"loss_type must be one of {', '.join(LOSS_TYPES)}"),
            (self.kl_in in ("loss", "reward"), "kl_in must be 'loss' or 'reward'"),
            (self.overlong in ("none", "mask", "soft"), "overlong must be 'none', 'mask' or 'soft'"),
            (self.overlong_buffer >= 1, "overlong_buffer must be >= 1"),
            (self.overlong_penalty >= 0, "overlong_penalty must be >= 0"),
        ]
        for message in [m for ok, m in checks if not ok] + dynamic_sampling_errors(self):
            raise ValueError(f"GRPOConfig: {message}")


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


class GRPOLoss(NamedTuple):
    """:func:`grpo_loss`'s result: the loss and what the logs need."""

    loss: torch.Tensor
    """policy_loss + beta * kl_loss (scalar, with gradients)."""
    policy_loss: torch.Tensor
    """The clipped surrogate, normalised (scalar, with gradients)."""
    kl_loss: torch.Tensor
    """The KL to the reference, normalised as the surrogate (scalar; 0 without a reference)."""
    ratio: torch.Tensor
    """(B, T) importance ratio of each token (a sequence's own on each of its tokens), detached."""
    clipped_low: torch.Tensor
    """(B, T) the lower clip binds: ratio < 1 - epsilon with a negative advantage."""
    clipped_high: torch.Tensor
    """(B, T) the upper clip binds: ratio > 1 + epsilon_high with a positive advantage."""


def normalise(
    x: torch.Tensor, mask: torch.Tensor, loss_type: str, *, max_len=None, sequences=None, tokens=None, world_size=1
):
    """Aggregate per-token losses ``x`` (B, T) under ``mask`` as ``loss_type`` says (TRL's ``_compute_loss``).

    Data parallel (this process holds B of the minibatch's rows): ``sequences`` is the minibatch's row count
    and ``tokens`` the whole batch's loss-token count over all processes, so the processes' results sum to the
    whole minibatch's loss; bnpo divides by this process's token count and ``world_size`` (TRL: the local
    batch, averaged over processes). Defaults: one process, ``tokens`` the mask's count.
    """
    m = mask.to(x.dtype)
    total = x * m
    rows = x.shape[0] if sequences is None else sequences
    if loss_type == "grpo":
        return (total.sum(-1) / m.sum(-1).clamp_min(1)).sum() / rows
    if loss_type == "bnpo":
        return total.sum() / m.sum().clamp_min(1) / world_size
    if loss_type == "dr_grpo":
        if max_len is None:
            raise ValueError("loss_type='dr_grpo' needs max_len (the env's max_new_tokens)")
        return total.sum() / (rows * max_len)
    if loss_type == "dapo":
        return total.sum() / (m.sum().clamp_min(1) if tokens is None else tokens)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
    loss_type: str = "dapo",
    max_len: int | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_estimator: str = "k3",
    beta: float = 0.0,
    sequences: int | None = None,
    tokens: torch.Tensor | float | None = None,
    world_size: int = 1,
) -> GRPOLoss:
    """GRPO's clipped surrogate with optional KL term, normalised by ``loss_type`` (:func:`normalise`).

    ``logprobs`` (B, T) with gradients, ``old_logprobs`` (B, T) those the samples were drawn with,
    ``advantages`` (B, T), ``mask`` (B, T) the loss tokens; ``ref_logprobs`` (B, T) the reference's (with
    ``beta``: the KL term ``beta * KL_t`` is added per token, TRL's order). Positions outside ``mask`` never
    reach the result, not even as NaN.

    >>> out = grpo_loss(torch.log(torch.tensor([[1.5, 0.5]])), torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]),
    ...                 torch.ones(1, 2, dtype=torch.bool), loss_type="bnpo")
    >>> round(out.loss.item(), 4), out.clipped_high.tolist(), out.clipped_low.tolist()
    (-0.2, [[True, False]], [[False, True]])
    """
    mask = mask.bool()
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    if importance_sampling_level == "token":
        log_weight = log_ratio
    elif importance_sampling_level == "sequence":  # GSPO: the geometric mean of the sequence's token ratios
        log_weight = (log_ratio.sum(-1) / mask.sum(-1).clamp_min(1)).unsqueeze(-1)
    else:
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}; 'token' or 'sequence'")
    ratio = log_weight.exp()
    high = epsilon if epsilon_high is None else epsilon_high
    clipped = ratio.clamp(1 - epsilon, 1 + high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)  # (B, T)
    agg = {"max_len": max_len, "sequences": sequences, "tokens": tokens, "world_size": world_size}
    policy = normalise(per_token, mask, loss_type, **agg)
    kl = torch.zeros((), device=logprobs.device)
    if ref_logprobs is not None:
        d = torch.where(mask, ref_logprobs - logprobs, 0.0)  # log(pi_ref / pi)
        if kl_estimator == "k3":
            per_kl = torch.expm1(d) - d
        elif kl_estimator == "k1":
            per_kl = -d
        else:
            raise ValueError(f"unknown KL estimator {kl_estimator!r}; expected 'k1' or 'k3'")
        kl = normalise(per_kl, mask, loss_type, **agg)
    ratio = ratio.detach().expand_as(logprobs)
    adv = advantages.expand_as(logprobs)
    return GRPOLoss(
        loss=policy + beta * kl,
        policy_loss=policy,
        kl_loss=kl,
        ratio=ratio,
        clipped_low=(ratio < 1 - epsilon) & (adv < 0),
        clipped_high=(ratio > 1 + high) & (adv > 0),
    )


def soft_overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), times ``penalty``: 0 for ``|y| <= max_len -
    buffer``, ``penalty * ((max_len - buffer) - |y|) / buffer`` up to ``max_len`` (-``penalty`` there).

    >>> soft_overlong_penalty(torch.tensor([10, 17, 20]), max_len=20, buffer=4).tolist()
    [0.0, -0.25, -1.0]
    """
    return penalty * (((max_len - buffer) - lengths.double()) / buffer).clamp(max=0.0).to(torch.float32)


class GRPO(DynamicSamplingMixin, BaseAgent):
    """Group-relative clipped policy optimisation without a critic. See the module docstring."""

    name: ClassVar[str] = "grpo"
    config_class: ClassVar[type[AgentConfig]] = GRPOConfig
    config: GRPOConfig

    def __init__(self, env, lm=None, config: GRPOConfig | None = None, **kwargs):
        super().__init__(env, lm=lm, config=config, **kwargs)
        self.round_extras: dict[str, torch.Tensor] = {}
        cfg, world = self.config, self.runtime.world_size
        if cfg.minibatch_size is not None and cfg.minibatch_size % world:
            raise ValueError(
                f"GRPOConfig: minibatch_size {cfg.minibatch_size} does not split over {world} processes "
                f"(each takes an equal share of every minibatch: use a multiple of {world})"
            )
        if cfg.overlong == "soft" and cfg.overlong_buffer > self.env.max_new_tokens:
            raise ValueError(
                f"GRPOConfig: overlong_buffer {cfg.overlong_buffer} exceeds the env's max_new_tokens "
                f"{self.env.max_new_tokens}"
            )

    @property
    def kl_in_loss(self) -> bool:
        """Whether the KL to the reference is a term of the loss (else of the rewards, or there is none)."""
        return self.policy.reference and self.config.kl_in == "loss"

    # --- collection ------------------------------------------------------------------------------------

    def collect_round(self):
        """One rollout: its rewards (KL-penalised with ``kl_in="reward"``, shaped with ``overlong="soft"``), the
        per-token KL and, with ``kl_in="loss"``, the reference's log-probs for the loss (``ref_logprobs``)."""
        cfg = self.config
        if self.kl_in_loss:
            with self.autocast():
                rollout = collect_rollout(
                    self.policy, self.env, self._draw_prompts(), self.sampling, self.generator, self.device, True
                )
            ref, kl = self.reference_kl(rollout)
            rewards, extras = rollout.rewards.clone(), {"ref_logprobs": ref}
        else:
            rollout, rewards, kl, extras = super().collect_round()
        if cfg.overlong == "soft":
            mask = rollout.action_mask
            last = mask & (mask.cumsum(1) == rollout.lengths[:, None])  # each row's last action
            rewards = rewards + self.overlong_shaping(rollout)[:, None] * last
        return rollout, rewards, kl, extras

    def overlong_shaping(self, rollout: Rollout) -> torch.Tensor:
        """The soft overlong punishment of each row (B,), 0 unless ``overlong="soft"``."""
        cfg = self.config
        if cfg.overlong != "soft":
            return torch.zeros(rollout.ids.shape[0], device=rollout.ids.device)
        return soft_overlong_penalty(
            rollout.lengths, self.env.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty
        )

    def tie_scores(self, rollout: Rollout, rewards: torch.Tensor) -> torch.Tensor:
        """The env's episode reward plus the soft overlong punishment (not the KL penalty)."""
        return rollout.episode_returns + self.overlong_shaping(rollout)

    # --- the update ------------------------------------------------------------------------------------

    def advantages(self, rollout: Rollout, rewards: torch.Tensor) -> torch.Tensor:
        """Group-relative advantages (B, T), 0 on padding: ``(G_t - b) / scale`` with ``G_t`` the per-token
        return-to-go of ``rewards`` and ``b``, ``scale`` from the row's group (see the module docstring)."""
        cfg = self.config
        mask = rollout.action_mask
        returns = discounted_returns(rewards, mask, cfg.gamma)  # (B, T)
        self.check_finite("returns", returns)
        mean, std = group_baseline(returns[:, 0], cfg.group_size, "grpo")  # (B,) each; std + 1e-4 as TRL
        scale = std if cfg.scale_rewards == "group" else torch.ones_like(std)
        if cfg.token_baseline == "episode":
            base = mean[:, None]
        else:  # the group's mean return-to-go at each step, over the rows still generating there
            B, T = returns.shape
            g, m = returns.view(-1, cfg.group_size, T), mask.view(-1, cfg.group_size, T).to(returns.dtype)
            step_mean = (g * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)
            base = step_mean.expand_as(g).reshape(B, T)
        return (returns - base) / scale[:, None] * mask

    def loss_mask(self, rollout: Rollout) -> torch.Tensor:
        """The tokens the loss is over (B, T): the actions, less truncated rows' with ``overlong="mask"``."""
        if self.config.overlong != "mask":
            return rollout.action_mask
        ended = torch.as_tensor(rollout.terminated, dtype=torch.bool, device=rollout.action_mask.device)
        return rollout.action_mask & ended[:, None]

    def train(self, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        cfg = self.config
        adv = self.advantages(rollout, rewards)
        self.check_finite("advantages", adv)
        loss_mask = self.loss_mask(rollout)
        ref = self.round_extras.get("ref_logprobs") if self.kl_in_loss else None
        beta = self.kl_ctl.coef if ref is not None else 0.0
        world = self.runtime.world_size
        B = rollout.ids.shape[0]
        size = B if cfg.minibatch_size is None else min(B, cfg.minibatch_size // world)
        tokens = self.batch_total(loss_mask.sum().double()).item()  # dapo's normaliser: the whole batch's
        if tokens == 0:  # every completion masked out (overlong="mask"): nothing to train on
            if self.verbose and self.runtime.is_main:
                print(f"GRPO: no loss tokens at iteration {self.iteration + 1} (every completion truncated)")
            return {}
        keys = ("pg", "kl_term", "ent", "kl", "low", "high", "ratio", "gn")
        stats: dict[str, list[float]] = {k: [] for k in keys}
        ratio_max, ratio_min = -math.inf, math.inf
        for it in range(cfg.num_iterations):
            if size >= B:
                order = torch.arange(B, device=rollout.ids.device)
            else:
                order = torch.randperm(B, generator=self.generator, device=self.generator.device)
                order = order.to(rollout.ids.device)
            for start in range(0, B, size):
                mb = order[start : start + size].sort().values  # in rollout order: replay slices
                m = loss_mask[mb]
                count = self.batch_count(m)
                if (count if count is not None else m.sum()).item() == 0:
                    continue  # no loss tokens in this minibatch (anywhere): no step
                with self.autocast():
                    logits, _ = self.policy.logits_and_values(
                        rollout.ids[mb], rollout.attention_mask[mb], rollout.prompt_len, need_values=False, rows=mb
                    )
                logprobs, entropy = self.logprobs_and_entropy(logits, rollout.actions[mb])  # (b, T) each
                out = grpo_loss(
                    logprobs,
                    rollout.logprobs[mb],
                    adv[mb],
                    m,
                    epsilon=cfg.epsilon,
                    epsilon_high=cfg.epsilon_high,
                    importance_sampling_level=cfg.importance_sampling_level,
                    loss_type=cfg.loss_type,
                    max_len=self.env.max_new_tokens,
                    ref_logprobs=None if ref is None else ref[mb],
                    kl_estimator=cfg.kl_estimator,
                    beta=beta,
                    sequences=len(mb) * world,
                    tokens=tokens,
                    world_size=world,
                )
                if cfg.loss_type == "dapo":  # TRL: the entropy over the same global token count
                    ent = (torch.where(m, entropy, 0.0)).sum() / tokens
                else:
                    ent = masked_mean(torch.where(m, entropy, 0.0), m, count)
                loss = out.loss - cfg.ent_coef * ent
                if self.policy.router_loss is not None:  # MoE: keep the routing balanced
                    loss = loss + cfg.router_aux_coef * self.policy.router_loss
                with torch.no_grad():
                    log_ratio = torch.where(m, logprobs - rollout.logprobs[mb], 0.0)
                    approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, m, count)  # k3 of KL(old || new)
                    parts = [out.policy_loss, out.kl_loss, ent, approx_kl]
                    parts += [masked_mean(x.float(), m, count) for x in (out.clipped_low, out.clipped_high, out.ratio)]
                    valid_ratio = out.ratio[m]
                    if valid_ratio.numel():
                        ratio_max = max(ratio_max, valid_ratio.max().item())
                        ratio_min = min(ratio_min, valid_ratio.min().item())
                figures = self.batch_total(torch.stack([p.detach().float() for p in parts])).tolist()
                pg, kl_term, en = figures[:3]
                if not math.isfinite(pg + beta * kl_term - cfg.ent_coef * en):
                    self.nonfinite(
                        f"non-finite GRPO loss at iteration {self.iteration + 1}, pass {it + 1} "
                        f"(policy loss {pg}, KL term {kl_term}, entropy {en})"
                    )
                self.backward(loss)
                stats["gn"].append(self.clip_and_step())
                if self.policy.router_loss is not None:
                    stats.setdefault("router", []).append(self.runtime.reduce_float(self.policy.router_loss.item()))
                for key, value in zip(keys[:-1], figures, strict=True):
                    stats[key].append(value)
        if self.runtime.distributed:
            ratio_max = self.runtime.reduce_float(ratio_max, "max")
            ratio_min = self.runtime.reduce_float(ratio_min, "min")
        if not stats["gn"]:
            return {}
        figures = {
            "losses/policy_loss": float(np.mean(stats["pg"])),
            "losses/entropy": float(np.mean(stats["ent"])),
            "losses/approx_kl": float(np.mean(stats["kl"])),
            "losses/clipfrac_low": float(np.mean(stats["low"])),
            "losses/clipfrac_high": float(np.mean(stats["high"])),
            "losses/ratio_mean": float(np.mean(stats["ratio"])),
            "losses/ratio_max": ratio_max,
            "losses/ratio_min": ratio_min,
            "losses/grad_norm": float(np.mean(stats["gn"])),
            "losses/steps": float(len(stats["gn"])),
        }
        if ref is not None:
            figures["losses/kl_loss"] = float(np.mean(stats["kl_term"]))
        if "router" in stats:
            figures["losses/router_balance"] = float(np.mean(stats["router"]))
        return figures
