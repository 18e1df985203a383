"""The fused direction-head tail (Triton, interpreter on CPU) against spo_fast.head.direction_scores_ref: values and
gradients with respect to both inputs, odd sizes, several blocks and split programs, every input dtype."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from spo_fast.kernels import direction_score as K

from spo_fast.head import direction_scores_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Gradient tolerances: the gradients are written in the inputs' dtype, so they carry its rounding.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}
DTYPES = list(TOL)


def make(k, b, c, h, w, dtype, dir_dtype=None, seed=0, transposed=False):
    gen = torch.Generator().manual_seed(seed)
    if transposed:  # the sampler's [b, k, ...] layout seen as [k, b, ...]: strided, read without a copy
        x = torch.randn(b, k, c, h, w, generator=gen).to(dtype).transpose(0, 1)
    else:
        # a shared offset (the pool mean) larger than the spread, as late in sampling
        x = (2.0 + torch.randn(k, b, c, h, w, generator=gen)).to(dtype)
    g = torch.randn(b, c, h, w, generator=gen).to(dir_dtype or dtype)
    return x.to(DEVICE), g.to(DEVICE)


def run(fn, x, g, up, need=(True, True)):
    xl = x.detach().clone().requires_grad_(need[0])
    gl = g.detach().clone().requires_grad_(need[1])
    out = fn(xl, gl)
    if any(need):
        (out * up).sum().backward()
    return out.detach(), xl.grad, gl.grad


def check(x, g, seed=3):
    k, b = x.shape[:2]
    up = torch.randn(k, b, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    got, gx, gg = run(K.direction_score_fused, x, g, up)
    # Reference in fp32 from the same (rounded) inputs: the kernel reads each input in its dtype, accumulates in fp32.
    exp, ex, eg = run(direction_scores_ref, x.float(), g.float(), up)
    assert got.dtype == torch.float32 and got.shape == (k, b) and torch.isfinite(got).all()
    # The scores come from identical fp32 values, so fp32 tolerance whatever the input dtype (scaled: sums of N terms).
    scale = (x.float() - x.float().mean(0)).abs().amax() * g.float().abs().amax() * x[0, 0].numel() ** 0.5
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5 * max(scale.item(), 1e-6))
    for name, a, e, dt in (("candidates", gx, ex, x.dtype), ("direction", gg, eg, g.dtype)):
        assert a.dtype == dt and a.shape == e.shape, name
        rtol, atol = TOL[dt]
        torch.testing.assert_close(a.float(), e, rtol=rtol, atol=atol * max(e.abs().max().item(), 1e-6), msg=name)


@pytest.mark.parametrize(
    "k,b,c,h,w,block,split",
    [
        (1, 1, 3, 5, 7, None, None),
        (2, 3, 3, 5, 7, None, None),
        (3, 1, 3, 5, 7, None, None),
        (5, 3, 3, 5, 7, None, None),
        (3, 3, 3, 5, 7, 16, None),  # 7 blocks in one program, masked tail
        (5, 2, 3, 5, 7, 32, 3),  # 4 blocks over 2 split programs per pool, then the two-stage sum
        (9, 2, 1, 3, 3, 16, 2),  # K_PAD 16 with 7 padded rows, 9 elements: one block, one split
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_direction_tail_matches_reference(k, b, c, h, w, block, split, dtype, monkeypatch):
    monkeypatch.setattr(K, "_BLOCK_OVERRIDE", block)
    monkeypatch.setattr(K, "_SPLIT_OVERRIDE", split)
    check(*make(k, b, c, h, w, dtype))


@pytest.mark.parametrize("x_dtype,g_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_mixed_dtypes_and_strided_candidates(x_dtype, g_dtype, monkeypatch):
    monkeypatch.setattr(K, "_BLOCK_OVERRIDE", 32)
    check(*make(4, 3, 3, 5, 7, x_dtype, g_dtype))
    check(*make(4, 3, 3, 5, 7, x_dtype, g_dtype, transposed=True))


@pytest.mark.parametrize("need", [(True, False), (False, True), (False, False)])
def test_only_the_gradients_asked_for(need):
    x, g = make(3, 2, 3, 5, 7, torch.float32)
    up = torch.randn(3, 2).to(DEVICE)
    got, gx, gg = run(K.direction_score_fused, x, g, up, need)
    exp, ex, eg = run(direction_scores_ref, x, g, up, need)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-4)
    for a, e in ((gx, ex), (gg, eg)):
        assert (a is None) == (e is None)
        if a is not None:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(
    k=st.integers(1, 6),
    b=st.integers(1, 3),
    n=st.integers(1, 40),
    shift=st.floats(-100, 100),
    seed=st.integers(0, 2**16),
)
def test_properties(k, b, n, shift, seed):
    """Scores of a pool sum to zero; a shift shared by a pool's candidates changes nothing; score differences are
    the dot products of candidate differences with the direction."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(k, b, 1, 1, n, generator=gen)
    g = torch.randn(b, 1, 1, n, generator=gen)
    v = shift + torch.randn(1, b, 1, 1, n, generator=gen)
    s = K.direction_score_fused(x.to(DEVICE), g.to(DEVICE)).cpu()
    bound = 1e-5 * k * n * x.abs().max() * g.abs().max()
    assert s.sum(0).abs().max() <= bound
    s_shift = K.direction_score_fused((x + v).to(DEVICE), g.to(DEVICE)).cpu()
    torch.testing.assert_close(s_shift, s, rtol=1e-4, atol=1e-4 * (1 + abs(shift)) * n**0.5)
    diff = torch.einsum("kbn,bn->kb", (x - x[:1]).flatten(2), g.flatten(1))
    torch.testing.assert_close(s - s[:1], diff, rtol=1e-4, atol=1e-4 * n**0.5)


