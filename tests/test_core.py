"""The model cores agree with the Hugging Face forward: full pass with left padding, and prefill + decode."""

from __future__ import annotations

import pytest
import torch

from textrl.core import HFCore, core_name, make_core, positions_from_mask
from textrl.engine import Engine
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
    [("gpt2_dir", Engine), ("gpt2_dir", HFCore), ("llama_dir", HFCore), ("qwen2_dir", HFCore)],
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
        step_logits = [(session := core.start(ids[:, :P], mask[:, :P], 12)).logits]
        for t in range(P, 10):
            step_logits.append(session.step(ids[:, t])[0])
        cached = torch.stack(step_logits[:-1], 1)  # predictions at positions P-1 .. 8
        torch.testing.assert_close(cached, logits[:, P - 1 : 9], atol=2e-5, rtol=1e-4)
        session.close()


def test_make_core_picks_the_engine(gpt2_dir, llama_dir):
    assert core_name(make_core(load_lm(gpt2_dir)[0])) == "engine (gpt2)"
    assert core_name(make_core(load_lm(llama_dir)[0])) == "engine (llama)"
    slow = make_core(load_lm(gpt2_dir)[0], fast=False)
    assert isinstance(slow, HFCore) and core_name(slow) == "HF forward (fast cores off)"


def test_decode_past_cache_raises(gpt2_dir):
    core = Engine(load_lm(gpt2_dir)[0])
    ids = torch.zeros(1, 2, dtype=torch.long)
    session = core.start(ids, torch.ones_like(ids), 3)
    session.step(torch.zeros(1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="KV cache full"):
        session.step(torch.zeros(1, dtype=torch.long))


# --- rollout replay: the update's forward takes the linear layers' outputs from the rollout's record ----------


def _recorded_rollout(core: Engine, vocab: int, steps: int = 6):
    """Prefill 3 left-padded prompts with a record, decode ``steps`` tokens; returns ids, mask, P."""
    ids, mask = _batch(vocab)
    P = 5
    ids, mask = ids[:, :P], mask[:, :P]
    torch.manual_seed(2)
    new = torch.randint(0, vocab, (3, steps))
    with torch.no_grad():
        session = core.start(ids, mask, P + steps, record=True)
        for t in range(steps - 1):  # the last token is never fed: nothing predicts past it
            session.step(new[:, t])
    session.close()
    return torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1), P


