"""textrl on a CUDA GPU: the engine against the HF forward in fp32 and bf16, prefill + decode (eager, static and
CUDA-graph steps) against the forward, a short ``learn()`` of each agent (fp32, bf16 autocast, bf16 weights),
LoRA, activation checkpointing, exact save/resume and a multi-turn env.

Every test runs on ``device`` = ``"cpu"`` and ``"cuda"``: the CUDA ones carry the ``cuda`` marker and are skipped
without a GPU (``pytest -m cuda tests/test_cuda.py`` runs only them, on a machine that has one); the CPU ones run
the same bodies in the default suite, so the test code itself is exercised everywhere.

bf16 tolerance: bf16 keeps 8 significant bits (a relative error of 2^-9 per rounding), so a bf16 forward cannot
match fp32 to a fixed tight bound; what it must do is be as accurate as HF's own bf16 forward. So the engine's
bf16 log-probabilities are compared with the fp32 HF ones, and their largest error may be at most twice HF bf16's
own largest error against the same fp32 reference, plus 0.05 nats (the floor for when HF's error happens to be
small at these few positions).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from agents import GRPO, PPO, REINFORCE, GRPOConfig, PPOConfig, REINFORCEConfig
from envs import TextGenEnv
from textrl.engine import Engine
from textrl.lm import load_lm
from textrl.rewards import keyword_reward
from textrl.runtime import Runtime

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (exact resume): read at its start
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
ARCHS = ["gpt2_dir", "llama_gqa_dir", "mistral_dir", "qwen2_dir", "qwen3_dir", "mixtral_dir", "qwen2_moe_dir"]
TOL = {"atol": 1e-4, "rtol": 1e-4}
BF16_FLOOR = 0.05
"""Nats: the engine's bf16 log-probs may be off fp32 by 2x HF bf16's own error plus this (module docstring)."""
PROMPTS = ["The old king", "The young queen", "The brave knight", "The quiet river"]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


def _model(request, arch: str, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    return request.getfixturevalue("sharpen")(load_lm(request.getfixturevalue(arch))[0]).to(device=device, dtype=dtype)


def _batch(vocab: int, device: torch.device, B: int = 3, S: int = 12):
    """Random ids (B, S) with left padding of 4, 1 and 0 positions."""
    ids = torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, S, dtype=torch.long)
    for b, width in enumerate([4, 1, 0][:B]):
        mask[b, :width] = 0
    return ids.to(device), mask.to(device)


def _hf_logits(model, ids, mask) -> torch.Tensor:
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


# --- the engine against the HF forward -------------------------------------------------------------------


def test_engine_matches_hf_in_fp32(request, arch, device):
    model = _model(request, arch, device)
    core = Engine(model)
    ids, mask = _batch(model.config.vocab_size, device)
    real = mask.bool()
    with torch.no_grad():
        logits, _ = core.forward(ids, mask)
        expected = _hf_logits(model, ids, mask)
    assert logits.device.type == device.type
    torch.testing.assert_close(logits[real], expected[real], **TOL)


def test_engine_matches_hf_in_bf16_as_closely_as_hf_bf16_does(request, arch, device):
    reference = _model(request, arch, device)
    model = _model(request, arch, device, torch.bfloat16)
    ids, mask = _batch(model.config.vocab_size, device)
    real = mask.bool()
    with torch.no_grad():
        exact = _hf_logits(reference, ids, mask)[real].float().log_softmax(-1)
        hf = _hf_logits(model, ids, mask)[real].float().log_softmax(-1)
        logits, _ = Engine(model).forward(ids, mask)
        mine = logits[real].float().log_softmax(-1)
    assert logits.dtype == torch.bfloat16
    hf_error, my_error = (hf - exact).abs().max().item(), (mine - exact).abs().max().item()
    assert my_error <= 2 * hf_error + BF16_FLOOR, (my_error, hf_error)
    assert math.isfinite(my_error)


@pytest.mark.parametrize("decode_step", ["eager", "static", "graph"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_and_decode_equal_the_forward(request, arch, device, dtype, decode_step):
    """Prefill P positions, then decode the rest one token per step (recorded, as a training rollout does), twice
    (the second session replays what the first captured): every step's logits are the forward's at that
    position. fp32: to 1e-4; bf16: to 2% of the logits' range (the forward and the steps round differently)."""
    model = _model(request, arch, device, dtype)
    core = Engine(model)
    core.decode_step = decode_step
    ids, mask = _batch(model.config.vocab_size, device)
    P, S = 5, ids.shape[1]
    with torch.no_grad():
        logits, _ = core.forward(ids, mask)
        for _ in range(2):
            with core.start(ids[:, :P], mask[:, :P], S, record=True) as session:
                steps = [session.logits] + [session.step(ids[:, t])[0].clone() for t in range(P, S)]
            cached = torch.stack(steps, 1).float()  # predictions at positions P-1 .. S-1
            expected = logits[:, P - 1 :].float()
            if dtype == torch.float32:
                torch.testing.assert_close(cached, expected, **TOL)
            else:
                scale = expected.abs().max().item()
                torch.testing.assert_close(cached, expected, atol=0.02 * scale, rtol=0)


