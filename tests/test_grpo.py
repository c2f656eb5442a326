"""GRPO: the loss variants against the papers' formulas on hand-built tensors, advantages, overlong handling,
dynamic sampling (tied groups refilled, never trained on), equality with REINFORCE, CLI, save/resume."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents import AGENTS, GRPO, REINFORCE, GRPOConfig, REINFORCEConfig
from agents.dynamic_sampling import concat_rollouts, pad_steps, take_rows, tied_groups
from agents.grpo import grpo_loss, normalise, soft_overlong_penalty
from envs import TextGenEnv
from textrl.rewards import immediate
from textrl.rollout import Rollout

PROMPTS = ["The old king", "The young queen", "The brave knight sees", "A river"]

# --- the loss on hand-built tensors -------------------------------------------------------------------
# Two sequences: 3 tokens with advantage +1, 2 tokens (and a padding step) with advantage -2.
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
RATIO = [[1.1, 1.5, 0.6], [0.7, 1.25, 1.0]]
NEW = OLD + torch.log(torch.tensor(RATIO))
ADV = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, 0.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])


def surrogate(r: float, a: float, low: float, high: float) -> float:
    """PPO's / GRPO's per-token objective, negated: -min(r A, clip(r, 1 - low, 1 + high) A)."""
    return -min(r * a, min(max(r, 1 - low), 1 + high) * a)


def hand_per_token(low: float = 0.2, high: float = 0.2) -> list[list[float]]:
    return [
        [surrogate(r, a, low, high) for r, a in zip(RATIO[0], [1.0] * 3, strict=True)],
        [surrogate(r, a, low, high) for r, a in zip(RATIO[1][:2], [-2.0] * 2, strict=True)],
    ]


def test_per_token_surrogate_known_values():
    # row 0 (A = +1): 1.1 inside; 1.5 clipped to 1.2 (upper bound binds); 0.6 below 0.8 but A > 0: min takes 0.6
    # row 1 (A = -2): 0.7 clipped to 0.8 (lower bound binds: -min(-1.4, -1.6) = 1.6); 1.25 above 1.2 but A < 0
    row0, row1 = hand_per_token()
    assert row0 == pytest.approx([-1.1, -1.2, -0.6]) and row1 == pytest.approx([1.6, 2.5])


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "expected"),
    [
        # GRPO (Shao et al. 2024): 1/G sum_i 1/|o_i| sum_t L_it
        ("grpo", {}, ((-1.1 - 1.2 - 0.6) / 3 + (1.6 + 2.5) / 2) / 2),
        # BNPO (TRL): sum_it L_it / sum_i |o_i|
        ("bnpo", {}, (-1.1 - 1.2 - 0.6 + 1.6 + 2.5) / 5),
        # Dr. GRPO (Liu et al. 2025): sum_it L_it / (G * max_len)
        ("dr_grpo", {"max_len": 4}, (-1.1 - 1.2 - 0.6 + 1.6 + 2.5) / (2 * 4)),
        # DAPO (Yu et al. 2025): sum_it L_it / tokens of the whole batch (here: this minibatch's 5 of 10)
        ("dapo", {"tokens": 10.0}, (-1.1 - 1.2 - 0.6 + 1.6 + 2.5) / 10),
        ("dapo", {}, (-1.1 - 1.2 - 0.6 + 1.6 + 2.5) / 5),
    ],
)
def test_loss_types_match_the_papers(loss_type, kwargs, expected):
    out = grpo_loss(NEW, OLD, ADV, MASK, epsilon=0.2, loss_type=loss_type, **kwargs)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.clipped_high.tolist() == [[False, True, False], [False, False, False]]
    assert out.clipped_low.tolist() == [[False, False, False], [True, False, False]]
    torch.testing.assert_close(out.ratio[MASK], torch.tensor(RATIO)[MASK])


def test_clip_higher_and_gradients_of_clipped_tokens():
    """DAPO's clip-higher: the upper bound moves to 1 + epsilon_high; a clipped token has zero gradient."""
    new = NEW.clone().requires_grad_(True)
    out = grpo_loss(new, OLD, ADV, MASK, epsilon=0.2, epsilon_high=0.28, loss_type="bnpo")
    per_token = hand_per_token(0.2, 0.28)
    assert per_token[0][1] == pytest.approx(-1.28)
    assert out.loss.item() == pytest.approx(sum(map(sum, per_token)) / 5, rel=1e-6)
    out.loss.backward()
    # d/dlogp of -r A is -r A (unclipped), 0 where the clip binds or on padding
    expected = torch.tensor([[-1.1, 0.0, -0.6], [0.0, 2.5, 0.0]]) / 5
    torch.testing.assert_close(new.grad, expected)
    # ratio 1.25 with epsilon_high 0.3: nothing clipped in row 0 position 1 of a 1.5 ratio? 1.5 > 1.3: clipped
    assert grpo_loss(NEW, OLD, ADV, MASK, epsilon_high=0.3).clipped_high[0, 1]
    assert not grpo_loss(NEW, OLD, ADV, MASK, epsilon_high=0.6).clipped_high.any()


