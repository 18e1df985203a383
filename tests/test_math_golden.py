"""spo_fast's SPO math against values computed by the official SPO code (tests/data/spo_reference_cases.json)."""

import pytest
import torch
from diffusers import DDIMScheduler

import spo_fast


def T(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def scheduler_for(prediction_type):
    s = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    s.set_timesteps(20)
    return s


@pytest.mark.parametrize("case", range(4))
def test_logprob_golden(golden, case):
    c = golden["logprob_cases"][case]
    sched = scheduler_for(c["prediction_type"])
    lp = spo_fast.ddim_step_log_prob(
        sched, T(c["model_output"]), T(c["timesteps"]), T(c["sample"]), T(c["prev_sample"]), eta=c["eta"]
    )
    ref = T(c["log_prob"])
    err = ((lp - ref).abs() / ref.abs()).max().item()
    assert err < 1e-5, err


def _loss_inputs(c, dtype=torch.float32):
    pw = T(c["eps_policy_win"], dtype).requires_grad_()
    pl = T(c["eps_policy_lose"], dtype).requires_grad_()
    args = dict(
        ref_pred=(T(c["eps_ref_win"], dtype), T(c["eps_ref_lose"], dtype)),
        sample=T(c["latents"], dtype),
        win_sample=T(c["next_latents_win"], dtype),
        lose_sample=T(c["next_latents_lose"], dtype),
        timesteps=T(c["timesteps"]).long(),
        eta=c["eta"],
        beta=c["beta"],
        eps=c["eps"],
    )
    return pw, pl, args


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", range(3))
def test_loss_golden(golden, sd_scheduler, case, dtype):
    c = golden["loss_cases"][case]
    pw, pl, args = _loss_inputs(c, dtype)
    out = spo_fast.spo_loss(policy_pred=(pw, pl), scheduler=sd_scheduler, **args)
    out.loss.backward()
    assert abs(out.loss.item() - c["loss"]) / c["loss"] < 5e-5
    for got, key in ((out.ratio_win, "ratio_win"), (out.ratio_lose, "ratio_lose")):
        ref = T(c[key], torch.float64)
        assert ((got.double() - ref).abs() / ref).max().item() < 5e-5
    for g, key in ((pw.grad, "grad_eps_policy_win"), (pl.grad, "grad_eps_policy_lose")):
        ref = T(c[key], torch.float64)
        assert rel(g.double(), ref) < 1e-4
    # Clamped ratios pass no gradient (case 1 has one ratio at exactly 1 - eps).
    clamped_w = (out.ratio_win - 1).abs() >= c["eps"] - 1e-6
    assert pw.grad[clamped_w].abs().max().item() == 0 if clamped_w.any() else True
    if case == 1:
        assert clamped_w.any(), "golden case 1 holds a clamped win ratio"
        assert torch.equal(T(c["grad_eps_policy_win"])[clamped_w], torch.zeros_like(pw.grad[clamped_w]))


@pytest.mark.parametrize("case", range(3))
def test_select_pairs_golden(golden, case):
    c = golden["compare_cases"][case]
    idx, valid = spo_fast.select_pairs(T(c["scores"]), c["threshold"])
    assert idx.tolist() == c["indices"]
    assert valid.tolist() == c["valid"]
