"""The spec-driven engine (``textrl.engine.Engine``) agrees with the Hugging Face forward of every covered
architecture in fp32: GPT-2, Llama (one kv head and grouped-query), Mistral (sliding window), Qwen2 (q/k/v
bias) and Qwen3 (q/k RMSNorm, head size other than hidden / heads, tied LM head).

Random-init HF models have every norm weight 1 and every bias 0, and weights so small that attention is
nearly uniform: a forward that skipped a norm weight or a bias would still agree. So each model is loaded and
then given O(1) weights, norms and biases (the ``sharpen`` fixture) before it is compared.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from textrl.core import HFCore, make_core
from textrl.lm import load_lm

engine = pytest.importorskip("textrl.engine", reason="textrl/engine.py is not there yet")
Engine = engine.Engine

ARCHS = [
    "gpt2_dir",
    "llama_dir",
    "llama_gqa_dir",
    "mistral_dir",
    "qwen2_dir",
    "qwen3_dir",
    "mixtral_dir",
    "qwen2_moe_dir",
]
FAMILY = {
    "gpt2_dir": "gpt2",
    "llama_dir": "llama",
    "llama_gqa_dir": "llama",
    "mistral_dir": "mistral",
    "qwen2_dir": "qwen2",
    "qwen3_dir": "qwen3",
    "mixtral_dir": "mixtral",
    "qwen2_moe_dir": "qwen2_moe",
}
TOL = {"atol": 1e-4, "rtol": 1e-4}


def _model(request, arch: str) -> nn.Module:
    return request.getfixturevalue("sharpen")(load_lm(request.getfixturevalue(arch))[0])


def _batch(vocab: int, B: int = 3, S: int = 12, seed: int = 1):
    """Random ids with left padding of different widths (4, 1, 0, 2, ...)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=gen)
    mask = torch.ones(B, S, dtype=torch.long)
    for b, width in enumerate([4, 1, 0, 2] * B):
        if b < B:
            mask[b, :width] = 0
    return ids, mask


def _vocab(model) -> int:
    return model.get_input_embeddings().num_embeddings


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


