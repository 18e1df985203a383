"""The fused Triton SPO loss against the PyTorch reference, the official golden vectors and finite differences.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1): small shapes, large blocks,
and lowered block caps where the multi-block paths must be exercised. ``cuda``-marked tests repeat the checks at
SD1.5 / SDXL size on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from spo_fast.kernels import spo_loss as K
from spo_fast.kernels.spo_loss import spo_loss_fused, spo_loss_fused_ref

import spo_fast
from spo_fast import CFGPrediction
from spo_fast.ddim import ddim_coefficients

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW_PRECISION = (torch.bfloat16, torch.float16)
NAMES = ("loss", "ratio_win", "ratio_lose", "log_ratio_win", "log_ratio_lose")


def make_inputs(b, shape, seed=0, spread=1.0, device=DEVICE):
    """fp32 inputs; ``spread`` scales the policy-reference gap (larger: more clamped ratios)."""
    g = torch.Generator().manual_seed(seed)
    x, p, xw, xl = (torch.randn(b, *shape, generator=g) for _ in range(4))
    # Per-pair gaps from tiny to large, so one batch holds clamped and unclamped ratios.
    gap = spread * torch.logspace(-3, 0, b).view(b, *([1] * len(shape)))
    r = p + gap * torch.randn(b, *shape, generator=g)
    return [t.to(device) for t in (x, p, r, xw, xl)]


def coeffs_for(sched, b, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed + 1)
    t = sched.timesteps[torch.randint(0, len(sched.timesteps), (b,), generator=g)]
    return ddim_coefficients(sched, t.to(device), 1.0)


def run(fn, coeffs, x, p, r, xw, xl, beta=10.0, eps=0.1, upstream=None):
    """Outputs and d(sum of weighted outputs)/d policy, so the gradients of all five outputs are checked."""
    p = p.detach().clone().requires_grad_()
    outs = fn(coeffs, p, r, x, xw, xl, beta, eps)
    w = upstream if upstream is not None else [torch.ones_like(outs[0]), *(0 * torch.ones_like(o) for o in outs[1:])]
    sum(((o * wi).sum() for o, wi in zip(outs, w) if o.requires_grad)).backward()
    return [o.detach() for o in outs], p.grad


def max_err(a, b):
    return (a.double() - b.double()).abs().nan_to_num(0).max().item()


def assert_grad_close(got, exp, rel=2e-5):
    """Elementwise against the largest gradient: the kernel forms x' - mu_theta directly, autograd goes through
    x' - mu_ref - d, so small entries differ by cancellation at the scale of the large ones."""
    torch.testing.assert_close(got, exp, rtol=rel, atol=rel * exp.abs().max().item())


def random_upstream(b, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, generator=g).to(DEVICE) for _ in range(5)]


# Odd sizes: 1 pair, 33 pairs, element counts that are not powers of two.
SIZES = [(1, (4, 6, 5)), (33, (3, 5, 7)), (4, (4, 16, 16))]