@pytest.mark.parametrize("shape", [(3, 0, 2, 3, 3), (0, 2, 2, 3, 3), (3, 2, 0, 3, 3)])
def test_empty_inputs(shape):
    k, b = shape[:2]
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    g = torch.randn(shape[1:], device=DEVICE, requires_grad=True)
    out = K.direction_score_fused(x, g)
    assert out.shape == (k, b) and out.dtype == torch.float32 and (out == 0).all()
    out.sum().backward()
    assert x.grad.shape == x.shape and g.grad.shape == g.shape
    assert (x.grad == 0).all() and (g.grad == 0).all()


def test_bad_inputs(monkeypatch):
    x, g = make(3, 2, 3, 5, 7, torch.float32)
    with pytest.raises(ValueError, match=r"\[k, b, C, h, w\]"):
        K.direction_score_fused(x[0], g)
    with pytest.raises(ValueError, match="to match candidates"):
        K.direction_score_fused(x, g[:1])
    with pytest.raises(ValueError, match="to match candidates"):
        K.direction_score_fused(x, g.flatten(1))
    with pytest.raises(ValueError, match="candidates must be float32"):
        K.direction_score_fused(x.double(), g)
    with pytest.raises(ValueError, match="direction must be float32"):
        K.direction_score_fused(x, g.to(torch.int32))
    with pytest.raises(ValueError, match="is on meta"):
        K.direction_score_fused(x, g.to("meta"))
    monkeypatch.setattr(K, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.direction_score_fused(x.cpu(), g.cpu())


def test_head_dispatch_picks_the_kernel_or_the_reference(monkeypatch):
    """``spo_fast.head.direction_scores`` (what the head calls) gives the same values and gradients through the kernel
    (SPO_FAST_HEAD_IMPL=triton) and the reference (=torch)."""
    from spo_fast.head import direction_scores

    x, g = make(4, 3, 3, 5, 7, torch.float32, transposed=True)
    up = torch.randn(4, 3, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    monkeypatch.setenv("SPO_FAST_HEAD_IMPL", "triton")
    got = run(direction_scores, x, g, up)
    monkeypatch.setenv("SPO_FAST_HEAD_IMPL", "torch")
    exp = run(direction_scores, x, g, up)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_custom_op_opcheck_and_compile():
    """Schema, fake implementations and registered autograd of the ops; torch.compile traces them without breaks."""
    x, g = make(3, 2, 3, 5, 7, torch.float32)
    xf, gf = x.reshape(3, 2, -1).requires_grad_(), g.reshape(2, -1).requires_grad_()
    torch.library.opcheck(torch.ops.spo_fast.direction_score_fwd.default, (xf, gf))
    up = torch.randn(3, 2, device=DEVICE)
    for need in ((True, True), (True, False), (False, True)):
        args = (up, xf.detach(), gf.detach(), *need)
        torch.library.opcheck(
            torch.ops.spo_fast.direction_score_bwd.default, args, test_utils=("test_schema", "test_faketensor")
        )

    def f(a, b):
        return (K.direction_score_fused(a, b) * up).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    x1, g1 = x.clone().requires_grad_(), g.clone().requires_grad_()
    x2, g2 = x.clone().requires_grad_(), g.clone().requires_grad_()
    lc, le = compiled(x1, g1), f(x2, g2)
    lc.backward()
    le.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(g1.grad, g2.grad)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [(4, 10, 4, 64, 64), (4, 4, 4, 128, 128), (16, 2, 4, 32, 32)])
def test_cuda_full_size(size, dtype):
    """SD1.5 (k 4, b 10, 4x64x64) and SDXL (k 4, b 4, 4x128x128) latents: the GPU block and split choices."""
    check(*make(*size, dtype))
