"""Runs every benchmark in bench/ (``bench_*.py``) and collects their JSON into one report with device and versions.

Each benchmark runs in its own process (clean allocator statistics, no shared caches) and writes its JSON to a
temporary path given with ``--out``; the report holds the environment once and every benchmark's payload, its wall
time and its return code. ``--quick`` passes each benchmark's CPU smoke-run arguments (few repeats, small shapes).
A failing benchmark is recorded and the others still run; the exit code is non-zero when any failed.

    python bench/run_all.py --quick            # CPU smoke run
    python bench/run_all.py --only bench_e2e   # one benchmark, full size
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import OUT_DIR, environment, write_json

BENCH_DIR = Path(__file__).parent
# Smoke-run arguments per benchmark for --quick; benchmarks not listed run with their defaults.
QUICK_ARGS: dict[str, list[str]] = {
    "bench_loss": ["--repeats", "3", "--shapes", "sd15", "--no-compile"],
    "bench_resampler": ["--repeats", "5", "--shapes", "official"],
    "bench_e2e": ["--scale", "small", "--warmup", "0", "--iters", "1"],
    "bench_efficiency": ["--iterations", "2", "--eval-every", "1", "--eval-prompts", "2"],
    "bench_head": ["--sections", "flops", "--repeats", "1"],
    "bench_direction_tail": ["--quick"],
}


def discover() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("bench_*.py"))


def run_one(name: str, quick: bool, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        cmd = [sys.executable, str(BENCH_DIR / f"{name}.py"), *(QUICK_ARGS.get(name, []) if quick else []), "--out"]
        cmd.append(str(out))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=BENCH_DIR, capture_output=True, text=True, timeout=timeout)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
        except subprocess.TimeoutExpired as exc:
            rc, tail = -1, f"timed out after {timeout} s: {str(exc.stdout or '')[-2000:]}"
        entry = {"command": cmd[1:], "returncode": rc, "seconds": time.perf_counter() - t0}
        if out.is_file():
            entry["result"] = json.loads(out.read_text())
        if rc != 0 or "result" not in entry:
            entry["log_tail"] = tail
        return entry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke-run arguments for every benchmark")
    ap.add_argument("--only", nargs="+", default=None, help="benchmark names (default: every bench_*.py)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")
    ap.add_argument("--out", default=None, help=f"report path (default {OUT_DIR / 'report.json'})")
    args = ap.parse_args()
    names = discover()
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            ap.error(f"unknown benchmarks {unknown}; found {names}")
        names = [n for n in names if n in args.only]
    report = {"environment": environment(), "quick": args.quick, "benchmarks": {}}
    failed = []
    for name in names:
        print(f"== {name}", flush=True)
        entry = run_one(name, args.quick, args.timeout)
        report["benchmarks"][name] = entry
        status = "ok" if entry["returncode"] == 0 else f"FAILED (rc {entry['returncode']})"
        print(f"   {status} in {entry['seconds']:.1f} s", flush=True)
        if entry["returncode"] != 0:
            failed.append(name)
            print(entry.get("log_tail", ""), flush=True)
    path = write_json("report", report, args.out)
    print(f"wrote {path}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