@pytest.mark.parametrize("b, shape", SIZES)
def test_fp32_matches_reference(sd_scheduler, b, shape):
    x, p, r, xw, xl = make_inputs(b, shape)
    c = coeffs_for(sd_scheduler, b)
    up = random_upstream(b)
    ref, gref = run(spo_loss_fused_ref, c, x, p, r, xw, xl, upstream=up)
    got, ggot = run(spo_loss_fused, c, x, p, r, xw, xl, upstream=up)
    for name, a, e in zip(NAMES, got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert_grad_close(ggot, gref)
    if b > 1:
        clamped = (ref[1] - 1).abs() >= 0.1 - 1e-6
        assert clamped.any() and not clamped.all(), "the batch must hold clamped and unclamped ratios"


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("b, shape", SIZES[:2])
def test_low_precision_error_at_most_twice_torch(sd_scheduler, b, shape, dtype):
    """Kernel error against the fp32 reference <= 2x the PyTorch reference's own error on the same inputs."""
    x, p, r, xw, xl = make_inputs(b, shape)
    c = coeffs_for(sd_scheduler, b)
    up = random_upstream(b)
    ref32, g32 = run(spo_loss_fused_ref, c, x, p, r, xw, xl, upstream=up)
    low = [t.to(dtype) for t in (x, p, r, xw, xl)]
    ref_lp, g_lp = run(spo_loss_fused_ref, c, *low, upstream=up)
    got, ggot = run(spo_loss_fused, c, *low, upstream=up)
    assert ggot.dtype == dtype and all(o.dtype == torch.float32 for o in got)
    for name, a, e_lp, e32 in zip(NAMES, got, ref_lp, ref32):
        bound = 2 * max_err(e_lp, e32) + 1e-6
        assert max_err(a, e32) <= bound, (name, max_err(a, e32), bound)
    assert max_err(ggot, g32) <= 2 * max_err(g_lp, g32) + 1e-6 * g32.abs().max().item()


def test_multi_block_masked_tail_and_chunked_epilogue(sd_scheduler, monkeypatch):
    """N = 105 in blocks of 16 (7 blocks, masked tail) reduced by the epilogue in chunks of 2 blocks."""
    monkeypatch.setattr(K, "_INTERPRETER_MAX_BLOCK", 16)
    monkeypatch.setattr(K, "_MAX_BLOCK_NB", 2)
    b, shape = 5, (3, 5, 7)
    x, p, r, xw, xl = make_inputs(b, shape)
    c = coeffs_for(sd_scheduler, b)
    up = random_upstream(b)
    ref, gref = run(spo_loss_fused_ref, c, x, p, r, xw, xl, upstream=up)
    got, ggot = run(spo_loss_fused, c, x, p, r, xw, xl, upstream=up)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-6)
    assert_grad_close(ggot, gref)


def test_clamped_ratio_passes_no_gradient(sd_scheduler):
    b, shape = 6, (4, 6, 5)
    x, p, r, xw, xl = make_inputs(b, shape, spread=3.0)
    c = coeffs_for(sd_scheduler, b)
    (loss, rw, rl, _, _), grad = run(spo_loss_fused, c, x, p, r, xw, xl, eps=0.01)
    cw, cl = (rw - 1).abs() >= 0.01 - 1e-6, (rl - 1).abs() >= 0.01 - 1e-6
    both = cw & cl
    assert both.any() and (~cw & ~cl).any()
    assert grad[both].abs().max().item() == 0.0
    assert grad[~cw & ~cl].abs().min().item() > 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cfg_halves_gradient_split(sd_scheduler, dtype):
    b, shape, gs = 4, (4, 6, 5), 5.0
    x, p, r, xw, xl = (t.to(dtype) for t in make_inputs(b, shape))
    g = torch.Generator().manual_seed(3)
    u = (p.float() + 0.1 * torch.randn(p.shape, generator=g).to(DEVICE)).to(dtype).requires_grad_()
    cnd = p.detach().clone().requires_grad_()
    c = coeffs_for(sd_scheduler, b)
    out = spo_loss_fused(c, CFGPrediction(u, cnd, gs), r, x, xw, xl)
    out[0].sum().backward()
    # Reference: the combined prediction (fp32) through the PyTorch closed form.
    eps_t = (u.detach().float() + gs * (cnd.detach().float() - u.detach().float())).requires_grad_()
    ref = spo_loss_fused_ref(c, eps_t, r, x, xw, xl)
    ref[0].sum().backward()
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    for a, e in zip(out, ref):
        torch.testing.assert_close(a.detach(), e.detach(), **tol)
    gtol = dict(rtol=2e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(cnd.grad.float(), gs * eps_t.grad, **gtol)
    torch.testing.assert_close(u.grad.float(), (1 - gs) * eps_t.grad, **gtol)
    # The public API's reference path splits the halves the same way.
    u2, c2 = u.detach().clone().requires_grad_(), cnd.detach().clone().requires_grad_()
    ref2 = spo_loss_fused_ref(c, CFGPrediction(u2, c2, gs), r, x, xw, xl)
    ref2[0].sum().backward()
    torch.testing.assert_close(c2.grad.float(), cnd.grad.float(), **gtol)
    torch.testing.assert_close(u2.grad.float(), u.grad.float(), **gtol)


def test_cfg_reference_prediction(sd_scheduler):
    b, shape = 3, (4, 6, 5)
    x, p, r, xw, xl = make_inputs(b, shape)
    c = coeffs_for(sd_scheduler, b)
    ref_cfg = CFGPrediction(r, r + 0.01, 4.0)
    got, g1 = run(spo_loss_fused, c, x, p, ref_cfg, xw, xl)
    exp, g2 = run(spo_loss_fused_ref, c, x, p, ref_cfg, xw, xl)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-6)
    assert_grad_close(g1, g2)


