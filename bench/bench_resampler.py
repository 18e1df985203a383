"""Resampler bookkeeping per sampling pass: C++ (spo_fast._C) vs the vectorised torch-op path vs the Python fallback.

One pass = for each scored step: select_step (pair selection + margin + continuation draw) and record_step; then
end_pass (compaction, statistics). Scores are precomputed, so only bookkeeping is timed.

- cpp:    select_step(backend="cpp") + PairLedger(backend="cpp")
- torch:  select_step(backend="torch") (the CUDA path's torch ops, here on CPU) + PairLedger(backend="python")
- python: select_step(backend="python") + PairLedger(backend="python")

Shapes: official (10 prompts, k = 4, 16 scored steps) and large (64 prompts, k = 8, 40 steps). Prints a table,
writes JSON (bench/out/bench_resampler.json).
"""

from __future__ import annotations

import argparse
import math

import torch
from _common import environment, median_time, print_table, write_json

from spo_fast import _cpp_lib
from spo_fast import ledger as L

SHAPES = {"official": (10, 4, 16), "large": (64, 8, 40)}
LEDGER_BACKEND = {"cpp": "cpp", "torch": "python", "python": "python"}


def one_pass(ledger: L.PairLedger, scores: list[torch.Tensor], backend: str, threshold: float = 0.3) -> L.PassPairs:
    b = scores[0].shape[1]
    ledger.begin_pass(0, range(b))
    parent = torch.full((b,), -1, dtype=torch.int64)
    for step, s in enumerate(scores):
        sel = L.select_step(s, threshold, ledger.seed, 0, step, backend=backend)
        ledger.record_step(step, 981 - 20 * step, sel, parent)
        parent = sel.next_index
    return ledger.end_pass()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=50, help="timed passes per case")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on [k, b] tensors a thread pool only adds wake-up latency; with 2 "
        "threads on a loaded 2-core machine the torch path measured ~8 ms per step instead of ~0.16 ms)",
    )
    ap.add_argument("--out", default=None, help="JSON path (default bench/out/bench_resampler.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backends = ["cpp", "torch", "python"] if _cpp_lib.cpp_available() else ["torch", "python"]
    rows = []
    for name in args.shapes:
        b, k, steps = SHAPES[name]
        g = torch.Generator().manual_seed(0)
        scores = [torch.randn(k, b, generator=g) for _ in range(steps)]
        scores[0][:, 0] = math.nan  # one prompt with no finite score, as in a real run now and then
        times = {}
        for backend in backends:
            ledger = L.PairLedger(seed=0, backend=LEDGER_BACKEND[backend])
            t_pass = median_time(lambda: one_pass(ledger, scores, backend), "cpu", args.repeats)  # noqa: B023
            t_sel = median_time(
                lambda: [L.select_step(s, 0.3, 0, 0, i, backend=backend) for i, s in enumerate(scores)],  # noqa: B023
                "cpu",
                args.repeats,
            )
            times[backend] = t_pass
            rows.append(
                {
                    "shape": f"{name} b={b} k={k} steps={steps}",
                    "backend": backend,
                    "pass_us": t_pass * 1e6,
                    "select_us_per_step": t_sel / steps * 1e6,
                    "record_end_us": (t_pass - t_sel) * 1e6,
                }
            )
        for r in rows[-len(backends) :]:
            r["speedup_vs_torch"] = times["torch"] / times[r["backend"]]
    print_table(rows, ["shape", "backend", "pass_us", "select_us_per_step", "record_end_us", "speedup_vs_torch"])
    path = write_json("bench_resampler", {"environment": environment(), "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
