"""RL maths shared by the agents: returns, GAE, baselines, PPO's clipped losses, KL estimators and control.

Shape legend: B rows (episodes), T token steps. ``valid`` (B, T) marks the steps an episode actually took
(a row that finished early is padded after its last token); every episode ends inside the rollout, and
its last valid step carries the sequence reward, so returns never bootstrap past it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


def discounted_returns(rewards: torch.Tensor, valid: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go ``G_t = r_t + gamma * G_{t+1}`` within each row's valid steps (0 elsewhere); ``t + 1`` is the
    row's next valid step, so invalid steps inside an episode (the env's tokens in a multi-turn episode) are
    bridged.

    >>> discounted_returns(torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[True, True, True]]), 0.5).tolist()
    [[1.5, 1.0, 2.0]]
    """
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    r = rewards * valid
    for t in range(rewards.shape[1] - 1, -1, -1):
        # a step that is not valid inside an episode (a multi-turn env's reply token) is skipped: the return
        # carries over it, so discounting counts the agent's own steps
        running = torch.where(valid[:, t], r[:, t] + gamma * running, running)
        returns[:, t] = running * valid[:, t]
    return returns


def gae(
    rewards: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016); the value after an episode's end is 0.

    The next state of a valid step is the row's next valid step: invalid steps inside an episode (the env's
    tokens in a multi-turn episode) are bridged, as if the agent's steps were contiguous.

    Returns ``(advantages, returns)`` with ``returns = advantages + values``, both (B, T), 0 on padding.

    >>> a, ret = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[True, True]]), 1.0, 1.0)
    >>> a.tolist(), ret.tolist()
    ([[0.5, 0.5]], [[1.0, 1.0]])
    """
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(running)  # the value at each row's next valid step (0 past the episode's end)
    v = values * valid
    for t in range(rewards.shape[1] - 1, -1, -1):
        m = valid[:, t]
        delta = rewards[:, t] + gamma * next_value - v[:, t]
        running = torch.where(m, delta + gamma * lam * running, running)  # carried over an invalid step
        adv[:, t] = running * m
        next_value = torch.where(m, v[:, t], next_value)
    return adv, (adv + v) * valid


def group_baseline(scores: torch.Tensor, group_size: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row baseline and scale for rows laid out as consecutive groups of samples of one prompt.

    ``kind``: ``"rloo"`` — the mean score of the *other* samples of the same prompt (leave-one-out);
    ``"grpo"`` — the group mean, with the group's standard deviation as scale.
    Returns ``(baseline (B,), scale (B,))``; the advantage is ``(G_t - baseline) / scale``.

    >>> b, s = group_baseline(torch.tensor([1.0, 3.0, 0.0, 0.0]), 2, "rloo")
    >>> b.tolist(), s.tolist()
    ([3.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0])
    >>> b, s = group_baseline(torch.tensor([1.0, 3.0, 0.0, 0.0]), 2, "grpo")
    >>> b.tolist(), [round(x, 4) for x in s.tolist()]
    ([2.0, 2.0, 0.0, 0.0], [1.4143, 1.4143, 0.0001, 0.0001])
    """
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} rows do not split into groups of {group_size}")
    g = scores.view(-1, group_size)  # (B / k, k)
    if kind == "rloo":
        if group_size < 2:
            raise ValueError("the leave-one-out baseline needs group_size >= 2")
        base = (g.sum(1, keepdim=True) - g) / (group_size - 1)
        return base.reshape(-1), torch.ones_like(scores)
    if kind == "grpo":
        std = g.std(1, keepdim=True, unbiased=True) if group_size > 1 else torch.zeros_like(g[:, :1])
        return g.mean(1, keepdim=True).expand_as(g).reshape(-1), (std + 1e-4).expand_as(g).reshape(-1)
    raise ValueError(f"unknown group baseline {kind!r}; expected 'rloo' or 'grpo'")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens (Schulman's k1 / k3).

    ``k1 = log p - log q`` (unbiased, can be negative); ``k3 = (q/p - 1) - log(q/p)`` (unbiased, >= 0).

    >>> kl_penalty(torch.tensor([-1.0]), torch.tensor([-2.0]), "k1").tolist()
    [1.0]
    >>> round(kl_penalty(torch.tensor([-1.0]), torch.tensor([-2.0]), "k3").item(), 6)
    0.367879
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


@dataclass
class KLController:
    """KL coefficient: fixed, or adaptive (Ziegler et al. 2019) towards a target KL per episode.

    Adaptive update: ``coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``.

    >>> c = KLController(coef=0.1, target=6.0, horizon=10000)
    >>> round(c.update(kl=12.0, n_steps=1000), 6)
    0.102
    >>> KLController(coef=0.1).update(kl=100.0, n_steps=1000)  # fixed: unchanged
    0.1
    """

    coef: float = 0.0
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None and math.isfinite(kl):
            error = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.coef *= 1.0 + error * n_steps / self.horizon
        return self.coef

    def state_dict(self) -> dict:
        return {"coef": self.coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.coef, self.target, self.horizon = state["coef"], state["target"], state["horizon"]


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, total: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over the given elements (nan when Var(returns) is 0);
    ``total``: as :func:`masked_whiten`'s (the variances of the whole batch across processes).

    >>> explained_variance(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0]))
    1.0
    """
    if total is not None:
        r, d = returns.double(), (returns - values).double()
        n, r1, r2, d1, d2 = total(torch.stack([r.new_tensor(r.numel()), r.sum(), (r**2).sum(), d.sum(), (d**2).sum()]))
        var_r, var_d = r2 / n - (r1 / n) ** 2, d2 / n - (d1 / n) ** 2
        return float("nan") if var_r.item() <= 0 else float(1 - var_d / var_r)
    var = returns.var(unbiased=False)
    if var.item() == 0:
        return float("nan")
    return float(1 - (returns - values).var(unbiased=False) / var)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``x`` over the elements where ``mask`` is true.

    ``count``: the denominator in place of ``mask.sum()``. Data parallel passes the masked count of the whole
    batch (all processes): this process's result is then its share of the whole batch's mean, the shares
    sum to it, and so do their gradients.
    """
    return (x * mask).sum() / (mask.sum().clamp_min(1) if count is None else count)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 1e-8,
    total: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Normalise to zero mean and unit variance over the masked elements (0 elsewhere).

    ``total``: sums a tensor over processes (data parallel: ``Runtime.all_reduce``), so that the mean and
    variance are the whole batch's, not this process's rows'.
    """
    if total is None:
        mean = masked_mean(x, mask)
        var = masked_mean((x - mean) ** 2, mask)
    else:
        sums = total(torch.stack([(x * mask).sum(), mask.sum().to(x.dtype)]))
        count = sums[1].clamp_min(1)
        mean = sums[0] / count
        var = total(((x - mean) ** 2 * mask).sum()) / count
    return (x - mean) * torch.rsqrt(var + eps) * mask


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate ``mean(max(-A r, -A clip(r, 1-eps, 1+eps)))`` and the clipped fraction
    (``count``: as :func:`masked_mean`'s).

    >>> loss, frac = clipped_policy_loss(torch.log(torch.tensor([[1.5, 0.5]])), torch.zeros(1, 2),
    ...                                  torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), 0.2)
    >>> round(loss.item(), 4), frac.item()
    (-0.2, 1.0)
    """
    ratio = (logprobs - old_logprobs).exp()
    loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    clipped = ((ratio - 1).abs() > clip).float()
    return masked_mean(loss, mask, count), masked_mean(clipped, mask, count)


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """``0.5 * mean(max((V - R)^2, (V_clipped - R)^2))`` with ``V_clipped = V_old + clip(V - V_old, +-eps)``
    (``count``: as :func:`masked_mean`'s).

    >>> clipped_value_loss(torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.ones(1, 1), 0.5)
    tensor(1.1250)
    """
    loss = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.max(loss, (clipped - returns) ** 2)
    return 0.5 * masked_mean(loss, mask, count)