def test_sequence_level_importance_ratio_gspo():
    """GSPO (Zheng et al. 2025): s_i = exp(1/|o_i| sum_t log r_it), clipped per sequence, loss -min(s A, clip(s) A)."""
    s0 = (1.1 * 1.5 * 0.6) ** (1 / 3)
    s1 = (0.7 * 1.25) ** (1 / 2)
    new = NEW.clone().requires_grad_(True)
    out = grpo_loss(new, OLD, ADV, MASK, importance_sampling_level="sequence", loss_type="grpo")
    assert out.loss.item() == pytest.approx((surrogate(s0, 1.0, 0.2, 0.2) + surrogate(s1, -2.0, 0.2, 0.2)) / 2)
    torch.testing.assert_close(out.ratio[0], torch.full((3,), s0))
    out.loss.backward()
    # every token of a sequence gets the same gradient: d(-s A)/dlogp_t = -s A / |o_i|, halved by the mean over 2
    torch.testing.assert_close(new.grad[0], torch.full((3,), -s0 / 3 / 2))
    torch.testing.assert_close(new.grad[1], torch.tensor([2 * s1 / 2 / 2, 2 * s1 / 2 / 2, 0.0]))
    # a tight clip binds on the second sequence (s1 = 0.935 < 0.98, A < 0): its whole gradient goes
    tight = grpo_loss(NEW, OLD, ADV, MASK, epsilon=0.02, importance_sampling_level="sequence", loss_type="grpo")
    assert tight.loss.item() == pytest.approx((surrogate(s0, 1.0, 0.02, 0.02) + 2 * 0.98) / 2)
    assert tight.clipped_low.tolist() == [[False, False, False], [True, True, False]]


def test_kl_term_k3_and_k1_in_the_loss():
    """GRPO's KL (Shao et al. 2024, eq. 4): pi_ref/pi - log(pi_ref/pi) - 1 per token, beta-weighted, normalised
    as the surrogate."""
    ref = OLD - 0.3
    out = grpo_loss(NEW, OLD, ADV, MASK, loss_type="bnpo", ref_logprobs=ref, beta=0.1)
    d = (ref - NEW)[MASK].tolist()
    k3 = sum(math.exp(x) - x - 1 for x in d) / 5
    assert out.kl_loss.item() == pytest.approx(k3, rel=1e-5)
    assert out.loss.item() == pytest.approx((-1.1 - 1.2 - 0.6 + 1.6 + 2.5) / 5 + 0.1 * k3, rel=1e-5)
    k1 = grpo_loss(NEW, OLD, ADV, MASK, loss_type="grpo", ref_logprobs=ref, beta=1.0, kl_estimator="k1").kl_loss
    assert k1.item() == pytest.approx((sum(-x for x in d[:3]) / 3 + sum(-x for x in d[3:]) / 2) / 2, rel=1e-5)