# --- the fixtures: what the engine is compared against -----------------------------------------------------


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_hf_mistral_applies_its_sliding_window(mistral_dir, attention):
    """HF's own Mistral forward (the reference) applies the window of 4 with an explicit mask and left padding:
    each position sees itself and the 3 before it, so with 2 layers the last token sees 6 positions back."""
    model, _ = load_lm(mistral_dir)
    model.set_attn_implementation(attention)
    assert model.config._attn_implementation == attention
    assert model.config.sliding_window == 4 and model.config.num_key_value_heads == 2
    ids = torch.randint(0, _vocab(model), (1, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, 15, dtype=torch.long)
    mask[0, :3] = 0
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        last = model(padded, attention_mask=mask, position_ids=positions).logits[0, -1]
        for back, moves in [(7, False), (9, False), (6, True), (5, True)]:
            changed = padded.clone()
            changed[0, -1 - back] = (changed[0, -1 - back] + 1) % _vocab(model)
            other = model(changed, attention_mask=mask, position_ids=positions).logits[0, -1]
            assert (not torch.equal(other, last)) == moves, back
        alone = model(ids).logits[0, -1]
    torch.testing.assert_close(alone, last, **TOL)


def test_fixtures_exercise_what_they_are_for(llama_dir, llama_gqa_dir, qwen3_dir):
    assert load_lm(llama_dir)[0].config.num_key_value_heads == 1
    gqa = load_lm(llama_gqa_dir)[0].config
    assert gqa.num_attention_heads == 4 and gqa.num_key_value_heads == 2
    qwen3 = load_lm(qwen3_dir)[0]
    attn = qwen3.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (4 * 16, 32) and attn.k_norm.weight.shape == (16,)
    assert qwen3.lm_head.weight is qwen3.model.embed_tokens.weight


# --- agreement with the HF forward ----------------------------------------------------------------------------


def test_forward_with_left_padding_matches_each_row_alone(request, arch):
    model = _model(request, arch)
    core = Engine(model)
    assert core.arch == FAMILY[arch]
    ids, mask = _batch(_vocab(model))
    with torch.no_grad():
        logits, hidden = core.forward(ids, mask)  # (B, S, V), (B, S, E)
        assert logits.shape == (*ids.shape, _vocab(model)) and hidden.shape[:2] == ids.shape
        for b in range(len(ids)):
            real = mask[b].bool()
            expected = model(ids[b, real][None])  # the row alone, unpadded
            torch.testing.assert_close(logits[b, real], expected.logits[0], **TOL)
        tail_logits, tail_hidden = core.forward(ids, mask, start=7)  # the tail of the full result
        torch.testing.assert_close(tail_logits, logits[:, 7:], **TOL)
        torch.testing.assert_close(tail_hidden, hidden[:, 7:], **TOL)
        hf_hidden = HFCore(model).forward(ids, mask)[1]  # the final norm's output, as HF's last hidden state
        torch.testing.assert_close(hidden[mask.bool()], hf_hidden[mask.bool()], **TOL)


@pytest.mark.parametrize("record", [False, True])
def test_prefill_and_decode_match_the_forward(request, arch, record):
    model = _model(request, arch)
    core = Engine(model)
    ids, mask = _batch(_vocab(model))
    P, S = 5, ids.shape[1]
    with torch.no_grad():
        logits, hidden = core.forward(ids, mask)
        session = core.start(ids[:, :P], mask[:, :P], S, record=record)
        first = (session.logits, session.hidden)
        steps = [first] + [session.step(ids[:, t]) for t in range(P, S)]
        session.close()
    cached = torch.stack([step[0] for step in steps[:-1]], 1)  # predictions at positions P-1 .. S-2
    torch.testing.assert_close(cached, logits[:, P - 1 : S - 1], **TOL)
    torch.testing.assert_close(steps[-1][0], logits[:, -1], **TOL)  # past the last: position S-1, cache full
    torch.testing.assert_close(torch.stack([s[1] for s in steps], 1), hidden[:, P - 1 :], **TOL)


def _loss(logits: torch.Tensor, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A loss reading every logit and hidden value of the valid positions (pads' values never enter)."""
    weights = torch.linspace(-1, 1, logits.shape[-1])
    return (logits[valid].log_softmax(-1) * weights).sum() + hidden[valid].square().sum() * 0.01


def _grads(model, core, ids, mask, start: int, rows=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits, hidden = core.forward(ids, mask, start, rows)
    _loss(logits, hidden, mask[:, start:].bool()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def _assert_grads_close(got: dict, expected: dict, what: str = "") -> None:
    assert got.keys() == expected.keys() and len(got) > 10, (what, sorted(set(got) ^ set(expected)))
    for name in got:
        scale = expected[name].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(got[name] / scale, expected[name] / scale, atol=1e-4, rtol=0, msg=f"{what} {name}")


def test_gradients_flow_into_the_hf_parameters_as_through_the_hf_forward(request, arch):
    model = _model(request, arch)
    core, hf = Engine(model), HFCore(model)
    ids, mask = _batch(_vocab(model), B=4)
    for start in (0, 4):
        logits, grads = _grads(model, core, ids, mask, start)
        hf_logits, hf_grads = _grads(model, hf, ids, mask, start)
        valid = mask[:, start:].bool()
        torch.testing.assert_close(logits[valid], hf_logits[valid], **TOL)
        _assert_grads_close(grads, hf_grads, f"start={start}")


def test_forward_after_a_recorded_rollout_matches_the_hf_forward(request, arch):
    """A recorded rollout (the engine may replay it), then the update's forward on all rows and on a
    minibatch of them (``rows``): logits and gradients as through the HF forward; then the weights move."""
    model = _model(request, arch)
    core, hf = Engine(model), HFCore(model)
    ids, mask = _batch(_vocab(model), B=4)
    P, S = 6, ids.shape[1]
    mask[3, -2:] = 0  # row 3 ended early: its last two positions are pads in the update
    with torch.no_grad():
        session = core.start(ids[:, :P], mask[:, :P], S, record=True)
        for t in range(P, S - 1):
            session.step(ids[:, t])
        session.close()
    ids = ids.masked_fill(~mask.bool(), 0)
    for rows in (None, torch.tensor([1, 3])):
        sub_ids, sub_mask = (ids, mask) if rows is None else (ids[rows], mask[rows])
        logits, grads = _grads(model, core, sub_ids[:, :-1], sub_mask[:, :-1], P - 1, rows)
        hf_logits, hf_grads = _grads(model, hf, sub_ids[:, :-1], sub_mask[:, :-1], P - 1)
        valid = sub_mask[:, P:].bool()
        torch.testing.assert_close(logits[valid], hf_logits[valid], **TOL)
        _assert_grads_close(grads, hf_grads, f"rows={rows}")
    assert core.replayed == 2  # both took the linear layers' outputs from the record
    for p in model.parameters():  # a real step: the record is stale after it
        p.grad = torch.randn_like(p) * 0.1
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad(set_to_none=True)
    logits, grads = _grads(model, core, ids[:, :-1], mask[:, :-1], P - 1)
    assert core.replayed == 2  # computed, not replayed
    hf_logits, hf_grads = _grads(model, hf, ids[:, :-1], mask[:, :-1], P - 1)
    torch.testing.assert_close(logits[mask[:, P:].bool()], hf_logits[mask[:, P:].bool()], **TOL)
    _assert_grads_close(grads, hf_grads, "after a step")


def test_rows_sharing_a_prompt(request, arch):
    """Groups of 4 rows with one (left-padded) prompt each, then different continuations: prefill, decode,
    forward and its gradients equal those of each row computed alone / through the HF forward."""
    model = _model(request, arch)
    core, hf = Engine(model), HFCore(model)
    vocab = _vocab(model)
    base_ids, base_mask = _batch(vocab, B=2, S=6)
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    P, T = 6, 5
    cont = torch.randint(0, vocab, (len(group), T), generator=torch.Generator().manual_seed(5))
    ids = torch.cat([base_ids[group], cont], 1)
    mask = torch.cat([base_mask[group], torch.ones_like(cont)], 1)
    if hasattr(core, "_shared_prefix"):  # the engine's own test of "enough rows share": this batch passes it
        assert core._shared_prefix(ids, mask, P - 1) is not None
    with torch.no_grad():
        steps = [(session := core.start(ids[:, :P], mask[:, :P], P + T, record=True)).logits]
        steps += [session.step(ids[:, t])[0] for t in range(P, P + T - 1)]
        session.close()
        each = torch.cat([core.forward(ids[b : b + 1], mask[b : b + 1])[0] for b in range(len(group))])
        for b in (0, 3, 5):
            real = mask[b].bool()
            torch.testing.assert_close(each[b, real], model(ids[b, real][None]).logits[0], **TOL)
    torch.testing.assert_close(torch.stack(steps, 1), each[:, P - 1 : -1], **TOL)
    logits, grads = _grads(model, core, ids[:, :-1], mask[:, :-1], P - 1)
    assert core.replayed == 1  # the shared prompts and the record together
    torch.testing.assert_close(logits, each[:, P - 1 : -1], **TOL)
    _assert_grads_close(grads, _grads(model, hf, ids[:, :-1], mask[:, :-1], P - 1)[1], "shared prompts")
    rows = torch.tensor([6, 0, 1, 5, 7])  # some rows of the record, out of order (a minibatch): still shared
    assert core._shared_prefix(ids[rows], mask[rows], P - 1) is not None
    logits, grads = _grads(model, core, ids[rows, :-1], mask[rows, :-1], P - 1, rows)
    assert core.replayed == 2
    torch.testing.assert_close(logits, each[rows, P - 1 : -1], **TOL)
    _assert_grads_close(grads, _grads(model, hf, ids[rows, :-1], mask[rows, :-1], P - 1)[1], "a minibatch")
    with torch.no_grad():  # start=0: the prompts' positions too
        torch.testing.assert_close(core.forward(ids, mask)[0][mask.bool()], each[mask.bool()], **TOL)


# --- which core runs --------------------------------------------------------------------------------------------


def test_make_core_picks_the_engine(request):
    for arch in ARCHS:
        model, _ = load_lm(request.getfixturevalue(arch))
        assert Engine.supports(model) and Engine.why_not(model) is None, arch
        core = make_core(model)
        assert type(core) is Engine and core.arch == FAMILY[arch], arch
        assert type(make_core(model, fast=False)) is HFCore, arch


class LoraLinear(nn.Module):
    """A LoRA-like wrapper the engine does not know (its base is ``.base``, not peft's ``.base_layer``): the
    base layer plus a low-rank update, which must never run as the plain base weights."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.5)  # nonzero: the update changes the outputs

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x))


@pytest.mark.parametrize("arch", ["llama_gqa_dir", "qwen3_dir"])
def test_an_unsupported_module_falls_back_to_hf(request, arch):
    model = _model(request, arch)
    ids, mask = _batch(_vocab(model))
    plain = Engine(model).forward(ids, mask)[0].detach()
    attn = model.model.layers[0].self_attn
    attn.q_proj = LoraLinear(attn.q_proj)
    reason = Engine.why_not(model)
    assert not Engine.supports(model) and reason is not None
    assert "layers.0.self_attn.q_proj" in reason and "LoraLinear" in reason, reason
    with pytest.raises(ValueError, match=r"q_proj"):
        Engine(model)
    core = make_core(model)
    assert type(core) is HFCore
    with torch.no_grad():
        logits = core.forward(ids, mask)[0]
        real = mask[0].bool()
        torch.testing.assert_close(logits[0, real], model(ids[0, real][None]).logits[0], **TOL)
    assert (logits - plain)[mask.bool()].abs().max() > 1e-2  # the LoRA update is in what runs


# --- an agent trained through the engine ----------------------------------------------------------------------


@pytest.fixture
def llama_env(llama_gqa_dir):
    from envs import TextGenEnv

    prompts = ["The old king", "The young queen", "The brave knight", "The quiet river"]
    return TextGenEnv(lm=str(llama_gqa_dir), prompts=prompts, reward="keyword_reward", max_new_tokens=6, stop=None)


@pytest.mark.parametrize("name", ["reinforce", "ppo"])
def test_an_agent_trains_through_the_engine(llama_env, name):
    from agents import PPO, REINFORCE, PPOConfig, REINFORCEConfig

    if name == "ppo":  # one epoch, one minibatch: the update's forward is on-policy
        agent = PPO(llama_env, config=PPOConfig(batch_size=8, minibatch_size=8, n_epochs=1, learning_rate=1e-3), seed=0)
    else:
        agent = REINFORCE(llama_env, config=REINFORCEConfig(batch_size=8, group_size=4, learning_rate=1e-3), seed=0)
    assert type(agent.policy.core) is Engine and type(agent.policy.ref_core) is Engine
    rollout, _, kl = agent.collect()
    assert torch.isfinite(kl).all() and kl.abs().max() < 1e-5  # the reference is the policy still
    logits, _ = agent.policy.logits_and_values(
        rollout.ids, rollout.attention_mask, rollout.prompt_len, need_values=False
    )
    logprobs, _ = agent.logprobs_and_entropy(logits, rollout.actions)
    valid = rollout.action_mask
    torch.testing.assert_close(logprobs[valid], rollout.logprobs[valid], atol=1e-5, rtol=1e-5)

    before = [p.detach().clone() for p in agent.policy.model.parameters()]
    stats: list[dict] = []
    agent.learn(1, callback=lambda a, s: stats.append(s))
    changed = [not torch.equal(a, b) for a, b in zip(before, agent.policy.model.parameters(), strict=True)]
    assert sum(changed) >= len(changed) // 2
    assert agent.policy.core.replayed >= 2  # evaluate() above and the update both replayed the rollout
    if name == "ppo":  # the update's first forward is the rollout's record: the ratio is exactly 1
        assert stats[0]["losses/approx_kl"] == 0.0


def test_a_record_over_the_memory_budget_is_not_kept(request, llama_env):
    """``record_bytes`` is what a record takes; over ``record_limit`` the rollout is not recorded (and the last
    record is freed), and the update computes its forward: the same training up to float rounding."""
    from agents import REINFORCE, REINFORCEConfig

    model = _model(request, "llama_gqa_dir")
    core = Engine(model)
    ids, mask = _batch(_vocab(model), B=4)
    P, S = 6, ids.shape[1]
    with torch.no_grad():
        session = core.start(ids[:, :P], mask[:, :P], S, record=True)
        session.close()
    rec = core._record
    kept = sum(b.numel() * b.element_size() for b in [*rec.out.values(), rec.logits])
    assert core.record_bytes(4, P, S) == kept
    core.record_limit = kept - 1
    with torch.no_grad():
        session = core.start(ids[:, :P], mask[:, :P], S, record=True)
        session.close()
    assert core._record is None

    agents = {}
    for mb in (4096.0, 0.0):
        config = REINFORCEConfig(batch_size=8, group_size=4, learning_rate=1e-3, replay_memory_mb=mb)
        agents[mb] = REINFORCE(llama_env, config=config, seed=0)
        agents[mb].learn(1)
    assert agents[4096.0].policy.core.replayed == 1 and agents[0.0].policy.core.replayed == 0
    for a, b in zip(agents[4096.0].policy.model.parameters(), agents[0.0].policy.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_linear_weights_are_stored_input_major_and_gradients_keep_that_layout(request, tmp_path):
    """On CPU the engine re-strides the blocks' ``nn.Linear`` weights and the untied LM head's in place (same
    values, same Parameter objects); gradients, computed or replayed, arrive in that layout (nothing is
    transposed per step), and the model still saves and reloads as a plain HF folder."""
    model = _model(request, "llama_gqa_dir")
    params = {n: p for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in params.items()}
    core = Engine(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 7 + 1 and "lm_head" in linears  # the blocks' and the head (not tied here)
    for n in linears:
        w = model.get_submodule(n).weight
        assert w is params[f"{n}.weight"] and w.stride() == (1, w.shape[0]), n
    assert model.get_input_embeddings().weight.is_contiguous()  # lookups gather its rows
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    ids, mask = _batch(_vocab(model), B=4)
    P, S = 6, ids.shape[1]
    for replay in (False, True):
        if replay:
            with torch.no_grad():
                session = core.start(ids[:, :P], mask[:, :P], S, record=True)
                for t in range(P, S - 1):
                    session.step(ids[:, t])
                session.close()
        replayed = core.replayed
        model.zero_grad(set_to_none=True)
        logits, hidden = core.forward(ids[:, :-1], mask[:, :-1], P - 1)
        _loss(logits, hidden, mask[:, P:].bool()).backward()
        assert core.replayed == replayed + replay
        for n in linears:
            w = model.get_submodule(n).weight
            assert w.grad.stride() == w.stride(), (n, replay)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for n, p in reloaded.named_parameters():
        assert torch.equal(p, params[n]), n


def _file_mappings(path) -> list[tuple[int, int]]:
    """The address ranges this process maps ``path`` at (/proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == str(path):
                lo, hi = (int(a, 16) for a in fields[0].split("-"))
                ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("arch", ["gpt2_dir", "llama_gqa_dir"])
def test_the_engine_gives_every_parameter_memory_of_its_own(request, arch):
    """A model loaded from safetensors points into the file's mapping (transformers maps it); the engine copies
    every CPU parameter into memory of its own, GPT-2's already input-major Conv1D weights included (in the
    mapping, a decode step's strided walk down each weight runs about half as fast), with the same values; a
    second engine on the same model copies nothing again."""
    folder = request.getfixturevalue(arch)
    model = load_lm(folder)[0]
    weights = (folder / "model.safetensors").resolve()

    def in_file() -> list[str]:
        ranges = _file_mappings(weights)
        return [n for n, p in model.named_parameters() if any(lo <= p.data_ptr() < hi for lo, hi in ranges)]

    if not in_file():
        pytest.skip("this transformers loads safetensors into memory of its own, not a file mapping")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Engine(model)
    assert in_file() == []
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    pointers = [p.data_ptr() for p in model.parameters()]
    Engine(model)
    assert [p.data_ptr() for p in model.parameters()] == pointers


def test_a_tied_lm_head_keeps_the_embedding_layout(request):
    """A head tied to the embedding table is that table: it stays (V, E)-contiguous (lookups gather its rows)
    while the blocks' weights are re-strided, and its decode logits still match the HF forward."""
    model = _model(request, "qwen3_dir")
    assert model.lm_head.weight is model.get_input_embeddings().weight
    core = Engine(model)
    assert model.lm_head.weight.is_contiguous()
    assert model.model.layers[0].mlp.up_proj.weight.stride()[0] == 1
    ids = torch.randint(0, _vocab(model), (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        session = core.start(ids[:, :4], torch.ones(2, 4, dtype=torch.long), 6)
        logits, _ = session.step(ids[:, 4])
        session.close()
        expected = model(ids[:, :5]).logits[:, -1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_input_major_adam_steps_exactly_as_adam_and_keeps_the_layout(fused):
    """``InputMajorAdam`` on input-major weights gives bit for bit the numbers torch's Adam gives on the same
    weights stored (out, in)-contiguous (sizes that are multiples of the vector width, as model weights
    are), with a closure and over several steps; parameters, gradients and
    moments keep their layout and shape (the saved state too), the step hooks run once per step, and the
    Adam made elsewhere keeps its own hooks."""
    from textrl.ops import InputMajorAdam, is_input_major

    g = torch.Generator().manual_seed(0)
    shapes = [(32, 16), (16, 48), (7,)]
    plain = [nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    mine = [nn.Parameter(p.detach().t().contiguous().t() if p.dim() == 2 else p.detach().clone()) for p in plain]
    assert [is_input_major(p) for p in mine] == [True, True, False]
    reference = torch.optim.Adam(plain, lr=0.1, eps=1e-5, fused=fused)
    opt = InputMajorAdam(mine, lr=0.1, eps=1e-5, fused=fused)
    calls = []
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    reference.register_step_post_hook(lambda *_: calls.append("other"))

    def give_grads(step):  # the same gradient values, each in its parameter's layout (as autograd gives them)
        for i, (p, q) in enumerate(zip(plain, mine, strict=True)):
            grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i))
            p.grad, q.grad = grad.clone(), grad.t().contiguous().t() if grad.dim() == 2 else grad.clone()
        return torch.tensor(float(step))

    for step in range(3):
        give_grads(step)
        if step == 1:  # moments in the plain layout (as a checkpoint loads them): relaid, same numbers
            opt.state[mine[0]]["exp_avg"] = opt.state[mine[0]]["exp_avg"].contiguous()
        reference.step()
        if step == 2:  # a closure runs before the parameters are handed over
            assert float(opt.step(lambda step=step: give_grads(step))) == step
        else:
            opt.step()
        for p, q in zip(plain, mine, strict=True):
            assert q.shape == p.shape and torch.equal(p, q)
            assert q.grad.stride() == q.stride()
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(reference.state[p][key], opt.state[q][key])
                assert opt.state[q][key].stride() == q.stride()
    assert calls == ["other", "pre", "post"] * 3
    assert [is_input_major(p) for p in mine] == [True, True, False]
    saved = opt.state_dict()["state"]
    assert [saved[i]["exp_avg"].shape for i in range(3)] == [torch.Size(s) for s in shapes]


def test_rotary_with_the_sign_in_the_table_is_hf_rotary_bit_for_bit():
    """``rotate`` with ``signed_sin`` gives exactly HF Llama's ``apply_rotary_pos_emb`` (queries and keys of
    different head counts rotated as one tensor, as the engine does), forward and backward."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from textrl.ops import rotate, signed_sin

    g = torch.Generator().manual_seed(0)
    B, H, G, S, D = 2, 4, 2, 5, 8
    q, k = torch.randn(B, H, S, D, generator=g), torch.randn(B, G, S, D, generator=g)
    angles = torch.randn(B, S, D // 2, generator=g)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()  # HF's (B, S, D)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    qk = torch.cat((q, k), 1).requires_grad_()
    got_q, got_k = rotate(qk, cos[:, None], signed_sin(sin)[:, None]).split((H, G), 1)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    grad_q, grad_k = torch.randn_like(q), torch.randn_like(k)
    ((got_q * grad_q).sum() + (got_k * grad_k).sum()).backward()
    leaf = torch.cat((q, k), 1).requires_grad_()
    want = apply_rotary_pos_emb(*leaf.split((H, G), 1), cos, sin)
    ((want[0] * grad_q).sum() + (want[1] * grad_k).sum()).backward()
    assert torch.equal(qk.grad, leaf.grad)


@pytest.mark.parametrize("kind", ["engine", "hf"])
def test_decode_sessions_are_independent(request, kind):
    """The decode state lives in the session: two open sessions on one core (e.g. an evaluation while a
    rollout is open) give each exactly what it gives alone; a closed session refuses to step."""
    model = _model(request, "llama_gqa_dir")
    core = Engine(model) if kind == "engine" else HFCore(model)
    ids, mask = _batch(_vocab(model), B=3, S=10)
    P, S = 5, ids.shape[1]
    with core.start(ids[:, :P], mask[:, :P], S) as alone:
        expected = [alone.logits] + [alone.step(ids[:, t])[0] for t in range(P, S - 1)]
    a = core.start(ids[:, :P], mask[:, :P], S, record=True)
    b = core.start(ids[:, :P].flip(0), mask[:, :P].flip(0), S)  # same shape: must not share a's cache
    got_a, got_b = [a.logits], [b.logits]
    for t in range(P, S - 1):
        got_a.append(a.step(ids[:, t])[0])
        got_b.append(b.step(ids[:, t].flip(0))[0])
    a.close()
    b.close()
    for x, y, z in zip(expected, got_a, got_b, strict=True):
        torch.testing.assert_close(y, x, **TOL)
        torch.testing.assert_close(z, x.flip(0), **TOL)
    with pytest.raises(RuntimeError, match="closed"):
        a.step(ids[:, P])
    a.close()  # closing twice is harmless


def test_a_decode_step_that_cannot_compile_runs_uncompiled_with_a_warning(request, monkeypatch):
    """decode_step="compile" where torch.compile fails (no C++ compiler, say): a warning names the cause, the
    step runs uncompiled and the rollout's logits are the eager step's; the next session does not retry."""
    model = _model(request, "llama_gqa_dir")
    ids, mask = _batch(_vocab(model), B=3, S=10)
    P, S = 5, ids.shape[1]

    def rollout(core):
        with torch.no_grad(), core.start(ids[:, :P], mask[:, :P], S, record=True) as session:
            return torch.stack([session.logits] + [session.step(ids[:, t])[0] for t in range(P, S)], 1)

    expected = rollout(Engine(model))
    attempts = []

    def no_compiler(fn, **kwargs):
        def compiled(*args):
            attempts.append(kwargs)
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    core = Engine(model)
    core.decode_step = "compile"
    with pytest.warns(RuntimeWarning, match="could not compile the decode step.*InvalidCxxCompiler"):
        got = rollout(core)
    torch.testing.assert_close(got, expected, **TOL)
    assert attempts == [{"dynamic": False, "options": {"cpp_wrapper": True}}]  # once, then uncompiled
    torch.testing.assert_close(rollout(core), expected, **TOL)
    assert len(attempts) == 1


# --- mixture of experts: the router's load-balancing loss ------------------------------------------------------


@pytest.mark.parametrize("arch", ["mixtral_dir", "qwen2_moe_dir"])
def test_router_balance_loss_equals_hf_aux_loss(request, arch):
    """The routing the engine logs gives HF's own load-balancing loss (``aux_loss``), padding excluded."""
    from textrl.core import positions_from_mask
    from textrl.ops import router_balance_loss

    model = _model(request, arch)
    ids, mask = _batch(_vocab(model))
    with torch.no_grad():
        hf = model(
            input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), output_router_logits=True
        )
    core = Engine(model)
    core.router_log = []
    core.forward(ids, mask)
    sparse = sum(layer.moe is not None for layer in core.spec.layers)  # Qwen2-MoE may keep dense layers
    assert sparse >= 1 and len(core.router_log) == sparse
    assert sum(len(p) for p, _ in core.router_log) == sparse * int(mask.sum())  # the real tokens only
    torch.testing.assert_close(router_balance_loss(core.router_log), hf.aux_loss, atol=1e-5, rtol=1e-5)


def test_an_agent_keeps_the_router_balanced_when_asked(mixtral_dir, llama_gqa_dir):
    from agents import REINFORCE, REINFORCEConfig
    from envs import TextGenEnv

    def env(lm):
        return TextGenEnv(lm=str(lm), prompts=["The old king"], reward="keyword_reward", max_new_tokens=5, stop=None)

    def router_grad(coef: float) -> torch.Tensor:
        config = REINFORCEConfig(batch_size=4, group_size=2, router_aux_coef=coef, max_grad_norm=0.0)
        agent = REINFORCE(env(mixtral_dir), config=config, seed=0)
        router = agent.policy.core.spec.layers[0].moe.router.weight
        grads: list[torch.Tensor] = []
        router.register_post_accumulate_grad_hook(lambda p: grads.append(p.grad.clone()))
        stats: list[dict] = []
        agent.learn(1, callback=lambda a, s: stats.append(s))
        assert ("losses/router_balance" in stats[0]) == (coef > 0)
        if coef > 0:
            assert 1.5 < stats[0]["losses/router_balance"] < 4.0  # about top_k = 2 near an even load
        return grads[0]

    plain, balanced = router_grad(0.0), router_grad(1.0)
    assert not torch.allclose(plain, balanced)  # the balance term reaches the router
    with pytest.raises(ValueError, match="router_aux_coef > 0 needs a mixture-of-experts policy"):
        REINFORCE(env(llama_gqa_dir), config=REINFORCEConfig(batch_size=4, group_size=2, router_aux_coef=0.1))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_torch_sdpa(heads, kv_heads, dtype):
    """The compiled CPU decode step's attention (one query over the cache, written out for inductor to fuse)
    is torch's SDPA: grouped queries, a key mask with holes (left padding, a sliding window) and rows that see
    a single key; in bf16 it rounds once, at the end."""
    from textrl.ops import decode_attention

    g = torch.Generator().manual_seed(0)
    B, S, D = 5, 11, 16
    q = torch.randn(B, heads, 1, D, generator=g)
    k, v = torch.randn(2, B, kv_heads, S, D, generator=g)
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.4
    mask[:, ..., -1] = True  # the step's own column is always seen
    mask[0] = False
    mask[0, ..., 3] = True  # a row that sees one key only
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    mine = decode_attention(q, k, v, mask)
    gqa = {"enable_gqa": True} if kv_heads != heads else {}
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, **gqa)
    assert mine.dtype == dtype and mine.shape == (B, heads, 1, D)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(mine.float(), expected, **tol)
    torch.testing.assert_close(mine[0].float(), v[0, :, 3:4].float().repeat_interleave(heads // kv_heads, 0), **tol)
