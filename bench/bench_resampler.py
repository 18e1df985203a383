"""Resampler bookkeeping per sampling pass: C++ (spo_fast._C) vs the vectorised torch-op path vs the Python fallback.

One pass is exactly what ``PoolSampler.sample`` runs per batch: ``begin_pass``, then for each scored step
``PairLedger.select_and_record`` (pair selection + margin + continuation draw + append to the ledger), then
``end_pass`` (compaction, statistics). Scores are precomputed, so only bookkeeping is timed. Every backend does the
same work and returns the same pairs (checked before timing):

- cpp:    PairLedger(backend="cpp").select_and_record (one C++ call per step)
- torch:  PairLedger(backend="python").select_and_record(backend="torch"): the CUDA path's torch ops, here on CPU,
          with the pure-Python ledger storage (no C++ anywhere)
- python: PairLedger(backend="python").select_and_record (the pure-Python fallback)

For reference ``cpp_two_call`` times the same pass with the two public calls per step (``select_step`` then
``record_step``), the path the sampler used before the fused call. The backends are timed side by side in one
process, interleaved round by round (the machine is shared with other jobs: a slow phase then hits every backend
alike), and the median of all single-pass times is reported.

Shapes: official (10 prompts, k = 4, 16 scored steps) and large (64 prompts, k = 8, 40 steps). Prints a table,
writes JSON (bench/out/bench_resampler.json).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from _common import environment, print_table, write_json

from spo_fast import _cpp_lib
from spo_fast import ledger as L

SHAPES = {"official": (10, 4, 16), "large": (64, 8, 40)}
THRESHOLD = 0.3


def fused_pass(ledger: L.PairLedger, ids: torch.Tensor, scores: list[torch.Tensor], select_backend: str | None):
    """The sampler's bookkeeping for one pass (spo_fast/sampler.py, PoolSampler.sample)."""
    ledger.begin_pass(0, ids)
    parent = torch.full((ids.numel(),), -1, dtype=torch.int64)
    for step, s in enumerate(scores):
        sel = ledger.select_and_record(step, 981 - 20 * step, s, THRESHOLD, parent, backend=select_backend)
        parent = sel.next_index
    return ledger.end_pass()


def two_call_pass(ledger: L.PairLedger, ids: torch.Tensor, scores: list[torch.Tensor], select_backend: str):
    ledger.begin_pass(0, ids)
    parent = torch.full((ids.numel(),), -1, dtype=torch.int64)
    for step, s in enumerate(scores):
        sel = L.select_step(s, THRESHOLD, ledger.seed, 0, step, backend=select_backend)
        ledger.record_step(step, 981 - 20 * step, sel, parent)
        parent = sel.next_index
    return ledger.end_pass()


def cases(ids: torch.Tensor, scores: list[torch.Tensor], with_cpp: bool) -> dict[str, Callable[[], L.PassPairs]]:
    out: dict[str, Callable[[], L.PassPairs]] = {}
    if with_cpp:
        cpp, cpp2 = L.PairLedger(backend="cpp"), L.PairLedger(backend="cpp")
        out["cpp"] = lambda: fused_pass(cpp, ids, scores, None)
        out["cpp_two_call"] = lambda: two_call_pass(cpp2, ids, scores, "cpp")
    tch, py = L.PairLedger(backend="python"), L.PairLedger(backend="python")
    out["torch"] = lambda: fused_pass(tch, ids, scores, "torch")
    out["python"] = lambda: fused_pass(py, ids, scores, None)
    return out


def check_same_pairs(runs: dict[str, Callable[[], L.PassPairs]]) -> None:
    """Same work in every backend: identical pairs (the torch margins may differ by float32 rounding only)."""
    ref = runs["python"]()
    for name, fn in runs.items():
        got = fn()
        for field in ("step_slot", "column", "win", "lose", "parent", "timestep"):
            assert torch.equal(getattr(got, field), getattr(ref, field)), (name, field)
        assert (got.num_invalid, got.num_nan_prompts) == (ref.num_invalid, ref.num_nan_prompts), name
        torch.testing.assert_close(got.margin, ref.margin, atol=0 if name != "torch" else 1e-6, rtol=0)


def interleaved_medians(runs: dict[str, Callable[[], object]], rounds: int, per_round: dict[str, int]) -> dict:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up
        fn()
        fn()
    for _ in range(rounds):
        for name, fn in runs.items():
            for _ in range(per_round[name]):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds over all backends")
    ap.add_argument("--repeats", type=int, default=20, help="timed passes per backend per round (torch: a quarter)")
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
    with_cpp = _cpp_lib.cpp_available()
    rows = []
    for name in args.shapes:
        b, k, steps = SHAPES[name]
        g = torch.Generator().manual_seed(0)
        scores = [torch.randn(k, b, generator=g) for _ in range(steps)]
        scores[0][:, 0] = math.nan  # one prompt with no finite score, as in a real run now and then
        ids = torch.arange(b)
        runs = cases(ids, scores, with_cpp)
        check_same_pairs(runs)
        per_round = {n: max(1, args.repeats // 4) if n == "torch" else args.repeats for n in runs}
        med = interleaved_medians(runs, args.rounds, per_round)
        for backend, t in med.items():
            rows.append(
                {
                    "shape": f"{name} b={b} k={k} steps={steps}",
                    "backend": backend,
                    "pass_us": t * 1e6,
                    "us_per_step": t / steps * 1e6,
                    "passes_timed": args.rounds * per_round[backend],
                    "speedup_vs_torch": med["torch"] / t,
                }
            )
    print_table(rows, ["shape", "backend", "pass_us", "us_per_step", "passes_timed", "speedup_vs_torch"])
    path = write_json("bench_resampler", {"environment": environment(), "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
