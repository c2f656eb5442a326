"""peft LoRA layers on the engine: base output plus the adapters' low-rank term, as peft computes it, in
every mode (forward, prefill, decode, replay), with the adapters switched off for a reference pass."""

from __future__ import annotations

import pytest
import torch

from textrl.core import HFCore, make_core
from textrl.engine import Engine
from textrl.lm import load_lm

peft = pytest.importorskip("peft")

TOL = {"atol": 1e-4, "rtol": 1e-4}


def _lora_model(request, arch: str, seed: int = 0):
    """A fixture model with every linear layer LoRA-wrapped (r=4), the adapters set to random values (peft
    starts B at zero, which would hide a wrong low-rank term)."""
    torch.manual_seed(seed)
    model = load_lm(request.getfixturevalue(arch))[0]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    wrapped = peft.get_peft_model(model, config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return wrapped


def _batch(vocab: int, B: int = 3, S: int = 10):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (B, S), generator=gen)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("arch", ["gpt2_dir", "llama_gqa_dir", "qwen2_dir"])
def test_lora_runs_on_the_engine_as_peft_computes_it(request, arch):
    model = _lora_model(request, arch)
    core = make_core(model)
    assert isinstance(core, Engine)  # not the HF fallback
    vocab = model.get_output_embeddings().weight.shape[0]
    ids, mask = _batch(vocab)
    P, S = 5, ids.shape[1]
    with torch.no_grad():
        logits = core.forward(ids, mask)[0]
        expected = HFCore(model).forward(ids, mask)[0]
        valid = mask.bool()
        torch.testing.assert_close(logits[valid], expected[valid], **TOL)
        with core.start(ids[:, :P], mask[:, :P], S, record=True) as session:
            steps = [session.logits] + [session.step(ids[:, t])[0] for t in range(P, S - 1)]
        torch.testing.assert_close(torch.stack(steps, 1), logits[:, P - 1 : S - 1], **TOL)
        with model.disable_adapter():  # the reference pass: the base model, not the record's function
            replayed = core.replayed
            off = core.forward(ids, mask)[0]
            assert core.replayed == replayed
            torch.testing.assert_close(off[valid], HFCore(model).forward(ids, mask)[0][valid], **TOL)
        assert (off - logits).abs().max() > 1e-2  # the adapters do change the function


@pytest.mark.parametrize("arch", ["gpt2_dir", "llama_gqa_dir"])
def test_lora_gradients_reach_only_the_adapters_replayed_or_not(request, arch):
    model = _lora_model(request, arch)
    core = Engine(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids, mask = _batch(vocab, B=4)
    P, S = 5, ids.shape[1]
    weights = torch.linspace(-1, 1, vocab)

    def grads(source, start):
        model.zero_grad(set_to_none=True)
        logits = source.forward(ids[:, :-1], mask[:, :-1], start)[0]
        (logits[mask[:, start + 1 :].bool()].log_softmax(-1) * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = grads(HFCore(model), P - 1)
    assert expected and all("lora_" in n for n in expected)  # peft froze the base
    with torch.no_grad(), core.start(ids[:, :P], mask[:, :P], S, record=True) as session:
        for t in range(P, S - 1):
            session.step(ids[:, t])
    before = core.replayed
    got = grads(core, P - 1)
    assert core.replayed == before + 1  # the base outputs came from the record
    assert got.keys() == expected.keys()
    for name in got:
        scale = expected[name].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(got[name] / scale, expected[name] / scale, atol=1e-4, rtol=0, msg=name)
