"""The README's benchmark commands run: bench/run_all.py --quick over the loss, resampler, efficiency and
direction-tail benches (bench_e2e has its own test), each writing JSON with the environment and its rows; the GPU
session script and its conv-layout and command-line checks, on CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    # E2E_MODES reaches bench_e2e.py (an unknown mode), GATE_T its --head-max-timestep (a negative one): in both the
    # argument check answers before any model is built
    for step, extra, want in (
        ("e2e", {"E2E_MODES": "official nope"}, "unknown mode 'nope'"),
        ("gated", {"GATE_T": "-1"}, "--head-max-timestep must be >= 0"),
    ):
        out = tmp_path / step
        subprocess.run(
            ["bash", str(BENCH / "gpu_session.sh"), step],
            env={**env, "OUT": str(out), **extra}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        log = (out / "log.txt").read_text()
        assert want in log and f"== {step}: rc 2" in log, log[-2000:]


def test_conv_layout_bench_small(tmp_path):
    """bench_conv_layout.py (gpu_session.sh layout): every model x layout row, and channels_last gives the NCHW
    result (a layout change must not change the numbers beyond rounding)."""
    out = tmp_path / "layout.json"
    subprocess.run(
        [sys.executable, str(BENCH / "bench_conv_layout.py"), "--scale", "small", "--repeats", "2", "--out", str(out)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert {(r["model"], r["layout"]) for r in rows} == {
        (m, lay) for m in ("vae_decode", "unet") for lay in ("nchw", "channels_last")
    }
    for r in rows:
        assert r["median_ms"] > 0 and r["max_rel_diff"] < 1e-4, r
        if r["layout"] == "nchw" and not r["cudnn_benchmark"]:
            assert r["vs_nchw"] == 1.0 and r["max_rel_diff"] == 0.0


@pytest.mark.slow
def test_cli_check_runs_every_command_on_cpu(tmp_path):
    """bench/cli_check.py (gpu_session.sh cli) on CPU: train, resume, the LoRA through diffusers' loader, train_head,
    the head modes (verified, alone, refreshed) and a one-process torchrun all succeed, and the JSON holds what
    each produced."""
    out = tmp_path / "cli.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "cli_check.py"), "--device", "cpu", "--iterations", "2", "--head-steps", "10",
         "--eval-prompts", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["failed"] == []
    steps = [s["step"] for s in res["steps"]]
    assert steps == ["train", "resume", "load_lora_weights", "train_head", "spo_verified_head", "spo_head_alone",
                     "spo_head_refresh", "torchrun_1proc"]  # fmt: skip
    r = res["results"]
    assert [i for i in r["spo"]["iterations_logged"] if i] == [1, 2, 3, 4], "the resume must continue to 4"
    assert r["lora"]["unet_output_change"] > 1e-6
    assert r["head"]["heldout_overall"]["pools"] > 0
    for name in ("spo_verified_head", "spo_head_alone", "spo_head_refresh", "ddp"):
        assert [p for p in r[name]["pairs"] if p is not None], name
    assert [c for c in r["spo_head_refresh"]["head_refresh_cos"] if c is not None], "the refresh must have run"


def test_reference_batches_bench_small(tmp_path):
    """bench_reference_batches.py: each setting trains on the same pairs from the same adapter, so the logged losses
    agree (float rounding at most) and every setting reports a time and its ratio to the per-micro-batch loop."""
    out = tmp_path / "ref.json"
    subprocess.run(
        [sys.executable, str(BENCH / "bench_reference_batches.py"), "--repeats", "1", "--settings", "1", "3",
         "--out", str(out)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["reference_batches"] for r in rows] == [1, 3]
    assert rows[0]["speedup_vs_1"] == 1.0 and rows[0]["micro_batches"] > 3
    assert all(r["median_s"] > 0 and r["max_loss_diff"] < 1e-5 for r in rows)
