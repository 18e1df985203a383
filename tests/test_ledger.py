"""Resampler bookkeeping: selection, continuation RNG, pair ledger, permutation, sharding; C++ == Python."""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spo_fast import _cpp_lib, select_pairs
from spo_fast import ledger as L

HAS_CPP = _cpp_lib.cpp_available()
needs_cpp = pytest.mark.skipif(
    not HAS_CPP, reason=f"spo_fast._C not built ({_cpp_lib.cpp_unavailable_reason()}); C++ comparisons skipped"
)
BACKENDS = ["python", pytest.param("cpp", marks=needs_cpp)]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INT64 = st.integers(-(2**63), 2**63 - 1)

# Scores with NaN, +-inf, ties (small integer grid), subnormals and extremes.
score_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.integers(-3, 3).map(float),
    st.sampled_from([math.nan, 0.0, -0.0, 1e-45, 3e38, -3e38]),
)


@st.composite
def score_tables(draw: st.DrawFn) -> torch.Tensor:
    k, b = draw(st.integers(2, 9)), draw(st.integers(1, 17))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    values = draw(st.lists(score_values, min_size=k * b, max_size=k * b))
    return torch.tensor(values, dtype=dtype).reshape(k, b)


thresholds = st.one_of(st.sampled_from([0.0, 0.3, 0.4, 0.999]), st.floats(0, 1, exclude_max=True))


def assert_same_selection(a: L.StepSelection, b: L.StepSelection) -> None:
    for name in ("win", "lose", "valid", "next_index"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.margin.isnan(), b.margin.isnan())
    assert torch.equal(a.margin.nan_to_num(), b.margin.nan_to_num())  # bit-identical where finite


# ---------------------------------------------------------------------------------------------- selection


