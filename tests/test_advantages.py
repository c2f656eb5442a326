"""Known-answer tests for the RL maths on hand-built tensors (like SB3's test_gae.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from textrl.advantages import (
    KLController,
    clipped_policy_loss,
    clipped_value_loss,
    discounted_returns,
    explained_variance,
    gae,
    group_baseline,
    kl_penalty,
    masked_mean,
    masked_whiten,
)


def test_discounted_returns_respect_episode_ends():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 9.0], [0.0, 0.0, 5.0, 0.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    g = 0.9
    expected = torch.tensor(
        [[1 + g * 2 + g * g * 3, 2 + g * 3, 3.0, 0.0], [g * g * 5, g * 5, 5.0, 0.0]]
    )  # the 9.0 after row 0's end is ignored
    assert_close(discounted_returns(rewards, valid, g), expected)


def test_gae_matches_brute_force():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    gamma, lam = 0.97, 0.9
    adv, ret = gae(rewards, values, valid, gamma, lam)
    for b in range(3):
        n = int(valid[b].sum())
        v = torch.cat([values[b, :n], torch.zeros(1)])  # value after the episode's end is 0
        deltas = [rewards[b, t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            expected = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            assert_close(adv[b, t], expected)
            assert_close(ret[b, t], expected + values[b, t])
        assert adv[b, n:].abs().sum() == 0 and ret[b, n:].abs().sum() == 0


def test_gae_with_lambda_one_is_return_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.4, 0.6]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    adv, _ = gae(rewards, values, valid, 1.0, 1.0)
    assert_close(adv, discounted_returns(rewards, valid, 1.0) - values)


def test_rloo_and_grpo_baselines():
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    base, scale = group_baseline(scores, 3, "rloo")
    assert_close(base, torch.tensor([4.0, 3.5, 1.5, 1.5, 1.5, 0.0]))
    assert_close(scale, torch.ones(6))
    base, scale = group_baseline(scores, 3, "grpo")
    assert_close(base, torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 1.0]))
    assert_close(scale, torch.tensor([math.sqrt(7.0)] * 3 + [math.sqrt(3.0)] * 3) + 1e-4)
    with pytest.raises(ValueError, match="groups of 4"):
        group_baseline(scores, 4, "rloo")
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_baseline(scores, 1, "rloo")
    with pytest.raises(ValueError, match="unknown group baseline"):
        group_baseline(scores, 3, "mean")


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -2.0, -0.1])
    assert_close(kl_penalty(logp, ref, "k1"), logp - ref)
    r = torch.exp(ref - logp)
    assert_close(kl_penalty(logp, ref, "k3"), r - 1 - torch.log(r))
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    # both are unbiased: on samples from p their mean approaches KL(p || q)
    torch.manual_seed(0)
    p = torch.distributions.Categorical(logits=torch.tensor([2.0, 0.0, -1.0]))
    q = torch.distributions.Categorical(logits=torch.tensor([0.0, 0.5, 0.0]))
    x = p.sample((200_000,))
    true_kl = torch.distributions.kl_divergence(p, q)
    for est in ("k1", "k3"):
        assert_close(kl_penalty(p.log_prob(x), q.log_prob(x), est).mean(), true_kl, atol=0.01, rtol=0)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logp, ref, "k2")


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.9]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # last token is padding
    loss, frac = clipped_policy_loss(new, old, adv, mask, clip=0.2)
    # per token: max(-A r, -A clip(r)): [-1.2, 0.8, -1.1]; mean over the 3 valid tokens
    assert_close(loss, torch.tensor((-1.2 + 0.8 - 1.1) / 3))
    assert_close(frac, torch.tensor(2 / 3))


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([[3.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 1.0]])
    mask = torch.ones(1, 2)
    # token 0: unclipped err 0, clipped value 1.5 -> err 2.25 -> max 2.25; token 1: err 1 both
    assert_close(clipped_value_loss(values, old, returns, mask, 0.5), torch.tensor(0.5 * (2.25 + 1.0) / 2))
    assert_close(clipped_value_loss(values, old, returns, mask, None), torch.tensor(0.5 * (0.0 + 1.0) / 2))


def test_adaptive_kl_controller():
    c = KLController(coef=0.2, target=1.0, horizon=100)
    assert c.update(kl=3.0, n_steps=10) == pytest.approx(0.2 * 1.02)  # error clipped to +0.2
    assert c.update(kl=0.5, n_steps=10) == pytest.approx(0.2 * 1.02 * 0.98)  # error -0.5 -> -0.2
    assert c.update(kl=1.0, n_steps=10) == pytest.approx(0.2 * 1.02 * 0.98)  # on target: unchanged
    fixed = KLController(coef=0.2)
    assert fixed.update(kl=50.0, n_steps=10) == 0.2
    c2 = KLController()
    c2.load_state_dict(c.state_dict())
    assert c2.state_dict() == c.state_dict()


def test_masked_helpers_and_explained_variance():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    m = torch.tensor([[True, True, False]])
    assert masked_mean(x, m).item() == 2.0
    w = masked_whiten(x, m)
    assert_close(w, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4, rtol=0)
    assert explained_variance(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert explained_variance(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 3.0])) == pytest.approx(1 - 4.0 / 1.0)
    assert math.isnan(explained_variance(torch.zeros(2), torch.ones(2)))
