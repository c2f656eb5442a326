"""Rollout storage: what the KV-cached rollout records agrees with a full forward and with the env."""

from __future__ import annotations

import pytest
import torch

from agents import PPO, PPOConfig
from envs import TextGenEnv
from textrl.rewards import keyword_reward


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.7, "top_k": 20, "top_p": 0.9}])
@pytest.mark.parametrize("lm", ["gpt2_dir", "llama_dir"])
def test_rollout_logprobs_values_and_rewards_are_consistent(request, lm, sampling):
    env = TextGenEnv(
        lm=str(request.getfixturevalue(lm)),
        prompts=["The king", "The old queen sees"],
        reward=keyword_reward(include=["the"]),
        max_new_tokens=10,
        stop=["."],  # some episodes end early, so rows have different lengths
    )
    agent = PPO(env, config=PPOConfig(batch_size=8, minibatch_size=8, **sampling), seed=3)
    rollout, rewards, kl = agent.collect()
    valid = rollout.action_mask
    # single-turn: every token the episode appended is an action, so the two masks coincide after the prompt
    assert valid.dtype == torch.bool and torch.equal(valid, rollout.attention_mask[:, rollout.prompt_len :].bool())

    # the update's full forward reproduces the rollout's cached log-probs and values: PPO's first ratio is 1
    with torch.no_grad():
        logits, values = agent.policy.logits_and_values(rollout.ids, rollout.attention_mask, rollout.prompt_len)
        logprobs, _ = agent.logprobs_and_entropy(logits, rollout.actions)
    torch.testing.assert_close(logprobs[valid], rollout.logprobs[valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values[valid], rollout.values[valid], atol=1e-5, rtol=1e-4)

    tok = agent.tokenizer
    for i in range(8):
        n = int(valid[i].sum())
        assert valid[i, :n].all() and not valid[i, n:].any()  # one contiguous episode per row
        taken = rollout.actions[i, :n].tolist()
        assert rollout.completions[i] == tok.decode(taken, skip_special_tokens=True)
        assert (rollout.actions[i, n:] == tok.pad_token_id).all()
        assert rollout.attention_mask[i, rollout.prompt_len :].sum() == n
        expected = keyword_reward(include=["the"])(completions=[rollout.completions[i]])[0]
        assert rollout.episode_returns[i].item() == pytest.approx(expected)  # paid once, at the last step
        assert rollout.rewards[i, n - 1].item() == pytest.approx(expected)
        assert rollout.components["keyword_reward"][i] == pytest.approx(expected)
        ended_by_stop = "." in rollout.completions[i]
        assert rollout.terminated[i] == (ended_by_stop or tok.eos_token_id in taken)
    assert (kl[~valid] == 0).all() and torch.isfinite(kl).all()
    torch.testing.assert_close(rewards, rollout.rewards - agent.kl_ctl.coef * kl)


def test_one_decode_loop_serves_rollouts_generate_and_textrl_generate(monkeypatch, llama_dir):
    """``agent.generate``, training rollouts and ``textrl.generate`` all run :func:`textrl.generation.decode`
    (the latter on the engine), and the loop closes its session even when the step function raises."""
    import textrl.generation
    import textrl.rollout
    from textrl.lm import generate, load_lm

    calls = []
    real = textrl.generation.decode

    def counting(source, *args, **kwargs):
        calls.append((type(source).__name__, args[2]))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(textrl.generation, "decode", counting)
    monkeypatch.setattr(textrl.rollout, "decode", counting)
    env = TextGenEnv(lm=str(llama_dir), prompts=["The king"], reward=keyword_reward(include=["the"]), max_new_tokens=5)
    agent = PPO(env, config=PPOConfig(batch_size=4, minibatch_size=4), seed=0)
    agent.generate(["the cat"], max_new_tokens=3)
    assert calls == [("ActorCritic", 3)]
    agent.learn(4 * 5)
    assert calls[1:] == [("ActorCritic", 5)]  # the training rollout: the same loop
    model, tokenizer = load_lm(llama_dir)
    generate(model, tokenizer, ["the cat"], max_new_tokens=2, seed=0)
    assert calls[2:] == [("Engine", 2)]
    policy = agent.policy
    ids = torch.zeros(2, 3, dtype=torch.long)

    def boom(t, session):
        raise ValueError("reward exploded")

    with pytest.raises(ValueError, match="exploded"):
        real(policy, ids, torch.ones_like(ids), 4, boom)
    assert policy.core._cache is None or not policy.core._cache.in_use


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.7, "suppress_tokens": [0, 5]}, {"top_k": 20}])
def test_the_one_call_sampler_draws_what_the_python_step_draws(monkeypatch, llama_dir, sampling):
    """Plain sampling (no top-k or top-p, not greedy) on a float32 CPU takes textrl.kernels.sample_into: the same
    tokens, log-probabilities and completions bit for bit as the Python-level step from the same seed (the same
    draws from the generator), with suppressed tokens and a temperature too; top-k stays in Python."""
    from textrl import kernels

    env = TextGenEnv(
        lm=str(llama_dir),
        prompts=["The king", "The old queen sees"],
        reward=keyword_reward(include=["the"]),
        max_new_tokens=10,
        stop=["."],
    )
    calls, wants = [], kernels.wants_sampler
    monkeypatch.setattr(kernels, "wants_sampler", lambda logits: calls.append(1) or wants(logits))
    taken = PPO(env, config=PPOConfig(batch_size=8, minibatch_size=8, **sampling), seed=3).collect()[0]
    assert bool(calls) == ("top_k" not in sampling)  # asked only for plain sampling (and then it applies)
    assert kernels.load() and wants(torch.zeros(2, 3))
    monkeypatch.setattr(kernels, "wants_sampler", lambda logits: False)
    python = PPO(env, config=PPOConfig(batch_size=8, minibatch_size=8, **sampling), seed=3).collect()[0]
    for field in ("ids", "actions", "logprobs", "action_mask"):
        assert torch.equal(getattr(taken, field), getattr(python, field)), field
    assert taken.completions == python.completions
