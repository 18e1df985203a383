"""The noisy-latent preference head: ranking loss, the direction head (tail, gradient distillation, teacher gradients
against finite differences), checkpoints, mismatch errors, the sampler's head mode and the train_head CLI."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from tiny_models import assert_teacher_gradient

from spo_fast.head import (
    HeadArchConfig,
    HeadMismatchError,
    HeadScorer,
    NoisyLatentPreferenceHead,
    PoolRecord,
    direction_distillation_loss,
    direction_scores,
    load_head,
    pairwise_agreement,
    pool_ranking_loss,
    save_head,
    scheduler_signature,
    timestep_embedding,
)
from spo_fast.sampler import PoolSampler, PoolSamplerConfig


def _sched(**kw):
    args = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    args.update(kw)
    return DDIMScheduler(**args)


def _head(encoder="latent", **kw):
    cfg = HeadArchConfig(encoder=encoder, latent_channels=2, text_dim=6, width=8, depth=2, embed_dim=8,
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


@pytest.mark.parametrize("encoder", ["direction", "latent"])
@pytest.mark.parametrize("inner", [0, 1])
def test_sampler_head_mode(inner, encoder):
    b, k, n, div = 3, 4, 8, 2
    head = HeadScorer(_head(encoder))
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


class ProposingHead:
    """A head that ranks candidates by ``sign * mean(x)`` (sign -1: the reverse of the teacher below) and records
    its scores."""

    def __init__(self, sign):
        self.sign, self.scores = sign, []

    def __call__(self, latents, timesteps, cond, prompt_index, parent_x0=None):
        s = self.sign * latents.mean((1, 2, 3))
        self.scores.append(s)
        return s


class CountingTeacher:
    def __init__(self):
        self.rows = []

    def __call__(self, x0, t, idx):
        self.rows.append(x0.shape[0])
        return 40 * x0.mean((1, 2, 3))


def _verify_run(k, verify, sign=-1.0, b=3, n=8, div=2, threshold=0.05):
    den, teacher, head = CountingDenoiser(), CountingTeacher(), ProposingHead(sign)
    cfg = PoolSamplerConfig(num_steps=n, num_candidates=k, divert_step=div, inner_steps=0, threshold=threshold)
    sampler = PoolSampler(den, _sched(), teacher, cfg, head=head if verify else None, verify_head=verify)
    g = torch.Generator().manual_seed(0)
    cond = Cond(torch.randn(b, 5, 6, generator=g))
    res = sampler.sample(cond, torch.randn(b, 2, 4, 4, generator=g), g, seed=3)
    return res, den, teacher, head


def test_verified_head_mode_lets_the_teacher_order_the_heads_pair():
    """The head proposes (argmax, argmin of its scores), the teacher sees only those 2b candidates and orders them:
    with a head that ranks in reverse, every pair's win is still the teacher's better candidate."""
    b, k = 3, 4
    res, den, teacher, head = _verify_run(k, True, b=b)
    assert teacher.rows == [2 * b] * len(res.log.scores)  # 2 of the k candidates per pool, final step included
    # per non-final scored step: the pair's x0 estimate (2b rows), and the continuations that are not one of the pair
    # (the pair's pass is reused for the others); the trunk b per step
    misses = [int(((n != w) & (n != lo)).sum()) for n, w, lo in zip(res.log.next_index, res.log.win, res.log.lose)]
    assert 0 < sum(misses[:-1]) < (len(misses) - 1) * b
    assert res.unet_rows == sum(den.rows) == b * 3 + sum(2 * b + m for m in misses[:-1])
    n_valid = 0
    for s, hs, win, lose, valid in zip(res.log.scores, head.scores, res.log.win, res.log.lose, res.log.valid):
        hs = hs.view(k, b)
        proposed = torch.stack([hs.argmax(0), hs.argmin(0)])
        cols = torch.arange(b)
        assert torch.equal(torch.sort(torch.stack([win, lose]), 0).values, torch.sort(proposed, 0).values)
        assert (s[win, cols] >= s[lose, cols]).all()
        # the two candidates the teacher did not see sit halfway: never selected, the margin is the teacher's
        mid = (s[win, cols] + s[lose, cols]) / 2
        others = torch.ones(k, b, dtype=torch.bool)
        others[win, cols] = others[lose, cols] = False
        torch.testing.assert_close(s[others], mid.expand(k, b)[others])
        # the reverse-ranking head's best is the teacher's worst: the teacher flips the order
        assert torch.equal(lose[valid], hs.argmax(0)[valid])
        n_valid += int(valid.sum())
    assert n_valid > 0 and len(res.pairs) == n_valid


def test_verified_head_mode_with_two_candidates_is_the_teacher_mode():
    """With k = 2 the head's pair is the whole pool: the same pairs, margins, final latents and UNet rows as the
    teacher mode (the ledger draws continuations from its counter RNG, not from the scores; every continuation is one
    of the pair, so its UNet output is reused as in the teacher mode)."""
    a, *_ = _verify_run(2, False)
    v, *_ = _verify_run(2, True)
    assert v.unet_rows == a.unet_rows
    for name in ("win", "lose", "parent_win", "timesteps", "margin", "prompt_index"):
        torch.testing.assert_close(getattr(v.pairs, name), getattr(a.pairs, name), msg=name)
    torch.testing.assert_close(v.final, a.final)
    assert len(a.pairs) > 0


def test_verified_head_mode_reuses_the_pairs_pass_without_changing_a_value(monkeypatch):
    """Continuations that are one of the verified pair take the UNet output of the pair's x0 pass: the same pairs
    and final latents as running the denoiser on every continuation, with fewer rows."""
    reused, *_ = _verify_run(4, True)

    def every_row(self, x, nxt, verified, i_next, cond, cols):
        return self.denoiser(x, self._t(i_next, x.shape[0], x.device), cond), x.shape[0]

    monkeypatch.setattr(PoolSampler, "_continuation_pred", every_row)
    full, *_ = _verify_run(4, True)
    for name in ("win", "lose", "parent_win", "margin"):
        torch.testing.assert_close(getattr(reused.pairs, name), getattr(full.pairs, name), msg=name)
    torch.testing.assert_close(reused.final, full.final)
    assert reused.unet_rows < full.unet_rows


def test_verified_head_mode_needs_a_head_and_a_scorer():
    cfg = PoolSamplerConfig(num_steps=4, divert_step=1)
    with pytest.raises(ValueError, match="verify_head needs both"):
        PoolSampler(CountingDenoiser(), _sched(), None, cfg, head=ProposingHead(1.0), verify_head=True)
    with pytest.raises(ValueError, match="verify_head needs both"):
        PoolSampler(CountingDenoiser(), _sched(), CountingTeacher(), cfg, verify_head=True)


class TimedTeacher(CountingTeacher):
    """Records the timestep of each call too."""

    def __init__(self):
        super().__init__()
        self.timesteps = []

    def __call__(self, x0, t, idx):
        self.timesteps.append(int(t[0]))
        return super().__call__(x0, t, idx)


def _gated_run(head_max_timestep, use_head=True, use_teacher=True, b=3, k=4, n=8, div=2):
    den, teacher, head = CountingDenoiser(), TimedTeacher(), ProposingHead(-1.0)
    cfg = PoolSamplerConfig(num_steps=n, num_candidates=k, divert_step=div, inner_steps=0, threshold=0.05)
    sampler = PoolSampler(
        den, _sched(), teacher if use_teacher else None, cfg, head=head if use_head else None,
        head_max_timestep=head_max_timestep,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    cond = Cond(torch.randn(b, 5, 6, generator=g))
    res = sampler.sample(cond, torch.randn(b, 2, 4, 4, generator=g), g, seed=3)
    return res, den, teacher, head


def test_timestep_gated_head_scores_the_quiet_steps_and_the_teacher_the_noisy_ones():
    """head_max_timestep T: steps scored above T take the teacher's path (x0 of all k*b candidates, decode, score),
    the others the head's. The continuations come from the ledger's RNG, not the scores, so the gated run's scores
    are the teacher run's on the noisy steps and the head run's on the quiet ones, value for value."""
    b, k = 3, 4
    teacher_run, *_ = _gated_run(None, use_head=False)
    head_run, *_ = _gated_run(None, use_teacher=False)
    ts = teacher_run.log.score_timesteps
    cut = sorted(ts)[len(ts) // 2]  # about half the scored steps each way
    res, den, teacher, head = _gated_run(cut)
    noisy = [t > cut for t in res.log.score_timesteps]
    assert 0 < sum(noisy) < len(noisy)
    assert teacher.timesteps == [t for t in ts if t > cut]
    assert len(head.scores) == len(noisy) - sum(noisy)
    for s, st, sh, is_noisy in zip(res.log.scores, teacher_run.log.scores, head_run.log.scores, noisy):
        torch.testing.assert_close(s, st if is_noisy else sh)
    # UNet rows: the trunk, k*b per teacher-scored step (its continuation reuses that pass), b per head step's
    # continuation (none after the final step)
    quiet_nonfinal = sum(1 for t in res.log.score_timesteps if 0 < t <= cut)
    assert res.unet_rows == sum(den.rows) == b * (2 + 1) + k * b * sum(noisy) + b * quiet_nonfinal
    assert len(res.pairs) == sum(int(v.sum()) for v in res.log.valid)


def test_timestep_gated_head_at_its_limits_is_the_head_or_the_teacher_mode():
    """T above every scored timestep: the head mode; T = 0: the teacher on every step but the final x_0."""
    full, *_ = _gated_run(999)
    head_run, *_ = _gated_run(None, use_teacher=False)
    assert full.unet_rows == head_run.unet_rows
    for a, c in zip(full.log.scores, head_run.log.scores):
        torch.testing.assert_close(a, c)
    zero, _, teacher, head = _gated_run(0)
    teacher_run, *_ = _gated_run(None, use_head=False)
    assert zero.unet_rows == teacher_run.unet_rows and len(head.scores) == 1
    for a, c in zip(zero.log.scores[:-1], teacher_run.log.scores[:-1]):
        torch.testing.assert_close(a, c)


def test_timestep_gated_head_needs_a_head_and_a_scorer():
    with pytest.raises(ValueError, match="needs both"):
        _gated_run(500, use_teacher=False)
    with pytest.raises(ValueError, match="needs both"):
        _gated_run(500, use_head=False)
    with pytest.raises(ValueError, match=">= 0"):
        _gated_run(-1)


def _audited_run(sign, audit, head_max_timestep=None, b=3, k=4, n=8, div=2):
    den, teacher, head = CountingDenoiser(), TimedTeacher(), ProposingHead(sign)
    cfg = PoolSamplerConfig(num_steps=n, num_candidates=k, divert_step=div, inner_steps=0, threshold=0.05)
    sampler = PoolSampler(den, _sched(), teacher, cfg, head=head, head_max_timestep=head_max_timestep)
    sampler.audit = audit
    g = torch.Generator().manual_seed(0)
    cond = Cond(torch.randn(b, 5, 6, generator=g))
    return sampler.sample(cond, torch.randn(b, 2, 4, 4, generator=g), g, seed=3), den, teacher


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_label_audit_gives_the_teachers_scores_and_changes_no_pair(sign):
    """The audit scores every head-scored pool with the teacher's own path: value for value the teacher mode's
    scores (the candidates are the same: continuations come from the ledger's RNG, not the scores), while the pairs,
    labels and UNet rows stay the head run's. Its counts follow: a head ranking like the teacher agrees on every
    valid pool and every pair, a reversed one on none."""
    from spo_fast.head import audit_counts, audit_summary

    b, k = 3, 4
    plain, *_ = _audited_run(sign, False)
    res, den, teacher = _audited_run(sign, True)
    teacher_run, *_ = _gated_run(None, use_head=False)
    assert plain.log.audit_scores == [None] * len(plain.log.scores) and plain.log.audit_rows == 0
    for name in ("win", "lose", "parent_win", "margin", "timesteps"):
        torch.testing.assert_close(getattr(res.pairs, name), getattr(plain.pairs, name), msg=name)
    for a, t, h, h0 in zip(res.log.audit_scores, teacher_run.log.scores, res.log.scores, plain.log.scores):
        torch.testing.assert_close(a, t)
        torch.testing.assert_close(h, h0)
    assert res.unet_rows == plain.unet_rows
    # the audit's rows: the k*b candidates' x0 estimate at every non-final scored step (no lookahead here)
    assert res.log.audit_rows == sum(den.rows) - res.unet_rows == k * b * (len(res.log.scores) - 1)
    counts = audit_counts(res.log, 0.05)
    total = counts["all"]
    assert total["pools"] == b * len(res.log.scores) == sum(c["pools"] for n, c in counts.items() if n != "all")
    assert total["valid"] > 0 and total["pairs"] == len(res.pairs) > 0
    summary = audit_summary(counts)["all"]
    want = 1.0 if sign > 0 else 0.0
    assert summary["agree_valid"] == want and summary["pair_precision"] == want


def test_label_audit_skips_the_steps_the_teacher_labels():
    """Gated: the steps above the gate carry the teacher's own labels; only the head's steps are audited."""
    from spo_fast.head import audit_counts

    ungated, *_ = _gated_run(None, use_head=False)
    cut = sorted(ungated.log.score_timesteps)[len(ungated.log.score_timesteps) // 2]
    res, *_ = _audited_run(-1.0, True, head_max_timestep=cut)
    audited = [a is not None for a in res.log.audit_scores]
    assert audited == [t <= cut for t in res.log.score_timesteps] and 0 < sum(audited) < len(audited)
    assert audit_counts(res.log, 0.05)["all"]["pools"] == 3 * sum(audited)


# ------------------------------------------------------------------------------------------------ direction head


def test_direction_scores_are_the_first_order_change_from_the_pool_mean():
    g = torch.Generator().manual_seed(0)
    k, b = 5, 3
    cand, d = torch.randn(k, b, 2, 3, 3, generator=g), torch.randn(b, 2, 3, 3, generator=g)
    s = direction_scores(cand, d)
    ref = torch.stack([torch.stack([((cand[i, j] - cand[:, j].mean(0)) * d[j]).sum() for j in range(b)])
                       for i in range(k)])  # fmt: skip
    torch.testing.assert_close(s, ref)
    # differences are <g, x_i - x_j> whatever the centering; the scores of a pool sum to zero
    torch.testing.assert_close(s[1] - s[0], ((cand[1] - cand[0]) * d).sum((1, 2, 3)))
    torch.testing.assert_close(s.sum(0), torch.zeros(b), atol=1e-5, rtol=0)


def test_direction_head_forward_reads_the_samplers_pool_layout():
    head = _head("direction")
    g = torch.Generator().manual_seed(1)
    k, b = 4, 3
    cand, px = torch.randn(k, b, 2, 4, 4, generator=g), torch.randn(b, 2, 4, 4, generator=g)
    t, text = torch.tensor([700, 300, 10]), head.text_features(torch.randn(2, 5, 6, generator=g))
    pidx = torch.tensor([1, 0, 1])
    with torch.no_grad():
        pools = head.score_pools(cand, px, t, text, pidx)  # [k, b]
        flat = head(cand.flatten(0, 1), t.repeat(k), text, pidx.repeat(k), parent_x0=px)  # row r * b + j
        # each pool is scored on its own: permuting the prompts permutes the scores
        perm = torch.tensor([2, 0, 1])
        permuted = head.score_pools(cand[:, perm], px[perm], t[perm], text, pidx[perm])
    torch.testing.assert_close(flat, pools.reshape(-1))
    torch.testing.assert_close(permuted, pools[:, perm])
    with pytest.raises(ValueError, match="parent_x0"):
        head(cand.flatten(0, 1), t.repeat(k), text, pidx.repeat(k))
    with pytest.raises(HeadMismatchError, match="trained for 2 latent channels"):
        head.score_pools(torch.randn(k, b, 3, 4, 4), torch.randn(b, 3, 4, 4), t, text, pidx)


def test_direction_distillation_loss_properties_and_fit():
    g = torch.Generator().manual_seed(2)
    target = torch.randn(6, 2, 4, 4, generator=g)
    target[3] = 0  # a pool without gradient (a flat teacher) is ignored
    assert direction_distillation_loss(target, target) < 1e-6
    assert abs(direction_distillation_loss(-target, target).item() - 2.0) < 1e-5  # opposite direction: 1 - cos = 2
    # same direction, wrong size: only the norm term, 0.1 * log(2)^2
    assert abs(direction_distillation_loss(2 * target, target).item() - 0.1 * torch.log(torch.tensor(2.0)) ** 2) < 1e-5
    # the head learns a direction that is a function of its inputs (here: the parent's x0, sign set by the timestep)
    head = _head("direction")
    k = 3
    cand, px = torch.randn(k, 6, 2, 4, 4, generator=g), torch.randn(6, 2, 4, 4, generator=g)
    t = torch.tensor([900, 100, 900, 100, 900, 100])
    want = px * torch.where(t > 500, 1.0, -1.0).view(-1, 1, 1, 1)
    embeds = torch.randn(2, 5, 6, generator=g)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        d = head.direction(cand.mean(0), px, t, head.text_features(embeds)[torch.tensor([0, 1] * 3)])
        loss = direction_distillation_loss(d, want)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_direction_head_checkpoint_round_trip(tmp_path):
    head = _head("direction")
    loaded = load_head(save_head(head, tmp_path / "head.pt"))
    g = torch.Generator().manual_seed(3)
    cand, px = torch.randn(2, 3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    e, t, i = torch.randn(3, 5, 6, generator=g), torch.tensor([5, 50, 500]), torch.arange(3)
    with torch.no_grad():
        torch.testing.assert_close(
            head.score_pools(cand, px, t, head.text_features(e), i),
            loaded.score_pools(cand, px, t, loaded.text_features(e), i),
        )


def test_potential_direction_is_a_conservative_field_and_trains_by_double_backward(tmp_path):
    """model.potential: the direction is the gradient of a scalar potential, so its Jacobian in the pool mean is
    symmetric (a Hessian), which a free direction head's is not; under grad mode the parameters get gradients
    through it (double backward), under no_grad it comes back detached; checkpoints keep the setting."""
    g = torch.Generator().manual_seed(4)
    px, t = torch.randn(1, 2, 3, 3, generator=g), torch.tensor([300])
    embeds = torch.randn(1, 5, 6, generator=g)

    def jacobian(head):
        text = head.text_features(embeds).detach()
        f = lambda m: head.direction(m.view(1, 2, 3, 3), px, t, text).flatten()  # noqa: E731
        return torch.autograd.functional.jacobian(f, torch.randn(18, generator=g))

    pot = _head("direction", potential=True)
    for p in pot.parameters():  # away from the identity initialisation, so the potential is not trivial
        torch.nn.init.normal_(p, std=0.3, generator=g)
    j = jacobian(pot)
    assert j.abs().max() > 1e-3
    torch.testing.assert_close(j, j.t(), atol=1e-5, rtol=1e-4)
    free = _head("direction")
    for p in free.parameters():
        torch.nn.init.normal_(p, std=0.3, generator=g)
    jf = jacobian(free)
    assert (jf - jf.t()).abs().max() > 0.1 * jf.abs().max()
    # training: the distillation loss reaches the potential's parameters through the gradient
    cand = torch.randn(3, 1, 2, 3, 3, generator=g)
    d = pot.direction(cand.mean(0), px, t, pot.text_features(embeds))
    direction_distillation_loss(d, torch.randn(1, 2, 3, 3, generator=g)).backward()
    assert pot.potential_out[0].weight.grad is not None and pot.conv_in.weight.grad.abs().sum() > 0
    with torch.no_grad():
        scored = pot.score_pools(cand, px, t, pot.text_features(embeds), torch.tensor([0]))
    assert not scored.requires_grad
    loaded = load_head(save_head(pot, tmp_path / "head.pt"))
    assert loaded.config.potential
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.score_pools(cand, px, t, loaded.text_features(embeds), torch.tensor([0])), scored
        )
    with pytest.raises(ValueError, match="potential head is a 'direction' head"):
        _head("latent", potential=True)


def test_potential_value_rule_scores_candidates_by_the_potential(tmp_path):
    """score_rule: a potential head scores by its value phi(x_i) centred per pool (checked against phi of each
    candidate run alone), which tends to the first-order rule <g(mean), x_i - mean> as the pool shrinks; 'gradient'
    keeps the first-order rule; old checkpoints (no score_rule) load as 'auto'; a free head cannot score by value."""
    g = torch.Generator().manual_seed(7)
    pot = _head("direction", potential=True)
    for p in pot.parameters():  # away from the identity initialisation, so the potential is curved
        torch.nn.init.normal_(p, std=0.3, generator=g)
    k, b = 3, 2
    px, t = torch.randn(b, 2, 5, 3, generator=g), torch.tensor([700, 20])
    embeds, idx = torch.randn(2, 5, 6, generator=g), torch.tensor([1, 0])
    cand = torch.randn(k, b, 2, 5, 3, generator=g)
    assert pot.scores_by_value
    with torch.no_grad():
        text = pot.text_features(embeds)
        scores = pot.score_pools(cand, px, t, text, idx)
        cond = pot.t_embedder(timestep_embedding(t)) + text[idx]

        def phi(x, j):  # the potential of one candidate of pool j, run alone
            h = pot.conv_in(torch.cat([x[None], px[j : j + 1]], 1))
            for blk in pot.blocks:
                h = blk(h, cond[j : j + 1])
            return pot.potential_out(torch.nn.functional.silu(h)).sum()

        ref = torch.tensor([[float(phi(cand[r, j], j)) for j in range(b)] for r in range(k)])
    torch.testing.assert_close(scores, ref - ref.mean(0, keepdim=True), atol=1e-5, rtol=1e-4)
    assert scores.abs().max() > 1e-3
    # a shrinking pool: value differences / eps -> first-order differences / eps
    grad_head = load_head(save_head(pot, tmp_path / "p.pt"))
    grad_head.config.score_rule = "gradient"
    assert not grad_head.scores_by_value
    mean = torch.randn(b, 2, 5, 3, generator=g)
    d = torch.randn(k, b, 2, 5, 3, generator=g)
    d = d - d.mean(0, keepdim=True)
    eps = 1e-3
    with torch.no_grad():
        v = pot.score_pools(mean + eps * d, px, t, text, idx) / eps
        fo = grad_head.score_pools(mean + eps * d, px, t, text, idx) / eps
        torch.testing.assert_close(fo, direction_scores(mean + eps * d, pot.direction(mean, px, t, text[idx])) / eps)
    torch.testing.assert_close(v, fo, atol=2e-3 * fo.abs().max().item(), rtol=0)
    # the sampler's layout (forward on k*b rows) scores by the same rule
    with torch.no_grad():
        flat = pot(cand.flatten(0, 1), t.repeat(k), text, idx.repeat(k), parent_x0=px)
    torch.testing.assert_close(flat.view(k, b), scores)
    # an older checkpoint without the field loads as 'auto' (value for a potential head)
    state = torch.load(tmp_path / "p.pt", weights_only=False)
    del state["config"]["score_rule"]
    torch.save(state, tmp_path / "old.pt")
    assert load_head(tmp_path / "old.pt").scores_by_value
    with pytest.raises(ValueError, match="needs a potential head"):
        _head("direction", score_rule="value")
    with pytest.raises(ValueError, match="score_rule must be one of"):
        _head("direction", potential=True, score_rule="second_order")
    assert not _head("direction").scores_by_value  # a free head: first order under 'auto'


def _toy():
    from spo_fast.pipeline import PromptEncoder, load_components
    from spo_fast.toy import toy_model_path

    comps = load_components(str(toy_model_path()), None, torch.float32, device="cpu")
    return comps, PromptEncoder(comps, device="cpu")


def _toy_direction_head(path):
    """A small untrained direction head for the toy model, saved through the checkpoint path real heads use."""
    comps, _ = _toy()
    arch = HeadArchConfig(encoder="direction", latent_channels=int(comps.unet.config.in_channels),
                          text_dim=int(comps.text_encoders[0].config.hidden_size), width=8, depth=1,
                          scheduler=scheduler_signature(comps.scheduler), base_model="toy")  # fmt: skip
    torch.manual_seed(0)
    return save_head(NoisyLatentPreferenceHead(arch), path)


def test_teacher_gradient_matches_finite_differences():
    """The direction head's target: the teacher's gradient at the pool mean, through the lookahead jumps, the
    decoder and the (differentiable) toy scorer, checked against central differences along random directions."""
    from spo_fast.head import _teacher_gradient
    from spo_fast.pipeline import CFGDenoiser
    from spo_fast.toy import ToyImageScorer, prompt_splits

    torch.manual_seed(0)
    comps, enc = _toy()
    prompts = list(prompt_splits()[0][:2])
    cond = enc(prompts)
    den = CFGDenoiser(comps.unet, enc([""]), 5.0)
    cfg = PoolSamplerConfig(num_steps=10, num_candidates=2, divert_step=2, threshold=0.0, lookahead_steps=2)
    teacher = ToyImageScorer()
    sampler = PoolSampler(den, comps.scheduler, teacher, cfg)
    t = sampler.timesteps[5]
    mean = torch.randn(2, *comps.latent_shape, generator=torch.Generator().manual_seed(4)) * 0.8
    grad = _teacher_gradient(sampler, comps, teacher.differentiable_score, mean, t, cond, prompts)

    assert_teacher_gradient(sampler, comps, den, teacher, mean, t, cond, prompts, grad, h=2e-2, atol=2e-3, seed=5)
    # at t = 0 the final x_0 is judged as it is
    g0 = _teacher_gradient(sampler, comps, teacher.differentiable_score, mean, 0, cond, prompts)
    assert g0.shape == mean.shape and torch.isfinite(g0).all()


def test_teacher_gradient_without_the_unet_is_the_scaled_x0_gradient():
    """through_unet=False holds the lookahead's UNet outputs constant: for epsilon prediction the gradient at the mean
    is then the teacher's gradient at the lookahead x0 divided by sqrt(alpha_bar_t) (the jumps' DDIM algebra), while
    the full gradient differs (the UNet's Jacobian). The denoiser runs without autograd."""
    from spo_fast.head import _teacher_gradient
    from spo_fast.pipeline import CFGDenoiser
    from spo_fast.toy import ToyImageScorer, prompt_splits

    torch.manual_seed(0)
    comps, enc = _toy()
    assert comps.scheduler.config.prediction_type == "epsilon"
    prompts = list(prompt_splits()[0][:2])
    cond = enc(prompts)
    den = CFGDenoiser(comps.unet, enc([""]), 5.0)
    grad_enabled = []

    def no_grad_den(x, ts, c):  # like the sampler's (graphable) denoiser: a forward only
        grad_enabled.append(torch.is_grad_enabled())
        return den(x, ts, c)

    cfg = PoolSamplerConfig(num_steps=10, num_candidates=2, divert_step=2, threshold=0.0, lookahead_steps=3)
    teacher = ToyImageScorer()
    sampler = PoolSampler(no_grad_den, comps.scheduler, teacher, cfg)
    t = int(sampler.timesteps[4])
    mean = torch.randn(2, *comps.latent_shape, generator=torch.Generator().manual_seed(4)) * 0.8
    grad = _teacher_gradient(sampler, comps, teacher.differentiable_score, mean, t, cond, prompts, through_unet=False)
    assert grad_enabled and not any(grad_enabled)
    with torch.no_grad():
        ts = torch.full((2,), t)
        x0, _ = sampler._lookahead_x0(mean, den(mean, ts, cond), t, cond)
    x0.requires_grad_(True)
    score = teacher.differentiable_score(comps.decode(x0).float(), ts, prompts)
    (g_x0,) = torch.autograd.grad(score.sum(), x0)
    torch.testing.assert_close(grad, g_x0 / comps.scheduler.alphas_cumprod[t].sqrt(), rtol=1e-4, atol=1e-6)
    full = _teacher_gradient(PoolSampler(den, comps.scheduler, teacher, cfg), comps, teacher.differentiable_score,
                             mean, t, cond, prompts)  # fmt: skip
    assert not torch.allclose(full, grad, rtol=0.05, atol=1e-5)


def test_collect_pools_records_direction_targets_and_rejects_an_opaque_teacher():
    from spo_fast.head import _teacher_gradient, collect_pools
    from spo_fast.toy import ToyImageScorer, prompt_splits

    comps, enc = _toy()
    prompts = list(prompt_splits()[0][:4])
    cfg = PoolSamplerConfig(num_steps=6, num_candidates=3, divert_step=2, threshold=0.05, lookahead_steps=2)
    rec = collect_pools(comps, enc, ToyImageScorer(), prompts, 1, 2, cfg, 5.0, seed=0, gradients=True)
    steps = 6 - 2
    assert len(rec) == 2 * steps and rec.latents.shape[1] == 3
    assert rec.parent_x0.shape == rec.grad.shape == (len(rec), *comps.latent_shape)
    assert rec.timesteps[-2:].tolist() == [0, 0] and torch.isfinite(rec.grad).all()
    both = PoolRecord.cat([rec, rec.subset(slice(0, 3))])
    assert len(both) == len(rec) + 3 and both.grad.shape[0] == len(both)
    # the smoothed target: the same pools, the mean of the teacher's gradients at the k midpoints (checked where the
    # x0 estimate is the latent itself, t = 0: an independent evaluation per midpoint)
    mid = collect_pools(comps, enc, ToyImageScorer(), prompts, 1, 2, cfg, 5.0, seed=0, gradients=True,
                        gradient_at="midpoints")  # fmt: skip
    torch.testing.assert_close(mid.latents, rec.latents)
    assert not torch.allclose(mid.grad, rec.grad) and torch.isfinite(mid.grad).all()
    score = ToyImageScorer().differentiable_score
    for i in (rec.timesteps == 0).nonzero().flatten().tolist():
        c = rec.latents[i]
        m = c.mean(0, keepdim=True)
        ps = [rec.prompts[int(rec.prompt[i])]] * len(c)
        want = _teacher_gradient(None, comps, score, m + (c - m) / 2, 0, None, ps).mean(0)
        torch.testing.assert_close(mid.grad[i], want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="gradient_at must be"):
        collect_pools(comps, enc, ToyImageScorer(), prompts, 1, 2, cfg, gradients=True, gradient_at="candidates")
    with pytest.raises(TypeError, match="not differentiable.*--model.encoder latent"):
        collect_pools(comps, enc, lambda im, t, p: im.mean((1, 2, 3)), prompts, 1, 2, cfg, gradients=True)


def test_recording_in_shards_equals_one_recording_and_resumes_after_an_interruption(tmp_path, monkeypatch):
    """Pools recorded shard by shard (collect_pools' pass_range) are bit for bit the pools of one recording; a
    train_head run killed while recording keeps its finished shards and --resume records only the missing ones."""
    import spo_fast.head as head_mod
    from spo_fast.head import collect_pools
    from spo_fast.toy import ToyImageScorer, prompt_splits
    from spo_fast.train_head import main

    comps, enc = _toy()
    prompts = list(prompt_splits()[0][:5])
    cfg = PoolSamplerConfig(num_steps=5, num_candidates=3, divert_step=2, threshold=0.05, lookahead_steps=1)
    whole = collect_pools(comps, enc, ToyImageScorer(), prompts, 3, 2, cfg, seed=4, parents=True)
    parts = [collect_pools(comps, enc, ToyImageScorer(), prompts, 3, 2, cfg, seed=4, parents=True, pass_range=r)
             for r in [(0, 1), (1, 3)]]  # fmt: skip
    joined = PoolRecord.cat(parts)
    for k in ("latents", "timesteps", "prompt", "scores", "parent_x0"):
        assert torch.equal(getattr(joined, k), getattr(whole, k)), k
    with pytest.raises(ValueError, match="non-empty range"):
        collect_pools(comps, enc, ToyImageScorer(), prompts, 3, 2, cfg, pass_range=(2, 4))

    out = tmp_path / "run"
    args = [*_tiny_head_run(out, steps=2), "--data.train_passes", "3", "--data.shard_passes", "1"]
    ref = tmp_path / "ref"
    assert main([*args, "--log.output_dir", str(ref), "--data.shard_passes", "3"]) == 0
    real, calls = head_mod.collect_pools, []

    def killed_after_two_shards(*a, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies while recording its third shard
        calls.append(kw["pass_range"])
        return real(*a, **kw)

    monkeypatch.setattr(head_mod, "collect_pools", killed_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    kept = sorted(p.name for p in (out / "data_train.parts").iterdir())
    assert kept == ["passes_000000-000001.pt", "passes_000001-000002.pt"] and not (out / "data_train.pt").exists()
    calls.clear()
    monkeypatch.setattr(head_mod, "collect_pools", lambda *a, **kw: calls.append(kw["pass_range"]) or real(*a, **kw))
    assert main([*args, "--resume"]) == 0
    assert calls == [(2, 3), (0, 1)]  # the train split's last shard, then the held-out split's only shard
    assert not (out / "data_train.parts").exists()
    a = torch.load(out / "data_train.pt", weights_only=False)
    b = torch.load(ref / "data_train.pt", weights_only=False)
    for k in ("latents", "scores", "grad", "parent_x0"):
        assert torch.equal(a[k], b[k]), k
    bad = [*args, "--log.output_dir", str(tmp_path / "bad"), "--data.shard_passes", "0"]
    assert main(bad) == 2 and not (tmp_path / "bad").exists()
    # rank 0 of a torchrun recording whose other process died before writing its shards: one clear error
    from spo_fast.distributed import DistributedContext
    from spo_fast.train_head import HeadDistiller, make_head_config

    lost = HeadDistiller(make_head_config(None, {"log.output_dir": str(tmp_path / "lost"), "data.shard_passes": 16}))
    lost.dist = DistributedContext(rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"lacks 3 of its 3 shards .*--resume"):
        lost.collect("train")


def _tiny_head_run(out, steps: int) -> list[str]:
    """train_head CLI arguments of a seconds-long toy run (one 2-prompt pass each, 6 sampling steps)."""
    return ["--log.output_dir", str(out), "--log.progress", "false", "--data.train_passes", "1",
            "--data.eval_passes", "1", "--data.batch_size", "2", "--sampling.num_steps", "6",
            "--sampling.divert_step", "2", "--train.steps", str(steps), "--train.batch_pools", "4"]  # fmt: skip


def test_train_head_cli_direction_run_and_resume(tmp_path):
    """A tiny end-to-end distillation: data with teacher gradients, training, held-out report, head.pt that the
    sampler's HeadScorer loads; --resume on a finished run reuses the recorded data."""
    import json

    from spo_fast.train_head import main

    out = tmp_path / "head"
    args = [*_tiny_head_run(out, steps=12), "--log.eval_every", "6", "--log.checkpoint_every", "6"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["encoder"] == "direction" and report["steps"] == 12
    assert -1.0 <= report["heldout"]["overall"]["grad_cosine"] <= 1.0
    assert 0.0 <= report["heldout"]["oracle_agree_valid"]["overall"] <= 1.0
    for row in [report["heldout"]["overall"], *report["heldout"]["buckets"].values()]:
        p, n, se = row["agree_valid"], row["teacher_valid"], row["agree_valid_se"]
        assert (se is None) if n == 0 else se == pytest.approx((p * (1 - p) / n) ** 0.5)
    assert (out / "report.png").is_file() and (out / "data_train.pt").is_file()
    head = load_head(out / "head.pt")
    assert head.config.encoder == "direction"
    data_mtime = (out / "data_train.pt").stat().st_mtime_ns
    assert main([*args, "--resume"]) == 0
    assert (out / "data_train.pt").stat().st_mtime_ns == data_mtime
    # a run folder written before a setting existed (here data.rank_passes) resumes with that setting's default
    old = json.loads((out / "config.json").read_text())
    del old["data"]["rank_passes"]
    (out / "config.json").write_text(json.dumps(old))
    assert main([*args, "--resume"]) == 0
    assert main(args) == 2  # the same run again without --resume: a clear error, nothing overwritten
    # the smoothed target (data.gradient_at midpoints) end to end; an unknown target fails before any recording
    mid = [*args, "--log.output_dir", str(tmp_path / "mid"), "--data.gradient_at", "midpoints"]
    assert main(mid) == 0 and (tmp_path / "mid" / "head.pt").is_file()
    bad = [*args, "--log.output_dir", str(tmp_path / "bad"), "--data.gradient_at", "candidates"]
    assert main(bad) == 2 and not (tmp_path / "bad" / "data_train.pt").exists()
    # the default direction head is the potential one, scoring by value; the free output on request, first order
    assert head.config.potential and head.scores_by_value and report["heldout"]["score_rule"] == "value"
    assert 0.0 <= report["heldout"]["overall"]["agree_valid_gradient_rule"] <= 1.0
    free = [*args, "--log.output_dir", str(tmp_path / "free"), "--model.potential", "false"]
    assert main(free) == 0 and not load_head(tmp_path / "free" / "head.pt").config.potential
    assert json.loads((tmp_path / "free" / "report.json").read_text())["heldout"]["score_rule"] == "gradient"
    # a value rule without a potential: one clear error before any recording
    bad_rule = [*args, "--log.output_dir", str(tmp_path / "badrule"), "--model.potential", "false",
                "--model.score_rule", "value"]  # fmt: skip
    assert main(bad_rule) == 2 and not (tmp_path / "badrule").exists()


def test_ranking_term_teaches_the_value_rule_above_its_timestep(tmp_path):
    """``train.rank_weight``: the pool ranking loss on the potential's values (the rule the sampler scores by). On
    pools whose gradient targets carry nothing (zeros) it alone teaches the teacher's order; ``rank_min_timestep``
    above every pool turns it off exactly (the same weights as without it); a negative setting is a clear error."""
    from spo_fast.head import evaluate_agreement
    from spo_fast.train_head import HeadDistiller, make_head_config

    def distil(name, **train):
        cfg = make_head_config(overrides={
            "train": {"steps": 30, "batch_pools": 16, "lr": 5e-3, "threads": 1, **train},
            "log": {"output_dir": str(tmp_path / name), "progress": False},
        })  # fmt: skip
        d = HeadDistiller(cfg)
        g = torch.Generator().manual_seed(0)
        P, k = 48, 4
        lat = torch.randn(P, k, *d.components.latent_shape, generator=g)
        prompts = ["a red circle", "a blue square"]
        shape = lat.shape[2:]
        data = PoolRecord(lat, torch.randint(1, 1000, (P,), generator=g), torch.randint(0, 2, (P,), generator=g),
                          10 * lat[:, :, 0].mean((-2, -1)), prompts, parent_x0=torch.randn(P, *shape, generator=g),
                          grad=torch.zeros(P, *shape))  # fmt: skip
        d.train(data, data)
        agree = evaluate_agreement(d.head, data, d._embeds(prompts), 0.05)["overall"]["agree_valid"]
        return agree, d.head.state_dict()

    plain, w0 = distil("plain")
    ranked, _ = distil("ranked", rank_weight=5.0)
    gated, w1 = distil("gated", rank_weight=5.0, rank_min_timestep=1000)
    assert ranked > 0.8 and ranked > plain + 0.2
    assert all(torch.equal(w0[key], w1[key]) for key in w0)
    with pytest.raises(ValueError, match="rank_min_timestep must be >= 0"):
        distil("bad", rank_weight=1.0, rank_min_timestep=-1)


def test_score_only_pools_feed_the_ranking_term(tmp_path):
    """``data.rank_passes``: pools recorded without teacher gradients (scores and parent x0) join the ranking
    term's draws. Here the gradient-recorded pools are few and ranked backwards, the score-only ones many and ranked
    right: the head learns the score-only order only when they are used. End to end, the CLI records them (no
    gradients) and reports them; without the ranking term they are one clear error before any recording."""
    import json

    from spo_fast.head import evaluate_agreement
    from spo_fast.train_head import HeadDistiller, main, make_head_config

    def distil(name, rank_data):
        cfg = make_head_config(overrides={
            "train": {"steps": 40, "batch_pools": 16, "lr": 5e-3, "threads": 1, "rank_weight": 5.0},
            "log": {"output_dir": str(tmp_path / name), "progress": False},
        })  # fmt: skip
        d = HeadDistiller(cfg)
        d.train(few, few, rank_data)
        return evaluate_agreement(d.head, many, d._embeds(prompts), 0.05)["overall"]["agree_valid"]

    g = torch.Generator().manual_seed(0)
    prompts = ["a red circle", "a blue square"]

    def pools(n, sign, grads):
        lat = torch.randn(n, 4, 4, 8, 8, generator=g)
        parent = torch.randn(n, 4, 8, 8, generator=g)
        return PoolRecord(lat, torch.randint(1, 1000, (n,), generator=g), torch.randint(0, 2, (n,), generator=g),
                          sign * 10 * lat[:, :, 0].mean((-2, -1)), prompts, parent_x0=parent,
                          grad=torch.zeros(n, 4, 8, 8) if grads else None)  # fmt: skip

    few, many = pools(8, -1.0, True), pools(96, 1.0, False)
    assert distil("with", many) > 0.8 > 0.5 > distil("without", None)
    with pytest.raises(ValueError, match="has no parent x0"):
        distil("noparent", PoolRecord(many.latents, many.timesteps, many.prompt, many.scores, prompts))

    out = tmp_path / "cli"
    args = [*_tiny_head_run(out, steps=4), "--train.rank_weight", "0.5", "--data.rank_passes", "2"]
    assert main(args) == 0
    rank = PoolRecord(**torch.load(out / "data_rank.pt", weights_only=False))
    train = PoolRecord(**torch.load(out / "data_train.pt", weights_only=False))
    assert rank.grad is None and rank.parent_x0.shape == (len(rank), *rank.latents.shape[2:])
    assert len(rank) == 2 * len(train) and not torch.equal(rank.latents[: len(train)], train.latents)
    assert json.loads((out / "report.json").read_text())["rank_pools"] == len(rank)
    bad = ["--log.output_dir", str(tmp_path / "bad"), "--data.rank_passes", "2"]
    assert main(bad) == 2 and not (tmp_path / "bad").exists()


def test_train_head_presets_follow_the_trainers_and_hold_out_prompts(tmp_path, capsys):
    """`--preset sd15|sdxl` distils on the pools and x0 estimate the SPO preset of that name judges (preset < config
    file < overrides); without data.eval_prompts every 10th prompt of the file is held out, disjoint from training."""
    import json

    from spo_fast.config import PRESETS
    from spo_fast.toy import prompt_splits
    from spo_fast.train_head import HeadDataConfig, _train_and_heldout_prompts, main, make_head_config

    for name in ("sd15", "sdxl"):
        cfg = make_head_config(preset=name)
        want = PRESETS[name]
        assert cfg.model.pretrained == want["model"]["pretrained"] and cfg.teacher.kind == "step_aware"
        for key in ("num_candidates", "divert_step", "threshold"):
            assert getattr(cfg.sampling, key) == want["sampling"][key]
        assert cfg.sampling.lookahead_steps == 1 and cfg.data.eval_prompts == ""
    assert make_head_config().sampling.lookahead_steps == PRESETS["toy"]["sampling"]["lookahead_steps"]
    file = tmp_path / "cfg.json"
    file.write_text(json.dumps({"sampling": {"threshold": 0.5}}))
    assert make_head_config(file, preset="sd15").sampling.threshold == 0.5
    assert make_head_config(file, {"sampling.threshold": 0.7}, preset="sd15").sampling.threshold == 0.7
    with pytest.raises(ValueError, match="unknown preset 'sd3'"):
        make_head_config(preset="sd3")

    prompts = [f"prompt number {i}" for i in range(25)]
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    train, held = _train_and_heldout_prompts(HeadDataConfig(prompts=str(tmp_path / "p.txt")))
    assert held == [prompts[9], prompts[19]] and sorted(train + held) == sorted(prompts) and not set(train) & set(held)
    (tmp_path / "three.txt").write_text("a\nb\nc")
    assert _train_and_heldout_prompts(HeadDataConfig(prompts=str(tmp_path / "three.txt"))) == (["a", "b"], ["c"])
    train, held = _train_and_heldout_prompts(
        HeadDataConfig(prompts=str(tmp_path / "p.txt"), eval_prompts=str(tmp_path / "three.txt"))
    )
    assert train == prompts and held == ["a", "b", "c"]
    assert _train_and_heldout_prompts(HeadDataConfig()) == tuple(list(x) for x in prompt_splits())
    (tmp_path / "one.txt").write_text("a lonely prompt")
    with pytest.raises(ValueError, match="too few to hold every 10th out"):
        _train_and_heldout_prompts(HeadDataConfig(prompts=str(tmp_path / "one.txt")))
    # the SD1.5 preset without the teacher's checkpoint: one clear error, nothing written
    assert main(["--preset", "sd15", "--log.output_dir", str(tmp_path / "run")]) == 2
    assert "teacher.checkpoint" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["head", "verify", "gated", "audit"])
def test_train_cli_runs_spo_with_a_direction_head(tmp_path, mode):
    """`python -m spo_fast.train --preference.head head.pt [--preference.verify_head true | --preference.
    head_max_timestep 200]`: the trainer loads the head through the checkpoint path (compatibility checks included)
    and samples in head mode (the verified head mode, or with the teacher on the steps above t = 200); the run
    writes its LoRA as usual."""
    verify = mode == "verify"
    from spo_fast.train import main

    path = _toy_direction_head(tmp_path / "head.pt")
    out = tmp_path / "run"
    args = ["--preference.head", str(path), "--train.iterations", "1", "--log.output_dir", str(out),
            "--log.progress", "false", "--data.num_eval_prompts", "2", "--sampling.batch_size", "2",
            "--sampling.num_steps", "8", "--sampling.divert_step", "4", "--train.batch_size", "4"]  # fmt: skip
    if verify:
        args += ["--preference.verify_head", "true"]
    if mode == "gated":
        args += ["--preference.head_max_timestep", "200"]
    if mode == "audit":
        args += ["--preference.head_audit_every", "1"]
    assert main(args) == 0
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    import json

    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1]
    # head mode: the UNet ran on the b continuations only, as plain sampling (2 prompts x 8 steps x CFG 2 rows);
    # the teacher mode would add k * b rows per scored step for the candidates' x0 and their lookahead
    assert ("head_audit" in rec) == (mode == "audit")
    if mode in ("head", "audit"):  # the audit's teacher passes are counted apart: the sampling is the head's
        assert rec["unet_rows"]["sampling"] == 2 * 8 * 2
    if mode == "audit":
        # the teacher on every head-scored pool: 2 prompts x 4 scored steps, the k * b candidates' x0 and 2-jump
        # lookahead on the 3 non-final ones (x CFG 2); agreement counts per bucket that add up to "all"
        audit = rec["head_audit"]
        assert (out / "report.png").is_file()  # the report plots the audit beside the valid-pair rate
        assert audit["unet_rows"] == 3 * (8 + 8) * 2 and audit["all"]["pools"] == 2 * 4
        buckets = [c for name, c in audit.items() if name not in ("all", "unet_rows")]
        for key in ("pools", "valid", "agree", "pairs", "pairs_agree"):
            assert sum(c[key] for c in buckets) == audit["all"][key]
        assert audit["all"]["pairs"] == rec["pairs"]
        for c in [audit["all"], *buckets]:
            assert c["agree"] <= c["valid"] <= c["pools"] and c["pairs_agree"] <= c["pairs"] <= c["pools"]
            assert c["agree_valid"] is None or 0 <= c["agree_valid"] <= 1
    if mode == "gated":
        # 8 steps, divert 4: scored at t = 251, 126, 1 and the final 0; above 200 only the first, where the teacher
        # takes the k * b = 8 candidates' x0 and their 2-jump lookahead (8 rows more) instead of the b continuations
        assert rec["unet_rows"]["sampling"] == (2 * 8 - 2 + 8 + 8) * 2
    if mode == "verify":
        # trunk 5 b rows; each of the 3 non-final scored steps: the pair's 2-jump lookahead (2 x 2b) and the
        # continuations that are not one of the pair (0..b); the final pair is scored as x_0 (b = 2, CFG 2 rows)
        assert (5 * 2 + 3 * 4 * 2) * 2 <= rec["unet_rows"]["sampling"] <= (5 * 2 + 3 * 5 * 2) * 2


def test_head_scores_for_recorded_pools_match_the_samplers_call():
    """Scores of recorded pools ([P, k], batched over pools) equal the head's scores in the sampler's layout."""
    from spo_fast.head import head_scores_for

    head = _head("direction")
    g = torch.Generator().manual_seed(6)
    P, k = 5, 3
    rec = PoolRecord(torch.randn(P, k, 2, 4, 4, generator=g), torch.tensor([900, 500, 20, 0, 700]),
                     torch.tensor([0, 1, 1, 0, 1]), torch.randn(P, k, generator=g), ["a", "b"],
                     parent_x0=torch.randn(P, 2, 4, 4, generator=g))  # fmt: skip
    embeds = torch.randn(2, 5, 6, generator=g)
    got = head_scores_for(head, rec, embeds, batch_pools=2)
    with torch.no_grad():
        text = head.text_features(embeds)
        want = head(rec.latents.transpose(0, 1).flatten(0, 1), rec.timesteps.repeat(k), text, rec.prompt.repeat(k),
                    parent_x0=rec.parent_x0).view(k, P).t()  # fmt: skip
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="no parent_x0"):
        head_scores_for(head, PoolRecord(rec.latents, rec.timesteps, rec.prompt, rec.scores, rec.prompts), embeds)


def test_bench_head_spo_section_runs(tmp_path):
    """README: `bench_head.py --sections spo --head <head.pt>` (SPO on the toy world with the head alone, the
    verified head and the refreshed head; one iteration each here) writes curves of the held-out score against
    seconds and UNet rows."""
    import json
    import math
    import subprocess
    import sys
    from pathlib import Path

    path = _toy_direction_head(tmp_path / "head.pt")
    out = tmp_path / "bench_head.json"
    cmd = [sys.executable, "bench_head.py", "--sections", "spo", "--head", str(path), "--spo-iterations", "1",
           "--eval-prompts", "2", "--spo-methods", "head", "head_verify", "head_refresh",
           "--spo-audit-every", "1", "--out", str(out)]  # fmt: skip
    bench = Path(__file__).parents[1] / "bench"
    proc = subprocess.run(cmd, cwd=bench, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spo = json.loads(out.read_text())["spo"]
    assert set(spo) == {"head", "head_verify", "head_refresh"}
    for curve in spo.values():
        assert [r["iteration"] for r in curve] == [0, 1] and all(math.isfinite(r["eval_score"]) for r in curve)
    # the verified head pays for the pair's x0 estimates: more UNet rows than the head alone
    assert spo["head_verify"][1]["unet_rows"] > spo["head"][1]["unet_rows"] > 0
    # the refresh pays for the teacher's gradients and reports its fit
    assert spo["head_refresh"][1]["unet_rows"] > spo["head"][1]["unet_rows"]
    assert -1 <= spo["head_refresh"][1]["head_refresh_cos"] <= 1
    # --spo-audit-every 1: each head method's labels against the teacher on its own pools
    for curve in spo.values():
        audit = curve[1]["head_audit"]
        assert audit["all"]["pools"] > 0 and audit["unet_rows"] > 0
    # --spo-head-max-timestep 500: the teacher scores the noisier steps (their k candidates' x0 and lookahead)
    gated = tmp_path / "gated.json"
    cmd = [*cmd[: cmd.index("--spo-methods")], "--spo-methods", "head", "--spo-head-max-timestep", "500",
           "--out", str(gated)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=bench, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(gated.read_text())
    assert payload["spo_head_max_timestep"] == 500
    assert payload["spo"]["head"][1]["unet_rows"] > spo["head"][1]["unet_rows"]


def test_bench_efficiency_compares_the_head_modes_with_spo_and_dpo(tmp_path):
    """README: `bench_efficiency.py --methods spo dpo spo_head spo_head_verify spo_head_refresh --head <head.pt>`:
    held-out score against seconds and UNet rows for every method in one JSON (+ PNG); the refreshed head's curve
    counts its teacher-gradient passes; the head methods without --head are one clear error."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    path = _toy_direction_head(tmp_path / "head.pt")
    out = tmp_path / "eff.json"
    bench = Path(__file__).parents[1] / "bench"
    base = [sys.executable, "bench_efficiency.py", "--iterations", "1", "--eval-every", "1", "--eval-prompts", "2"]
    cmd = [*base, "--methods", "spo", "spo_head", "spo_head_refresh", "--head", str(path), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=bench, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["method"] for r in res["rows"]] == ["spo", "spo_head", "spo_head_refresh"]
    curves = res["curves"]
    assert out.with_suffix(".png").is_file() and (tmp_path / "efficiency_runs" / "spo_head_refresh").is_dir()
    # the head alone runs the UNet only on the continuations; the refresh's curve counts its teacher-gradient passes
    assert curves["spo_head"][-1]["unet_rows"] < curves["spo"][-1]["unet_rows"]
    logged = json.loads(
        (tmp_path / "efficiency_runs" / "spo_head_refresh" / "metrics.jsonl").read_text().splitlines()[-1]
    )
    rows = logged["unet_rows"]
    assert rows["head_refresh"] > 0 and curves["spo_head_refresh"][-1]["unet_rows"] == sum(rows.values())
    proc = subprocess.run([*base, "--methods", "spo_head"], cwd=bench, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "need --head" in proc.stderr


def _refresh_config(out, head_path, iterations, every=1):
    from spo_fast.config import make_config

    return make_config("toy", overrides={
        "preference": {"head": str(head_path), "head_refresh": every, "head_refresh_steps": 3},
        "train": {"iterations": iterations, "batch_size": 4},
        "sampling": {"batch_size": 2, "num_steps": 8, "divert_step": 4},
        "data": {"num_eval_prompts": 2},
        "log": {"output_dir": str(out), "progress": False, "checkpoint_every": 1, "eval_every": 0},
    })  # fmt: skip


@pytest.mark.parametrize("mode", ["teacher_labels", "head_labels", "carry", "carry_frozen", "carry_x0"])
def test_head_refresh_fits_the_teachers_gradient_on_the_policys_pools(tmp_path, monkeypatch, mode):
    """preference.head_refresh: the recorded scored steps (every one; every 2nd for carry) get the teacher's
    gradient at the pool means with the policy's UNet (per recorded non-final step: b 2 x 2 lookahead jumps x CFG 2
    x forward+backward 3 rows; the final x_0 is scored without the UNet), and the head's updates fit those targets:
    repeated updates on one buffer lower the distillation loss and raise the cosine. Labels: a recorded step's
    pools get the first-order scores of its gradient (head_refresh_teacher_labels, the default) or the head's; with
    head_refresh_carry the steps in between get the first-order scores of the pass's last recorded gradient (the
    head's at a pass's first step). The decode + score path of the teacher mode is never called. With
    head_refresh_steps 0 (carry_frozen) the labels are the same but the head stays as trained and nothing is kept.
    With head_refresh_through_unet false (carry_x0) the gradient passes are forward only (1 row, not 3)."""
    from spo_fast.head import RefreshingHeadScorer, direction_scores
    from spo_fast.trainer import SPOTrainer

    path = _toy_direction_head(tmp_path / "head.pt")
    carry = mode.startswith("carry")
    every = 2 if carry else 1
    cfg = _refresh_config(tmp_path / "run", path, 1, every=every)
    cfg.preference.head_refresh_teacher_labels = mode != "head_labels"
    cfg.preference.head_refresh_carry = carry
    if mode == "carry_frozen":
        cfg.preference.head_refresh_steps = 0
    assert cfg.preference.head_refresh_through_unet is False  # the default: the x0-space gradient
    cfg.preference.head_refresh_through_unet = mode != "carry_x0"
    tr = SPOTrainer(cfg)
    assert isinstance(tr.sampler.head, RefreshingHeadScorer)
    calls, seen = [], []
    real = tr.scorer.image_scorer
    tr.scorer.image_scorer = lambda *a: calls.append(1) or real(*a)
    call = RefreshingHeadScorer.__call__

    def spy(self, latents, timesteps, cond, prompt_index, parent_x0=None):
        head_only = HeadScorer.__call__(self, latents, timesteps, cond, prompt_index, parent_x0=parent_x0)
        recorded = self._record
        grads = []
        self._record = lambda *a: grads.append(recorded(*a)) or grads[-1]
        out = call(self, latents, timesteps, cond, prompt_index, parent_x0=parent_x0)
        del self._record
        b = parent_x0.shape[0]
        cand = latents.view(latents.shape[0] // b, b, *latents.shape[1:])
        grad = grads[0] if grads else None
        seen.append((int(timesteps[0]), out, head_only, cand, grad))
        return out

    monkeypatch.setattr(RefreshingHeadScorer, "__call__", spy)
    before = {k: v.clone() for k, v in tr.head_refresher.head.state_dict().items()}
    pairs, prompts, _ = tr.sample_pairs(0)
    tr.train_on(pairs, prompts, 0)
    kept = 0 if mode == "carry_frozen" else 4 // every
    assert not calls and len(seen) == 4 and len(tr.head_refresher.buffer) == kept  # 4 scored steps
    if mode != "carry_frozen":  # the buffer holds the gradients the labels used
        recorded = [grad for *_, grad in seen if grad is not None]
        torch.testing.assert_close(tr.head_refresher.buffer[-1]["grad"], recorded[-1].float())
    last = None
    for _t, out, head_only, cand, grad in seen:
        if grad is not None:
            want = direction_scores(cand, grad).reshape(-1) if mode != "head_labels" else head_only
            last = grad
        else:
            want = direction_scores(cand, last).reshape(-1) if carry and last is not None else head_only
        torch.testing.assert_close(out, want)
        if grad is not None:  # an untrained head: the two label sources differ
            assert not torch.allclose(head_only, direction_scores(cand, grad).reshape(-1))
    first = tr.refresh_head()
    recorded_nonfinal = sum(1 for t, *_, grad in seen if grad is not None and t > 0)
    assert tr.unet_rows["head_refresh"] == recorded_nonfinal * 2 * 2 * 2 * (1 if mode == "carry_x0" else 3) > 0
    if mode == "carry_frozen":
        assert "head_refresh_loss" not in first
        for k, v in tr.head_refresher.head.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)
        return
    assert any(not torch.equal(before[k], v) for k, v in tr.head_refresher.head.state_dict().items())
    for _ in range(6):
        last_logs = tr.refresh_head()
    assert last_logs["head_refresh_loss"] < first["head_refresh_loss"]
    assert last_logs["head_refresh_cos"] > first["head_refresh_cos"]


def test_head_refresh_resumes_exactly_and_rejects_bad_settings(tmp_path):
    """A run killed after iteration 1 and resumed ends with the same head (weights, buffer) and losses as one that
    ran 2 iterations straight; head_refresh without a head, or with a per-candidate head, is a clear error."""
    import json

    from spo_fast.trainer import SPOTrainer, validate_config

    path = _toy_direction_head(tmp_path / "head.pt")
    straight = SPOTrainer(_refresh_config(tmp_path / "a", path, 2))
    straight.run()
    SPOTrainer(_refresh_config(tmp_path / "b", path, 1)).run()
    resumed = SPOTrainer(_refresh_config(tmp_path / "b", path, 2), resume=True)
    assert resumed.iteration == 1 and len(resumed.head_refresher.buffer) == 4
    resumed.run()
    for k, v in straight.head_refresher.head.state_dict().items():
        torch.testing.assert_close(resumed.head_refresher.head.state_dict()[k], v, rtol=0, atol=0)

    def logs(d):
        return [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]

    keys = ("loss", "head_refresh_loss", "head_refresh_cos")
    assert [[r.get(k) for k in keys] for r in logs("a")] == [[r.get(k) for k in keys] for r in logs("b")]

    bad = [
        ({"head": ""}, "head_refresh .*needs preference.head"),
        ({"head_refresh": -1}, "head_refresh and head_refresh_steps must be >= 0"),
        ({"head_refresh_steps": 0, "head_refresh_teacher_labels": False, "head_refresh_carry": False},
         "would label nothing"),
        # the label audit: needs a head, and N >= 0
        ({"head": "", "head_refresh": 0, "head_audit_every": 2}, "head_audit_every .*needs preference.head"),
        ({"head_audit_every": -1}, "head_audit_every must be >= 0"),
    ]  # fmt: skip
    for overrides, match in bad:
        cfg = _refresh_config(tmp_path / "c", path, 1)
        for key, value in overrides.items():
            setattr(cfg.preference, key, value)
        with pytest.raises(ValueError, match=match):
            validate_config(cfg)
    from spo_fast.head import RefreshingHeadScorer

    with pytest.raises(ValueError, match="needs a 'direction' head"):
        RefreshingHeadScorer(_head("latent"), None, None, None, None)


def test_init_head_warm_starts_from_a_trained_head(tmp_path):
    """``train.init_head``: a run starts from a trained head's weights (0 steps keep them exactly); a head of another
    architecture or a missing file is one clear error before the run folder is written."""
    from spo_fast.head import load_head, save_head
    from spo_fast.train_head import HeadDistiller, make_head_config

    def cfg(name, **over):
        model = over.pop("model", {})
        return make_head_config(overrides={
            "model": model, "train": {"steps": 1, "threads": 1, **over},
            "log": {"output_dir": str(tmp_path / name), "progress": False},
        })  # fmt: skip

    src = HeadDistiller(cfg("src", seed=1))
    save_head(src.head, tmp_path / "src.pt")
    warm = HeadDistiller(cfg("warm", seed=2, init_head=str(tmp_path / "src.pt")))
    fresh = HeadDistiller(cfg("fresh", seed=2))
    ref = load_head(tmp_path / "src.pt").state_dict()
    assert all(torch.equal(warm.head.state_dict()[k].cpu(), v) for k, v in ref.items())
    assert not all(torch.equal(fresh.head.state_dict()[k].cpu(), v) for k, v in ref.items())
    with pytest.raises(ValueError, match=r"model.width: head 32 vs run 16"):
        HeadDistiller(cfg("wide", model={"width": 16}, init_head=str(tmp_path / "src.pt")))
    with pytest.raises(FileNotFoundError, match="train.init_head: no head at"):
        HeadDistiller(cfg("missing", init_head=str(tmp_path / "none.pt")))
    assert not (tmp_path / "wide").exists() and not (tmp_path / "missing").exists()
    # the CLI: the same error as one line, exit code 2
    from spo_fast.train_head import main

    out = str(tmp_path / "cli")
    assert main(["--train.init_head", str(tmp_path / "none.pt"), "--log.output_dir", out]) == 2
    assert not (tmp_path / "cli").exists()