def test_padding_never_reaches_the_loss():
    new = NEW.clone()
    new[1, 2] = -math.inf  # e.g. a suppressed pad token's log-prob
    out = grpo_loss(new, OLD, ADV, MASK, loss_type="grpo", ref_logprobs=OLD, beta=0.1)
    assert math.isfinite(out.loss.item())


def test_normalise_data_parallel_shares_sum_to_the_whole():
    """Two processes' shares (sequences and tokens counted over both) add up to the one-process loss."""
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0], [6.0, 0.0, 0.0], [7.0, 8.0, 9.0]])
    m = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        whole = normalise(x, m, loss_type, max_len=3)
        shares = sum(
            normalise(x[r], m[r], loss_type, max_len=3, sequences=4, tokens=m.sum(), world_size=2)
            for r in (slice(0, 2), slice(2, 4))
        )
        assert shares.item() == pytest.approx(whole.item()), loss_type


def test_soft_overlong_penalty_known_values():
    """DAPO eq. 13 with L_max = 8, L_cache = 4: 0 up to 4 tokens, then (4 - |y|) / 4."""
    got = soft_overlong_penalty(torch.arange(1, 9), max_len=8, buffer=4, penalty=0.5).tolist()
    assert got == pytest.approx([0, 0, 0, 0, -0.125, -0.25, -0.375, -0.5])


# --- agents on a tiny random GPT-2 ----------------------------------------------------------------------


def crc_reward(completions, **_):
    """A sequence reward that differs between different completions (ties are all but impossible)."""
    return [zlib.crc32(c.encode()) % 997 / 997 for c in completions]


@immediate
def low_ids(new_token_ids):
    return (new_token_ids < 60).astype(float)


class TiedAtFirst:
    """0 for every completion in the first ``tied_calls`` calls (rollouts), then :func:`crc_reward`."""

    def __init__(self, tied_calls: int):
        self.calls, self.tied_calls = 0, tied_calls

    def __call__(self, completions, **_):
        self.calls += 1
        return [0.0] * len(completions) if self.calls <= self.tied_calls else crc_reward(completions)


def full_length_env(gpt2_dir, reward, max_new_tokens: int = 6) -> TextGenEnv:
    """Every completion runs to max_new_tokens (no stop strings; eos suppressed by the configs): all rows of a
    rollout end together, so a sequence reward is called once per rollout."""
    return TextGenEnv(lm=str(gpt2_dir), prompts=PROMPTS, reward=reward, max_new_tokens=max_new_tokens, stop=None)


def eos(env) -> int:
    return env.engine.tokenizer.eos_token_id


def _config(cls, env, **kw):
    kw = {"batch_size": 8, "group_size": 4, "learning_rate": 1e-3, "suppress_tokens": [eos(env)]} | kw
    return (GRPOConfig if cls is GRPO else REINFORCEConfig)(**kw)


def _params(agent) -> list[torch.Tensor]:
    return [p.detach().clone() for p in agent.policy.trainable_parameters()]


def _gradients(agent, rollout, rewards) -> dict[str, torch.Tensor]:
    """The gradient of ``agent.train`` on this rollout (captured instead of the optimizer step)."""
    grads: dict[str, torch.Tensor] = {}

    def capture() -> float:
        for name, p in agent.policy.named_parameters():
            if p.grad is not None:
                grads[name] = grads.get(name, 0) + p.grad.clone()
        agent.optimizer.zero_grad(set_to_none=True)
        return 0.0

    agent.clip_and_step = capture
    agent.train(rollout, rewards)
    return grads


def test_registered_and_exported():
    assert AGENTS["grpo"] is GRPO and GRPO.config_class is GRPOConfig


