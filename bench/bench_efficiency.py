"""Training efficiency on the toy world: SPO (step-wise pools) against trajectory-level DPO (Diffusion-DPO / D3PO
style) with the same models, sampler code, loss family and held-out evaluation; with ``--head`` also SPO with the
noisy-latent head (``spo_head``: the head alone; ``spo_head_verify``: the head proposes, the teacher orders;
``spo_head_refresh``: the head with the teacher's gradient every 3rd scored step, the library's refresh defaults).

For each method it records the held-out preference score against wall-clock (sampling + training, evaluation
excluded) and against UNet evaluations (latent rows through the UNet; CFG doubles a row, backward counts as two
forwards), then reports how much compute SPO needs to reach the DPO run's final score. Writes JSON + PNG.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from _common import OUT_DIR, environment, print_table, write_json

from spo_fast.config import make_config
from spo_fast.report import read_metrics
from spo_fast.trainer import SPOTrainer

HEAD_METHODS = {
    "spo_head": {},
    "spo_head_verify": {"preference.verify_head": True},
    "spo_head_refresh": {"preference.head_refresh": 3},
}
METHODS = ("spo", "dpo", *HEAD_METHODS)


def run_method(method: str, args: argparse.Namespace, out: Path) -> list[dict]:
    overrides = {
        "train.method": "dpo" if method == "dpo" else "spo",
        "train.iterations": args.iterations,
        "train.seed": args.seed,
        "log.eval_every": args.eval_every,
        "log.output_dir": str(out / method),
        "log.checkpoint_every": args.iterations,
        "log.progress": False,
        "data.num_eval_prompts": args.eval_prompts,
    }
    if method in HEAD_METHODS:
        overrides.update({"preference.head": args.head, **HEAD_METHODS[method]})
    if not (args.reuse and (out / method / "summary.json").is_file()):
        SPOTrainer(make_config("toy", overrides=overrides), overwrite=True).run()
    curve, wall = [], 0.0
    for r in read_metrics(out / method):
        wall += r.get("time_sampling", 0.0) + r.get("time_training", 0.0)  # training includes the head refresh
        if "eval_score" in r:
            rows = r["unet_rows"]  # the head refresh's teacher-gradient passes count too
            curve.append(
                {
                    "iteration": r["iteration"],
                    "wall_s": wall,
                    "unet_rows": rows["sampling"] + rows["training"] + rows.get("head_refresh", 0),
                    "eval_score": r["eval_score"],
                }
            )
    return curve


def compute_to_reach(curve: list[dict], target: float, key: str) -> float | None:
    """First crossing of ``target`` by linear interpolation along ``key``; None if never reached, or if the target
    is not above the starting score (then "reaching" it says nothing about learning)."""
    if not curve or curve[0]["eval_score"] >= target:
        return None
    for a, b in zip(curve, curve[1:]):
        if a["eval_score"] < target <= b["eval_score"]:
            f = (target - a["eval_score"]) / (b["eval_score"] - a["eval_score"])
            return a[key] + f * (b[key] - a[key])
    return None


def score_at(curve: list[dict], budget: float, key: str) -> float | None:
    """Held-out score at ``budget`` of ``key`` (linear interpolation between evaluations); None past the curve."""
    for a, b in zip(curve, curve[1:]):
        if a[key] <= budget <= b[key]:
            f = (budget - a[key]) / (b[key] - a[key]) if b[key] > a[key] else 1.0
            return a["eval_score"] + f * (b["eval_score"] - a["eval_score"])
    return None


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for method, curve in curves.items():
        for a, key, label in ((ax[0], "wall_s", "wall-clock seconds (CPU)"), (ax[1], "unet_rows", "UNet rows")):
            a.plot([c[key] for c in curve], [c["eval_score"] for c in curve], "o-", label=method)
            a.set(xlabel=label, ylabel="held-out preference score")
    ax[0].legend()
    fig.suptitle("SPO (teacher or noisy-latent head) vs trajectory-level DPO on the toy world")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-prompts", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=["spo", "dpo"], choices=METHODS)
    ap.add_argument("--head", default="", help="head.pt of python -m spo_fast.train_head (the spo_head* methods)")
    ap.add_argument(
        "--reuse", action="store_true", help="summarise the finished runs beside --out (or in bench/out), no training"
    )
    ap.add_argument("--out", default=None, help="JSON path (default bench/out/bench_efficiency.json)")
    args = ap.parse_args()
    if any(m in HEAD_METHODS for m in args.methods) and not Path(args.head).is_file():
        ap.error("the spo_head* methods need --head <head.pt> (train one with python -m spo_fast.train_head)")
    logging.basicConfig(level=logging.WARNING)
    work = (Path(args.out).parent if args.out else OUT_DIR) / "efficiency_runs"  # the runs sit beside the JSON
    curves = {m: run_method(m, args, work) for m in args.methods}
    rows, summary = [], {}
    for m, curve in curves.items():
        rows.append(
            {
                "method": m,
                "score_start": curve[0]["eval_score"],
                "score_final": curve[-1]["eval_score"],
                "wall_s": curve[-1]["wall_s"],
                "unet_rows": curve[-1]["unet_rows"],
            }
        )
    if "dpo" in curves and "spo" in curves:
        target = curves["dpo"][-1]["eval_score"]
        for key in ("wall_s", "unet_rows"):
            spo_cost = compute_to_reach(curves["spo"], target, key)
            dpo_cost = compute_to_reach(curves["dpo"], target, key)
            summary[f"spo_{key}_to_dpo_final"] = spo_cost
            summary[f"dpo_{key}_to_dpo_final"] = dpo_cost
            summary[f"speedup_{key}"] = (dpo_cost / spo_cost) if spo_cost and dpo_cost else None
        summary["dpo_final_score"] = target
        # Equal compute: both methods' gain at the smaller of the two final budgets (defined even when DPO never rises).
        for key in ("wall_s", "unet_rows"):
            budget = min(curves["spo"][-1][key], curves["dpo"][-1][key])
            summary[f"equal_{key}_budget"] = budget
            for m in ("spo", "dpo"):
                at = score_at(curves[m], budget, key)
                summary[f"{m}_gain_at_equal_{key}"] = None if at is None else at - curves[m][0]["eval_score"]
        if target <= curves["dpo"][0]["eval_score"]:
            summary["note"] = "DPO did not improve on its starting score: compute-to-reach is undefined"
    if "spo" in curves:
        # Each head mode against teacher SPO: the teacher's score at the head run's final budget (equal compute).
        for m in (m for m in curves if m in HEAD_METHODS):
            for key in ("wall_s", "unet_rows"):
                at = score_at(curves["spo"], curves[m][-1][key], key)
                summary[f"spo_score_at_{m}_final_{key}"] = at
                summary[f"{m}_lead_at_equal_{key}"] = None if at is None else curves[m][-1]["eval_score"] - at
    print_table(rows, ["method", "score_start", "score_final", "wall_s", "unet_rows"])
    print(json.dumps(summary, indent=2))
    png = Path(args.out).with_suffix(".png") if args.out else OUT_DIR / "bench_efficiency.png"
    plot(curves, png)
    path = write_json(
        "bench_efficiency",
        {"benchmark": "bench_efficiency", "env": environment(), "args": vars(args), "rows": rows,
         "summary": summary, "curves": curves, "plot": str(png)},
        args.out,
    )  # fmt: skip
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
