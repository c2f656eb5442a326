"""textrl.policy.action_logprobs: the chunked log-softmax + gather must equal the plain autograd version."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from textrl import policy
from textrl.policy import action_logprobs


def _reference(logits, actions):
    logp = F.log_softmax(logits, -1)
    p = logp.exp()
    entropy = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
    return logp.gather(-1, actions[..., None]).squeeze(-1), entropy


@pytest.mark.parametrize("chunk_bytes", [64, 1 << 19])  # many small chunks, and the default
@pytest.mark.parametrize("filtered", [False, True])  # -inf logits, as top-k / top-p leave them
def test_action_logprobs_values_entropy_and_gradient(monkeypatch, chunk_bytes, filtered):
    monkeypatch.setattr(policy, "_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 5, 37
    base = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    if filtered:
        base[..., 20:] = -torch.inf  # actions below stay valid
    actions = torch.randint(0, 20, (B, T), generator=g)
    weights = torch.randn(B, T, generator=g, dtype=torch.float64)

    x1 = base.clone().requires_grad_(True)
    logp, entropy = action_logprobs(x1, actions, entropy=True)
    (logp * weights).sum().backward()

    x2 = base.clone().requires_grad_(True)
    ref_logp, ref_entropy = _reference(x2, actions)
    (ref_logp * weights).sum().backward()

    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(entropy, ref_entropy.detach())
    torch.testing.assert_close(x1.grad, x2.grad)
    # the entropy is for logging only: a loss that includes it gets the log-probs' gradient alone
    x3 = base.clone().requires_grad_(True)
    logp3, entropy3 = action_logprobs(x3, actions, entropy=True)
    ((logp3 * weights).sum() + entropy3.sum()).backward()
    torch.testing.assert_close(x3.grad, x2.grad)
    logp_only, none = action_logprobs(base, actions)
    assert none is None
    torch.testing.assert_close(logp_only, ref_logp.detach())


@pytest.mark.parametrize("chunk_bytes", [64, 1 << 19])
def test_suppressed_tokens_are_removed_from_the_distribution(monkeypatch, chunk_bytes):
    """``suppress_tokens`` gives what -inf logits give (values, entropy, gradient), without touching the input."""
    monkeypatch.setattr(policy, "_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(1)
    B, T, V = 2, 4, 11
    base = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    actions = torch.randint(2, V, (B, T), generator=g)
    weights = torch.randn(B, T, generator=g, dtype=torch.float64)

    x1 = base.clone().requires_grad_(True)
    logp, entropy = action_logprobs(x1, actions, entropy=True, suppress_tokens=[0, 1])
    (logp * weights).sum().backward()
    x2 = base.clone().requires_grad_(True)
    ref_logp, ref_entropy = _reference(policy.shape_logits(x2, suppress_tokens=[0, 1]), actions)
    (ref_logp * weights).sum().backward()

    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(entropy, ref_entropy.detach())
    torch.testing.assert_close(x1.grad, x2.grad)
    assert torch.equal(x1.grad[..., :2], torch.zeros(B, T, 2, dtype=torch.float64))
    assert (logp > F.log_softmax(base, -1).gather(-1, actions[..., None]).squeeze(-1)).all()  # renormalised
    assert torch.equal(x1.detach(), base)
    # a suppressed token is never drawn, however likely
    probs = F.softmax(policy.shape_logits(torch.tensor([[9.0, 0.0, 0.0]]).repeat(200, 1), suppress_tokens=[0]), -1)
    assert (policy.sample(probs, g) != 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_bytes", [64, 1 << 19])
@pytest.mark.parametrize("suppressed", [(), (0, 5)])
def test_half_precision_logits_give_the_float32_copys_numbers_bit_for_bit(monkeypatch, dtype, chunk_bytes, suppressed):
    """bf16/fp16 logits passed as they are: the log-probs and entropies (float32) of ``logits.float()``, and
    the same gradient in the logits' dtype, bit for bit; no float32 copy of the logits is kept."""
    monkeypatch.setattr(policy, "_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(2)
    B, T, V = 3, 6, 41
    base = (torch.randn(B, T, V, generator=g) * 4).to(dtype)
    actions = torch.randint(6, V, (B, T), generator=g)
    weights = torch.randn(B, T, generator=g)

    x1 = base.clone().requires_grad_(True)
    logp, entropy = action_logprobs(x1, actions, entropy=True, suppress_tokens=suppressed)
    assert logp.dtype == entropy.dtype == torch.float32
    (logp * weights).sum().backward()
    x2 = base.clone().requires_grad_(True)
    ref_logp, ref_entropy = action_logprobs(x2.float(), actions, entropy=True, suppress_tokens=suppressed)
    (ref_logp * weights).sum().backward()

    assert torch.equal(logp, ref_logp) and torch.equal(entropy, ref_entropy)
    assert x1.grad.dtype == dtype and torch.equal(x1.grad, x2.grad)
    # and the float32 numbers are the plain autograd ones (to float32 rounding)
    x3 = base.float().requires_grad_(True)
    plain, _ = _reference(policy.shape_logits(x3, suppress_tokens=list(suppressed)), actions)
    (plain * weights).sum().backward()
    torch.testing.assert_close(logp, plain.detach())
    torch.testing.assert_close(x1.grad.float(), x3.grad.to(dtype).float())
