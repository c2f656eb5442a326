"""textrl's CPU kernels (``textrl.kernels.split_mm``, ``split_mm_group``): equal to torch's matmul to float32
rounding (the direct kernel for input-major weights, BLAS pieces for other layouts and the last columns),
taken only where they pay, used by every decode step (eager, static, compiled) with the same logits as
without them, and a build that fails falls back to torch's matmul with a warning."""

from __future__ import annotations

import shutil

import pytest
import torch

from textrl import kernels, ops
from textrl.engine import Engine
from textrl.lm import load_lm

# where a C++ compiler is at hand (as torch.compile needs too) the kernel must build: no silent skip
pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build textrl's CPU kernel")


def assert_matmul_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float32 rounding: the kernel sums in another order than the BLAS library, so elements may
    differ by a few units in the last place of the largest product (a wrong tile or offset is off by the
    values themselves)."""
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * max(1.0, expected.abs().max().item()))


def test_the_kernel_builds_and_loads():
    assert kernels.load(), kernels._state.get("error")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# the direct kernel's tiles are 8 rows x 32 columns: whole tiles, rows and columns short of one, both
SHAPES = [(1, 64, 40), (3, 300, 1000), (16, 512, 1408), (32, 256, 4096), (5, 96, 129), (17, 128, 96), (64, 7, 32)]


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("layout", ["input-major", "linear"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_split_mm_equals_torch_matmul(M, K, N, layout, bias, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(M * K + N)
        x = torch.randn(M, K, generator=gen)
        w = torch.randn(K, N, generator=gen) if layout == "input-major" else torch.randn(N, K, generator=gen).t()
        b = torch.randn(N, generator=gen) if bias else None
        expected = torch.mm(x, w) if b is None else torch.addmm(b, x, w)
        assert_matmul_close(kernels.split_mm(x, w, b), expected)
        record = torch.full((M, 5, N), 7.0)  # into column 2 of a record, as a decode step writes it
        got = kernels.split_mm(x, w, b, out=record[:, 2])
        assert got.data_ptr() == record[:, 2].data_ptr()
        assert_matmul_close(record[:, 2], expected)
        assert (record[:, [0, 1, 3, 4]] == 7.0).all()  # the other columns untouched
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("M", [1, 9, 16])
def test_split_mm_group_equals_torch_matmul(M, threads):
    """A group of weights of one input, mixed layouts, widths and biases: each output as torch computes it,
    into fresh tensors or into record columns."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(M)
        x = torch.randn(M, 96, generator=gen)
        ws = [
            torch.randn(96, 128, generator=gen),
            torch.randn(40, 96, generator=gen).t(),
            torch.randn(96, 64, generator=gen),
        ]
        biases = [torch.randn(128, generator=gen), None, torch.randn(64, generator=gen)]
        expected = [x @ w if b is None else torch.addmm(b, x, w) for w, b in zip(ws, biases, strict=True)]
        for got, want in zip(kernels.split_mm_group(x, ws, biases), expected, strict=True):
            assert_matmul_close(got, want)
        records = [torch.full((M, 3, w.shape[1]), 7.0) for w in ws]
        outs = kernels.split_mm_group(x, ws, biases, [r[:, 1] for r in records])
        for record, out, want in zip(records, outs, expected, strict=True):
            assert out.data_ptr() == record[:, 1].data_ptr()
            assert_matmul_close(record[:, 1], want)
            assert (record[:, [0, 2]] == 7.0).all()
    finally:
        torch.set_num_threads(before)


def test_split_mm_group_names_bad_input():
    assert kernels.load()
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match=r"split_mm_group: x is .* but weight 1 is"):
        kernels.split_mm_group(x, [torch.randn(8, 4), torch.randn(9, 4)], [None, None])
    with pytest.raises(RuntimeError, match="split_mm_group: 2 weights but 1 outputs"):
        kernels.split_mm_group(x, [torch.randn(8, 4), torch.randn(8, 4)], [None, None], [torch.empty(2, 4)])
    with pytest.raises(RuntimeError, match="split_mm_group: bias 0 is"):
        kernels.split_mm_group(x, [torch.randn(8, 4)], [torch.randn(5)])


