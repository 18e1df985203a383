"""Properties the SPO math must satisfy, checked against independent references (diffusers, autograd, fp64)."""

import pytest
import torch
from diffusers import DDIMScheduler

import spo_fast
from spo_fast.ddim import ddim_coefficients, ddim_log_prob, ddim_step, ddim_step_mean
from spo_fast.loss import spo_log_ratio


def make_batch(b=5, shape=(4, 6, 5), dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *shape, generator=g, dtype=dtype)
    p = torch.randn(b, *shape, generator=g, dtype=dtype)
    r = p + scale * 0.05 * torch.randn(b, *shape, generator=g, dtype=dtype)
    xw = torch.randn(b, *shape, generator=g, dtype=dtype)
    xl = torch.randn(b, *shape, generator=g, dtype=dtype)
    return x, p, r, xw, xl


TIMESTEPS = torch.tensor([951, 601, 351, 51, 1])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_closed_form_equals_logprob_difference(sd_scheduler, prediction_type):
    sched = DDIMScheduler.from_config(sd_scheduler.config, prediction_type=prediction_type)
    sched.set_timesteps(20)
    x, p, r, xw, _ = make_batch()
    c = ddim_coefficients(sched, TIMESTEPS, eta=1.0)
    lp_p = ddim_log_prob(ddim_step_mean(c, p, x), xw, c.sigma)
    lp_r = ddim_log_prob(ddim_step_mean(c, r, x), xw, c.sigma)
    lr = spo_log_ratio(c, p, r, x, xw)
    torch.testing.assert_close(lr, lp_p - lp_r, rtol=0, atol=1e-10)


def test_ratio_is_one_when_policy_equals_reference(sd_scheduler):
    x, p, _, xw, xl = make_batch(dtype=torch.float32)
    out = spo_fast.spo_loss(p, p.clone(), x, xw, xl, TIMESTEPS, sd_scheduler)
    assert torch.equal(out.ratio_win, torch.ones(5)) and torch.equal(out.ratio_lose, torch.ones(5))
    torch.testing.assert_close(out.loss, torch.log(torch.tensor(2.0)))


@pytest.mark.parametrize("eps", [0.1, 1e-3])
def test_autograd_equals_analytic_gradient(sd_scheduler, eps):
    """dL/dp = sum_{w,l} dL/dlr * c2 (x' - mu_theta) / (sigma^2 N B); zero where the ratio is clamped."""
    beta = 10.0
    x, p, r, xw, xl = make_batch(scale=3.0)
    p.requires_grad_()
    per_pair, rw, rl, lrw, lrl = spo_fast.spo_loss_per_pair(p, r, x, xw, xl, TIMESTEPS, sd_scheduler, 1.0, beta, eps)
    per_pair.mean().backward()
    c = ddim_coefficients(sd_scheduler, TIMESTEPS, 1.0)
    b, n = x.shape[0], x[0].numel()
    mu = ddim_step_mean(c, p.detach(), x)
    z = beta * (torch.log(rw) - torch.log(rl))
    dlw = -beta * torch.sigmoid(-z) * ((lrw.exp() - 1).abs() < eps)
    dll = beta * torch.sigmoid(-z) * ((lrl.exp() - 1).abs() < eps)
    e = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    analytic = e(c.c2 / (c.sigma**2 * n * b)) * (e(dlw) * (xw - mu) + e(dll) * (xl - mu))
    torch.testing.assert_close(p.grad, analytic, rtol=1e-9, atol=1e-12)
    if eps == 1e-3:
        assert ((rw - 1).abs() >= eps - 1e-12).any(), "the small clip must clamp some ratios in this test"