# --- the agents ------------------------------------------------------------------------------------------


def _env(lm, max_new_tokens: int = 8) -> TextGenEnv:
    reward = keyword_reward(include=["the"])
    return TextGenEnv(lm=str(lm), prompts=PROMPTS, reward=reward, max_new_tokens=max_new_tokens)


def _config(cls, device, **kw):
    """Tiny runs: B = 8 (groups of 4 for REINFORCE and GRPO), eos never sampled so every episode is 8 tokens."""
    common = {"batch_size": 8, "learning_rate": 1e-3, "device": device.type, "suppress_tokens": [0]} | kw
    if cls is PPO:
        return PPOConfig(minibatch_size=4, n_epochs=2, **common)
    if cls is GRPO:
        return GRPOConfig(group_size=4, minibatch_size=4, num_iterations=2, **common)
    return REINFORCEConfig(group_size=4, **common)


def _params(agent) -> list[torch.Tensor]:
    return [p.detach().clone() for p in agent.policy.trainable_parameters()]


@pytest.mark.parametrize("precision", ["fp32", "autocast-bf16", "bf16-weights"])
@pytest.mark.parametrize("cls", [REINFORCE, PPO, GRPO], ids=["reinforce", "ppo", "grpo"])
def test_a_short_learn_on_the_device(gpt2_dir, device, cls, precision):
    """Two iterations: the weights (on the device, in the dtype asked) move, every loss is finite, and B x T
    tokens are counted per iteration."""
    env = _env(gpt2_dir)
    eos = env.tokenizer.eos_token_id
    kw = {"autocast": "bf16"} if precision == "autocast-bf16" else {}
    place = {"runtime": Runtime.local(device, torch.bfloat16)} if precision == "bf16-weights" else {}
    agent = cls(env, config=_config(cls, device, suppress_tokens=[eos], **kw), seed=0, verbose=0, **place)
    assert agent.device.type == device.type
    before = _params(agent)
    stats: list[dict] = []
    agent.learn(2 * 8 * 8, callback=lambda a, s: stats.append(s))
    assert agent.iteration == 2 and agent.num_timesteps == 2 * 8 * 8
    after = _params(agent)
    assert all(p.device.type == device.type for p in after)
    want = torch.bfloat16 if precision == "bf16-weights" else torch.float32
    assert {p.dtype for p in agent.policy.model.parameters()} == {want}
    moved = [not torch.equal(a, b) for a, b in zip(before, after, strict=True)]
    assert sum(moved) >= len(moved) // 2
    for s in stats:
        losses = {k: v for k, v in s.items() if k.startswith("losses/")}
        assert losses and all(math.isfinite(v) for v in losses.values()), losses