def test_split_mm_names_bad_shapes():
    assert kernels.load()
    with pytest.raises(RuntimeError, match="split_mm: x is"):
        kernels.split_mm(torch.randn(2, 8), torch.randn(9, 4))
    with pytest.raises(RuntimeError, match=r"split_mm: output 0 is \[2, 5\], expected 2 x 4"):
        kernels.split_mm(torch.randn(2, 8), torch.randn(8, 4), out=torch.empty(2, 5))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "heads,kv_heads,D,S",
    [(8, 4, 64, 40), (4, 4, 64, 3), (6, 2, 24, 19), (4, 1, 128, 33), (2, 2, 48, 70), (3, 3, 300, 17), (4, 2, 16, 1)],
)
def test_decode_attention_kernel_equals_torch_sdpa(threads, heads, kv_heads, D, S):
    """The decode step's attention kernel is torch's SDPA to float32 rounding: grouped queries, head sizes its
    register path takes (multiples of 16 up to 256) and ones it does not, cache views (strided keys and values),
    masks with holes, per head or broadcast over rows, and a row that sees a single key."""
    assert kernels.load()
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(S)
    B = 5
    q = torch.randn(B, heads, 1, D, generator=g)
    cache_k, cache_v = torch.randn(2, B, kv_heads, S + 7, D, generator=g)
    k, v = cache_k[:, :, 2 : S + 2], cache_v[:, :, 2 : S + 2]  # views into a longer cache
    gqa = {"enable_gqa": True} if kv_heads != heads else {}
    masks = [torch.rand(B, 1, 1, S, generator=g) > 0.4, torch.rand(B, heads, 1, S, generator=g) > 0.5]
    masks.append(torch.rand(1, 1, 1, S, generator=g) > 0.3)
    for mask in masks:
        mask[..., -1] = True  # the step's own column is always seen
        if mask.shape[0] == B:
            mask[0] = False
            mask[0, ..., 0] = True  # a row that sees one key only
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
        got = kernels.decode_attention(q, k, v, mask)
        assert got.shape == (B, heads, 1, D) and got.is_contiguous()
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)
    torch.set_num_threads(2)


def test_decode_attention_names_bad_input():
    assert kernels.load()
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 5, 16)
    seen = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="decode_attention: one query per row"):
        kernels.decode_attention(torch.randn(2, 4, 3, 16), k, k, seen)
    with pytest.raises(RuntimeError, match=r"decode_attention: q \[2, 3, 1, 16\] does not match k"):
        kernels.decode_attention(torch.randn(2, 3, 1, 16), k, k, seen)
    with pytest.raises(RuntimeError, match=r"decode_attention: mask \[2, 1, 1, 4\] does not broadcast"):
        kernels.decode_attention(q, k, k, seen[..., :4])
    with pytest.raises(RuntimeError, match="decode_attention: float32 q, k, v and a bool mask only"):
        kernels.decode_attention(q, k, k, seen.float())
    with pytest.raises(RuntimeError, match="decode_attention: unit stride along D"):
        columns = torch.randn(2, 2, 16, 5).transpose(2, 3)  # (2, 2, 5, 16), stride 5 along D
        kernels.decode_attention(q, columns, columns, seen)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(16, 512), (3, 7, 40), (600, 100), (2, 5, 4, 24), (1, 1)])
def test_row_kernels_equal_torch(threads, shape):
    """RMSNorm, SwiGLU's product and the tanh GELU, one pass per row: torch's to float32 rounding for rows of any
    width (a multiple of 16 or not), any leading dimensions, views with a row stride, and enough rows to be shared
    out over the threads."""
    assert kernels.load()
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(len(shape))
    E = shape[-1]
    wide = torch.randn(*shape[:-1], 2 * E + 3, generator=g) * 3
    for x in (torch.randn(shape, generator=g) * 3, wide[..., 1 : E + 1]):  # contiguous, and a strided view
        w = torch.randn(E, generator=g)
        torch.testing.assert_close(
            kernels.rms_norm(x, w, 1e-5), torch.nn.functional.rms_norm(x, (E,), w, 1e-5), atol=2e-6, rtol=1e-5
        )
        up = torch.randn(*shape[:-1], E + 5, generator=g)[..., 2 : E + 2]  # a strided view
        expected = torch.nn.functional.silu(x) * up
        got = kernels.silu_mul(x, up)
        assert got.shape == x.shape and got.is_contiguous()
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)
        expected = torch.nn.functional.gelu(x, approximate="tanh")
        torch.testing.assert_close(kernels.gelu_tanh(x), expected, atol=2e-6, rtol=1e-5)
    big = torch.tensor([[-200.0, -88.5, -20.0, 0.0, 20.0, 90.0, 200.0] * 3])  # saturating exponents, vector and tail
    torch.testing.assert_close(kernels.silu_mul(big, torch.ones_like(big)), torch.nn.functional.silu(big))
    torch.testing.assert_close(kernels.gelu_tanh(big), torch.nn.functional.gelu(big, approximate="tanh"))
    torch.set_num_threads(2)


