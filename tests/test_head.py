"""The noisy-latent preference head: ranking loss, checkpoints, mismatch errors, and the sampler's head mode."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from spo_fast.head import (
    HeadArchConfig,
    HeadMismatchError,
    HeadScorer,
    NoisyLatentPreferenceHead,
    load_head,
    pairwise_agreement,
    pool_ranking_loss,
    save_head,
    scheduler_signature,
)
from spo_fast.sampler import PoolSampler, PoolSamplerConfig


def _sched(**kw):
    args = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    args.update(kw)
    return DDIMScheduler(**args)


def _head(encoder="latent", **kw):
    cfg = HeadArchConfig(encoder="latent", latent_channels=2, text_dim=6, width=8, depth=2, embed_dim=8,
                         levels=[1, 2], scheduler=scheduler_signature(_sched()), base_model="tiny", **kw)  # fmt: skip
    torch.manual_seed(0)
    return NoisyLatentPreferenceHead(cfg)


class Cond:
    """Minimal PromptEmbeds stand-in: indexable, with ``embeds [b, L, D]``."""

    def __init__(self, embeds):
        self.embeds = embeds

    def __getitem__(self, idx):
        return Cond(self.embeds[idx])


def test_ranking_loss_decreases_on_a_fixed_batch():
    head = _head()
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(6, 3, 2, 4, 4, generator=g)
    ts = torch.randint(1, 1000, (6,), generator=g)
    teacher = 5 * lat.mean((2, 3, 4)) + torch.linspace(-1, 1, 3)  # a learnable function of the candidates
    embeds = torch.randn(2, 5, 6, generator=g)
    pidx = torch.tensor([0, 1, 0, 1, 0, 1])
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        s = head(lat.flatten(0, 1), ts.repeat_interleave(3), head.text_features(embeds), pidx.repeat_interleave(3))
        loss = pool_ranking_loss(s.view(6, 3), teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # a perfect copy of the teacher has zero loss (the teacher's own entropy is subtracted) and full agreement
    assert pool_ranking_loss(teacher, teacher).abs() < 1e-6
    a = pairwise_agreement(teacher, teacher, 0.0)
    assert a["agree_pair"].all() and a["same_selection"].all() and (a["agree_all"] == 1).all()


def test_checkpoint_round_trip_and_mismatch_errors(tmp_path):
    head = _head()
    path = save_head(head, tmp_path / "head.pt")
    assert not list(tmp_path.glob(".*tmp*"))  # atomic: no temporary left behind

    class Comp:  # the fields load_head checks
        def __init__(self, c, d, sched):
            self.unet = type("U", (), {"config": type("C", (), {"in_channels": c})()})()
            self.text_encoders = [type("T", (), {"config": type("C", (), {"hidden_size": d})()})()]
            self.scheduler = sched

    loaded = load_head(path, Comp(2, 6, _sched()))
    x, t = torch.randn(4, 2, 4, 4), torch.tensor([1, 300, 600, 999])
    text = torch.randn(1, 5, 6)
    with torch.no_grad():
        a = head(x, t, head.text_features(text), torch.zeros(4, dtype=torch.long))
        b = loaded(x, t, loaded.text_features(text), torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(a, b)
    with pytest.raises(HeadMismatchError, match="4 latent channels.*2|2 latent channels.*has 4"):
        load_head(path, Comp(4, 6, _sched()))
    with pytest.raises(HeadMismatchError, match="width 6.*768"):
        load_head(path, Comp(2, 768, _sched()))
    with pytest.raises(HeadMismatchError, match="beta_schedule: head 'scaled_linear' vs scheduler 'linear'"):
        load_head(path, Comp(2, 6, _sched(beta_schedule="linear")))
    with pytest.raises(FileNotFoundError, match="python -m spo_fast.train_head"):
        load_head(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="python -m spo_fast.train_head"):
        load_head("")


class CountingDenoiser:
    def __init__(self):
        self.rows = []

    def __call__(self, x, t, cond):
        self.rows.append(x.shape[0])
        return 0.3 * x + cond.embeds.mean((1, 2)).view(-1, 1, 1, 1)


@pytest.mark.parametrize("inner", [0, 1])
def test_sampler_head_mode(inner):
    b, k, n, div = 3, 4, 8, 2
    head = HeadScorer(_head())
    den = CountingDenoiser()
    cfg = PoolSamplerConfig(num_steps=n, num_candidates=k, divert_step=div, inner_steps=inner, threshold=0.0)
    sampler = PoolSampler(den, _sched(), None, cfg, head=head)
    cond = Cond(torch.randn(b, 5, 6))
    g = torch.Generator().manual_seed(0)
    res = sampler.sample(cond, torch.randn(b, 2, 4, 4, generator=g), g, seed=3)
    segs = len(res.log.scores)
    # trunk b rows per step; per scored step the UNet sees only the b continuations (k*b only for inner steps)
    assert den.rows[: div + 1] == [b] * (div + 1)
    assert set(den.rows[div + 1 :]) <= ({b} if inner == 0 else {b, k * b})
    assert den.rows.count(k * b) == inner * segs  # (n - div) is a multiple of inner + 1 here: every segment is full
    assert res.unet_rows == sum(den.rows)
    if inner == 0:
        assert res.unet_rows == b * n  # one UNet row per prompt per step: as cheap as plain sampling
    # pairs have the teacher mode's form
    assert len(res.pairs) == sum(int(v.sum()) * len(t) for v, t in zip(res.log.valid, res.log.transition_timesteps))
    assert res.pairs.shared_parent == (inner == 0)
    assert res.pairs.win.shape[1:] == (2, 4, 4) and res.log.scores[0].shape == (k, b)
    assert res.log.score_timesteps[-1] == 0
    # the log's scores are the head's scores of the candidates at their timestep
    assert all(torch.isfinite(s).all() for s in res.log.scores)


def test_sampler_needs_a_scorer_or_head():
    with pytest.raises(ValueError, match="scorer .* or a head"):
        PoolSampler(CountingDenoiser(), _sched(), None, PoolSamplerConfig(num_steps=4, divert_step=1))
