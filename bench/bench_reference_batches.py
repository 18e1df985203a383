"""The training phase with the frozen reference's predictions computed per micro-batch (``train.reference_batches
1``, the official loop) or ahead of the optimizer steps in larger no-grad forwards (2, 4, 16 micro-batches).

One process, one set of sampled pairs (the e2e bench's setup: an SD1.5-structured model at ``--scale small`` on
CPU or ``full`` on a GPU, 10 prompts, k 4, 20 steps, threshold 0, so 160 pairs and 16 micro-batches of 10); each
setting trains on the same pairs from the same adapter (restored between runs), settings alternate over
``--repeats`` rounds, and the median time of ``SPOTrainer.train_on`` is reported with its ratio to setting 1 and
the largest difference of the logged micro-batch losses (float rounding only: the reference is the same model).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import environment, print_table, sync, write_json
from bench_e2e import Setup, _build_fast, build_pipeline, make_prompts, parse_args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=("full", "small"), default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--settings", type=int, nargs="+", default=[1, 2, 4, 16], help="train.reference_batches values")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if 1 not in args.settings:
        ap.error("--settings must include 1 (the per-micro-batch baseline the ratios refer to)")
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    e2e = parse_args(["--scale", args.scale, "--modes", "fast", "--device", args.device])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_pipeline(Path(tmp) / "pipeline", args.scale, 0)
        prompts = make_prompts(64, 0)
        pf = Path(tmp) / "prompts.txt"
        pf.write_text("\n".join(prompts) + "\n")
        mode, trainer, _ = _build_fast(Setup(e2e, device, folder, pf, prompts))
        pairs, batch_prompts, _ = trainer.sample_pairs(0)
        params = [p.detach().clone() for p in trainer.params]
        opt_state = trainer.optimizer.state_dict()

        def run(setting: int) -> tuple[float, list[float]]:
            with torch.no_grad():
                for p, p0 in zip(trainer.params, params):
                    p.copy_(p0)
            trainer.optimizer.load_state_dict(opt_state)
            trainer.cfg.train.reference_batches = setting
            sync(device)
            t0 = time.perf_counter()
            logs = trainer.train_on(pairs, batch_prompts, 0)
            sync(device)
            return time.perf_counter() - t0, logs["micro_losses"]

        for s in args.settings:  # warm-up: allocator, autotuning, the first AdamW step
            run(s)
        times: dict[int, list[float]] = {s: [] for s in args.settings}
        losses: dict[int, list[float]] = {}
        for _ in range(args.repeats):
            for s in args.settings:
                sec, losses[s] = run(s)
                times[s].append(sec)
        if mode.cleanup:
            mode.cleanup()
    base = statistics.median(times[1])
    for s in args.settings:
        med = statistics.median(times[s])
        diff = max(abs(a - b) for a, b in zip(losses[s], losses[1]))
        rows.append({"reference_batches": s, "median_s": med, "speedup_vs_1": base / med, "max_loss_diff": diff,
                     "pairs": len(pairs), "micro_batches": len(losses[s])})  # fmt: skip
    print_table(rows, list(rows[0]))
    payload = {"environment": environment(), "config": {"scale": args.scale, "repeats": args.repeats}, "rows": rows}
    path = write_json("bench_reference_batches", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