def _loss_grads(core: Engine, ids, mask, P, rows=None):
    """Logits of the generated positions and the gradients of a loss over them."""
    core.model.zero_grad(set_to_none=True)
    logits, hidden = core.forward(ids[:, :-1], mask[:, :-1], P - 1, rows)
    weights = torch.linspace(-1, 1, logits.shape[-1])
    valid = mask[:, P:, None]
    ((logits.log_softmax(-1) * weights * valid).sum() + (hidden * valid).square().sum()).backward()
    grads = {n: p.grad.clone() for n, p in core.model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _assert_grads_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        scale = b[name].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(a[name] / scale, b[name] / scale, atol=2e-5, rtol=0, msg=name)


def test_replay_gives_the_recomputed_logits_and_gradients(gpt2_dir):
    core = Engine(load_lm(gpt2_dir)[0])
    vocab = core.spec.head.weight.shape[0]
    ids, mask, P = _recorded_rollout(core, vocab)
    mask[2, -2:] = 0  # row 2 ended early: its last tokens are pads in the update, not what the decode fed
    ids[2, -2:] = 0
    replayed_logits, replayed = _loss_grads(core, ids, mask, P)
    assert core.replayed == 1
    record, core._record = core._record, None
    logits, recomputed = _loss_grads(core, ids, mask, P)
    assert core.replayed == 1  # no record: computed
    valid = mask[:, P:].bool()
    torch.testing.assert_close(replayed_logits[valid], logits[valid], atol=2e-5, rtol=1e-4)
    _assert_grads_close(replayed, recomputed)

    core._record = record  # a subset of rows, as a PPO minibatch asks for them
    rows = torch.tensor([2, 0])
    _, sub_replayed = _loss_grads(core, ids[rows], mask[rows], P, rows)
    assert core.replayed == 2
    core._record = None
    _, sub_recomputed = _loss_grads(core, ids[rows], mask[rows], P)
    _assert_grads_close(sub_replayed, sub_recomputed)


def test_replay_only_for_the_recorded_tokens_and_weights(gpt2_dir):
    core = Engine(load_lm(gpt2_dir)[0])
    vocab = core.spec.head.weight.shape[0]
    ids, mask, P = _recorded_rollout(core, vocab)

    other = ids.clone()
    other[1, P + 1] = (other[1, P + 1] + 1) % vocab  # one token differs
    _loss_grads(core, other, mask, P)
    assert core.replayed == 0
    holed = mask.clone()
    holed[0, P + 1] = 0  # a hole inside a completion: the decode let later tokens see that one
    _loss_grads(core, ids, holed, P)
    assert core.replayed == 0
    _loss_grads(core, ids, mask, P, rows=torch.tensor([1, 0]))  # rows named in another order than given
    assert core.replayed == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        core.forward(ids[:, :-1], mask[:, :-1], P - 1)
    assert core.replayed == 0

    _loss_grads(core, ids, mask, P)
    assert core.replayed == 1
    torch.optim.SGD(core.model.parameters(), lr=0.1).step()  # the weights move: the record is stale
    logits, _ = core.forward(ids[:, :-1], mask[:, :-1], P - 1)
    assert core.replayed == 1
    core._record = None
    torch.testing.assert_close(logits, core.forward(ids[:, :-1], mask[:, :-1], P - 1)[0])


def test_record_reuses_its_buffers_and_survives_a_full_cache(gpt2_dir):
    core = Engine(load_lm(gpt2_dir)[0])
    vocab = core.spec.head.weight.shape[0]
    _recorded_rollout(core, vocab)
    buffer = next(iter(core._record.out.values()))
    ids, mask, P = _recorded_rollout(core, vocab)
    assert next(iter(core._record.out.values())) is buffer  # same shapes: the same memory
    with torch.no_grad():  # decode into the last cache position: beyond what an update can use
        session = core.start(ids[:, :P], mask[:, :P], P + 2, record=True)
        session.step(ids[:, P])
        session.step(ids[:, P + 1])
    _loss_grads(core, ids[:, : P + 2], mask[:, : P + 2], P)
    assert core.replayed == 1


def test_a_rollout_without_record_leaves_the_last_record_valid(gpt2_dir):
    """An evaluation or generate() between a training rollout and its update changes nothing for the replay."""
    core = Engine(load_lm(gpt2_dir)[0])
    vocab = core.spec.head.weight.shape[0]
    ids, mask, P = _recorded_rollout(core, vocab)
    with torch.no_grad():  # other prompts and tokens, not recorded
        session = core.start(ids[:, :P].flip(0), mask[:, :P].flip(0), P + 4)
        for t in range(3):
            session.step((ids[:, P + t] + 1) % vocab)
    session.close()
    replayed_logits, replayed = _loss_grads(core, ids, mask, P)
    assert core.replayed == 1
    core._record = None
    logits, recomputed = _loss_grads(core, ids, mask, P)
    torch.testing.assert_close(replayed_logits, logits, atol=2e-5, rtol=1e-4)
    _assert_grads_close(replayed, recomputed)


# --- shared prompts: rows with the same prompt compute it once ------------------------------------------------


def test_rows_with_the_same_prompt_compute_it_once(gpt2_dir, monkeypatch):
    """Prefill, decode, the record, the whole-sequence forward, its replay (all rows, and a minibatch) and
    their gradients are the same whether rows that share a prompt (groups of samples of one prompt, with left
    padding) compute it once or each."""
    core = Engine(load_lm(gpt2_dir)[0])
    vocab = core.spec.head.weight.shape[0]
    base_ids, base_mask = _batch(vocab)
    P, steps = 6, 4
    group = torch.tensor([0, 0, 1, 2, 1, 2, 2, 0])  # 3 prompts, each sampled two or three times
    ids, mask = base_ids[group, :P], base_mask[group, :P]
    torch.manual_seed(3)
    new = torch.randint(0, vocab, (len(group), steps))
    assert core._shared_prefix(ids, mask, P) is not None
    assert core._shared_prefix(base_ids, base_mask, P) is None  # 3 distinct rows: nothing to share

    def run():
        with torch.no_grad():
            session = core.start(ids, mask, P + steps, record=True)
            out = [(session.logits, session.hidden)]
            out += [session.step(new[:, t]) for t in range(steps - 1)]
        session.close()
        rec = core._record
        recorded = [b.clone() for b in [*rec.out.values(), rec.logits]]
        full_ids, full_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
        replays = core.replayed
        replayed = _loss_grads(core, full_ids, full_mask, P)[1]
        rows = torch.tensor([0, 1, 2, 4])  # a minibatch of two prompts, two samples each
        sub_replayed = _loss_grads(core, full_ids[rows], full_mask[rows], P, rows)[1]
        assert core.replayed == replays + 2
        core._record = None  # the whole-sequence forward, not a replay
        logits, grads = _loss_grads(core, full_ids, full_mask, P)
        sub_grads = _loss_grads(core, full_ids[rows], full_mask[rows], P)[1]
        cached = torch.stack([step_logits for step_logits, _ in out], 1)  # the rollout's predictions
        torch.testing.assert_close(cached, logits, atol=2e-5, rtol=1e-4)
        _assert_grads_close(replayed, grads)
        _assert_grads_close(sub_replayed, sub_grads)
        return out, recorded, logits, grads

    shared = run()
    monkeypatch.setattr(Engine, "_shared_prefix", staticmethod(lambda ids, mask, n: None))
    each = run()
    for (la, ha), (lb, hb) in zip(shared[0], each[0], strict=True):
        torch.testing.assert_close(la, lb, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ha, hb, atol=2e-5, rtol=1e-4)
    for a, b in zip(shared[1], each[1], strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(shared[2], each[2], atol=2e-5, rtol=1e-4)
    _assert_grads_close(shared[3], each[3])
