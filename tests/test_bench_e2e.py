"""bench/bench_e2e.py --scale small runs on CPU and reports every field for both modes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parent.parent / "bench"


def test_bench_e2e_small(tmp_path):
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, "bench_e2e.py", "--scale", "small", "--prompts", "2", "--k", "2", "--steps", "6",
           "--divert", "3", "--train-batch", "2", "--warmup", "0", "--iters", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] and data["config"]["scale"] == "small"
    modes = {m["mode"]: m for m in data["modes"]}
    assert set(modes) == {"official", "fast"}
    for m in modes.values():
        assert m["seconds_per_iteration"] > 0 and m["images_per_second"] > 0
        assert set(m["phases"]) >= {"sampling", "sampling_unet", "sampling_decode", "sampling_score", "training"}
        assert m["unet_flops_per_row"]["train"] > m["unet_flops_per_row"]["forward"] > 0
        assert m["state_bytes"] > 0 and "peak_memory_bytes" in m and "mfu" in m
    # same seed, same prompts, noise and resampler: the same pairs (threshold 0: every scored step pairs)
    assert modes["official"]["pairs_per_iteration"] == modes["fast"]["pairs_per_iteration"] == [2 * 3]
    # the official mode holds a second UNet (the deep-copied reference)
    assert modes["fast"]["state_bytes"] < modes["official"]["state_bytes"]
    assert data["speedups"]["fast"]["training"] > 0
    assert data["speedups"]["fast"]["iteration_min"] > 0


def test_bench_e2e_summary_keeps_the_fastest_iteration_beside_the_median():
    """A disturbed iteration moves neither statistic much but they differ: the median of 3.0 / 1.0 / 2.0 s is 2.0,
    the fastest 1.0, and every timed iteration is kept in order."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_e2e
    finally:
        sys.path.remove(str(BENCH))
    recs = [
        bench_e2e.IterationRecord({"training": sec / 2}, sec, 4, 8, 16, {"forward": 4, "train": 4})
        for sec in (3.0, 1.0, 2.0)
    ]
    mode = bench_e2e.Mode(
        iteration=lambda it: recs[it], flops_per_row={"forward": 1.0, "train": 3.0}, details={},
        state_bytes=lambda: 1, records=recs,
    )  # fmt: skip
    row = bench_e2e.summarise("fast", mode, torch.device("cpu"))
    assert row["seconds_per_iteration"] == 2.0 and row["seconds_per_iteration_min"] == 1.0
    assert row["iteration_seconds"] == [3.0, 1.0, 2.0] and row["phases"]["training"] == 1.0


@pytest.mark.parametrize("mode", ["nope", "official@compile", "fast@nope", "nope@compile"])
def test_bench_e2e_rejects_unavailable_modes(mode):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_e2e
    finally:
        sys.path.remove(str(BENCH))
    with pytest.raises(SystemExit):
        bench_e2e.parse_args(["--modes", mode])
    assert bench_e2e.parse_args(["--modes", "official", "fast", "fast+head"]).modes[-1] == "fast+head"
    assert bench_e2e.parse_args(["--modes", "official", "fast@compile"]).modes[-1] == "fast@compile"


