"""The model cores agree with the Hugging Face forward: full pass with left padding, and prefill + decode."""

from __future__ import annotations

import pytest
import torch

from textrl.core import GPT2Core, HFCore, make_core, positions_from_mask
from textrl.lm import load_lm


def _batch(vocab: int):
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :4] = 0  # left padding of different widths
    mask[1, :1] = 0
    return ids, mask


def test_positions_from_mask():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


@pytest.mark.parametrize(
    ("arch", "core_cls"),
    [("gpt2_dir", GPT2Core), ("gpt2_dir", HFCore), ("llama_dir", HFCore), ("qwen2_dir", HFCore)],
)
def test_core_matches_hf_forward(request, arch, core_cls):
    model, _ = load_lm(request.getfixturevalue(arch))
    core = core_cls(model)
    vocab = model.get_input_embeddings().num_embeddings
    ids, mask = _batch(vocab)
    with torch.no_grad():
        logits, _ = core.forward(ids, mask)  # (B, S, V)
        for b in range(3):
            real = ids[b, mask[b].bool()]
            expected = model(real[None]).logits[0]  # the row alone, unpadded
            torch.testing.assert_close(logits[b, mask[b].bool()], expected, atol=2e-5, rtol=1e-4)

        tail_logits, tail_hidden = core.forward(ids, mask, start=7)  # the head only where it is needed
        full_hidden = core.forward(ids, mask)[1]
        torch.testing.assert_close(tail_logits, logits[:, 7:])
        torch.testing.assert_close(tail_hidden, full_hidden[:, 7:])

        P = 6
        step_logits = [core.prefill(ids[:, :P], mask[:, :P], 12)[0]]
        for t in range(P, 10):
            step_logits.append(core.decode(ids[:, t])[0])
        cached = torch.stack(step_logits[:-1], 1)  # predictions at positions P-1 .. 8
        torch.testing.assert_close(cached, logits[:, P - 1 : 9], atol=2e-5, rtol=1e-4)
        core.release()


def test_make_core_picks_fast_path_for_gpt2(gpt2_dir, llama_dir):
    assert not GPT2Core.supports(load_lm(llama_dir)[0])
    assert isinstance(make_core(load_lm(gpt2_dir)[0]), GPT2Core)
    assert isinstance(make_core(load_lm(llama_dir)[0]), HFCore)
    assert isinstance(make_core(load_lm(gpt2_dir)[0], fast=False), HFCore)


def test_decode_past_cache_raises(gpt2_dir):
    core = GPT2Core(load_lm(gpt2_dir)[0])
    ids = torch.zeros(1, 2, dtype=torch.long)
    core.prefill(ids, torch.ones_like(ids), 3)
    core.decode(torch.zeros(1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="KV cache full"):
        core.decode(torch.zeros(1, dtype=torch.long))
