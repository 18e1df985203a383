"""The fused head tail (Triton, interpreter on CPU) against the PyTorch reference: values and gradients."""

from __future__ import annotations

import pytest
import torch
from spo_fast.kernels import head_score as K

from spo_fast.head import pyramid_pool_matrix, score_tail, score_tail_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}


def make(n, c, h, w, d, m, levels, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    cells = sum(x * x for x in levels)
    f = torch.randn(n, c, h, w, generator=g).to(dtype)
    weight = (torch.randn(d, cells * c, generator=g) / (cells * c) ** 0.5).to(dtype)
    bias = (0.1 * torch.randn(d, generator=g)).to(dtype)
    text = torch.randn(m, d, generator=g).to(dtype)
    idx = torch.randint(0, m, (n,), generator=g)
    ls = torch.tensor(2.3)
    pool = pyramid_pool_matrix(h, w, levels)
    return [t.to(DEVICE) for t in (f, pool, weight, bias, text, idx, ls)]


def grads(fn, f, pool, weight, bias, text, idx, ls, up):
    leaves = [t.detach().clone().requires_grad_() for t in (f, weight, bias, text, ls)]
    out = fn(leaves[0], pool, leaves[1], leaves[2], leaves[3], idx, leaves[4])
    (out * up).sum().backward()
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize(
    "n,c,h,w,d,m,levels,block_c",
    [(5, 7, 4, 4, 9, 3, (1, 2, 4), None), (3, 33, 8, 8, 20, 2, (1, 2), 8), (1, 4, 6, 6, 3, 1, (1, 3), 2)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_tail_matches_reference(n, c, h, w, d, m, levels, block_c, dtype, monkeypatch):
    monkeypatch.setattr(K, "_BLOCK_C_OVERRIDE", block_c)
    inputs = make(n, c, h, w, d, m, levels, dtype)
    up = torch.randn(n, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    got, g_got = grads(K.head_score_fused, *inputs, up)
    # Reference in fp32 from the same (rounded) inputs: the kernel accumulates in fp32 whatever the input dtype.
    exp, g_exp = grads(score_tail_ref, *[t.float() if t.is_floating_point() else t for t in inputs], up)
    rtol, atol = TOL[dtype]
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, exp, rtol=rtol, atol=atol * exp.abs().max().item())
    for name, a, b in zip(("features", "weight", "bias", "text", "logit_scale"), g_got, g_exp):
        assert a.dtype == (dtype if name != "logit_scale" else torch.float32), name
        torch.testing.assert_close(a.float(), b, rtol=rtol, atol=atol * max(b.abs().max().item(), 1e-6), msg=name)


def test_dispatch_and_bad_inputs(monkeypatch):
    inputs = make(4, 5, 4, 4, 6, 2, (1, 2), torch.float32)
    monkeypatch.setenv("SPO_FAST_HEAD_IMPL", "triton")
    a = score_tail(*inputs)
    monkeypatch.setenv("SPO_FAST_HEAD_IMPL", "torch")
    torch.testing.assert_close(a, score_tail(*inputs), rtol=1e-5, atol=1e-5)
    f, pool, weight, bias, text, idx, ls = inputs
    with pytest.raises(ValueError, match="columns"):
        K.head_score_fused(f, pool, weight[:, :-1], bias, text, idx, ls)
    with pytest.raises(ValueError, match="float32"):
        K.head_score_fused(f.double(), pool, weight, bias, text, idx, ls)
    with pytest.raises(ValueError, match="not divisible"):
        pyramid_pool_matrix(6, 6, (4,))


def test_zero_feature_row_is_finite():
    f, pool, weight, bias, text, idx, ls = make(2, 3, 2, 2, 4, 1, (1, 2), torch.float32)
    bias = torch.zeros_like(bias)
    out, g = grads(
        K.head_score_fused, torch.zeros_like(f), pool, weight, bias, text, idx, ls, torch.ones(2, device=DEVICE)
    )
    assert torch.isfinite(out).all() and all(torch.isfinite(x).all() for x in g)
