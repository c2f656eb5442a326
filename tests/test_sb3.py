"""Stock stable-baselines3 on the token env through agents.sb3: training, logging, save/load, callbacks, cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback, EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, VecVideoRecorder
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import GPT2Config, GPT2LMHeadModel

from agents.sb3 import SampleLoggingCallback, TransformerActorCriticPolicy
from envs import TextGenEnv
from envs.render import BACKGROUND, FRAME_HEIGHT, FRAME_WIDTH
from textrl.engine import Engine
from textrl.lm import load_lm
from textrl.prefix_cache import PrefixCache, last_hidden, longest_extension
from textrl.rewards import immediate, keyword_reward

PROMPTS = ["The old king", "The young queen sees", "The brave knight", "A river"]


@immediate
def low_ids(new_token_ids):
    """A dense reward (about a third of the tokens), so every update has a non-zero gradient."""
    return (new_token_ids < 100).astype(float)


def _venv(lm, n_envs: int = 2, env: str | type = TextGenEnv, **kwargs):
    """SB3's ``make_vec_env`` of the env class, or of a registered id (which SB3 makes with render_mode="rgb_array")."""
    env_kwargs = {"lm": str(lm), "prompts": PROMPTS, "reward": low_ids, "max_new_tokens": 4} | kwargs
    return make_vec_env(env, n_envs=n_envs, seed=0, env_kwargs=env_kwargs)


def _ppo(lm, venv=None, **kwargs):
    kwargs = {"n_steps": 8, "batch_size": 8, "n_epochs": 2, "learning_rate": 1e-3, "seed": 0, "verbose": 0} | kwargs
    return PPO(TransformerActorCriticPolicy, venv or _venv(lm), policy_kwargs={"lm": str(lm)}, **kwargs)


def test_ppo_trains_the_lm_and_value_head_and_logs(gpt2_dir, tmp_path):
    model = _ppo(gpt2_dir, tensorboard_log=str(tmp_path))
    policy = model.policy
    lm = policy.features_extractor.model
    assert policy.action_net.head is lm.get_output_embeddings()  # the actor is the LM's own head...
    assert lm.lm_head.weight is lm.transformer.wte.weight  # ...with its tied weights
    assert not lm.training
    lm_before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    value_before = policy.value_net.weight.detach().clone()

    model.learn(3 * 16, tb_log_name="ppo")  # three rollouts of 2 envs x 8 steps

    changed = [n for n, p in lm.named_parameters() if not torch.equal(p, lm_before[n])]
    assert len(changed) == len(lm_before), f"unchanged: {set(lm_before) - set(changed)}"
    assert not torch.equal(policy.value_net.weight, value_before)
    assert lm.lm_head.weight is lm.transformer.wte.weight and not lm.training  # still tied, still no dropout
    assert policy.cache_stats["extended"] > policy.cache_stats["recomputed"] > 0

    (run,) = tmp_path.glob("ppo_*")
    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/policy_gradient_loss", "train/value_loss", "train/approx_kl", "rollout/ep_rew_mean"}
    assert expected <= tags, tags
    assert len(events.Scalars("train/policy_gradient_loss")) >= 2


def test_ppo_trains_on_make_vec_env_of_the_registered_id(gpt2_dir):
    venv = _venv(gpt2_dir, env="textrl/TextGen-v0")
    assert venv.render_mode == "rgb_array"
    venv.reset()
    assert all(frame.shape == (FRAME_HEIGHT, FRAME_WIDTH, 3) for frame in venv.get_images())
    model = _ppo(gpt2_dir, venv=venv)
    lm = model.policy.features_extractor.model
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    model.learn(2 * 16)
    assert model.num_timesteps == 2 * 16
    changed = [n for n, p in lm.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before), f"unchanged: {set(before) - set(changed)}"


def test_a2c_learns_on_a_llama_with_the_prefix_cache(llama_dir):
    model = A2C(TransformerActorCriticPolicy, _venv(llama_dir), policy_kwargs={"lm": str(llama_dir)}, n_steps=4, seed=0)
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(2 * 8)
    assert model.policy.features_extractor.cache.stats["extended"] > 0  # the engine runs Llama: one token a step
    assert all(not torch.equal(a, b) for a, b in zip(before, model.policy.parameters(), strict=True))