def test_row_kernels_name_bad_input():
    assert kernels.load()
    with pytest.raises(RuntimeError, match=r"rms_norm: weight \[5\] does not match rows of 4"):
        kernels.rms_norm(torch.randn(3, 4), torch.randn(5), 1e-6)
    with pytest.raises(RuntimeError, match="rms_norm: a float32 CPU tensor"):
        kernels.rms_norm(torch.randn(3, 4, dtype=torch.float64), torch.randn(4), 1e-6)
    with pytest.raises(RuntimeError, match=r"silu_mul: gate \[3, 4\] and up \[3, 5\] differ"):
        kernels.silu_mul(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="gelu_tanh: a float32 CPU tensor"):
        kernels.gelu_tanh(torch.randn(3, 4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"rms_norm_backward: grad \[3, 5\] and x \[3, 4\] differ"):
        kernels.rms_norm_backward(torch.randn(3, 5), torch.randn(3, 4), torch.randn(4), 1e-6)
    with pytest.raises(RuntimeError, match=r"rms_norm_backward: weight \[5\] does not match rows of 4"):
        kernels.rms_norm_backward(torch.randn(3, 4), torch.randn(3, 4), torch.randn(5), 1e-6)
    with pytest.raises(RuntimeError, match=r"silu_mul_backward: grad \[3, 4\], gate \[3, 4\] and up \[2, 4\] differ"):
        kernels.silu_mul_backward(torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="silu_mul_backward: a float32 CPU tensor"):
        kernels.silu_mul_backward(*[torch.randn(3, 4, dtype=torch.float64)] * 3)


@pytest.mark.skipif(not kernels._onednn(), reason="torch built without oneDNN")
def test_onednn_matmul_equals_torch_and_is_taken_only_where_it_applies(two_threads, monkeypatch):
    """oneDNN's matmul (the reference pass's and the update's many rows): torch's ``mm`` to float32 rounding, with a
    bias, for both weight layouts the engine keeps; taken for more than MAX_ROWS rows without autograd, in float32,
    and not with ``TEXTRL_ONEDNN=0``."""
    g = torch.Generator().manual_seed(0)
    rows = kernels.MAX_ROWS + 30
    x, w, bias = torch.randn(rows, 96, generator=g), torch.randn(96, 200, generator=g), torch.randn(200, generator=g)
    for weight in (w, w.t().contiguous().t()):  # (in, out) contiguous, and the transpose of an (out, in) one
        assert_matmul_close(kernels.onednn_mm(x, weight), x @ weight)
        assert_matmul_close(kernels.onednn_mm(x, weight, bias), torch.addmm(bias, x, weight))
    assert kernels.wants_onednn(x, w)
    assert not kernels.wants_onednn(x[: kernels.MAX_ROWS], w)  # few rows: split_mm's
    assert not kernels.wants_onednn(x.requires_grad_(), w)  # autograd: no backward here
    with torch.no_grad():
        assert kernels.wants_onednn(x, w)
    x = x.detach()
    assert not kernels.wants_onednn(x.bfloat16(), w.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels.wants_onednn(x, w)
    monkeypatch.setenv("TEXTRL_ONEDNN", "0")
    assert not kernels.wants_onednn(x, w)


def test_the_reference_pass_and_the_replayed_backward_take_onednn(request, monkeypatch):
    """The engine's forward without autograd (a reference pass) and the replayed linear layers' input gradients
    go through oneDNN's matmul where it applies (many rows); the results equal torch's matmul's to float32
    rounding (logits and gradients, with ``TEXTRL_ONEDNN=0`` as the reference)."""
    if not kernels._onednn():
        pytest.skip("torch built without oneDNN")
    model = load_lm(request.getfixturevalue("llama_gqa_dir"))[0]
    core = Engine(model)
    calls = []
    onednn_mm = kernels.onednn_mm
    monkeypatch.setattr(kernels, "onednn_mm", lambda *a: calls.append(a[0].shape[0]) or onednn_mm(*a))
    B, P, S = 40, 4, 9  # 40 x 8 = 320 rows through the replayed update: more than MAX_ROWS
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)

    def run():
        with torch.no_grad():
            reference = core.forward(ids, mask, P - 1)[0]
            with core.start(ids[:, :P], mask[:, :P], S, record=True) as session:
                for t in range(P, S - 1):
                    session.step(ids[:, t])
        model.zero_grad(set_to_none=True)
        logits = core.forward(ids[:, :-1], mask[:, :-1], P - 1)[0]
        logits.logsumexp(-1).mean().backward()
        return reference, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    replayed = core.replayed
    reference, grads = run()
    assert core.replayed == replayed + 1
    assert calls and all(rows > kernels.MAX_ROWS for rows in calls)
    monkeypatch.setenv("TEXTRL_ONEDNN", "0")
    calls.clear()
    reference_mkl, grads_mkl = run()
    assert not calls
    torch.testing.assert_close(reference, reference_mkl, atol=1e-5, rtol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_mkl[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(16, 512), (4, 9, 40), (600, 100), (2, 5, 4, 24), (1, 1)])
def test_row_kernels_under_autograd_equal_torch(threads, shape):
    """RMSNorm and SwiGLU's product under autograd (the update) run on the row kernels forward and backward
    (:class:`textrl.ops._RMSNorm`, :class:`textrl.ops._SiLUMul`): outputs and gradients equal torch's autograd to
    float32 rounding, for contiguous inputs, a record's slice (rows with gaps, read in place), views the kernels
    copy first (leading dimensions that do not collapse, a stride along the row), and an expanded incoming
    gradient."""
    assert kernels.load()
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(threads + len(shape))
    E = shape[-1]
    record = torch.randn(*shape[:-1], 3, 2 * E + 1, generator=g) * 3  # a slice of it leaves gaps between rows
    if len(shape) > 2:  # the first two dimensions of a slice of it do not merge (for four dimensions: a copy)
        other = torch.randn(shape[0], 2 * shape[1], *shape[2:], generator=g)[:, : shape[1]]
    else:  # a stride along the rows: a copy
        other = torch.randn(shape[0], 2 * E, generator=g)[:, ::2]
    inputs = [torch.randn(shape, generator=g) * 3, record[..., 1, :E], record[..., 2, E + 1 :], other]
    norm = torch.nn.Module()
    norm.weight, norm.variance_epsilon = torch.nn.Parameter(torch.randn(E, generator=g)), 1e-5
    for x in inputs:
        for grad in (torch.randn(shape, generator=g), torch.randn(E, generator=g).expand(shape)):
            a, b = x.detach().clone().requires_grad_(), x.detach().requires_grad_()
            y = ops.norm(a, norm)
            assert type(y.grad_fn).__name__ == "_RMSNormBackward"
            y.backward(grad)
            w = norm.weight.detach().clone().requires_grad_()
            expected = torch.nn.functional.rms_norm(b, (E,), w, 1e-5)
            expected.backward(grad)
            torch.testing.assert_close(y, expected, atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(norm.weight.grad, w.grad, atol=1e-4 * shape[0], rtol=1e-4)
            norm.weight.grad = None
            up = torch.randn(shape, generator=g)
            gate, up1, gate2, up2 = (t.detach().clone().requires_grad_() for t in (x, up, x, up))
            y = ops.swiglu(gate, up1)
            assert type(y.grad_fn).__name__ == "_SiLUMulBackward"
            y.backward(grad)
            expected = torch.nn.functional.silu(gate2) * up2
            expected.backward(grad)
            torch.testing.assert_close(y, expected, atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(gate.grad, gate2.grad, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(up1.grad, up2.grad, atol=1e-5, rtol=1e-4)
    torch.set_num_threads(2)


def test_the_kernel_is_taken_only_where_it_pays(two_threads, monkeypatch):
    w = torch.randn(512, 1408)
    assert kernels.wants_split(torch.randn(16, 512), w)
    assert not kernels.wants_split(torch.randn(kernels.MAX_ROWS + 1, 512), w)  # many rows: torch's own
    assert not kernels.wants_split(torch.randn(16, 32), torch.randn(32, 32))  # a small weight
    assert kernels.wants_split(torch.randn(16, 32), *[torch.randn(32, 64)] * 2)  # a group large enough in all
    assert not kernels.wants_split(torch.randn(16, 512, dtype=torch.bfloat16), w.bfloat16())
    assert not kernels.wants_split(torch.randn(16, 512, requires_grad=True), w)  # autograd: no backward here
    with torch.no_grad():
        assert kernels.wants_split(torch.randn(16, 512, requires_grad=True), w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels.wants_split(torch.randn(16, 512), w)
    torch.set_num_threads(1)
    assert not kernels.wants_split(torch.randn(16, 512), w)
    torch.set_num_threads(2)
    q, k = torch.randn(16, 8, 1, 64), torch.randn(16, 4, 40, 64)
    assert kernels.wants_attention(q, k)
    assert not kernels.wants_attention(q.bfloat16(), k.bfloat16())
    assert not kernels.wants_attention(torch.randn(16, 8, 2, 64), k)  # two queries per row: torch's
    assert not kernels.wants_attention(q.requires_grad_(), k)  # autograd: no backward here
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels.wants_attention(q, k)
    x, weight = torch.randn(16, 512), torch.ones(512, requires_grad=True)
    assert not kernels.wants_rows(x, weight)  # autograd through the norm's weight: not the kernel alone,
    assert kernels.wants_rows(x, weight, autograd=True)  # but under an autograd Function with its backward kernel
    with torch.no_grad():
        assert kernels.wants_rows(x, weight)
        assert not kernels.wants_rows(x.bfloat16(), weight)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not kernels.wants_rows(x, weight)
    monkeypatch.setenv("TEXTRL_CPU_KERNELS", "0")
    assert not kernels.wants_split(torch.randn(16, 512), w)
    assert not kernels.wants_attention(q.detach(), k)
    with torch.no_grad():
        assert not kernels.wants_rows(x, weight)
    assert not kernels.wants_rows(x, weight, autograd=True)


def _decode(model, mode: str, ids, mask, P: int, S: int, fused: bool = False, record: bool = True):
    """The logits and final hidden states of a prefill and decode steps to S positions, side by side (B, S - P + 1,
    V + E), and the record's buffers (None without one); ``fused``: eager steps as one C++ call each
    (:attr:`Engine.fused_step`), else op by op."""
    core = Engine(model)
    core.decode_step, core.fused_step = mode, fused
    with torch.no_grad(), core.start(ids[:, :P], mask[:, :P], S, record=record) as session:
        outputs = [torch.cat([session.logits, session.hidden], -1)]
        outputs += [torch.cat(session.step(ids[:, t]), -1) for t in range(P, S)]
        taken = session.fused
        buffers = {m: out.clone() for m, out in session.record.out.items()} if record else None
    assert bool(taken) == (fused and mode == "eager" and kernels.enabled())
    return torch.stack(outputs, 1), buffers


@pytest.mark.parametrize("arch", ["gpt2_dir", "llama_gqa_dir", "qwen2_dir"])
@pytest.mark.parametrize("mode", ["eager", "static"])
def test_decode_steps_with_the_kernels_match_torch(request, monkeypatch, two_threads, arch, mode):
    """Every block matmul and the head of a decode step through the matmul kernel (the test models are small, so
    the size threshold is lowered), every layer's attention through the attention kernel: the logits and the
    rollout record equal those of torch's matmul and attention. (Op by op, where the Python-level calls can be
    counted; the fused step makes the same calls from C++, see the next test.)"""
    model = load_lm(request.getfixturevalue(arch))[0]
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (4, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    monkeypatch.setenv("TEXTRL_CPU_KERNELS", "0")
    expected, expected_record = _decode(model, mode, ids, mask, 5, 11)
    monkeypatch.setenv("TEXTRL_CPU_KERNELS", "1")
    monkeypatch.setattr(kernels, "MIN_WEIGHT", 0)
    calls, attended = [], []  # one per weight; one per layer and step
    split_mm, split_mm_group, attention = kernels.split_mm, kernels.split_mm_group, kernels.decode_attention
    monkeypatch.setattr(kernels, "split_mm", lambda *a, **k: calls.append(1) or split_mm(*a, **k))
    monkeypatch.setattr(kernels, "split_mm_group", lambda x, ws, *a: calls.extend(ws) or split_mm_group(x, ws, *a))
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: attended.append(1) or attention(*a))
    rowwise, rms_norm, gelu_tanh = [], kernels.rms_norm, kernels.gelu_tanh
    monkeypatch.setattr(kernels, "rms_norm", lambda *a: rowwise.append(1) or rms_norm(*a))
    monkeypatch.setattr(kernels, "gelu_tanh", lambda *a: rowwise.append(1) or gelu_tanh(*a))
    got, record = _decode(model, mode, ids, mask, 5, 11)
    n_linears = len(expected_record)
    assert len(calls) >= 5 * (n_linears + 1)  # every block linear and the head, at each of the 5 steps
    assert len(attended) == 6 * model.config.num_hidden_layers  # every layer's attention at each of the 6 steps
    if arch != "gpt2_dir":  # RMSNorm: two a layer and the final one, in the prompt's pass and at each step
        assert len(rowwise) == 7 * (2 * model.config.num_hidden_layers + 1)
    else:  # GPT-2's LayerNorms stay torch's; its tanh GELU, one a layer
        assert len(rowwise) == 7 * model.config.num_hidden_layers
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for m, out in record.items():
        torch.testing.assert_close(out, expected_record[m], atol=1e-5, rtol=1e-5)


FUSED_ARCHS = ["gpt2_dir", "llama_gqa_dir", "qwen2_dir", "qwen3_dir", "mistral_dir"]


@pytest.mark.parametrize("arch", FUSED_ARCHS)
@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("record", [True, False])
def test_the_fused_decode_step_equals_the_op_by_op_one_bit_for_bit(
    request, monkeypatch, two_threads, arch, split, record
):
    """One C++ call per step (a textrl.kernels.decode_plan: embeddings, every block through textrl::decode_layer,
    the final norm and the head) computes what the op-by-op step computes with the same kernels, bit for bit:
    logits, final hidden states and every linear output in the record, for LayerNorm + fused qkv + GELU (GPT-2),
    grouped-query attention with RMSNorm and SwiGLU (Llama), q/k/v biases (Qwen2), q/k norms and a head size other
    than width / heads (Qwen3) and a sliding window shorter than the sequence (Mistral); a padded row; the linear
    layers split over the threads or torch's matmul (the size threshold moved both ways); the last step past the
    record's capacity (scratch outputs), and sessions without a record."""
    model = load_lm(request.getfixturevalue(arch))[0]
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (4, 14), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    monkeypatch.setattr(kernels, "MIN_WEIGHT", 0 if split else 1 << 40)
    expected, expected_record = _decode(model, "eager", ids, mask, 5, 14, fused=False, record=record)
    got, got_record = _decode(model, "eager", ids, mask, 5, 14, fused=True, record=record)
    assert torch.equal(got, expected)
    if record:
        assert got_record.keys() == expected_record.keys()
        for m, out in got_record.items():
            assert torch.equal(out, expected_record[m])


def test_the_fused_step_keeps_its_plans_for_later_sessions_and_reads_the_weights_as_they_are(request, two_threads):
    """The plans made for the engine's kept cache and record serve the next session on them (no new plan), and
    read the weights where they lie: after an in-place update (an optimizer step) a session's logits equal a fresh
    engine's. Buffers of another shape get plans of their own."""
    model = load_lm(request.getfixturevalue("qwen2_dir"))[0]
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (4, 9), generator=gen)
    mask = torch.ones_like(ids)

    def run(core, rows=4):
        with torch.no_grad(), core.start(ids[:rows, :5], mask[:rows, :5], 9, record=True) as session:
            out = torch.stack([session.step(ids[:rows, t])[0] for t in range(5, 9)], 1)
            return out, session.fused

    core = Engine(model)
    first, plans = run(core)
    assert plans and run(core)[1] is plans  # the same plans, not new ones
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)  # in place, as an optimizer step updates them
    after, reused = run(core)
    assert reused is plans
    assert not torch.equal(after, first)
    assert torch.equal(after, run(Engine(model))[0])
    assert run(core, rows=2)[1] is not plans  # a cache of another shape


def test_a_decode_plan_names_bad_input(request, two_threads):
    model = load_lm(request.getfixturevalue("llama_gqa_dir"))[0]
    core = Engine(model)
    ids = torch.ones(2, 3, dtype=torch.long)
    with torch.no_grad(), core.start(ids, torch.ones_like(ids), 6) as session:
        session.step(ids[:, 0])
        plan = session.fused[False]
        vocab = model.get_input_embeddings().num_embeddings
        with pytest.raises(RuntimeError, match=f"token {vocab} of row 1 is outside the vocabulary of {vocab}"):
            plan.step(torch.tensor([1, vocab]), session.pos, 4, 0, None, None)
        with pytest.raises(RuntimeError, match=f"token {vocab} of row 1 is outside"):  # a column: strided tokens
            plan.step(torch.tensor([[1, 0], [vocab, 0]])[:, 0], session.pos, 4, 0, None, None)
        with pytest.raises(RuntimeError, match="column 6 outside a cache of 6"):
            plan.step(ids[:, 0], session.pos, 6, 0, None, None)
        with pytest.raises(RuntimeError, match="tokens and positions must be int64"):
            plan.step(ids[:, 0].int(), session.pos, 4, 0, None, None)
        pos = torch.tensor([999, 3])
        with pytest.raises(RuntimeError, match="position 1000 of row 0 is outside"):
            plan.step(ids[:, 0], pos, 4, 0, None, None)
        assert pos.tolist() == [999, 3]  # refused before anything changed


def test_the_fused_step_is_taken_only_where_it_applies(request, monkeypatch, two_threads):
    """Op by op wherever the fused step's kernels do not apply: switched off, kernels off, bf16 weights, a
    mixture-of-experts layer, active LoRA adapters."""
    import peft

    def taken(model, fused=True) -> bool:
        core = Engine(model)
        core.fused_step = fused
        ids = torch.ones(2, 3, dtype=torch.long)
        with torch.no_grad(), core.start(ids, torch.ones_like(ids), 5) as session:
            session.step(ids[:, 0])
            return bool(session.fused)

    llama = load_lm(request.getfixturevalue("llama_gqa_dir"))[0]
    assert taken(llama) and not taken(llama, fused=False)
    assert not taken(load_lm(request.getfixturevalue("mixtral_dir"))[0])
    assert not taken(load_lm(request.getfixturevalue("qwen2_dir"))[0].to(torch.bfloat16))
    lora = peft.get_peft_model(
        load_lm(request.getfixturevalue("llama_gqa_dir"))[0], peft.LoraConfig(r=2, target_modules="all-linear")
    )
    assert not taken(lora)
    with lora.disable_adapter():  # no adapter acts: the base weights alone, fused
        assert taken(lora)
    monkeypatch.setenv("TEXTRL_CPU_KERNELS", "0")
    assert not taken(llama)


def test_decode_layer_names_bad_input():
    assert kernels.load()
    op = kernels.decode_layer_op()
    B, E, D, G = 2, 16, 8, 2
    w = torch.randn(E, E)
    cache = torch.zeros(B, G, 4, D)
    keymask = torch.ones(B, 1, 1, 4, dtype=torch.bool)
    scratch = torch.zeros(B, 1, E)

    def call(x, t=1, split=(0, 0, 0, 0)):
        op(x, 0, t, 0, None, None, torch.ones(E), None, [w, w, w], [None] * 3, [scratch] * 3, None, None, cache,
           cache.clone(), keymask, w, None, scratch, torch.ones(E), None, [w, w], [None, None], [scratch] * 2, w, None,
           scratch, 2, 0, False, [1e-6, 1e-6, 0.0], list(split))  # fmt: skip

    call(torch.randn(B, E))  # well formed: runs
    with pytest.raises(RuntimeError, match="decode_layer: x must be a contiguous float32"):
        call(torch.randn(E, B).t())
    with pytest.raises(RuntimeError, match="decode_layer: column 4"):
        call(torch.randn(B, E), t=4)
    with pytest.raises(RuntimeError, match="decode_layer: eps takes 3 values and split 4"):
        call(torch.randn(B, E), split=(0, 0))


def test_a_compiled_decode_step_calls_the_kernel(request, monkeypatch, two_threads):
    model = load_lm(request.getfixturevalue("qwen2_dir"))[0]  # q/k/v biases: addmm chunks
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (4, 9), generator=gen)
    mask = torch.ones_like(ids)
    monkeypatch.setenv("TEXTRL_CPU_KERNELS", "0")
    expected, _ = _decode(model, "eager", ids, mask, 5, 9)
    monkeypatch.setenv("TEXTRL_CPU_KERNELS", "1")
    monkeypatch.setattr(kernels, "MIN_WEIGHT", 0)
    torch._dynamo.reset()
    core = Engine(model)
    core.decode_step = "compile"
    with torch.no_grad(), core.start(ids[:, :5], mask[:, :5], 9, record=True) as session:
        outputs = [torch.cat([session.logits, session.hidden], -1)]
        got = torch.stack(outputs + [torch.cat(session.step(ids[:, t]), -1) for t in range(5, 9)], 1)
        static = core._static
    assert static.split_head and all(static.split.values())
    assert static.attention is kernels.decode_attention
    assert len(static.grouped) == 2 * len(core.spec.layers) and all(static.grouped.values())  # (q, k, v), (gate, up)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_kernel_that_cannot_be_built_falls_back_with_a_warning(monkeypatch, two_threads):
    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_loaded", lambda: False)
    monkeypatch.setattr(kernels, "_compile", no_compiler)
    x, w = torch.randn(16, 512), torch.randn(512, 1408)
    with pytest.warns(RuntimeWarning, match="could not be built.*Ninja is required"):
        assert not kernels.wants_split(x, w)
    assert not kernels.wants_split(x, w)  # tried once: no second warning (pytest's filter would raise)
    assert "Ninja" in kernels._state["error"]


def test_a_lock_left_by_a_killed_build_is_cleared_with_a_warning(tmp_path):
    """torch waits for a build's lock file for ever: one older than a build takes (a process killed while
    building) is removed with a warning that names it; a fresh one (a build in progress) is left to torch."""
    import os
    import time

    lock = tmp_path / "lock"
    lock.touch()
    kernels._clear_stale_lock(tmp_path)  # a build in progress: kept
    assert lock.exists()
    old = time.time() - kernels.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match=r"removing .*lock, left 11 min ago by a build .* that did not finish"):
        kernels._clear_stale_lock(tmp_path)
    assert not lock.exists()
    kernels._clear_stale_lock(tmp_path)  # no lock: nothing to do


def test_sample_into_names_bad_input():
    assert kernels.load()
    tokens, logprobs, none = torch.zeros(2, dtype=torch.long), torch.zeros(2), torch.zeros(0, dtype=torch.long)
    kernels.sample_into(torch.randn(2, 5), 4, none, 1.0, None, tokens, logprobs)  # well formed: runs
    assert (tokens < 4).all() and (logprobs <= 0).all()
    with pytest.raises(RuntimeError, match="sample_into: logits must be float32"):
        kernels.sample_into(torch.randn(2, 5).double(), 4, none, 1.0, None, tokens, logprobs)
    with pytest.raises(RuntimeError, match="0 < n <= V, got \\[2, 5\\] and n = 6"):
        kernels.sample_into(torch.randn(2, 5), 6, none, 1.0, None, tokens, logprobs)
    with pytest.raises(RuntimeError, match="must be \\(B,\\) for B = 2"):
        kernels.sample_into(torch.randn(2, 5), 4, none, 1.0, None, tokens[:1], logprobs)
    with pytest.raises(RuntimeError, match="temperature must be > 0"):
        kernels.sample_into(torch.randn(2, 5), 4, none, 0.0, None, tokens, logprobs)