@pytest.mark.parametrize("loss_type", ["bnpo", "dapo"])
def test_first_pass_gradient_equals_reinforce_with_group_baseline(gpt2_dir, loss_type):
    """One pass, one minibatch, the KL in the reward, token-mean normalisation: the ratio is 1, nothing is
    clipped, and GRPO's gradient is REINFORCE's with the grpo baseline, on immediate + sequence rewards."""
    env = TextGenEnv(
        lm=str(gpt2_dir), prompts=PROMPTS, reward={crc_reward: 1.0, low_ids: 0.5}, max_new_tokens=6, stop=["e"]
    )
    common = {"batch_size": 8, "group_size": 4, "kl_coef": 0.05, "kl_estimator": "k1"}
    grpo = GRPO(env, config=GRPOConfig(loss_type=loss_type, kl_in="reward", **common), seed=0)
    reinforce = REINFORCE(env, config=REINFORCEConfig(baseline="grpo", **common), seed=0)
    rollout, rewards, _ = grpo.collect()
    assert rollout.lengths.min() < rollout.lengths.max()  # rows of several lengths: the token means matter
    ours, theirs = _gradients(grpo, rollout, rewards), _gradients(reinforce, rollout, rewards)
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-4, msg=name)
    assert any(g.abs().sum() > 0 for g in ours.values())


def test_immediate_rewards_give_per_token_advantages(gpt2_dir):
    env = full_length_env(gpt2_dir, low_ids)
    agent = GRPO(env, config=_config(GRPO, env, kl_coef=0.0), seed=0)
    rollout, rewards, _ = agent.collect()
    r = rewards.double().numpy()
    G = np.flip(np.cumsum(np.flip(r, 1), 1), 1)  # return-to-go, gamma 1 (every row runs the full 6 steps)
    groups = G.reshape(2, 4, -1)
    mean0 = groups[:, :, 0].mean(1, keepdims=True)
    std0 = groups[:, :, 0].std(1, ddof=1, keepdims=True) + 1e-4
    episode = ((groups - mean0[..., None]) / std0[..., None]).reshape(8, -1)
    torch.testing.assert_close(
        agent.advantages(rollout, rewards).double(), torch.from_numpy(episode), rtol=1e-5, atol=1e-5
    )
    assert any(len(set(np.round(row, 6))) > 1 for row in episode)  # they differ along a sequence
    agent.config.token_baseline = "step"
    step = ((groups - groups.mean(1, keepdims=True)) / std0[..., None]).reshape(8, -1)
    torch.testing.assert_close(
        agent.advantages(rollout, rewards).double(), torch.from_numpy(step), rtol=1e-5, atol=1e-5
    )
    agent.config.scale_rewards = "none"  # Dr. GRPO: no division by the std
    step = (groups - groups.mean(1, keepdims=True)).reshape(8, -1)
    torch.testing.assert_close(
        agent.advantages(rollout, rewards).double(), torch.from_numpy(step), rtol=1e-5, atol=1e-5
    )