@FAST
@given(
    scores=score_tables(), threshold=thresholds, seed=INT64, pass_index=st.integers(0, 10**6), step=st.integers(0, 50)
)
def test_selection_matches_select_pairs_and_backends_agree(scores, threshold, seed, pass_index, step):
    idx, valid = select_pairs(scores, threshold)
    finite2 = torch.isfinite(scores).sum(0) >= 2
    results = {}
    for backend in ["python", "torch"] + (["cpp"] if HAS_CPP else []):
        sel = L.select_step(scores, threshold, seed, pass_index, step, backend=backend)
        assert torch.equal(sel.win, idx[0]) and torch.equal(sel.lose, idx[1]), backend
        assert torch.equal(sel.valid, valid), backend
        assert torch.equal(sel.margin.isnan(), ~finite2), backend
        assert sel.margin.dtype == torch.float32 and sel.next_index.dtype == torch.int64
        results[backend] = sel
    if HAS_CPP:
        assert_same_selection(results["cpp"], results["python"])
    torch.testing.assert_close(results["torch"].margin, results["python"].margin, equal_nan=True, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_selection_on_the_threshold_edge(backend, dtype):
    """Margins within float rounding of the threshold: the one place a different arithmetic could disagree."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for t in (0.0, 0.3, 0.4, 0.9):
        gap = 2 * math.atanh(t)  # exact margin == t
        rows.append(torch.tensor([gap, 0.0]) + torch.randn(2, generator=g) * 1e-7)
        for j in range(-40, 41):
            rows.append(torch.tensor([gap * (1 + j * 2.0**-24) + 1.0, 1.0]))
    rows.append(torch.tensor([1e-45, 0.0]))  # threshold 0 with a subnormal gap: torch's margin rounds to 0
    scores = torch.stack(rows, 1).to(dtype)
    for t in (0.0, 0.3, 0.4, 0.9):
        _, valid = select_pairs(scores, t)
        assert torch.equal(L.select_step(scores, t, 0, 0, 0, backend=backend).valid, valid)


def test_selection_all_nan_column_and_ties():
    nan = math.nan
    scores = torch.tensor([[nan, 1.0, 2.0, nan], [nan, 1.0, 2.0, 5.0], [nan, 1.0, 0.0, nan]])
    for backend in ["python", "torch"] + (["cpp"] if HAS_CPP else []):
        sel = L.select_step(scores, 0.0, 0, 0, 0, backend=backend)
        assert sel.win.tolist() == [0, 0, 0, 1]  # all NaN: first row; ties: first of the best
        assert sel.lose.tolist() == [2, 2, 2, 1]  # all NaN: last row; ties: last of the worst
        assert sel.valid.tolist() == [False, False, True, False]
        assert sel.margin.isnan().tolist() == [True, False, False, True]


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_selection_bad_input(backend):
    with pytest.raises(ValueError, match="k >= 2"):
        L.select_step(torch.zeros(1, 3), 0.3, 0, 0, 0, backend=backend)
    with pytest.raises(ValueError, match="empty batch"):
        L.select_step(torch.zeros(4, 0), 0.3, 0, 0, 0, backend=backend)
    for t in (-0.1, 1.0, math.nan):
        with pytest.raises(ValueError, match="threshold"):
            L.select_step(torch.zeros(4, 2), t, 0, 0, 0, backend=backend)
    with pytest.raises(ValueError, match=r"\[k, b\]"):
        L.select_step(torch.zeros(4), 0.3, 0, 0, 0, backend=backend)
    with pytest.raises(ValueError, match="64-bit"):
        L.select_step(torch.zeros(4, 2), 0.3, 2**64, 0, 0, backend=backend)


# ---------------------------------------------------------------------------------------------- RNG


@needs_cpp
@FAST
@given(seed=INT64, pass_index=INT64, step=INT64, batch=st.integers(0, 40), k=st.integers(1, 2**40))
def test_continuation_cpp_equals_python(seed, pass_index, step, batch, k):
    a = L.continuation_indices(seed, pass_index, step, batch, k, backend="cpp")
    b = L.continuation_indices(seed, pass_index, step, batch, k, backend="python")
    assert torch.equal(a, b)
    assert ((a >= 0) & (a < k)).all()


def test_continuation_is_keyed_not_stateful_and_roughly_uniform():
    a = L.continuation_indices(7, 3, 5, 64, 4)
    assert torch.equal(a, L.continuation_indices(7, 3, 5, 64, 4))
    assert torch.equal(a[:10], L.continuation_indices(7, 3, 5, 10, 4))  # a column's draw ignores the batch size
    assert not torch.equal(a, L.continuation_indices(7, 3, 6, 64, 4))
    k, per = 7, 2000
    draws = torch.cat([L.continuation_indices(11, p, s, 100, k) for p in range(7) for s in range(20)])
    counts = torch.bincount(draws, minlength=k).double()
    expected = draws.numel() / k
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 40, (chi2, counts)  # 6 degrees of freedom: P(chi2 > 40) ~ 5e-7
    assert draws.numel() == 14000 and per == 2000


# ---------------------------------------------------------------------------------------------- permutation, shards


@FAST
@given(seed=INT64, epoch=st.integers(0, 10**9), n=st.integers(0, 300))
def test_epoch_order(seed, epoch, n):
    a = L.epoch_order(seed, epoch, n, backend="python")
    assert torch.equal(a.sort().values, torch.arange(n))
    if HAS_CPP:
        assert torch.equal(a, L.epoch_order(seed, epoch, n, backend="cpp"))
    if n > 20:
        assert not torch.equal(a, L.epoch_order(seed, epoch + 1, n, backend="python"))


@FAST
@given(n=st.integers(0, 200), world=st.integers(1, 9), drop=st.booleans(), seed=st.integers(0, 99))
def test_shards_cover_every_pair(n, world, drop, seed):
    order = L.epoch_order(seed, 0, n)
    parts = [L.shard_order(order, r, world, drop, backend="python") for r in range(world)]
    if HAS_CPP:
        for r in range(world):
            assert torch.equal(parts[r], L.shard_order(order, r, world, drop, backend="cpp"))
    sizes = {p.numel() for p in parts}
    assert len(sizes) == 1  # even split
    got = torch.cat(parts).sort().values
    if drop:
        assert torch.equal(got, order[: n - n % world].sort().values)  # exactly the stated remainder is dropped
    else:
        pad = (-n) % world if n else 0
        expect = torch.cat([order, order.repeat(pad // max(n, 1) + 1)[:pad]]) if n else order
        assert torch.equal(got, expect.sort().values)
        if n:
            sampler = torch.utils.data.DistributedSampler(range(n), world, 0, shuffle=False, drop_last=False)
            assert torch.equal(parts[0], order[list(sampler)])


def test_shard_bad_input():
    with pytest.raises(ValueError, match="rank"):
        L.shard_order(torch.arange(4), 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        L.shard_order(torch.arange(4), 0, 0)


# ---------------------------------------------------------------------------------------------- ledger


def run_pass(ledger, pass_index, b, k, steps, threshold, gen, start=0, backend=None):
    """Records steps [start, steps); returns the selections (scores drawn from gen, some NaN columns)."""
    parent = torch.full((b,), -1, dtype=torch.int64)
    sels = []
    for s in range(start, steps):
        scores = torch.randn(k, b, generator=gen)
        scores[:, torch.rand(b, generator=gen) < 0.15] = math.nan
        sel = L.select_step(scores, threshold, ledger.seed, pass_index, s, backend=backend or ledger.backend)
        ledger.record_step(s, 981 - 50 * s, sel, parent)
        parent = sel.next_index
        sels.append(sel)
    return sels


def pass_equal(a: L.PassPairs, b: L.PassPairs) -> None:
    for name in ("step_slot", "column", "win", "lose", "timestep", "prompt_id", "parent", "margin"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.pass_index, a.num_invalid, a.num_nan_prompts) == (b.pass_index, b.num_invalid, b.num_nan_prompts)


@FAST
@given(b=st.integers(1, 12), k=st.integers(2, 6), steps=st.integers(1, 8), threshold=thresholds, seed=st.integers(0, 9))
def test_ledger_compaction_and_backends_agree(b, k, steps, threshold, seed):
    ledgers = [L.PairLedger(seed, backend=be) for be in (["python"] + (["cpp"] if HAS_CPP else []))]
    outs = []
    for led in ledgers:
        gen = torch.Generator().manual_seed(seed)
        results = []
        for p in range(2):
            led.begin_pass(p, torch.arange(b) + 100 * p)
            sels = run_pass(led, p, b, k, steps, threshold, gen)
            results.append((led.end_pass(), sels))
        outs.append((results, led.stats()))
    (results, stats) = outs[0]
    for pairs, sels in results:
        valid = torch.stack([s.valid for s in sels])  # [steps, b]
        slot, col = valid.nonzero(as_tuple=True)  # row-major == (step, column) order
        assert torch.equal(pairs.step_slot, slot) and torch.equal(pairs.column, col)
        assert torch.equal(pairs.win, torch.stack([s.win for s in sels])[slot, col])
        assert torch.equal(pairs.prompt_id, col + 100 * pairs.pass_index)
        assert pairs.num_invalid == valid.numel() - valid.sum()
        assert pairs.num_nan_prompts == int(torch.stack([s.margin for s in sels]).isnan().sum())
    for row in stats.values():
        assert row["count"] == 2 * b and 0 <= row["valid_rate"] <= 1
    for other_results, other_stats in outs[1:]:
        for (a, _), (c, _) in zip(results, other_results):
            pass_equal(a, c)
        assert other_stats == stats or all(
            (math.isnan(x) and math.isnan(y)) or x == y
            for t in stats
            for x, y in zip(stats[t].values(), other_stats[t].values())
        )


@pytest.mark.parametrize("src", BACKENDS)
@pytest.mark.parametrize("dst", BACKENDS)
def test_state_dict_round_trip_mid_pass(src, dst):
    b, k, steps = 10, 4, 16
    ref = L.PairLedger(3, backend=src)
    gen = torch.Generator().manual_seed(1)
    ref.begin_pass(0, range(b))
    run_pass(ref, 0, b, k, steps, 0.3, gen)
    ref.end_pass()
    ref.begin_pass(1, range(10, 10 + b))
    gen_state = gen.get_state()
    run_pass(ref, 1, b, k, steps, 0.3, gen)
    expected, expected_stats = ref.end_pass(), ref.stats()

    led = L.PairLedger(3, backend=src)
    gen = torch.Generator().manual_seed(1)
    led.begin_pass(0, range(b))
    run_pass(led, 0, b, k, steps, 0.3, gen)
    led.end_pass()
    led.begin_pass(1, range(10, 10 + b))
    gen.set_state(gen_state)
    sels = run_pass(led, 1, b, k, 7, 0.3, gen)
    buf = io.BytesIO()
    torch.save(led.state_dict(), buf)
    buf.seek(0)
    resumed = L.PairLedger(99, drop_remainder=False, backend=dst)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.seed == 3 and resumed.drop_remainder
    # The sampler resumes at step 7 with parent = the last recorded continuation.
    parent = sels[-1].next_index
    for s in range(7, steps):
        scores = torch.randn(k, b, generator=gen)
        scores[:, torch.rand(b, generator=gen) < 0.15] = math.nan
        sel = L.select_step(scores, 0.3, resumed.seed, 1, s, backend=dst)
        resumed.record_step(s, 981 - 50 * s, sel, parent)
        parent = sel.next_index
    pass_equal(resumed.end_pass(), expected)
    assert resumed.stats() == expected_stats


def test_state_dict_version_mismatch_and_bad_use():
    led = L.PairLedger()
    state = led.state_dict()
    state["version"] = L.LEDGER_VERSION + 1
    with pytest.raises(ValueError, match=rf"version {L.LEDGER_VERSION + 1}.*LEDGER_VERSION={L.LEDGER_VERSION}"):
        led.load_state_dict(state)
    with pytest.raises(ValueError, match="outside a pass"):
        led.end_pass()
    with pytest.raises(ValueError, match="empty batch"):
        led.begin_pass(0, [])
    led.begin_pass(0, [1, 2, 3])
    sel = L.select_step(torch.randn(4, 2), 0.3, 0, 0, 0)
    with pytest.raises(ValueError, match="3 prompts"):
        led.record_step(0, 981, sel, torch.full((2,), -1))


# ---------------------------------------------------------------------------------------------- fallback and loader


def test_fallback_with_extension_disabled(monkeypatch):
    monkeypatch.setenv("SPO_FAST_CPP", "0")
    assert L.active_backend() == "python"
    assert L.PairLedger().backend == "python"
    monkeypatch.setenv("SPO_FAST_CPP", "bogus")
    with pytest.raises(ValueError, match="SPO_FAST_CPP"):
        L.active_backend()


def test_missing_extension_warns_once_and_required_mode_raises(monkeypatch, caplog):
    monkeypatch.setattr(_cpp_lib, "_tried", True)
    monkeypatch.setattr(_cpp_lib, "_module", None)
    monkeypatch.setattr(_cpp_lib, "_reason", "spo_fast._C is not built (test)")
    monkeypatch.setattr(_cpp_lib, "_warned", False)
    monkeypatch.setenv("SPO_FAST_CPP", "auto")
    with caplog.at_level(logging.WARNING, logger="spo_fast"):
        sel = L.select_step(torch.randn(4, 3), 0.3, 0, 0, 0)
        L.PairLedger()
    assert sel.win.shape == (3,)
    warnings = [r for r in caplog.records if "not built (test)" in r.getMessage()]
    assert len(warnings) == 1 and "pip install -e . --no-build-isolation" in warnings[0].getMessage()
    monkeypatch.setenv("SPO_FAST_CPP", "1")
    with pytest.raises(RuntimeError, match="not built"):
        L.PairLedger()
    with pytest.raises(RuntimeError, match="not built"):
        L.PairLedger(backend="cpp")


def test_set_backend_switch():
    try:
        L.set_backend("python")
        assert L.active_backend() == "python"
        if HAS_CPP:
            L.set_backend("cpp")
            assert L.active_backend() == "cpp"
        with pytest.raises(ValueError):
            L.set_backend("fortran")
    finally:
        L.set_backend(None)


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_selection_and_ledger_match_cpu():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 10, generator=gen)
    scores[:, 3] = math.nan
    dev = torch.device("cuda")
    idx, valid = select_pairs(scores.to(dev), 0.3)
    sel = L.select_step(scores.to(dev), 0.3, 1, 0, 0)
    assert sel.win.device.type == "cuda" and torch.equal(sel.valid, valid) and torch.equal(sel.win, idx[0])
    cpu = L.select_step(scores, 0.3, 1, 0, 0)
    assert torch.equal(sel.next_index.cpu(), cpu.next_index)
    a, c = L.PairLedger(), L.PairLedger()
    a.begin_pass(0, range(10))
    c.begin_pass(0, range(10))
    a.record_step(0, 981, sel, torch.full((10,), -1, device=dev))
    c.record_step(0, 981, L.StepSelection(*(t.cpu() for t in vars(sel).values())), torch.full((10,), -1))
    pass_equal(a.end_pass(), c.end_pass())


# ---------------------------------------------------------------------------------------------- fused select_and_record


@st.composite
def pass_scores(draw: st.DrawFn) -> list[torch.Tensor]:
    """A pass's score tables: NaN/inf/ties/extremes, near-threshold gaps, float32 or float64 (one dtype per pass)."""
    k, b, steps = draw(st.integers(2, 6)), draw(st.integers(1, 9)), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    edge = st.sampled_from([2 * math.atanh(0.3) * (1 + j * 2.0**-24) for j in range(-3, 4)])
    values = st.one_of(score_values, edge)
    return [
        torch.tensor(draw(st.lists(values, min_size=k * b, max_size=k * b)), dtype=dtype).reshape(k, b)
        for _ in range(steps)
    ]


def fused_pass(led: L.PairLedger, pass_index: int, scores: list[torch.Tensor], threshold: float, seed=None):
    b = scores[0].shape[1]
    led.begin_pass(pass_index, torch.arange(b) + 7)
    parent, sels = torch.full((b,), -1, dtype=torch.int64), []
    for s, sc in enumerate(scores):
        sel = led.select_and_record(s, 981 - 50 * s, sc, threshold, parent, seed=seed)
        parent = sel.next_index
        sels.append(sel)
    return led.end_pass(), sels


def two_call_pass(led: L.PairLedger, pass_index: int, scores: list[torch.Tensor], threshold: float, seed: int):
    b = scores[0].shape[1]
    led.begin_pass(pass_index, torch.arange(b) + 7)
    parent, sels = torch.full((b,), -1, dtype=torch.int64), []
    for s, sc in enumerate(scores):
        sel = L.select_step(sc, threshold, seed, pass_index, s, backend=led.backend)
        led.record_step(s, 981 - 50 * s, sel, parent)
        parent = sel.next_index
        sels.append(sel)
    return led.end_pass(), sels


@FAST
@given(scores=pass_scores(), threshold=thresholds, seed=INT64, pass_index=st.integers(0, 10**6))
def test_select_and_record_equals_the_two_calls_on_every_backend(scores, threshold, seed, pass_index):
    """The fused call (the sampler's path) == select_step + record_step, bit for bit, and C++ == Python."""
    results = {}
    for backend in ["python"] + (["cpp"] if HAS_CPP else []):
        ref_led, led = L.PairLedger(seed, backend=backend), L.PairLedger(seed, backend=backend)
        ref_pairs, ref_sels = two_call_pass(ref_led, pass_index, scores, threshold, seed)
        pairs, sels = fused_pass(led, pass_index, scores, threshold)  # seed defaults to the ledger's
        for a, c in zip(sels, ref_sels):
            assert_same_selection(a, c)
        pass_equal(pairs, ref_pairs)
        assert led.stats() == ref_led.stats() or all(
            (math.isnan(x) and math.isnan(y)) or x == y
            for t in ref_led.stats()
            for x, y in zip(led.stats()[t].values(), ref_led.stats()[t].values())
        )
        results[backend] = (pairs, sels, led.state_dict())
    if HAS_CPP:
        (p_py, s_py, st_py), (p_cpp, s_cpp, st_cpp) = results["python"], results["cpp"]
        pass_equal(p_py, p_cpp)
        for a, c in zip(s_py, s_cpp):
            assert_same_selection(a, c)
        assert st_py["stats"].keys() == st_cpp["stats"].keys()
    # The torch-op selection through the same call gives the same pairs (its margins within float32 rounding).
    tch, tch_sels = L.PairLedger(seed, backend="python"), []
    tch.begin_pass(pass_index, torch.arange(scores[0].shape[1]) + 7)
    parent = torch.full((scores[0].shape[1],), -1, dtype=torch.int64)
    for s, sc in enumerate(scores):
        sel = tch.select_and_record(s, 981 - 50 * s, sc, threshold, parent, backend="torch")
        parent = sel.next_index
        tch_sels.append(sel)
    p_t, p_ref = tch.end_pass(), results["python"][0]
    for name in ("step_slot", "column", "win", "lose", "parent", "prompt_id"):
        assert torch.equal(getattr(p_t, name), getattr(p_ref, name)), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_and_record_decides_the_threshold_edge_before_recording(backend):
    """Undecided margins (within rounding of the threshold) are re-decided, and the ledger keeps the decided value."""
    gap = 2 * math.atanh(0.3)
    cols = [torch.tensor([gap * (1 + j * 2.0**-24) + 1.0, 1.0]) for j in range(-40, 41)]
    scores = torch.stack(cols, 1)
    _, valid = select_pairs(scores, 0.3)
    assert 0 < int(valid.sum()) < valid.numel()  # the edge really splits
    led = L.PairLedger(backend=backend)
    led.begin_pass(0, range(scores.shape[1]))
    sel = led.select_and_record(0, 981, scores, 0.3, torch.full((scores.shape[1],), -1))
    assert torch.equal(sel.valid, valid)
    pairs = led.end_pass()
    assert torch.equal(pairs.column, valid.nonzero()[:, 0]) and pairs.num_invalid == int((~valid).sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_and_record_off_the_fast_path(backend):
    """Half precision, non-contiguous, requires_grad, list parent and an explicit seed give the two-call result."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 4, generator=g)
    variants = [
        base.half(),
        base.t().contiguous().t(),  # non-contiguous [k, b] view
        base.clone().requires_grad_(True),
        base.double(),
    ]
    for scores in variants:
        a, c = L.PairLedger(1, backend=backend), L.PairLedger(1, backend=backend)
        a.begin_pass(3, range(4))
        c.begin_pass(3, range(4))
        sa = a.select_and_record(2, 901, scores, 0.3, [-1, -1, -1, -1], seed=11)
        sc = L.select_step(scores, 0.3, 11, 3, 2, backend=backend)
        c.record_step(2, 901, sc, torch.full((4,), -1))
        assert_same_selection(sa, sc)
        pass_equal(a.end_pass(), c.end_pass())


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_and_record_bad_input(backend):
    led = L.PairLedger(backend=backend)
    with pytest.raises(ValueError, match="outside a pass"):
        led.select_and_record(0, 981, torch.randn(4, 3), 0.3, torch.full((3,), -1))
    led.begin_pass(0, [1, 2, 3])
    with pytest.raises(ValueError, match="3 prompts"):
        led.select_and_record(0, 981, torch.randn(4, 2), 0.3, torch.full((2,), -1))
    with pytest.raises(ValueError, match=r"parent must have shape \(3,\)"):
        led.select_and_record(0, 981, torch.randn(4, 3), 0.3, torch.full((2,), -1))
    with pytest.raises(ValueError, match="k >= 2"):
        led.select_and_record(0, 981, torch.randn(1, 3), 0.3, torch.full((3,), -1))
    with pytest.raises(ValueError, match="threshold"):
        led.select_and_record(0, 981, torch.randn(4, 3), 1.5, torch.full((3,), -1))
    with pytest.raises(ValueError, match="64-bit"):
        led.select_and_record(2**64, 981, torch.randn(4, 3), 0.3, torch.full((3,), -1))
    # Nothing of the failed calls was recorded; an all-NaN prompt gives no pair and is counted.
    scores = torch.randn(4, 3)
    scores[:, 1] = math.nan
    led.select_and_record(0, 981, scores, 0.0, torch.full((3,), -1))
    pairs = led.end_pass()
    assert pairs.num_nan_prompts == 1 and 1 not in pairs.column.tolist() and pairs.step_slot.tolist() == [0, 0]


def test_select_and_record_with_extension_disabled(monkeypatch):
    """SPO_FAST_CPP=0: the fused call runs on the pure-Python core and still equals the C++ result when built."""
    monkeypatch.setenv("SPO_FAST_CPP", "0")
    g = torch.Generator().manual_seed(2)
    scores = [torch.randn(4, 10, generator=g) for _ in range(16)]
    led = L.PairLedger(4)
    assert led.backend == "python" and isinstance(led._core, L._PyLedgerCore)
    py_pairs, py_sels = fused_pass(led, 9, scores, 0.3)
    assert py_pairs.num_pairs > 0
    if HAS_CPP:
        cpp_pairs, cpp_sels = fused_pass(L.PairLedger(4, backend="cpp"), 9, scores, 0.3)
        pass_equal(py_pairs, cpp_pairs)
        for a, c in zip(py_sels, cpp_sels):
            assert_same_selection(a, c)


def test_stale_extension_names_both_versions(monkeypatch):
    class Stale:
        API_VERSION = _cpp_lib.EXTENSION_API_VERSION - 1

    import spo_fast

    monkeypatch.setattr(_cpp_lib, "_tried", False)
    monkeypatch.setattr(_cpp_lib, "_module", None)
    monkeypatch.setattr(_cpp_lib, "_reason", None)
    # `from . import _C` finds the already imported submodule as the package attribute.
    monkeypatch.setattr(spo_fast, "_C", Stale, raising=False)
    assert not _cpp_lib.cpp_available()
    reason = _cpp_lib.cpp_unavailable_reason()
    assert f"API_VERSION={Stale.API_VERSION}" in reason and f"needs {_cpp_lib.EXTENSION_API_VERSION}" in reason