def test_lora_on_the_device(gpt2_dir, device):
    """Rank-4 adapters train on the device; the base stays exactly as it was."""
    config = _config(REINFORCE, device, lora_rank=4, lora_alpha=8.0, learning_rate=1e-2, kl_coef=0.1)
    agent = REINFORCE(_env(gpt2_dir), config=config, seed=0, verbose=0)
    named = dict(agent.policy.model.named_parameters())
    base = {n: p.detach().clone() for n, p in named.items() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in named.items() if "lora_" in n}
    assert adapters and all(p.device.type == device.type for p in named.values())
    agent.learn(2 * 8 * 8)
    for n, p in agent.policy.model.named_parameters():
        if "lora_" in n:
            continue
        assert torch.equal(p, base[n]), n
    assert any(not torch.equal(p, adapters[n]) for n, p in agent.policy.model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_activation_checkpointing_on_the_device(request, device, dtype):
    """The update's forward with activation checkpointing: the gradients of the plain forward (to float
    rounding: kernels may sum in another order on a GPU), with far less saved for the backward pass."""
    from torch.autograd.graph import saved_tensors_hooks

    model = _model(request, "llama_gqa_dir", device, dtype)
    core = Engine(model)
    ids, mask = _batch(model.get_input_embeddings().num_embeddings, device)

    def grads(on: bool):
        core.checkpoint_blocks = on
        saved = []
        with saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
            logits, hidden = core.forward(ids, mask, 4)
        valid = mask[:, 4:].bool()
        (logits[valid].float().log_softmax(-1)[:, :7].sum() + hidden[valid].float().square().sum() * 0.01).backward()
        out = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out, sum(saved)

    (plain, plain_saved), (checked, checked_saved) = grads(False), grads(True)
    assert plain.keys() == checked.keys() and len(plain) > 10 and checked_saved < 0.6 * plain_saved
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name in plain:
        scale = plain[name].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(checked[name] / scale, plain[name] / scale, atol=tol, rtol=0, msg=name)


@pytest.fixture
def deterministic():
    """Deterministic kernels (CUDA's atomics-based ones replaced), restored afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("cls", [REINFORCE, PPO, GRPO], ids=["reinforce", "ppo", "grpo"])
def test_save_then_resume_continues_exactly(gpt2_dir, tmp_path, device, cls, deterministic, resumed_exactly):
    """As the CPU tests check: an agent saved after one iteration and loaded continues with exactly the weights
    and statistics of the one that ran on."""
    env = _env(gpt2_dir)
    a = cls(env, config=_config(cls, device, kl_target=0.5), seed=7, verbose=0)
    a.learn(1)
    b = resumed_exactly(a, tmp_path / "mid", env, ("rollout/reward_mean", "losses/policy_loss", "charts/kl_coef"))
    assert b.device.type == device.type


def test_a_multi_turn_env_on_the_device(device):
    """The scripted replies are read into the KV cache on the device, and the loop trains."""
    from envs.dialogue import MultiTurnEnv

    def echo_count(state, turn):
        words = len(turn.split())
        return (f" you said {words} words.", float(words == 2), state["turn"] == 2)

    env = MultiTurnEnv(lm="tiny", prompts=["ROMEO:\n", "The king"], respond=echo_count, max_turn_tokens=5)
    config = REINFORCEConfig(batch_size=4, group_size=2, kl_coef=0.1, learning_rate=1e-4, device=device.type)
    agent = REINFORCE(env, config=config, seed=0, verbose=0)
    rollout, _, _ = agent.collect()
    replies = rollout.attention_mask[:, rollout.prompt_len :].bool() & ~rollout.action_mask
    assert rollout.ids.device.type == device.type and replies.any()
    agent.learn(100)
    assert agent.num_timesteps >= 100 and agent.iteration >= 2


# --- the static decode step ------------------------------------------------------------------------------


@pytest.mark.parametrize("decode_step", ["static", "graph"])
def test_a_static_decode_step_samples_the_eager_tokens(llama_gqa_dir, device, decode_step):
    """Agents with the same seed, one decoding eagerly and one with the static step (a CUDA graph on a GPU):
    the same tokens in every rollout, and the same weights after an iteration on them (to rounding)."""
    agents = []
    for step in ("eager", decode_step):
        env = _env(llama_gqa_dir)
        config = _config(REINFORCE, device, suppress_tokens=[env.tokenizer.eos_token_id], decode_step=step)
        agents.append(REINFORCE(env, config=config, seed=3, verbose=0))
    eager, static = agents
    assert eager.policy.runs_on.startswith("engine")
    for _ in range(2):
        a, b = eager.collect()[0], static.collect()[0]
        assert torch.equal(a.ids, b.ids)
        torch.testing.assert_close(a.logprobs[a.action_mask], b.logprobs[b.action_mask], atol=1e-4, rtol=0)
    eager.learn(1)
    static.learn(1)
    for pa, pb in zip(_params(eager), _params(static), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-4, rtol=1e-3)


def test_a_graph_decode_step_under_bf16_autocast(llama_gqa_dir, device):
    """autocast="bf16" (weights fp32, the decode's matmuls bf16) with the CUDA-graph step: rollouts and updates
    run, and every episode has its tokens."""
    env = _env(llama_gqa_dir)
    kw = {"suppress_tokens": [env.tokenizer.eos_token_id], "autocast": "bf16", "decode_step": "graph"}
    agent = REINFORCE(env, config=_config(REINFORCE, device, **kw), seed=0, verbose=0)
    agent.learn(2 * 8 * 8)
    assert agent.iteration == 2 and agent.num_timesteps == 2 * 8 * 8


def _compiler_works() -> bool:
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2))
    except Exception:  # no C++ compiler (CPU) or no triton (GPU): torch.compile cannot run here
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama_gqa_dir", "mistral_dir"])
def test_a_compiled_decode_step_equals_the_eager_one(request, device, arch):
    """``decode_step="compile"`` (torch.compile, and a CUDA graph on a GPU): the eager step's logits (~1 min
    of compilation on a CPU; skipped where torch.compile cannot run). Grouped-query attention (Llama) and a
    sliding window that acts within the sequence (Mistral): on a CPU the compiled step's attention is
    :func:`textrl.ops.decode_attention`."""
    if device.type == "cpu" and not _compiler_works():
        pytest.skip("torch.compile cannot run here")
    model = _model(request, arch, device)
    ids, mask = _batch(model.config.vocab_size, device)
    P, S = 5, ids.shape[1]
    out = {}
    for step in ("eager", "compile"):
        core = Engine(model)
        core.decode_step = step
        with torch.no_grad(), core.start(ids[:, :P], mask[:, :P], S, record=True) as session:
            out[step] = torch.stack([session.step(ids[:, t])[0].clone() for t in range(P, S)], 1)
    torch.testing.assert_close(out["compile"], out["eager"], **TOL)
