"""REINFORCE and PPO on tiny random models: updates, learning, save/load, exact resume, logging, errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import GPT2Config, GPT2LMHeadModel

from agents import PPO, REINFORCE, PPOConfig, REINFORCEConfig
from envs import TextGenEnv, TextGenVectorEnv
from textrl.checkpoint import CheckpointError
from textrl.rewards import immediate, keyword_reward

PROMPTS = ["The old king", "The young queen", "The brave knight", "The quiet river"]


@pytest.fixture
def env(gpt2_dir):
    return TextGenEnv(lm=str(gpt2_dir), prompts=PROMPTS, reward=keyword_reward(include=["the"]), max_new_tokens=8)


def _small(cls, **kw):
    kw = {"learning_rate": 1e-3} | kw
    if cls is PPO:
        return PPOConfig(batch_size=8, minibatch_size=4, n_epochs=2, **kw)
    return REINFORCEConfig(batch_size=8, group_size=4, **kw)


def _params(agent) -> list[torch.Tensor]:
    return [p.detach().clone() for p in agent.policy.trainable_parameters()]


@pytest.mark.parametrize("cls", [REINFORCE, PPO])
def test_parameters_change_after_one_update(cls, env):
    agent = cls(env, config=_small(cls), seed=0)
    before = _params(agent)
    ref_before = [p.detach().clone() for p in agent.policy.ref_model.parameters()]
    agent.learn(1)  # one iteration
    assert agent.iteration == 1 and agent.num_timesteps > 0
    after = _params(agent)
    changed = [not torch.equal(a, b) for a, b in zip(before, after, strict=True)]
    assert sum(changed) >= len(changed) // 2, "most trainable tensors should move after one update"
    assert all(torch.equal(a, b) for a, b in zip(ref_before, agent.policy.ref_model.parameters(), strict=True))


@pytest.mark.parametrize("cls", [REINFORCE, PPO])
def test_agent_learns_a_token_level_task(cls, gpt2_dir):
    """A per-token reward for the 30 lowest token ids (~10% of the vocabulary): the reward must rise."""

    @immediate
    def low_ids(new_token_ids):
        return (new_token_ids < 30).astype(float)

    env = TextGenEnv(lm=str(gpt2_dir), prompts=PROMPTS, reward=low_ids, max_new_tokens=6)
    agent = cls(env, config=_small(cls, kl_coef=0.0, learning_rate=3e-3), seed=0)
    history = []
    agent.learn(2500, callback=lambda a, s: history.append(s["rollout/reward_mean"]))
    start, end = np.mean(history[:3]), np.mean(history[-3:])
    assert end > start + 1.5, f"reward did not rise: {start:.2f} -> {end:.2f} (max 6)"


@pytest.mark.parametrize("cls", [REINFORCE, PPO])
def test_save_load_gives_identical_predictions(cls, env, tmp_path):
    agent = cls(env, config=_small(cls, suppress_tokens=[1]), seed=0)
    agent.learn(1)
    agent.save(tmp_path / "agent")
    loaded = cls.load(tmp_path / "agent", env=env)
    obs, _ = env.reset(seed=3)
    for deterministic in (True,):
        a, _ = agent.predict(obs, deterministic=deterministic)
        b, _ = loaded.predict(obs, deterministic=deterministic)
        assert a == b
    ids, mask = obs["input_ids"][None], obs["attention_mask"][None]
    from textrl.rollout import left_pad

    li, lm = left_pad(ids, mask, agent.tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(agent.policy.core.forward(li, lm)[0], loaded.policy.core.forward(li, lm)[0])
    assert loaded.num_timesteps == agent.num_timesteps and loaded.iteration == agent.iteration
    assert loaded.sampling == agent.sampling and loaded.sampling.suppress_tokens == [1]
    assert agent.generate(PROMPTS[:2], deterministic=True) == loaded.generate(PROMPTS[:2], deterministic=True)


@pytest.mark.parametrize("cls", [REINFORCE, PPO])
def test_resume_continues_with_identical_state(cls, env, tmp_path, resumed_exactly):
    cfg = _small(cls, kl_target=0.5)  # adaptive KL: its state must survive too
    a = cls(env, config=cfg, seed=7)
    a.learn(1)
    keys = ("rollout/reward_mean", "rollout/kl_ref", "losses/policy_loss", "charts/kl_coef")
    b = resumed_exactly(a, tmp_path / "mid", env, keys)
    assert a.kl_ctl.coef == b.kl_ctl.coef


def test_tensorboard_logs_and_checkpoints(env, tmp_path):
    agent = PPO(env, config=_small(PPO, sample_interval=1), seed=1, tensorboard_log=tmp_path / "runs")
    agent.learn(1)
    run = agent.run_dir
    assert run.parent == tmp_path / "runs" and run.name.startswith("TextGen__ppo__1__")
    assert (run / "config.json").is_file()
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in (
        "rollout/reward_mean",
        "rollout/reward_std",
        "rollout/reward/keyword_reward",
        "rollout/episode_length",
        "rollout/kl_ref",
        "losses/policy_loss",
        "losses/value_loss",
        "losses/entropy",
        "losses/approx_kl",
        "losses/clipfrac",
        "losses/explained_variance",
        "charts/kl_coef",
        "charts/tokens_per_second",
    ):
        assert tag in tags, tag
    assert "rollout/rewards" in events.Tags()["histograms"]
    assert any(t.startswith("samples") for t in events.Tags()["tensors"])
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "manifest.json").is_file()


def test_an_agent_on_a_cpu_tunes_the_allocator(env, monkeypatch):
    """Every iteration's large tensors reuse the last one's pages (see textrl.allocator): set by the agent."""
    from textrl import allocator

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_blocks", lambda: calls.append(1) or True)
    REINFORCE(env, config=_small(REINFORCE), seed=0)
    assert calls == [1]


def test_corrupt_checkpoint_is_a_clear_error(env, tmp_path):
    agent = REINFORCE(env, config=_small(REINFORCE), seed=0)
    path = agent.save(tmp_path / "agent")
    weights = path / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncate
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        REINFORCE.load(path, env=env)
    with pytest.raises(CheckpointError, match="holds a 'reinforce' agent"):
        agent.save(tmp_path / "ok")
        PPO.load(tmp_path / "ok", env=env)


def test_vocab_mismatch_is_a_clear_error(env, tmp_path):
    small = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=64, n_embd=16, n_layer=1, n_head=2))
    small.save_pretrained(tmp_path / "small")
    env.tokenizer.save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="50 output tokens but the env's action space has 300"):
        PPO(env, lm=tmp_path / "small", config=_small(PPO))


@pytest.mark.parametrize(
    ("cls", "bad", "message"),
    [
        (PPO, {"learning_rate": -1.0}, "learning_rate must be > 0"),
        (PPO, {"clip_range": 0.0}, "clip_range must be > 0"),
        (PPO, {"minibatch_size": 32}, "minibatch_size must be in"),
        (PPO, {"gamma": 1.5}, "gamma must be in"),
        (REINFORCE, {"baseline": "rloo", "group_size": 1}, "needs group_size >= 2"),
        (REINFORCE, {"group_size": 3}, "multiple of group_size"),
        (REINFORCE, {"top_p": 0.0}, "top_p must be in"),
        (REINFORCE, {"suppress_tokens": [-1]}, "suppress_tokens must be ids >= 0"),
        (PPO, {"suppress_tokens": [10**6]}, "suppress_tokens: token id 1000000 is outside"),
    ],
)
def test_bad_config_values(cls, bad, message, env):
    base = {"batch_size": 8}
    config_cls = PPOConfig if cls is PPO else REINFORCEConfig
    with pytest.raises(ValueError, match=message):
        cls(env, config=config_cls(**(base | bad)))


def test_vector_env_sets_the_batch_and_unknown_env_id_errors(gpt2_dir):
    venv = TextGenVectorEnv(num_envs=4, lm=str(gpt2_dir), prompts=PROMPTS, reward="keyword_reward", max_new_tokens=4)
    agent = REINFORCE(venv, config=REINFORCEConfig(batch_size=16, group_size=2), seed=0)
    assert agent.config.batch_size == 4
    with pytest.raises(ValueError, match="cannot make a textrl vector env"):
        PPO("textrl/NoSuchEnv-v0")


def test_llama_policy_through_the_generic_core(llama_dir):
    env = TextGenEnv(lm=str(llama_dir), prompts=PROMPTS, reward="keyword_reward", max_new_tokens=4)
    agent = PPO(env, config=_small(PPO), seed=0)
    agent.learn(1)
    assert agent.iteration == 1
    assert len(agent.generate(["The old king"], max_new_tokens=3)) == 1


def test_predict_single_and_batched(env):
    agent = PPO(env, config=_small(PPO), seed=0)
    obs, _ = env.reset(seed=0)
    action, state = agent.predict(obs)
    assert state is None and 0 <= int(action) < env.action_space.n
    batch = {k: np.stack([v, v]) for k, v in obs.items()}
    actions, _ = agent.predict(batch, deterministic=True)
    assert actions.shape == (2,) and actions[0] == actions[1]


def test_cli_train_writes_logs_and_resumes(gpt2_dir, tmp_path, capsys):
    from agents.cli import main

    factory = tmp_path / "my_env.py"
    factory.write_text(
        "from envs import TextGenEnv\n"
        "def make():\n"
        f"    return TextGenEnv(lm={str(gpt2_dir)!r}, prompts=['The king'], reward='keyword_reward',"
        " max_new_tokens=4)\n"
    )
    common = ["--env", f"{factory}:make", "--agent", "reinforce", "--batch-size", "4", "--group-size", "2"]
    common += ["--suppress-tokens", "0", "1"]  # a list flag: parsed, saved with the run, restored on resume
    runs = tmp_path / "runs"
    assert main(["train", *common, "--total-timesteps", "20", "--tensorboard-log", str(runs), "--progress", "0"]) == 0
    out = capsys.readouterr().out
    assert "reward (mean per episode): first iteration" in out
    (run,) = runs.iterdir()
    assert run.name.startswith("my_env__reinforce__0__")
    (ckpt,) = (run / "checkpoints").glob("step-*")
    steps = int(ckpt.name.split("-")[1])
    assert steps >= 20
    resume = common[:-3]  # without --suppress-tokens: the checkpoint's config is restored
    assert main(["train", *resume, "--total-timesteps", str(steps + 10), "--resume", str(run), "--progress", "0"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["suppress_tokens"] == [0, 1]
    assert max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*")) > steps
    # bad input: a clear error and exit code 2
    assert main(["train", "--env", "textrl/Nope-v0", "--agent", "ppo"]) == 2
    assert "unknown env 'textrl/Nope-v0'" in capsys.readouterr().err


def test_agent_checkpoint_has_no_pickles(env, tmp_path):
    path = REINFORCE(env, config=_small(REINFORCE), seed=0).save(tmp_path / "a")
    suffixes = {p.suffix for p in Path(path).rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json", ".jinja", ""}, suffixes


@pytest.mark.parametrize("cls", [REINFORCE, PPO])
def test_update_replays_the_rollout_only_while_the_weights_are_unchanged(cls, env):
    """The first (on-policy) forward of each update replays the rollout's record; later minibatches cannot.

    PPO here takes 2 epochs x 2 minibatches per iteration: only the first of the four sees the weights the
    rollout was sampled with (the fused Adam step must mark the record stale). The result equals training
    without replay up to float rounding.
    """
    runs = {}
    for replay in (True, False):
        agent = cls(env, config=_small(cls), seed=0)
        agent.policy.replay = replay
        for _ in range(3):
            agent.learn(1, reset_num_timesteps=False)  # one iteration each
        runs[replay] = agent
    assert runs[True].iteration == 3
    assert runs[True].policy.core.replayed == 3 and runs[False].policy.core.replayed == 0
    for a, b in zip(_params(runs[True]), _params(runs[False]), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("cls", [REINFORCE, PPO])
def test_suppressed_eos_gives_full_length_completions_and_a_consistent_distribution(cls, gpt2_dir):
    """With eos suppressed every episode runs to max_new_tokens, no sampled or generated token is eos, and the
    update's first forward sees the very distribution the rollout sampled from (ratio 1, approx KL 0)."""
    env = TextGenEnv(lm=str(gpt2_dir), prompts=PROMPTS, reward="keyword_reward", max_new_tokens=6, stop=None)
    eos = env.engine.tokenizer.eos_token_id
    agent = cls(env, config=_small(cls, suppress_tokens=[eos]), seed=0)
    # make eos the most likely token by far: without suppression most episodes would end at once
    with torch.no_grad():
        agent.policy.model.lm_head.weight[eos] = agent.policy.model.transformer.wte.weight.mean(0) * 0 + 5.0
        agent.policy.model.transformer.ln_f.bias.fill_(1.0)
    torch.autograd.graph.increment_version(list(agent.policy.model.parameters()))
    rollout, _, kl = agent.collect()
    assert rollout.action_mask.all() and (rollout.actions != eos).all()
    assert torch.isfinite(kl).all()
    logits, _ = agent.policy.logits_and_values(
        rollout.ids, rollout.attention_mask, rollout.prompt_len, need_values=False
    )
    logprobs, _ = agent.logprobs_and_entropy(logits, rollout.actions)
    torch.testing.assert_close(logprobs, rollout.logprobs, atol=1e-5, rtol=1e-5)
    unsuppressed = torch.log_softmax(logits.float(), -1).gather(-1, rollout.actions[..., None]).squeeze(-1)
    assert (unsuppressed < logprobs - 1).all()  # eos held most of the mass: removing it matters
    assert all(agent.generate(PROMPTS, max_new_tokens=6))  # unsuppressed, eos first would leave them empty
    assert all(agent.generate(PROMPTS, max_new_tokens=6, deterministic=True))  # greedy skips eos too
    obs, _ = env.reset(seed=0)
    assert agent.predict(obs, deterministic=True)[0] != eos
    agent.sampling = dataclasses.replace(agent.sampling, suppress_tokens=())
    assert not any(agent.generate(PROMPTS, max_new_tokens=6))
    agent.learn(1, reset_num_timesteps=False)
    assert agent.iteration == 1


