"""Activation checkpointing in the update (``AgentConfig.activation_checkpointing``): the backward pass
recomputes each block's activations instead of keeping them. The gradients are those of the plain forward
on every architecture the engine runs, computed or replayed from a rollout record, with rows sharing a
prompt, with LoRA adapters, with a mixture of experts' router log, and on the HF path; what autograd keeps
for the backward shrinks; and an agent trains to the same weights with it on as off.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from textrl.core import HFCore
from textrl.engine import Engine
from textrl.lm import load_lm
from textrl.ops import router_balance_loss

ARCHS = ["gpt2_dir", "llama_gqa_dir", "qwen2_dir", "qwen3_dir", "mistral_dir", "mixtral_dir", "qwen2_moe_dir"]


def _model(request, arch: str):
    return request.getfixturevalue("sharpen")(load_lm(request.getfixturevalue(arch))[0])


def _batch(vocab: int, groups: int = 2, per_group: int = 3, P: int = 6, T: int = 5):
    """``groups`` left-padded prompts, each continued ``per_group`` ways: rows that share a prompt."""
    gen = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, vocab, (groups, P), generator=gen)
    prompt_mask = torch.ones(groups, P, dtype=torch.long)
    prompt_mask[0, :2] = 0
    rows = torch.arange(groups).repeat_interleave(per_group)
    cont = torch.randint(0, vocab, (len(rows), T), generator=gen)
    ids = torch.cat([prompts[rows], cont], 1)
    mask = torch.cat([prompt_mask[rows], torch.ones_like(cont)], 1)
    mask[-1, -2:] = 0  # a row that ended early
    return ids, mask


def _grads(model, core, ids, mask, start: int, router: bool = False):
    """Logits and every parameter's gradient of a loss over the valid positions (with the router's
    load-balancing loss when ``router``), and the bytes autograd saved for the backward pass."""
    model.zero_grad(set_to_none=True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    if router:
        core.router_log = []
    with saved_tensors_hooks(pack, lambda t: t):
        logits, hidden = core.forward(ids, mask, start)
    valid = mask[:, start:].bool()
    weights = torch.linspace(-1, 1, logits.shape[-1])
    loss = (logits[valid].log_softmax(-1) * weights).sum() + hidden[valid].square().sum() * 0.01
    if router:
        loss = loss + router_balance_loss(core.router_log)
        logged = len(core.router_log)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    if router:
        assert len(core.router_log) == logged  # the recompute logged nothing more
        core.router_log = None
    return logits.detach(), grads, sum(saved)


def _assert_same(got, expected, what: str):
    (logits, grads, _), (logits_0, grads_0, _) = got, expected
    torch.testing.assert_close(logits, logits_0, atol=0, rtol=0, msg=what)
    assert grads.keys() == grads_0.keys() and len(grads) > 5, what
    for name in grads:  # the recompute runs the very same kernels on the very same inputs
        torch.testing.assert_close(grads[name], grads_0[name], atol=1e-7, rtol=1e-6, msg=f"{what}: {name}")


def _compare(model, core, ids, mask, start: int, what: str, router: bool = False):
    """``_grads`` without, then with checkpointing; the two agree exactly: ``(plain, checked)``."""
    plain = _grads(model, core, ids, mask, start, router)
    core.checkpoint_blocks = True
    try:
        checked = _grads(model, core, ids, mask, start, router)
    finally:
        core.checkpoint_blocks = False
    _assert_same(checked, plain, what)
    return plain, checked


def _record(core, ids, mask, P):
    with torch.no_grad():
        session = core.start(ids[:, :P], mask[:, :P], ids.shape[1], record=True)
        for t in range(P, ids.shape[1] - 1):
            session.step(ids[:, t])
        session.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_gradients_equal_the_plain_forward(request, arch):
    model = _model(request, arch)
    core = Engine(model)
    ids, mask = _batch(model.get_input_embeddings().num_embeddings)
    P = 6
    router = any(layer.moe is not None for layer in core.spec.layers)
    for start in (0, P - 1):  # start P - 1: the rows share their prompt (the shared-prefix path)
        plain, checked = _compare(model, core, ids, mask, start, f"{arch} start={start}", router)
        assert checked[2] < 0.6 * plain[2], (arch, start, checked[2], plain[2])  # kept for the backward
    # replayed from a rollout record: the recompute reads the same record columns
    _record(core, ids, mask, P)
    _compare(model, core, ids[:, :-1], mask[:, :-1], P - 1, f"{arch} replayed", router)
    assert core.replayed == 2


def test_lora_gradients_equal_the_plain_forward(request):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(request, "llama_gqa_dir"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():  # B starts at zero: give it values, so every adapter gets gradients
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    core = Engine(model)
    ids, mask = _batch(model.get_input_embeddings().num_embeddings)
    plain, checked = _compare(model, core, ids, mask, 5, "lora")
    assert all("lora_" in name for name in checked[1]) and checked[2] < 0.6 * plain[2]


def test_hf_path_gradients_equal_the_plain_forward(request):
    model = _model(request, "qwen3_dir")
    core = HFCore(model)
    ids, mask = _batch(model.get_input_embeddings().num_embeddings)
    plain, checked = _compare(model, core, ids, mask, 5, "HF path")
    assert checked[2] < 0.6 * plain[2]
    layers = core.checkpoint_layers()
    assert len(layers) >= 2 and not any(m.training for m in model.modules())  # eval mode again after the call
    with torch.no_grad():  # no autograd: nothing to checkpoint, and no module leaves eval mode
        core.forward(ids, mask)


def test_a_model_transformers_cannot_checkpoint_is_a_clear_error(request):
    model = _model(request, "gpt2_dir")
    model.supports_gradient_checkpointing = False  # as some remote-code models declare
    with pytest.raises(ValueError, match="activation checkpointing: GPT2LMHeadModel does not support it"):
        HFCore(model).checkpoint_layers()


@pytest.mark.parametrize("fast", [True, False])
def test_an_agent_trains_to_the_same_weights(llama_gqa_dir, fast):
    """Two REINFORCE iterations with checkpointing on and off, from the same seed: the same weights, with
    far less kept for the backward passes."""
    from agents import REINFORCE, REINFORCEConfig
    from envs import TextGenEnv

    saved = {False: 0, True: 0}

    def train(on: bool) -> list[torch.Tensor]:
        env = TextGenEnv(
            lm=str(llama_gqa_dir), prompts=["The old king", "A quiet river"], reward="keyword_reward", max_new_tokens=6
        )
        config = REINFORCEConfig(batch_size=4, group_size=2, learning_rate=1e-3, activation_checkpointing=on)
        agent = REINFORCE(env, config=config, seed=0)
        if not fast:  # the HF path: a policy whose core is transformers' own forward
            agent.policy.core = HFCore(agent.policy.model)
            agent.policy.ref_core = HFCore(agent.policy.ref_model)
            agent.policy.activation_checkpointing = on
        assert agent.policy.activation_checkpointing is on

        def pack(t):
            saved[on] += t.numel() * t.element_size()
            return t

        with saved_tensors_hooks(pack, lambda t: t):
            agent.learn(2)
        return [p.detach().clone() for p in agent.policy.model.parameters()]

    for a, b in zip(train(False), train(True), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert saved[True] < 0.6 * saved[False], saved