def test_learns_and_logs(gpt2_dir, tmp_path):
    env = TextGenEnv(lm=str(gpt2_dir), prompts=PROMPTS, reward=crc_reward, max_new_tokens=6)
    config = GRPOConfig(
        batch_size=8, group_size=4, minibatch_size=4, num_iterations=2, epsilon_high=0.28, sample_interval=1
    )
    agent = GRPO(env, config=config, seed=1, tensorboard_log=tmp_path / "runs")
    before = _params(agent)
    stats = []
    agent.learn(1, callback=lambda a, s: stats.append(s))
    assert not all(torch.equal(a, b) for a, b in zip(before, _params(agent), strict=True))
    (s,) = stats
    assert s["losses/steps"] == 4  # 2 passes x 2 minibatches
    assert agent.policy.core.replayed == 1  # the first minibatch replays the rollout record; later ones cannot
    assert s["losses/ratio_min"] <= s["losses/ratio_mean"] <= s["losses/ratio_max"]
    assert 0 <= s["losses/clipfrac_low"] <= 1 and 0 <= s["losses/clipfrac_high"] <= 1
    events = EventAccumulator(str(agent.run_dir), size_guidance={"scalars": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in (
        "rollout/reward_mean",
        "rollout/kl_ref",
        "losses/policy_loss",
        "losses/kl_loss",
        "losses/entropy",
        "losses/approx_kl",
        "losses/clipfrac_low",
        "losses/clipfrac_high",
        "losses/ratio_mean",
        "losses/ratio_max",
        "losses/ratio_min",
        "losses/grad_norm",
    ):
        assert tag in tags, tag


# --- dynamic sampling ------------------------------------------------------------------------------------


def test_tied_groups_helpers():
    assert tied_groups(torch.tensor([0.5, 0.5 + 1e-7, 1.0, 0.0]), 2).tolist() == [True, False]


def test_tied_groups_are_refilled_and_never_trained_on(gpt2_dir):
    """The first rollout's groups all tie: they are dropped, a fresh rollout fills the batch, and the update
    equals one trained on that fresh rollout alone (the tied rollout's tokens still count)."""
    x_env = full_length_env(gpt2_dir, TiedAtFirst(1))
    x = GRPO(x_env, config=_config(GRPO, x_env, dynamic_sampling=True), seed=0)
    stats = []
    x.learn(1, callback=lambda a, s: stats.append(s))

    y_env = full_length_env(gpt2_dir, TiedAtFirst(1))
    y = GRPO(y_env, config=_config(GRPO, y_env), seed=0)
    tied, _, _ = y.collect()  # the rollout x dropped: same prompts and samples
    assert tied_groups(tied.episode_returns, 4).all()
    y.learn(1)
    for a, b in zip(_params(x), _params(y), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    (s,) = stats
    assert s["charts/groups_dropped"] == 0.5 and s["charts/resample_rounds"] == 1
    assert s["charts/effective_batch"] == 8 and s["charts/update_skipped"] == 0
    assert x.num_timesteps == 2 * 8 * 6 and y.num_timesteps == 8 * 6
    assert s["rollout/reward_mean"] == 0.0  # the rollout/ figures are the first (unfiltered) round's


@pytest.mark.parametrize("cls", [GRPO, REINFORCE])
def test_all_tied_up_to_the_cap_skips_the_update(gpt2_dir, cls):
    env = full_length_env(gpt2_dir, TiedAtFirst(10**9))
    extra = {"baseline": "grpo"} if cls is REINFORCE else {}
    agent = cls(env, config=_config(cls, env, dynamic_sampling=True, max_resample=2, **extra), seed=0)
    before = _params(agent)
    stats = []
    agent.learn(1, callback=lambda a, s: stats.append(s))
    for a, b in zip(before, _params(agent), strict=True):
        assert torch.equal(a, b)
    (s,) = stats
    assert s["charts/update_skipped"] == 1 and s["charts/resample_rounds"] == 2
    assert s["charts/groups_dropped"] == 1.0 and s["charts/effective_batch"] == 0
    assert "losses/policy_loss" not in s
    assert agent.num_timesteps == 3 * 8 * 6  # every round's tokens were generated


def prompt_tied(prompts, completions, **_):
    """Ties on the prompts that start with "The" (0 for every sample), else crc_reward."""
    return [0.0 if p.startswith("The") else r for p, r in zip(prompts, crc_reward(completions), strict=True)]


@pytest.mark.parametrize("cls", [GRPO, REINFORCE])
def test_partly_tied_batch_merges_kept_groups_of_several_rounds(gpt2_dir, cls):
    """Round 1 keeps its untied groups; later rounds fill the rest. The merged batch (prompts re-padded)
    scores the same log-probs the samples were drawn with."""
    env = TextGenEnv(lm=str(gpt2_dir), prompts=PROMPTS, reward=prompt_tied, max_new_tokens=5)
    extra = {"baseline": "rloo"} if cls is REINFORCE else {}
    config = _config(cls, env, batch_size=16, group_size=2, dynamic_sampling=True, max_resample=8, **extra)
    agent = cls(env, config=config, seed=3)
    rollout, rewards, kl = agent.collect()
    report = agent.sampling_report
    assert report.rounds >= 1 and 0 < report.groups_dropped < report.groups_seen
    assert report.rows == 16 and rollout.ids.shape[0] == 16 and rewards.shape == kl.shape == rollout.actions.shape
    assert not tied_groups(rollout.episode_returns, 2).any()
    assert all(not rollout.prompts[i].startswith("The") for i in range(16))
    env_rewards = rewards if cls is GRPO else rewards + agent.kl_ctl.coef * kl  # GRPO: the KL is in the loss
    torch.testing.assert_close(env_rewards.sum(1), rollout.episode_returns)
    logits, _ = agent.policy.logits_and_values(rollout.ids, rollout.attention_mask, rollout.prompt_len, False)
    logprobs, _ = agent.logprobs_and_entropy(logits, rollout.actions)
    m = rollout.action_mask
    torch.testing.assert_close(logprobs[m], rollout.logprobs[m], atol=1e-5, rtol=1e-5)
    agent._guarded_train(rollout, rewards, kl)  # trains on the merged batch


def test_concat_rollouts_repads(gpt2_dir):
    env = TextGenEnv(lm=str(gpt2_dir), prompts=PROMPTS, reward=crc_reward, max_new_tokens=5)
    agent = GRPO(env, config=GRPOConfig(batch_size=4, group_size=2, kl_coef=0.0), seed=0)
    a, _, _ = agent.collect()
    b, _, _ = agent.collect()
    merged = concat_rollouts([take_rows(a, np.array([2, 3])), take_rows(b, np.array([0, 1]))], agent.env.pad_id)
    assert merged.prompts == a.prompts[2:] + b.prompts[:2]
    for part, rows, at in ((a, [2, 3], 0), (b, [0, 1], 2)):
        for i, j in enumerate(rows):
            got = merged.ids[at + i][merged.attention_mask[at + i].bool()]
            want = part.ids[j][part.attention_mask[j].bool()]
            assert torch.equal(got, want)
            assert torch.equal(merged.actions[at + i][merged.action_mask[at + i]], part.actions[j][part.action_mask[j]])


# --- overlong handling -------------------------------------------------------------------------------------


def test_overlong_soft_adds_the_penalty_to_the_score(gpt2_dir):
    env = full_length_env(gpt2_dir, crc_reward, max_new_tokens=6)
    config = _config(GRPO, env, overlong="soft", overlong_buffer=4, overlong_penalty=0.5, kl_coef=0.0)
    agent = GRPO(env, config=config, seed=0)
    rollout, rewards, _ = agent.collect()
    # every completion has 6 tokens = L_max: the full penalty, 0.5 * ((6 - 4) - 6) / 4 = -0.5, on its last token
    torch.testing.assert_close(rewards.sum(1), rollout.episode_returns - 0.5)
    torch.testing.assert_close(rewards[:, -1], rollout.rewards[:, -1] - 0.5)
    torch.testing.assert_close(agent.tie_scores(rollout, rewards), rollout.episode_returns - 0.5)


def test_overlong_mask_drops_truncated_completions(gpt2_dir):
    env = TextGenEnv(lm=str(gpt2_dir), prompts=PROMPTS, reward=crc_reward, max_new_tokens=3, stop=["e"])
    agent = GRPO(env, config=GRPOConfig(batch_size=16, group_size=4, overlong="mask"), seed=0)
    rollout, _, _ = agent.collect()
    assert rollout.terminated.any() and not rollout.terminated.all()
    mask = agent.loss_mask(rollout)
    assert mask.any(1).tolist() == rollout.terminated.tolist()
    assert torch.equal(mask[torch.from_numpy(rollout.terminated)], rollout.action_mask[rollout.terminated])
    # every completion truncated: no loss tokens, no step
    env = full_length_env(gpt2_dir, crc_reward)
    agent = GRPO(env, config=_config(GRPO, env, overlong="mask"), seed=0)
    before = _params(agent)
    agent.learn(1)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(agent), strict=True))


# --- persistence, CLI, config ------------------------------------------------------------------------------


def test_resume_continues_with_identical_state(gpt2_dir, tmp_path, resumed_exactly):
    env = TextGenEnv(lm=str(gpt2_dir), prompts=PROMPTS, reward=prompt_tied, max_new_tokens=5)
    config = GRPOConfig(
        batch_size=8, group_size=2, minibatch_size=4, num_iterations=2, dynamic_sampling=True, kl_target=0.5
    )
    a = GRPO(env, config=config, seed=7)
    a.learn(1)
    keys = ("rollout/reward_mean", "losses/policy_loss", "charts/kl_coef", "charts/groups_dropped")
    b = resumed_exactly(a, tmp_path / "mid", env, keys)
    assert b.config == a.config
    assert a.generate(PROMPTS[:2], deterministic=True) == b.generate(PROMPTS[:2], deterministic=True)


def test_cli_train_grpo_and_resume(gpt2_dir, tmp_path, capsys):
    from agents.cli import main

    factory = tmp_path / "my_env.py"
    factory.write_text(
        "from envs import TextGenEnv\n"
        "def make():\n"
        f"    return TextGenEnv(lm={str(gpt2_dir)!r}, prompts=['The king', 'A queen'], reward='keyword_reward',"
        " max_new_tokens=4)\n"
    )
    common = ["--env", f"{factory}:make", "--agent", "grpo", "--batch-size", "4", "--group-size", "2"]
    common += ["--loss-type", "dr_grpo", "--epsilon-high", "0.28", "--importance-sampling-level", "sequence"]
    common += ["--dynamic-sampling", "true", "--max-resample", "1", "--overlong", "soft", "--overlong-buffer", "2"]
    runs = tmp_path / "runs"
    assert main(["train", *common, "--total-timesteps", "20", "--tensorboard-log", str(runs), "--progress", "0"]) == 0
    assert "reward (mean per episode): first iteration" in capsys.readouterr().out
    (run,) = runs.iterdir()
    assert run.name.startswith("my_env__grpo__0__")
    (ckpt,) = (run / "checkpoints").glob("step-*")
    steps = int(ckpt.name.split("-")[1])
    assert main(["train", "--total-timesteps", str(steps + 10), "--resume", str(run), "--progress", "0"]) == 0
    assert "resuming from" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--agent", "grpo", "--loss-type", "nope"])
    assert exit_.value.code == 2 and "argument --loss-type: expected one of" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"group_size": 1}, "group_size must be >= 2"),
        ({"loss_type": "ppo"}, "loss_type must be one of"),
        ({"importance_sampling_level": "word"}, "importance_sampling_level"),
        ({"epsilon": 0.0}, "epsilon must be > 0"),
        ({"minibatch_size": 32}, "minibatch_size must be in"),
        ({"num_iterations": 0}, "num_iterations must be >= 1"),
        ({"kl_in": "value"}, "kl_in must be"),
        ({"overlong": "cut"}, "overlong must be"),
        ({"max_resample": -1}, "max_resample must be >= 0"),
    ],
)
def test_bad_config_values(bad, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**({"batch_size": 8} | bad)).validate()