@pytest.mark.parametrize("case", range(3))
def test_golden_vectors_through_public_api(golden, sd_scheduler, monkeypatch, case):
    """The official golden cases (separate win/lose predictions) through spo_fast.spo_loss forced onto the kernel."""
    monkeypatch.setenv("SPO_FAST_LOSS_IMPL", "triton")
    c = golden["loss_cases"][case]

    def T(v):
        return torch.tensor(v, dtype=torch.float32, device=DEVICE)

    pw, pl = T(c["eps_policy_win"]).requires_grad_(), T(c["eps_policy_lose"]).requires_grad_()
    out = spo_fast.spo_loss(
        (pw, pl),
        (T(c["eps_ref_win"]), T(c["eps_ref_lose"])),
        T(c["latents"]),
        T(c["next_latents_win"]),
        T(c["next_latents_lose"]),
        T(c["timesteps"]).long(),
        sd_scheduler,
        eta=c["eta"],
        beta=c["beta"],
        eps=c["eps"],
    )
    out.loss.backward()
    assert abs(out.loss.item() - c["loss"]) / c["loss"] < 5e-5
    for got, key in ((out.ratio_win, "ratio_win"), (out.ratio_lose, "ratio_lose")):
        ref = torch.tensor(c[key], dtype=torch.float64)
        assert ((got.cpu().double() - ref).abs() / ref).max().item() < 5e-5
    for g, key in ((pw.grad, "grad_eps_policy_win"), (pl.grad, "grad_eps_policy_lose")):
        ref = torch.tensor(c[key], dtype=torch.float64)
        assert ((g.cpu().double() - ref).norm() / ref.norm()).item() < 1e-4


def test_public_api_shared_and_cfg(sd_scheduler, monkeypatch):
    b, shape = 5, (4, 6, 5)
    x, p, r, xw, xl = make_inputs(b, shape)
    t = sd_scheduler.timesteps[torch.arange(b) * 3]
    results = {}
    for impl in ("torch", "triton"):
        monkeypatch.setenv("SPO_FAST_LOSS_IMPL", impl)
        u = (p - 0.02).requires_grad_()
        cnd = p.clone().requires_grad_()
        out = spo_fast.spo_loss(CFGPrediction(u, cnd, 7.5), r, x, xw, xl, t, sd_scheduler)
        out.loss.backward()
        results[impl] = (out.loss.detach(), out.ratio_win.detach(), out.ratio_lose.detach(), u.grad, cnd.grad)
    for a, e in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, e, rtol=2e-5, atol=1e-7)


def test_gradcheck_fp64_reference_and_kernel(sd_scheduler, monkeypatch):
    """Finite differences in fp64: the reference (through the public API) and the kernel (fp64 accumulation)."""
    b, shape = 3, (2, 3)
    x, p, r, xw, xl = (t.double() for t in make_inputs(b, shape, spread=0.3))
    t = sd_scheduler.timesteps[torch.tensor([2, 9, 17])]
    c = ddim_coefficients(sd_scheduler, t.to(DEVICE), 1.0)

    def public(pp):
        return spo_fast.spo_loss_per_pair(pp, r, x, xw, xl, t.to(DEVICE), sd_scheduler)

    monkeypatch.setenv("SPO_FAST_LOSS_IMPL", "torch")
    assert torch.autograd.gradcheck(public, (p.clone().requires_grad_(),))

    def kernel(u, cnd):
        return spo_loss_fused(c, CFGPrediction(u, cnd, 3.0), r, x, xw, xl)

    u = (p - 0.01).requires_grad_()
    cnd = p.clone().requires_grad_()
    assert torch.autograd.gradcheck(kernel, (u, cnd))


def test_non_contiguous_inputs(sd_scheduler):
    b, shape = 3, (4, 6, 5)
    x, p, r, xw, xl = make_inputs(b, shape)
    c = coeffs_for(sd_scheduler, b)
    strided = [t.transpose(1, 3).contiguous().transpose(1, 3) for t in (x, p, r, xw, xl)]
    assert not any(t.is_contiguous() for t in strided)
    got, g1 = run(spo_loss_fused, c, *strided)
    exp, g2 = run(spo_loss_fused, c, x, p, r, xw, xl)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-9)


