"""The env protocol (:class:`textrl.protocol.TextVectorEnv`): agents train through it and nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents import REINFORCE, REINFORCEConfig
from envs import TextGenEnv, TextGenVectorEnv
from textrl.evaluation import evaluate_agent
from textrl.protocol import TextVectorEnv
from textrl.rewards import keyword_reward

PROMPTS = ["The old king", "The young queen", "The brave knight", "The quiet river"]


class Delegating:
    """An env that implements the protocol by delegation alone: it is not a TextGenVectorEnv and has none
    of its internals (no ``engine``), so an agent that reached past the protocol would fail on it."""

    def __init__(self, num_envs: int = 4, **kwargs):
        self._inner = TextGenVectorEnv(num_envs=num_envs, **kwargs)
        self.num_envs = num_envs
        self.single_action_space = self._inner.single_action_space
        self.tokenizer = self._inner.tokenizer
        self.init_kwargs = dict(self._inner.init_kwargs)

    prompts = property(lambda self: self._inner.prompts)
    max_new_tokens = property(lambda self: self._inner.max_new_tokens)
    stop = property(lambda self: self._inner.stop)
    pad_id = property(lambda self: self._inner.pad_id)
    reward_names = property(lambda self: self._inner.reward_names)

    def prompt_text(self, row: int) -> str:
        return self._inner.prompt_text(row)

    def reset(self, *, seed=None, options=None):
        return self._inner.reset(seed=seed, options=options)

    def step(self, actions):
        return self._inner.step(actions)


def _kwargs(gpt2_dir) -> dict:
    return {"lm": str(gpt2_dir), "prompts": PROMPTS, "reward": keyword_reward(include=["the"]), "max_new_tokens": 6}


def test_the_envs_implement_the_protocol(gpt2_dir):
    assert isinstance(TextGenVectorEnv(num_envs=2, **_kwargs(gpt2_dir)), TextVectorEnv)
    assert isinstance(Delegating(2, **_kwargs(gpt2_dir)), TextVectorEnv)
    assert not isinstance(TextGenEnv(**_kwargs(gpt2_dir)), TextVectorEnv)  # a single env is made a vector one
    env = TextGenVectorEnv(num_envs=2, **_kwargs(gpt2_dir))
    env.reset(options={"prompt_index": np.array([3, 1])})
    assert env.prompts == PROMPTS and [env.prompt_text(0), env.prompt_text(1)] == [PROMPTS[3], PROMPTS[1]]
    assert env.reward_names == ("keyword_reward",) and env.max_new_tokens == 6 and env.stop == ()
    assert env.pad_id == env.tokenizer.pad_token_id


def test_an_env_with_only_the_protocol_trains_exactly_like_the_env_it_wraps(gpt2_dir):
    config = REINFORCEConfig(batch_size=4, group_size=2, learning_rate=1e-3)
    runs = []
    for env in (TextGenVectorEnv(num_envs=4, **_kwargs(gpt2_dir)), Delegating(4, **_kwargs(gpt2_dir))):
        agent = REINFORCE(env, config=config, seed=0)
        agent.learn(3 * 4 * 6)
        params = torch.cat([p.detach().flatten() for p in agent.policy.model.parameters()])
        evaluation = evaluate_agent(agent, episodes=4)
        runs.append((params, evaluation.samples, agent.generate(["The old"], max_new_tokens=4, seed=1)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1:] == runs[1][1:]


def test_an_agent_takes_a_model_object_and_a_runtime(gpt2_dir):
    """A ready ``PreTrainedModel`` is trained in place (no copy loaded from disk); the default runtime is one
    process on the config's device, whose reductions return their input. (An entropy bonus gives the step a
    gradient whatever the rewards: six tokens from the random model seldom say "the", and with equal rewards in
    every group the KL term's float rounding alone decided whether the weights moved.)"""
    from textrl.lm import load_lm
    from textrl.runtime import Runtime

    model, _ = load_lm(gpt2_dir)
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    config = REINFORCEConfig(batch_size=4, group_size=2, ent_coef=0.01)
    agent = REINFORCE(Delegating(4, **_kwargs(gpt2_dir)), lm=model, config=config, seed=0)
    assert agent.policy.model is model and agent.lm == str(gpt2_dir)
    assert agent.runtime == Runtime.local("cpu") and agent.runtime.is_main and agent.runtime.world_size == 1
    agent.learn(4 * 6)
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, before)
    x = torch.arange(3.0)
    assert agent.runtime.all_reduce(x, "mean") is x and agent.runtime.reduce_float(2.5) == 2.5
    with pytest.raises(ValueError, match="unknown reduction"):
        agent.runtime.all_reduce(x, "prod")
    with pytest.raises(RuntimeError, match="torchrun"):
        Runtime(torch.device("cpu"), rank=0, world_size=2).all_reduce(x)