@pytest.mark.parametrize("limit", [1e-3, 1e6, 0.0])
def test_clip_and_step_clips_as_torch_does(env, limit):
    """The step gets the gradients ``clip_grads_with_norm_`` leaves, bit for bit: scaled when the norm is over
    ``max_grad_norm``, untouched within it (the multiply by a clamped 1 is skipped) or with 0 (no clipping);
    the pre-clip norm is returned and the gradients are cleared."""
    agent = REINFORCE(env, config=_small(REINFORCE, max_grad_norm=limit), seed=0)
    params = list(agent.policy.trainable_parameters())
    gen = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    original = [p.grad.clone() for p in params]
    holders = [torch.zeros_like(g, requires_grad=True) for g in original]  # torch's clip reads .grad
    for h, g in zip(holders, original, strict=True):
        h.grad = g.clone()
    norm = torch.nn.utils.get_total_norm([h.grad for h in holders])
    torch.nn.utils.clip_grads_with_norm_(holders, limit or float("inf"), norm)
    expected = [h.grad for h in holders]
    stepped = []
    agent.optimizer.step = lambda: stepped.append([p.grad.clone() for p in params])
    assert agent.clip_and_step() == pytest.approx(float(norm))
    assert len(stepped) == 1 and all(p.grad is None for p in params)
    assert all(torch.equal(a, b) for a, b in zip(stepped[0], expected, strict=True))
    clipped = limit == 1e-3
    assert all(torch.equal(a, b) for a, b in zip(stepped[0], original, strict=True)) is not clipped
