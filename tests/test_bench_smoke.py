"""The README's benchmark commands run: bench/run_all.py --quick over the loss, resampler, efficiency and
direction-tail benches (bench_e2e has its own test), each writing JSON with the environment and its rows."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "bench"


def test_run_all_quick(tmp_path):
    out = tmp_path / "report.json"
    names = ["bench_loss", "bench_resampler", "bench_efficiency", "bench_direction_tail"]
    subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--quick", "--only", *names, "--out", str(out)],
        check=True, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    report = json.loads(out.read_text())
    for name in names:
        entry = report["benchmarks"][name]
        assert entry["returncode"] == 0, entry.get("log_tail")
        res = entry["result"]
        assert ("env" in res or "environment" in res) and res["rows"]
    eff = report["benchmarks"]["bench_efficiency"]["result"]
    assert {r["method"] for r in eff["rows"]} == {"spo", "dpo"}
    # the equal-compute comparison is defined whether or not DPO rises above its start
    assert {"spo_gain_at_equal_unet_rows", "dpo_gain_at_equal_unet_rows"} <= set(eff["summary"])


def test_gpu_session_script_runs_a_step_and_rejects_unknown_ones(tmp_path):
    """bench/gpu_session.sh (the README's GPU-machine command): one step on CPU writes its JSON and the shared log."""
    import os

    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable, "REPEATS": "3"}  # the step's time limit is 50 s
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_session.sh"), "direction"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = (tmp_path / "log.txt").read_text()
    assert "torch" in log and "== direction: rc 0" in log
    res = json.loads((tmp_path / "bench_direction_tail.json").read_text())
    assert res["rows"]
    bad_out = tmp_path / "bad"
    bad = subprocess.run(
        ["bash", str(BENCH / "gpu_session.sh"), "direction", "nope"],
        env={**env, "OUT": str(bad_out)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "unknown step nope" in bad.stdout
    assert not bad_out.exists(), "an unknown step must fail before any work"