def test_equivalent_prediction_types_agree(sd_scheduler):
    x, eps_p, eps_r, xw, xl = make_batch()
    c = ddim_coefficients(sd_scheduler, TIMESTEPS, 1.0)
    sa, s1a = (v.view(-1, 1, 1, 1) for v in (c.sqrt_alpha, c.sqrt_one_minus_alpha))
    outs = {}
    for ptype in ("epsilon", "v_prediction", "sample"):
        sched = DDIMScheduler.from_config(sd_scheduler.config, prediction_type=ptype)
        sched.set_timesteps(20)

        def conv(e):
            x0 = (x - s1a * e) / sa
            return {"epsilon": e, "v_prediction": sa * e - s1a * x0, "sample": x0}[ptype]  # noqa: B023

        lp = spo_fast.ddim_step_log_prob(sched, conv(eps_p), TIMESTEPS, x, xw)
        loss = spo_fast.spo_loss(conv(eps_p), conv(eps_r), x, xw, xl, TIMESTEPS, sched)
        outs[ptype] = (lp, loss.loss, loss.ratio_win)
    for ptype in ("v_prediction", "sample"):
        for a, b in zip(outs[ptype], outs["epsilon"]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_matches_diffusers(sd_scheduler, eta, prediction_type):
    sched = DDIMScheduler.from_config(sd_scheduler.config, prediction_type=prediction_type)
    sched.set_timesteps(20)
    x, p, _, _, _ = make_batch(b=3, dtype=torch.float32)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    for t in (951, 501, 51, 1):
        ref = sched.step(p, t, x, eta=eta, variance_noise=z).prev_sample
        c = ddim_coefficients(sched, t, eta, batch_size=3)
        got = ddim_step(c, p, x, noise=z)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_pool_candidates_share_one_mean(sd_scheduler):
    x, p, _, _, _ = make_batch(b=2, shape=(4, 8, 8))
    c = ddim_coefficients(sd_scheduler, [501, 201], 1.0)
    g = torch.Generator().manual_seed(0)
    pool = ddim_step(c, p, x, num_candidates=4000, generator=g)
    assert pool.shape == (4000, 2, 4, 8, 8)
    mean = ddim_step_mean(c, p, x)
    torch.testing.assert_close(pool.mean(0), mean, atol=5 * c.sigma.max().item() / 4000**0.5, rtol=0)
    assert not torch.equal(pool[0], pool[1])
    again = ddim_step(c, p, x, num_candidates=4000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pool, again)


def test_select_pairs_properties():
    g = torch.Generator().manual_seed(0)
    for k, b in ((2, 1), (4, 10), (7, 33)):
        s = torch.randn(k, b, generator=g) * 3
        idx, valid = spo_fast.select_pairs(s, 0.3)
        cols = torch.arange(b)
        assert torch.equal(s[idx[0], cols], s.max(0).values)
        assert torch.equal(s[idx[1], cols], s.min(0).values)
        margin = torch.tanh((s.max(0).values - s.min(0).values) / 2)
        assert torch.equal(valid, margin > 0.3) or torch.allclose(margin[valid != (margin > 0.3)], torch.tensor(0.3))
    # ties never give win == lose; NaN never wins or loses; fewer than two finite scores -> invalid
    idx, valid = spo_fast.select_pairs(torch.zeros(3, 2), 0.0)
    assert (idx[0] != idx[1]).all() and not valid.any()
    s = torch.tensor([[float("nan"), float("nan")], [1.0, float("nan")], [-2.0, 5.0]])
    idx, valid = spo_fast.select_pairs(s, 0.1)
    assert idx[:, 0].tolist() == [1, 2] and valid.tolist() == [True, False]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eta=-0.5), "eta"),
        (dict(timesteps=torch.tensor([1000, 1, 1, 1, 1])), "timesteps"),
        (dict(timesteps=torch.tensor([1, 2])), "timesteps"),
        (dict(win_sample=torch.zeros(5, 4, 6, 4)), "win_sample"),
        (dict(beta=0.0), "beta"),
        (dict(eps=1.5), "eps"),
    ],
)
def test_bad_input_raises_value_error(sd_scheduler, kwargs, match):
    x, p, r, xw, xl = make_batch(dtype=torch.float32)
    args = dict(
        policy_pred=p, ref_pred=r, sample=x, win_sample=xw, lose_sample=xl, timesteps=TIMESTEPS, scheduler=sd_scheduler
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        spo_fast.spo_loss(**args)


def test_bad_scheduler_and_device(sd_scheduler):
    x, p, r, xw, xl = make_batch(dtype=torch.float32)
    bad = DDIMScheduler.from_config(sd_scheduler.config)
    bad.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type"):
        spo_fast.ddim_step_log_prob(bad, p, TIMESTEPS, x, xw)
    with pytest.raises(ValueError, match="set_timesteps"):
        spo_fast.ddim_step_log_prob(DDIMScheduler.from_config(sd_scheduler.config), p, TIMESTEPS, x, xw)
    with pytest.raises(ValueError, match="device"):
        spo_fast.ddim_step_log_prob(sd_scheduler, p.to("meta"), TIMESTEPS, x, xw)
    for th in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            spo_fast.select_pairs(torch.zeros(2, 3), th)
    with pytest.raises(ValueError, match="k >= 2"):
        spo_fast.select_pairs(torch.zeros(1, 3), 0.3)
