"""LoRA runs: adapters train, the base stays frozen, the reference is the base with the adapters off, and
checkpoints hold peft's adapter folder, resume exactly and refuse another base."""

from __future__ import annotations

import json

import pytest
import torch

from agents import PPO, REINFORCE, PPOConfig, REINFORCEConfig
from envs import TextGenEnv
from textrl.checkpoint import CheckpointError
from textrl.engine import Engine
from textrl.rewards import keyword_reward

peft = pytest.importorskip("peft")

PROMPTS = ["The old king", "The young queen", "The brave knight", "The quiet river"]


def _env(lm) -> TextGenEnv:
    return TextGenEnv(lm=str(lm), prompts=PROMPTS, reward=keyword_reward(include=["the"]), max_new_tokens=8)


def _config(cls, **kw):
    base = {"batch_size": 8, "lora_rank": 4, "lora_alpha": 8.0, "learning_rate": 1e-2, "kl_coef": 0.1}
    if cls is REINFORCEConfig:
        base["group_size"] = 4
    else:
        base["minibatch_size"] = 4
    return cls(**(base | kw))


@pytest.mark.parametrize(("agent_cls", "config_cls"), [(REINFORCE, REINFORCEConfig), (PPO, PPOConfig)])
def test_a_lora_run_trains_the_adapters_only_with_the_base_as_reference(agent_cls, config_cls):
    agent = agent_cls(_env("tiny"), config=_config(config_cls), seed=0)  # a trained LM: rewards differ
    policy = agent.policy
    assert isinstance(policy.core, Engine) and policy.runs_on.startswith("engine")
    assert policy.ref_model is None and policy.ref_core is policy.core  # no second copy of the weights
    trainable = {id(p) for p in agent.optimizer.param_groups[0]["params"]}
    named = dict(policy.model.named_parameters())
    adapters = {id(p) for n, p in named.items() if "lora_" in n}
    assert adapters and trainable == adapters | {id(p) for p in policy.value_head.parameters()}
    base_before = {n: p.detach().clone() for n, p in named.items() if "lora_" not in n}
    rollout, _, kl = agent.collect()
    assert kl.abs().max() < 1e-5  # the adapters start at zero: policy == base
    agent.learn(3 * 8 * 8)
    rollout, _, kl = agent.collect()
    assert kl[rollout.action_mask].abs().max() > 1e-4  # the adapters moved the policy away from the base
    for n, p in policy.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n  # frozen
    # the reference is exactly the base model's distribution
    with torch.no_grad(), policy.model.disable_adapter():
        logits = policy.model(input_ids=rollout.ids[:, :-1], attention_mask=rollout.attention_mask[:, :-1]).logits
    P = rollout.prompt_len
    ref = policy.reference_logprobs(rollout.ids, rollout.attention_mask, P, rollout.actions)
    expected = logits[:, P - 1 :].float().log_softmax(-1).gather(-1, rollout.actions[..., None])[..., 0]
    valid = rollout.action_mask
    torch.testing.assert_close(ref[valid], expected[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("agent_cls", "config_cls"), [(REINFORCE, REINFORCEConfig), (PPO, PPOConfig)])
def test_a_seeded_lora_run_is_reproducible(agent_cls, config_cls):
    """peft draws the adapters' starting A matrices from torch's global RNG: the agent draws them from its
    seed, so two runs with one seed start from the same adapters and train to the same weights, whatever the
    global RNG's state; another seed starts elsewhere."""

    def run(seed: int):
        torch.rand(int(torch.randint(1, 100, ())))  # the global RNG somewhere else each time
        agent = agent_cls(_env("tiny"), config=_config(config_cls), seed=seed)
        start = {n: p.detach().clone() for n, p in agent.policy.model.named_parameters() if "lora_A" in n}
        agent.learn(2 * 8 * 8)
        return start, {n: p.detach().clone() for n, p in agent.policy.model.named_parameters() if "lora_" in n}

    (start, end), (start_again, end_again), (start_other, _) = run(0), run(0), run(1)
    assert start and all(torch.equal(start[n], start_again[n]) for n in start)
    assert all(torch.equal(end[n], end_again[n]) for n in end)
    assert not all(torch.equal(start[n], start_other[n]) for n in start)


def test_a_lora_checkpoint_is_peft_format_and_resumes_exactly(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from textrl.lm import resolve_lm_path

    base_dir = tmp_path / "base"  # a copy of the embedded LM, changed below to play another base
    shutil.copytree(resolve_lm_path("tiny"), base_dir)
    config = _config(REINFORCEConfig)
    agent = REINFORCE(_env(base_dir), config=config, seed=1)
    agent.learn(2 * 8 * 8)
    saved = agent.save(tmp_path / "ckpt")
    policy_dir = saved / "policy"
    assert (policy_dir / "adapter_config.json").is_file() and (policy_dir / "adapter_model.safetensors").is_file()
    assert not (policy_dir / "model.safetensors").exists() and not (saved / "reference.safetensors").exists()
    # peft alone loads it onto the base and gives the agent's logits
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    loaded_peft = peft.PeftModel.from_pretrained(base, policy_dir).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        mine = agent.policy.core.forward(ids, torch.ones_like(ids))[0]
        torch.testing.assert_close(loaded_peft(input_ids=ids).logits, mine, atol=1e-4, rtol=1e-4)
    # resume: the same next iterations as the uninterrupted agent
    resumed = REINFORCE.load(saved, env=_env(base_dir))
    agent.learn(2 * 8 * 8, reset_num_timesteps=False)
    resumed.learn(2 * 8 * 8, reset_num_timesteps=False)
    for (n, a), b in zip(agent.policy.model.named_parameters(), resumed.policy.model.parameters(), strict=True):
        assert torch.equal(a, b), n
    # the base changed since: a clear error naming both
    weights = load_file(base_dir / "model.safetensors")
    name = next(n for n in weights if n.endswith("mlp.c_fc.weight"))
    weights[name] = weights[name] + 0.01
    save_file(weights, base_dir / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((saved / "state.json").read_text())["lora"]["base"] == str(base_dir)
    with pytest.raises(CheckpointError, match=r"LoRA adapters for the base model .*base.* but the base loaded now"):
        REINFORCE.load(saved, env=_env(base_dir))


def test_bad_lora_settings_are_clear_errors(llama_dir):
    with pytest.raises(ValueError, match="lora_rank must be >= 0"):
        REINFORCEConfig(lora_rank=-1).validate()
    with pytest.raises(ValueError, match="lora_alpha must be > 0"):
        REINFORCEConfig(lora_rank=4, lora_alpha=0).validate()
    with pytest.raises(ValueError, match=r"match no module.*q_proj"):
        REINFORCE(_env(llama_dir), config=_config(REINFORCEConfig, lora_targets=["attention_qkv"]), seed=0)


def test_export_writes_the_adapter_folder_or_merges_it(tmp_path):
    from transformers import AutoModelForCausalLM

    from agents.cli import main

    agent = REINFORCE(_env("tiny"), config=_config(REINFORCEConfig), seed=2)
    agent.learn(2 * 8 * 8)
    saved = agent.save(tmp_path / "ckpt")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = agent.policy.core.forward(ids, torch.ones_like(ids))[0]
    assert main(["export", str(saved), str(tmp_path / "adapters")]) == 0
    assert (tmp_path / "adapters" / "adapter_model.safetensors").is_file()
    assert main(["export", str(saved), str(tmp_path / "merged"), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # transformers alone
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    full = REINFORCE(_env("tiny"), config=REINFORCEConfig(batch_size=8, group_size=4), seed=0).save(tmp_path / "full")
    assert main(["export", str(full), str(tmp_path / "nothing"), "--merge"]) == 2  # a one-line error


def test_textrl_train_with_lora_runs_on_the_engine_and_resumes(tmp_path, capsys):
    from agents.cli import main

    runs = tmp_path / "runs"
    start = ["train", "--env", "textrl/TextGen-v0", "--env-kwargs", '{"max_new_tokens": 4}', "--agent", "reinforce"]
    start += ["--batch-size", "4", "--group-size", "2", "--lora-rank", "4", "--lora-targets", "c_attn", "c_fc"]
    assert main([*start, "--total-timesteps", "16", "--tensorboard-log", str(runs), "--progress", "0"]) == 0
    assert "runs on the engine (gpt2)" in capsys.readouterr().out
    (run,) = runs.iterdir()
    assert main(["train", "--resume", str(run), "--total-timesteps", "32", "--progress", "0"]) == 0
    newest = max((run / "checkpoints").glob("step-*"))
    state = json.loads((newest / "state.json").read_text())
    assert state["num_timesteps"] >= 32 and state["config"]["lora_targets"] == ["c_attn", "c_fc"]
    adapter = json.loads((newest / "policy" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["c_attn", "c_fc"]


def test_starting_from_an_adapter_trains_it_further_against_a_frozen_copy_of_it(tmp_path):
    trained = REINFORCE(_env("tiny"), config=_config(REINFORCEConfig), seed=3)
    trained.learn(2 * 8 * 8)
    adapter = trained.save(tmp_path / "ckpt") / "policy"
    agent = REINFORCE(_env("tiny"), lm=adapter, config=_config(REINFORCEConfig), seed=0)
    assert not agent.reference_is_base and agent.policy.ref_model is not None  # the starting adapter, frozen
    rollout, _, kl = agent.collect()
    assert kl.abs().max() < 1e-5  # the reference is the starting policy, adapters included
    P, ids, mask = rollout.prompt_len, rollout.ids, rollout.attention_mask
    with torch.no_grad(), agent.policy.model.disable_adapter():
        base = agent.policy.core.forward(ids[:, :-1], mask[:, :-1], P - 1)[0]  # the bare base, same positions
    base_logprobs = base.float().log_softmax(-1).gather(-1, rollout.actions[..., None])[..., 0]
    assert (base_logprobs - rollout.logprobs)[rollout.action_mask].abs().max() > 1e-3  # not the bare base