def test_a_model_the_engine_does_not_run_trains_without_the_cache(tokenizer, tmp_path):
    folder = tmp_path / "gpt2-inverse-layer-scaling"  # an attention variant the engine does not run
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    shape = {"vocab_size": len(tokenizer), "n_positions": 64, "n_embd": 16, "n_layer": 1, "n_head": 2}
    GPT2LMHeadModel(GPT2Config(**shape, **ids, scale_attn_by_inverse_layer_idx=True)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = A2C(TransformerActorCriticPolicy, _venv(folder), policy_kwargs={"lm": str(folder)}, n_steps=4, seed=0)
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(2 * 8)
    assert model.policy.features_extractor.cache is None  # the full HF forward at every step
    assert all(not torch.equal(a, b) for a, b in zip(before, model.policy.parameters(), strict=True))


@pytest.mark.parametrize("arch", ["gpt2_dir", "llama_dir"])
def test_action_logits_are_the_lm_next_token_logits(request, arch):
    lm = request.getfixturevalue(arch)
    model = _ppo(lm)
    obs = model.env.reset()
    with torch.no_grad():
        dist = model.policy.get_distribution(model.policy.obs_to_tensor(obs)[0])
        hf, _ = load_lm(lm)
        for row in range(len(obs["input_ids"])):
            ids = obs["input_ids"][row, obs["attention_mask"][row].astype(bool)]
            expected = hf(torch.as_tensor(ids)[None]).logits[0, -1].log_softmax(-1)
            torch.testing.assert_close(dist.distribution.logits[row], expected, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_predicts_the_same(gpt2_dir, tmp_path):
    model = _ppo(gpt2_dir)
    model.learn(16)
    obs = model.env.reset()
    actions, _ = model.predict(obs, deterministic=True)
    model.save(tmp_path / "model.zip")
    loaded = PPO.load(tmp_path / "model.zip", env=_venv(gpt2_dir))
    again, _ = loaded.predict(obs, deterministic=True)
    np.testing.assert_array_equal(actions, again)
    for (name, a), b in zip(model.policy.state_dict().items(), loaded.policy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    lm = loaded.policy.features_extractor.model
    assert loaded.policy.action_net.head.weight is lm.transformer.wte.weight


def test_checkpoint_eval_video_and_sample_callbacks(gpt2_dir, tmp_path):
    """SB3's own callbacks and video recorder on ``make_vec_env`` of the registered id, plus ours."""
    from moviepy import VideoFileClip

    model = _ppo(gpt2_dir, venv=_venv(gpt2_dir, env="textrl/TextGen-v0"), tensorboard_log=str(tmp_path / "runs"))
    checkpoints = CheckpointCallback(save_freq=8, save_path=str(tmp_path / "ckpt"), name_prefix="sb3")
    evaluation = EvalCallback(
        _venv(gpt2_dir, n_envs=1, env="textrl/TextGen-v0"),
        n_eval_episodes=2,
        eval_freq=8,
        log_path=str(tmp_path / "eval"),
        best_model_save_path=str(tmp_path / "best"),
        verbose=0,
    )
    samples = SampleLoggingCallback(every_n_rollouts=1, n=3)
    model.learn(2 * 16, callback=[checkpoints, evaluation, samples], tb_log_name="cb")

    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["sb3_16_steps.zip", "sb3_32_steps.zip"]
    assert np.load(tmp_path / "eval" / "evaluations.npz")["results"].shape == (2, 2)
    assert (tmp_path / "best" / "best_model.zip").stat().st_size > 0

    assert samples.rollouts == 2 and len(samples.last_samples) == 3
    assert [p for p, _, _ in samples.last_samples] == PROMPTS[:3]
    assert all(0 <= r <= 4 for _, _, r in samples.last_samples)  # low_ids pays at most 1 per token, 4 tokens
    (run,) = (tmp_path / "runs").glob("cb_*")
    events = EventAccumulator(str(run), size_guidance={"tensors": 0}).Reload()
    assert "samples/text_summary" in events.Tags()["tensors"]
    assert len(events.Tensors("samples/text_summary")) == 2

    own = SampleLoggingCallback(prompts=["Hello"], n=2, deterministic=True)
    own.init_callback(model)
    assert [(p, len(c) > 0) for p, c, _ in own.log_samples()] == [("Hello", True)] * 2

    # SB3's video recipe: the rgb_array frames of 8 steps after the reset, written to .mp4
    recorder = VecVideoRecorder(model.env, str(tmp_path / "video"), lambda step: step == 0, video_length=8)
    obs = recorder.reset()
    for _ in range(8):
        obs, *_ = recorder.step(model.predict(obs)[0])
    recorder.close()
    (video,) = (tmp_path / "video").glob("*.mp4")
    assert video.stat().st_size > 2_000
    with VideoFileClip(str(video)) as clip:  # 9 frames at the env's render_fps, the 2 envs' frames tiled
        assert clip.fps == TextGenEnv.metadata["render_fps"] and clip.duration == pytest.approx(9 / 4, abs=0.3)
        frame = clip.get_frame(0)
    assert frame.shape == (2 * FRAME_HEIGHT, FRAME_WIDTH, 3)
    np.testing.assert_allclose(frame[:4, :4].reshape(-1, 3).mean(0), BACKGROUND, atol=8)  # our frames, lossily


def test_cached_rollout_equals_the_uncached_forward(gpt2_dir):
    """A rollout with resets at different steps per env: stored log-probs and values = the full forward's."""
    kwargs = {"lm": str(gpt2_dir), "prompts": PROMPTS, "reward": low_ids, "context_length": 16}
    venv = DummyVecEnv([lambda m=m: TextGenEnv(**kwargs, max_new_tokens=m) for m in (3, 4, 5)])  # varied lengths
    venv.seed(0)
    model = _ppo(gpt2_dir, venv=venv, n_steps=12, batch_size=12)
    policy, value_calls = model.policy, []
    # non-zero values (the value net starts at zero) of unit scale, as a trained head gives: weights of std 1 would
    # scale the hidden state's float32 rounding (decode kernels against the full forward) by sqrt(width)
    width = policy.value_net.weight.shape[1]
    torch.nn.init.normal_(policy.value_net.weight.data, std=width**-0.5)
    predict_values = policy.predict_values
    policy.predict_values = lambda obs: value_calls.append((obs, predict_values(obs))) or value_calls[-1][1]
    _, callback = model._setup_learn(36, callback=None)
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, 12)
    buffer = model.rollout_buffer
    starts = buffer.episode_starts[1:]  # (steps, envs)
    assert starts.sum() >= 6 and not (starts == starts[:, :1]).all(), "episodes should end at different steps"
    stats = policy.cache_stats
    assert stats["extended"] > stats["recomputed"] > 0

    obs = {k: torch.as_tensor(v.reshape(36, -1)) for k, v in buffer.observations.items()}
    actions = torch.as_tensor(buffer.actions.reshape(36)).long()
    values, logp, _ = policy.evaluate_actions(obs, actions)  # with gradients: the full, uncached forward
    torch.testing.assert_close(logp.detach().numpy(), buffer.log_probs.reshape(36), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values.detach().numpy().ravel(), buffer.values.reshape(36), atol=1e-5, rtol=1e-5)
    # SB3's other calls: the bootstrap value of each truncated episode (one row, served from the batch's
    # cache) and the value of the last observation
    assert [len(obs["input_ids"]) for obs, _ in value_calls] == [1] * (len(value_calls) - 1) + [3]
    assert len(value_calls) >= 8
    for obs, cached in value_calls:
        torch.testing.assert_close(cached, predict_values(obs).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2_dir", "llama_gqa_dir", "mistral_dir", "qwen2_moe_dir"])
def test_prefix_cache_serves_every_kind_of_row_exactly(request, arch):
    model, _ = load_lm(request.getfixturevalue(arch))
    core = Engine(model)
    cache = PrefixCache(core)
    g = torch.Generator().manual_seed(0)
    C = 12
    tokens = torch.randint(0, 300, (3, C), generator=g)
    lengths = torch.tensor([3, 5, 2])

    def obs(tokens, lengths):
        mask = (torch.arange(C) < lengths[:, None]).long()
        return tokens.masked_fill(mask == 0, 0), mask

    def check(ids, mask):
        with torch.no_grad():
            torch.testing.assert_close(cache(ids, mask), last_hidden(model, core, ids, mask), atol=1e-5, rtol=1e-5)

    check(*obs(tokens, lengths))  # all rows new
    check(*obs(tokens, lengths + 1))  # all rows one token longer
    check(*obs(tokens, lengths + 1))  # the same again
    other = torch.randint(0, 300, (1, C), generator=g)
    check(*obs(other, torch.tensor([4])))  # a one-row call in between (its own cache)
    check(*obs(tokens[:1], torch.tensor([5])))  # one row extending row 0 of the batch: served from that row
    tokens[1] = torch.randint(0, 300, (C,), generator=g)  # row 1 resets to a new prompt
    check(*obs(tokens, torch.tensor([5, 3, 5])))  # as cached, new, two longer: reuse / recompute / extend by 2
    assert cache.stats == {"extended": 5, "recomputed": 5, "reused": 4}
    check(*obs(tokens, torch.tensor([11, 3, 5])))  # six longer (an action and a 5-token reply): extended
    assert cache.stats["extended"] == 6
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.5)  # an in-place update (as an optimizer step does)
    check(*obs(tokens, torch.tensor([12, 4, 6])))  # stale states must not be used
    assert cache.stats["recomputed"] == 8
    left = torch.tensor([[0, 0, 1, 1, 1] + [1] * (C - 5)])  # left padding is not the env's layout: no cache
    check(tokens[:1], left)
    assert cache.stats["uncached"] == 1


@pytest.mark.parametrize("arch", ["gpt2_dir", "llama_dir", "mistral_dir"])
def test_shared_prefix_forward_equals_one_forward_per_row(request, arch):
    """The training forward reads prefixes off longer rows: same states and same gradients as row by row."""
    model, _ = load_lm(request.getfixturevalue(arch))
    core = Engine(model) if Engine.supports(model) else None
    g = torch.Generator().manual_seed(0)
    episode, other = torch.randint(3, 300, (9,), generator=g), torch.randint(3, 300, (9,), generator=g)
    rows = [episode[:4], episode[:7], other[:5], episode[:9], episode[:7], other[:3], episode[:5]]
    ids = torch.stack([torch.cat([r, torch.zeros(10 - len(r), dtype=torch.long)]) for r in rows])  # (7, 10)
    mask = (torch.arange(10) < torch.tensor([len(r) for r in rows])[:, None]).long()
    assert longest_extension(ids, mask.sum(1)).tolist() == [3, 3, 2, 3, 3, 2, 3]  # two rows are run, not seven
    weights = torch.randn(len(rows), model.config.hidden_size, generator=g)

    def states_and_grads(fn):
        model.zero_grad()
        hidden = fn()
        (hidden * weights).sum().backward()
        return hidden.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    shared, shared_grads = states_and_grads(lambda: last_hidden(model, core, ids, mask))
    alone, alone_grads = states_and_grads(
        lambda: torch.cat([last_hidden(model, core, ids[i : i + 1], mask[i : i + 1]) for i in range(len(rows))])
    )
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-5)
    assert len(shared_grads) == len(alone_grads) > 0
    for a, b in zip(shared_grads, alone_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_vocabulary_mismatch_and_wrong_env_are_clear_errors(gpt2_dir, tmp_path, tokenizer):
    small = tmp_path / "small-vocab"
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(small)
    tokenizer.save_pretrained(small)
    with pytest.raises(ValueError, match="does not fit the env"):
        PPO(TransformerActorCriticPolicy, _venv(gpt2_dir), policy_kwargs={"lm": str(small)})
    with pytest.raises(ValueError, match="needs a textrl token env"):
        PPO(TransformerActorCriticPolicy, "CartPole-v1", policy_kwargs={"lm": str(gpt2_dir)})
    with pytest.raises(ValueError, match="builds its own network"):
        PPO(TransformerActorCriticPolicy, _venv(gpt2_dir), policy_kwargs={"lm": str(gpt2_dir), "net_arch": [64]})


@pytest.mark.slow
def test_sb3_ppo_raises_keyword_reward_on_tiny(capsys):
    """SB3 PPO + TransformerActorCriticPolicy on the task of tests/test_learning.py: "love" in the completion."""
    venv = make_vec_env(
        TextGenEnv,
        n_envs=16,
        seed=0,
        env_kwargs={"lm": "tiny", "reward": keyword_reward(include=["love"]), "max_new_tokens": 24},
    )
    model = PPO(
        TransformerActorCriticPolicy,
        venv,
        policy_kwargs={"lm": "tiny"},
        n_steps=48,
        batch_size=384,  # 16 episodes per minibatch, 4 updates per rollout (as the PPO run in test_learning.py)
        n_epochs=2,
        learning_rate=1e-4,
        gamma=1.0,
        ent_coef=0.0,
        seed=0,
        verbose=0,
    )
    rewards: list[float] = []

    class EpisodeReturns(BaseCallback):
        def _on_rollout_start(self) -> None:
            self.returns: list[float] = []

        def _on_step(self) -> bool:
            self.returns += [info["episode"]["r"] for info in self.locals["infos"] if "episode" in info]
            return True

        def _on_rollout_end(self) -> None:
            rewards.append(float(np.mean(self.returns)))

    model.learn(60_000, callback=EpisodeReturns())
    start, end = np.mean(rewards[:5]), np.mean(rewards[-5:])
    with capsys.disabled():
        print(f"\nSB3 PPO: reward {start:.3f} -> {end:.3f}")
    assert start < 0.5
    assert end > 0.8, f"SB3 PPO reward {start:.3f} -> {end:.3f}"