def test_reinforce_dynamic_sampling_needs_a_group_baseline():
    with pytest.raises(ValueError, match="needs a group baseline"):
        REINFORCEConfig(baseline="moving_average", dynamic_sampling=True).validate()


# --- data parallel -----------------------------------------------------------------------------------------

WORKER = Path(__file__).resolve().parent / "grpo_distributed_worker.py"


def _launch(args: list[str], world: int = 2, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """``world`` processes of ``python args...`` with the variables torchrun sets (gloo on CPU)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    root = str(WORKER.parent.parent)
    base |= {
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([root, base.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, *args],
            env=base
            | {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world)}
            | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def test_two_processes_update_as_one_on_the_combined_batch_and_agree_on_dynamic_sampling(gpt2_dir, tmp_path):
    """Data parallel (2 processes, gloo): each loss type's update (its steps' all-reduced gradients) equals one
    process's on the combined batch; with dynamic sampling the processes agree on the rounds and stay identical."""
    for rank, r in enumerate(_launch([str(WORKER), str(gpt2_dir), str(tmp_path)])):
        assert r.returncode == 0, f"rank {rank}:\n{r.stderr[-3000:]}"
    spec = importlib.util.spec_from_file_location("grpo_distributed_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    for kind in worker.KINDS:
        agent = worker.make(kind, str(gpt2_dir))
        assert agent.runtime.world_size == 1
        parts = [load_file(tmp_path / f"{kind}-rollout-{r}.safetensors") for r in (0, 1)]
        rollouts = [
            Rollout(
                **{
                    k: p[k]
                    for k in ("ids", "attention_mask", "actions", "logprobs", "values", "rewards", "action_mask")
                },
                prompt_len=int(p["prompt_len"]),
                prompt_index=np.zeros(4, dtype=np.int64),
                prompts=[""] * 4,
                completions=[""] * 4,
                components={},
                terminated=np.zeros(4, dtype=bool),
            )
            for p in parts
        ]
        rollout = concat_rollouts(rollouts, agent.env.pad_id)
        T = rollout.actions.shape[1]
        penalised, kl, ref = (
            torch.cat([pad_steps(p[k], T) for p in parts]) for k in ("penalised", "kl", "ref_logprobs")
        )
        agent.round_extras = {"ref_logprobs": ref}
        grads: dict[str, torch.Tensor] = {}
        step = agent.optimizer.step

        def capturing(*args, agent=agent, step=step, grads=grads, **kwargs):
            i = len(grads) // len(agent.policy.trainable_parameters())
            for name, p in agent.policy.named_parameters():
                if p.requires_grad:
                    grads[f"step{i}.{name}"] = (torch.zeros_like(p) if p.grad is None else p.grad).clone()
            return step(*args, **kwargs)

        agent.optimizer.step = capturing
        agent._guarded_train(rollout, penalised, kl)
        theirs = load_file(tmp_path / f"{kind}-grads-0.safetensors")
        assert theirs.keys() == grads.keys()
        assert len({k.split(".")[0] for k in grads}) == agent.config.num_iterations
        largest = max(float(g.abs().max()) for g in grads.values())
        assert largest > 1e-3
        for name, g in grads.items():
            torch.testing.assert_close(theirs[name], g, rtol=0, atol=1e-5 * largest, msg=f"{kind} {name}")
    final = [load_file(tmp_path / f"dynamic-final-{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    summaries = [json.loads((tmp_path / f"dynamic-{r}.json").read_text()) for r in (0, 1)]
    assert summaries[0] == summaries[1] and summaries[0]["iterations"] >= 3
    assert 0 < summaries[0]["last"]["charts/groups_dropped"] < 1


def test_grpo_learning_benchmark_prints_a_row_per_agent(gpt2_dir, tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "grpo_learning.py"
    spec = importlib.util.spec_from_file_location("grpo_learning", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["grpo_learning"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    argv = ["--tasks", "QuestionMark", "--agents", "reinforce", "grpo-dynamic", "--budget", "40"]
    argv += ["--eval-episodes", "4", "--batch-size", "8", "--lm", str(gpt2_dir), "--runs", str(tmp_path)]
    results = module.main(argv)
    out = capsys.readouterr().out
    assert [r["agent"] for r in results] == ["reinforce", "grpo-dynamic"]
    assert all(r["tokens"] >= 40 for r in results) and results[1]["groups_dropped"] is not None
    assert "| QuestionMark | grpo-dynamic |" in out and "| QuestionMark | reinforce |" in out
