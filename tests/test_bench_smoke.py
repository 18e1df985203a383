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
