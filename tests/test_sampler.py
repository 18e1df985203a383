"""The pool sampler's pairs obey SPO's definition (DESIGN.md section 2), checked by recording what it computed."""

import pytest
import torch
from diffusers import DDIMScheduler

from spo_fast.ddim import ddim_coefficients, ddim_step_mean, predict_x0_eps
from spo_fast.sampler import PoolSampler, PoolSamplerConfig, ddim_sample
from spo_fast.selection import select_pairs


class Recorder:
    """A deterministic toy denoiser (eps = 0.3 x + prompt offset) that records its inputs."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond):
        if t is not None:
            self.calls.append((x.clone(), t.clone()))
        return 0.3 * x + cond.view(-1, 1, 1, 1)


def scorer(x0, t, idx):
    return 40 * x0.mean(dim=(1, 2, 3))  # big spread so some pairs are valid and some not


@pytest.fixture
def sched():
    s = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    return s


@pytest.mark.parametrize("inner", [0, 2])
def test_pairs_obey_the_definition(sched, inner):
    b, k, n, div = 3, 4, 10, 3
    den = Recorder()
    cfg = PoolSamplerConfig(num_steps=n, num_candidates=k, divert_step=div, inner_steps=inner, threshold=0.1)
    sampler = PoolSampler(den, sched, scorer, cfg)
    cond = torch.tensor([0.1, -0.2, 0.05])
    g = torch.Generator().manual_seed(0)
    res = sampler.sample(cond, torch.randn(b, 2, 3, 3, generator=g), g, seed=7, pass_index=0)
    ts = sampler.timesteps
    # trunk: b rows for steps 0..div; then every UNet call sees the k*b pool
    assert all(c[0].shape[0] == b for c in den.calls[: div + 1])
    assert all(c[0].shape[0] == k * b for c in den.calls[div + 1 :])
    seg_starts = list(range(div, n, inner + 1))
    assert len(res.log.scores) == len(seg_starts)
    cols = torch.arange(b)
    # scoring calls: the pool at the end of each segment (the last segment is scored on x_0 directly)
    scored = [
        c for c in den.calls[div + 1 :] if int(c[1][0]) in [ts[s + inner + 1] for s in seg_starts if s + inner + 1 < n]
    ]
    for s_i, start in enumerate(seg_starts):
        scores = res.log.scores[s_i]
        idx, valid = select_pairs(scores, 0.1)
        assert torch.equal(res.log.win[s_i], idx[0]) and torch.equal(res.log.lose[s_i], idx[1])
        assert torch.equal(res.log.valid[s_i], valid)
        assert ((res.log.next_index[s_i] >= 0) & (res.log.next_index[s_i] < k)).all()
        if s_i + 1 < len(seg_starts) and start + inner + 1 < n:
            pool = scored[s_i][0].view(k, b, 2, 3, 3)
            # the scores are the scorer applied to the candidates' predicted x0 at their timestep
            c = ddim_coefficients(sched, ts[start + inner + 1], 1.0, batch_size=k * b, num_inference_steps=n)
            x0, _ = predict_x0_eps(c, den(pool.flatten(0, 1), None, cond.repeat(k)), pool.flatten(0, 1))
            torch.testing.assert_close(scores, scorer(x0, None, None).view(k, b))
            # the next segment's parent is the continuation drawn from this pool
            cont = pool[res.log.next_index[s_i], cols]
            nxt = res.pairs.step_index == seg_starts[s_i + 1]
            if nxt.any():
                torch.testing.assert_close(res.pairs.parent_win[nxt], cont[res.pairs.prompt_index[nxt]])
    # every pair: win != lose, margin above the threshold; shared parent iff no inner steps
    assert res.pairs.shared_parent == (inner == 0)
    assert (res.pairs.margin > 0.1).all()
    assert not torch.equal(res.pairs.win, res.pairs.lose)
    n_valid = sum(int(v.sum()) for v in res.log.valid)
    per_record = [len(t) for t in res.log.transition_timesteps]
    assert len(res.pairs) == sum(int(v.sum()) * m for v, m in zip(res.log.valid, per_record))
    assert n_valid + res.num_invalid == b * len(seg_starts)


def test_win_and_lose_are_draws_from_the_parent_step(sched):
    """Each (parent, win) transition is a sample of the DDIM step from the parent: the residual over sigma is
    the standard-normal noise; win and lose differ only by their noise."""
    b, k, n = 2, 3, 8
    den = Recorder()
    sampler = PoolSampler(den, sched, scorer, PoolSamplerConfig(n, k, 2, 0, 0.0))
    cond = torch.tensor([0.2, -0.1])
    g = torch.Generator().manual_seed(1)
    res = sampler.sample(cond, torch.randn(b, 4, 8, 8, generator=g), g)
    p = res.pairs
    c = ddim_coefficients(sched, p.timesteps, 1.0, num_inference_steps=n)
    mean = ddim_step_mean(c, den(p.parent_win, None, cond[p.prompt_index]), p.parent_win)
    for x in (p.win, p.lose):
        z = (x - mean) / c.sigma.view(-1, 1, 1, 1)
        assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.1


def test_sampler_is_deterministic_for_a_generator(sched):
    def run():
        s = PoolSampler(Recorder(), sched, scorer, PoolSamplerConfig(8, 3, 2, 1, 0.2))
        g = torch.Generator().manual_seed(5)
        return s.sample(torch.tensor([0.0, 0.1]), torch.randn(2, 2, 4, 4, generator=g), g, seed=3, pass_index=2)

    a, b = run(), run()
    assert torch.equal(a.pairs.win, b.pairs.win) and torch.equal(a.final, b.final)


def test_trajectory_mode_labels_whole_chains(sched):
    """divert 0 + inner = n - 1 is the DPO baseline: one record per prompt, n transitions each, scored at t = 0."""
    n, b = 6, 3
    s = PoolSampler(Recorder(), sched, scorer, PoolSamplerConfig(n, 2, 0, n - 1, 0.0))
    g = torch.Generator().manual_seed(0)
    res = s.sample(torch.zeros(b), torch.randn(b, 2, 3, 3, generator=g), g)
    assert res.log.score_timesteps == [0]
    assert len(res.pairs) == int(res.log.valid[0].sum()) * n and not res.pairs.shared_parent


@pytest.mark.parametrize("la", [2, 3])
def test_lookahead_scores_the_rolled_out_x0(sched, la):
    """With lookahead_steps = n the scorer sees the x0 of n deterministic DDIM jumps from each candidate to t = 0
    (evenly spaced in t; the first reuses the pool's UNet call), recomputed here in float64 from the scheduler's
    alphas; every extra UNet call is counted."""
    b, k, n, div = 2, 3, 8, 2
    den, seen = Recorder(), []

    def recording_scorer(x0, t, idx):
        seen.append(x0.clone())
        return scorer(x0, t, idx)

    s = PoolSampler(den, sched, recording_scorer, PoolSamplerConfig(n, k, div, 0, 0.1, lookahead_steps=la))
    cond = torch.tensor([0.1, -0.2])
    g = torch.Generator().manual_seed(2)
    res = s.sample(cond, torch.randn(b, 2, 3, 3, generator=g), g)
    a, ts = sched.alphas_cumprod.double(), s.timesteps
    offset = cond.repeat(k).view(-1, 1, 1, 1).double()
    for s_i, t_idx in enumerate(range(div + 1, n)):
        group = den.calls[div + 1 + s_i * la : div + 1 + (s_i + 1) * la]
        steps = [round(ts[t_idx] * (1 - j / la)) for j in range(la)]
        assert [int(c[1][0]) for c in group] == steps and all(c[0].shape[0] == k * b for c in group)
        x = group[0][0].double()
        for j, tj in enumerate(steps):
            eps = 0.3 * x + offset
            x0 = (x - (1 - a[tj]).sqrt() * eps) / a[tj].sqrt()
            if j + 1 < la:
                x = a[steps[j + 1]].sqrt() * x0 + (1 - a[steps[j + 1]]).sqrt() * eps
        torch.testing.assert_close(seen[s_i].double(), x0, rtol=1e-5, atol=1e-5)
    assert len(den.calls) == div + 1 + (n - div - 1) * la
    assert res.unet_rows == b * (div + 1) + (n - div - 1) * k * b * la


def test_bad_sampler_config():
    for kw, match in [
        (dict(num_candidates=1), "k"),
        (dict(divert_step=20), "divert_step"),
        (dict(threshold=1.0), "threshold"),
        (dict(eta=0.0), "eta"),
        (dict(lookahead_steps=0), "lookahead_steps"),
    ]:
        with pytest.raises(ValueError, match=match):
            PoolSamplerConfig(**kw).validate()


def test_ddim_sample_eta0_is_deterministic(sched):
    den = Recorder()
    x = torch.randn(2, 2, 3, 3)
    a = ddim_sample(den, sched, x, torch.zeros(2), 5, 0.0)
    b = ddim_sample(den, sched, x, torch.zeros(2), 5, 0.0)
    assert torch.equal(a, b) and a.shape == x.shape