def test_mixed_dtypes_bf16_policy_fp32_latents(sd_scheduler):
    """An autocast UNet output (bf16) with fp32 latents: each input is read in its own dtype."""
    b, shape = 3, (4, 6, 5)
    x, p, r, xw, xl = make_inputs(b, shape)
    c = coeffs_for(sd_scheduler, b)
    pb, rb = p.bfloat16(), r.bfloat16()
    got, g1 = run(spo_loss_fused, c, x, pb, rb, xw, xl)
    exp, g2 = run(spo_loss_fused_ref, c, x, pb, rb, xw, xl)
    assert g1.dtype == torch.bfloat16
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(g1.float(), g2.float(), rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bad_input_raises_value_error_naming_tensor(sd_scheduler, monkeypatch, impl):
    monkeypatch.setenv("SPO_FAST_LOSS_IMPL", impl)
    b, shape = 3, (4, 6, 5)
    x, p, r, xw, xl = make_inputs(b, shape)
    t = sd_scheduler.timesteps[:b]
    with pytest.raises(ValueError, match="lose_sample"):
        spo_fast.spo_loss(p, r, x, xw, xl[:, :2], t, sd_scheduler)
    with pytest.raises(ValueError, match="policy_pred.cond"):
        spo_fast.spo_loss(CFGPrediction(p, p[:2], 5.0), r, x, xw, xl, t, sd_scheduler)
    with pytest.raises(ValueError, match="ref_pred.*device"):
        spo_fast.spo_loss(p, r.to("meta"), x, xw, xl, t, sd_scheduler)
    with pytest.raises(ValueError, match="win_sample.*floating"):
        spo_fast.spo_loss(p, r, x, xw.long(), xl, t, sd_scheduler)
    with pytest.raises(ValueError, match="policy_pred must be"):
        spo_fast.spo_loss((p, p, p), r, x, xw, xl, t, sd_scheduler)
    # the kernel's own entry point checks too
    c = coeffs_for(sd_scheduler, b)
    with pytest.raises(ValueError, match="ref_pred"):
        spo_loss_fused(c, p, r[:, :1], x, xw, xl)
    with pytest.raises(ValueError, match="win_sample.*float"):
        spo_loss_fused(c, p, r, x, xw.int(), xl)
    with pytest.raises(ValueError, match="coeffs"):
        spo_loss_fused(coeffs_for(sd_scheduler, b + 1), p, r, x, xw, xl)


# numpy, which runs the interpreted kernel, warns on inf - inf: that NaN is the point of the test.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("which", range(5))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_gives_nan_loss(sd_scheduler, monkeypatch, impl, which, bad):
    monkeypatch.setenv("SPO_FAST_LOSS_IMPL", impl)
    b, shape = 2, (4, 6, 5)
    inputs = make_inputs(b, shape)
    inputs[which][1, 2, 3, 4] = bad
    x, p, r, xw, xl = inputs
    per_pair, *_ = spo_fast.spo_loss_per_pair(p, r, x, xw, xl, sd_scheduler.timesteps[:b], sd_scheduler)
    assert torch.isnan(per_pair[1]) and torch.isfinite(per_pair[0])
    assert torch.isnan(spo_fast.spo_loss(p, r, x, xw, xl, sd_scheduler.timesteps[:b], sd_scheduler).loss)


def test_dispatch(sd_scheduler, monkeypatch):
    b, shape = 2, (4, 6, 5)
    x, p, r, xw, xl = make_inputs(b, shape)
    t = sd_scheduler.timesteps[:b]
    calls = []
    real = K.spo_loss_fused

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(K, "spo_loss_fused", spy)
    expect_kernel_auto = DEVICE == "cuda"
    for impl, expected in (("torch", False), ("triton", True), ("auto", expect_kernel_auto)):
        monkeypatch.setenv("SPO_FAST_LOSS_IMPL", impl)
        calls.clear()
        spo_fast.spo_loss(p, r, x, xw, xl, t, sd_scheduler)
        assert bool(calls) == expected, impl
    # clip_sample=True: the mean is nonlinear in the prediction, the reference runs even when triton is forced
    from diffusers import DDIMScheduler

    clip = DDIMScheduler.from_config(sd_scheduler.config, clip_sample=True)
    clip.set_timesteps(20)
    monkeypatch.setenv("SPO_FAST_LOSS_IMPL", "triton")
    calls.clear()
    spo_fast.spo_loss(p, r, x, xw, xl, t, clip)
    assert not calls
    monkeypatch.setenv("SPO_FAST_LOSS_IMPL", "fastest")
    with pytest.raises(ValueError, match="SPO_FAST_LOSS_IMPL"):
        spo_fast.spo_loss(p, r, x, xw, xl, t, sd_scheduler)


def test_custom_op_opcheck_and_compile(sd_scheduler):
    """Schema, fake implementation and registered autograd of the op; torch.compile traces it without breaks."""
    b, shape = 2, (3, 5)
    x, p, r, xw, xl = make_inputs(b, shape)
    c = coeffs_for(sd_scheduler, b)
    flat = [t.reshape(b, -1).contiguous() for t in (x, xw, xl)]
    pf = p.reshape(b, -1).clone().requires_grad_()
    args = (*flat, pf, None, r.reshape(b, -1), *(v.float().contiguous() for v in (c.c1, c.c2, c.sigma)), 1.0, 10.0, 0.1)
    torch.library.opcheck(torch.ops.spo_fast.spo_loss_fwd.default, args, test_utils=("test_schema", "test_faketensor"))

    def f(pp):
        out = spo_loss_fused(c, pp, r, x, xw, xl)
        return out[0].mean()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    p1, p2 = p.clone().requires_grad_(), p.clone().requires_grad_()
    lc, le = compiled(p1), f(p2)
    lc.backward()
    le.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(p1.grad, p2.grad)


# ---------------------------------------------------------------------------------------------------------------
# Full size on a GPU
# ---------------------------------------------------------------------------------------------------------------

FULL = {"sd15": (10, (4, 64, 64)), "sdxl": (2, (4, 128, 128))}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("size", list(FULL))
def test_cuda_full_size(sd_scheduler, size, dtype):
    b, shape = FULL[size]
    x, p, r, xw, xl = make_inputs(b, shape, device="cuda", spread=0.1)
    c = coeffs_for(sd_scheduler, b, device="cuda")
    up = random_upstream(b)
    ref32, g32 = run(spo_loss_fused_ref, c, x, p, r, xw, xl, upstream=up)
    inputs = [t.to(dtype) for t in (x, p, r, xw, xl)]
    ref_lp, g_lp = run(spo_loss_fused_ref, c, *inputs, upstream=up)
    got, ggot = run(spo_loss_fused, c, *inputs, upstream=up)
    if dtype == torch.float32:
        for a, e in zip(got, ref32):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
        assert_grad_close(ggot, g32)
    else:
        for name, a, e_lp, e32 in zip(NAMES, got, ref_lp, ref32):
            assert max_err(a, e32) <= 2 * max_err(e_lp, e32) + 1e-5, name
        assert max_err(ggot, g32) <= 2 * max_err(g_lp, g32) + 1e-6 * g32.abs().max().item()


@pytest.mark.cuda
def test_cuda_cfg_and_inductor_compile(sd_scheduler):
    b, shape = FULL["sd15"]
    x, p, r, xw, xl = make_inputs(b, shape, device="cuda", spread=0.1)
    c = coeffs_for(sd_scheduler, b, device="cuda")
    u = (p - 0.01).bfloat16().requires_grad_()
    cnd = p.bfloat16().requires_grad_()

    def f(u, cnd):
        return spo_loss_fused(c, CFGPrediction(u, cnd, 5.0), r, x, xw, xl)[0].mean()

    compiled = torch.compile(f, fullgraph=True)
    lc = compiled(u, cnd)
    lc.backward()
    gu, gc = u.grad.clone(), cnd.grad.clone()
    u.grad = cnd.grad = None
    f(u, cnd).backward()
    torch.testing.assert_close(gu, u.grad)
    torch.testing.assert_close(gc, cnd.grad)
    torch.testing.assert_close(gc.float(), -5.0 / 4.0 * gu.float(), rtol=2e-2, atol=1e-6)