def test_bench_e2e_small_head_mode(tmp_path):
    """The fast path with the (untrained) direction head, alone, verified and refreshed: same pair count
    (threshold 0); the refresh adds its own phase and time."""
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, "bench_e2e.py", "--scale", "small", "--prompts", "2", "--k", "2", "--steps", "6",
           "--divert", "3", "--train-batch", "2", "--warmup", "0", "--iters", "1", "--modes", "fast", "fast+head",
           "fast+head_verify", "fast+head_refresh", "fast+head_refresh_x0", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modes = {m["mode"]: m for m in json.loads(out.read_text())["modes"]}
    assert set(modes) == {"fast", "fast+head", "fast+head_verify", "fast+head_refresh", "fast+head_refresh_x0"}
    assert modes["fast+head"]["pairs_per_iteration"] == modes["fast"]["pairs_per_iteration"] == [2 * 3]
    assert modes["fast+head_verify"]["pairs_per_iteration"] == [2 * 3]
    # k = 2: the verified head's pair is the whole pool, so the decoder and the SPM run as in the fast path
    assert modes["fast+head_verify"]["phases"]["sampling_decode"] > 0
    assert modes["fast+head"]["phases"]["sampling_decode"] == 0
    assert modes["fast+head"]["head_parameters"] > 0 and modes["fast+head"]["head_potential"]  # train_head's default
    assert modes["fast+head"]["head_score_rule"] == "value"
    assert modes["fast+head"]["seconds_per_iteration"] > 0
    refresh = modes["fast+head_refresh"]
    assert refresh["pairs_per_iteration"] == [2 * 3] and refresh["phases"]["sampling_decode"] == 0
    assert refresh["phases"]["head_refresh"] > 0 and modes["fast+head"]["phases"]["head_refresh"] == 0
    x0 = modes["fast+head_refresh_x0"]  # the same labels' pipeline, the gradient without the UNet's backward
    assert x0["pairs_per_iteration"] == [2 * 3] and x0["phases"]["head_refresh"] > 0


def test_bench_e2e_small_timestep_gated_head(tmp_path):
    """--head-max-timestep: the steps scored above it go through decode + SPM, the rest through the head (6 steps,
    divert 3: scored at t = 167, 1 and the final 0; the cut at 100 gives the teacher one of the three);
    --head-width sets the timed head's width."""
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, "bench_e2e.py", "--scale", "small", "--prompts", "2", "--k", "2", "--steps", "6",
           "--divert", "3", "--train-batch", "2", "--warmup", "0", "--iters", "1", "--modes", "fast+head",
           "--head-max-timestep", "100", "--head-width", "16", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    (mode,) = data["modes"]
    assert data["config"]["head_max_timestep"] == 100
    assert mode["pairs_per_iteration"] == [2 * 3]
    assert mode["phases"]["sampling_decode"] > 0 and mode["phases"]["sampling_score"] > 0
    assert mode["head_width"] == data["config"]["head_width"] == 16  # --head-width: the timed head's


def test_bench_e2e_a_failing_mode_is_reported_and_the_others_measured(tmp_path, monkeypatch):
    """On a GPU one mode can run out of memory: the bench records it under failed_modes and still writes the
    other modes' measurements (a device session is too short to lose them all)."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_e2e
    finally:
        sys.path.remove(str(BENCH))
    fast = bench_e2e.RUNNERS["fast"]

    def fails_in_iteration(setup):
        mode = fast(setup)

        def iteration(it):
            raise RuntimeError("CUDA out of memory (simulated)")

        mode.iteration = iteration
        return mode

    def fails_to_build(setup):
        raise MemoryError("no room for the head (simulated)")

    monkeypatch.setitem(bench_e2e.RUNNERS, "fast+head", fails_in_iteration)
    monkeypatch.setitem(bench_e2e.RUNNERS, "fast+head_verify", fails_to_build)
    out = tmp_path / "e2e.json"
    argv = ["--scale", "small", "--prompts", "2", "--k", "2", "--steps", "6", "--divert", "3", "--train-batch", "2",
            "--warmup", "0", "--iters", "1", "--out", str(out),
            "--modes", "fast", "fast+head", "fast+head_verify"]  # fmt: skip
    bench_e2e.main(argv)
    data = json.loads(out.read_text())
    assert [m["mode"] for m in data["modes"]] == ["fast"] and data["modes"][0]["seconds_per_iteration"] > 0
    failed = data["failed_modes"]
    assert set(failed) == {"fast+head", "fast+head_verify"}
    assert "iteration 0: RuntimeError: CUDA out of memory" in failed["fast+head"]
    assert failed["fast+head_verify"].startswith("build: MemoryError")
