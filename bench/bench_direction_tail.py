"""The direction head's scoring tail: the PyTorch reference (einsum) against the fused Triton kernel.

reference:  spo_fast.head.direction_scores_ref: x.float(), the pool mean, x - mean (k*b*N, materialised), einsum.
fused:      spo_fast.kernels.direction_score.direction_score_fused: one streaming pass (mean, centring and dot
            product in registers); backward one Triton pass. CUDA only here: on CPU Triton runs in its
            interpreter, which measures Python, not the kernel, so CPU runs time the reference alone and say so.

Phases: forward (no grad), full (forward + backward with respect to candidates and direction) and full_dir (forward
+ backward with respect to the direction only: head training, where the candidates come from the sampler
detached). Shapes: SD1.5 (k 4, b 10, 4x64x64) and SDXL (k 4, b 4, 4x128x128). Layouts: ``contiguous`` candidates
``[k, b, ...]``, or ``sampler``: the sampler's ``[b, k, ...]`` latents seen through ``transpose(0, 1)``, as
spo_fast.head passes them. Bandwidth counts the minimum traffic (forward reads candidates and direction; the
backward reads the candidates for d direction, the direction for d candidates, and writes each gradient asked
for). Prints a table, writes JSON (bench/out/ by default; measured results are kept under bench/results/<device>/).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from _common import environment, median_time, peak_memory, print_table, write_json

from spo_fast.head import direction_scores_ref

SHAPES = {"sd15": (4, 10, 4, 64, 64), "sdxl": (4, 4, 4, 128, 128)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PHASES = ("forward", "full", "full_dir")


def make_inputs(shape, dtype, layout: str, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    k, b, c, h, w = shape
    g = torch.Generator(device=dev).manual_seed(0)
    mean = torch.randn(1, b, c, h, w, generator=g, device=dev)
    if layout == "sampler":
        x = (mean.transpose(0, 1) + 0.3 * torch.randn(b, k, c, h, w, generator=g, device=dev)).to(dtype)
        x = x.transpose(0, 1)
    else:
        x = (mean + 0.3 * torch.randn(k, b, c, h, w, generator=g, device=dev)).to(dtype)
    d = torch.randn(b, c, h, w, generator=g, device=dev).to(dtype)
    return x, d


def measure(fn: Callable[..., torch.Tensor], x, d, dev, repeats: int) -> dict[str, float]:
    k, b = x.shape[:2]
    up = torch.randn(k, b, device=dev)
    xg, dg = x.detach().clone().requires_grad_(), d.detach().clone().requires_grad_()  # clone keeps the layout

    def fwd():
        with torch.no_grad():
            fn(x, d)

    def full():
        xg.grad = dg.grad = None
        (fn(xg, dg) * up).sum().backward()

    def full_dir():
        dg.grad = None
        (fn(x, dg) * up).sum().backward()

    out = {"forward_s": median_time(fwd, dev, repeats), "full_s": median_time(full, dev, repeats)}
    out["full_dir_s"] = median_time(full_dir, dev, repeats)
    return {**out, **peak_memory(full, dev)}


def traffic_bytes(x: torch.Tensor, d: torch.Tensor) -> dict[str, int]:
    bx, bd = x.numel() * x.element_size(), d.numel() * d.element_size()
    # backward: d direction needs the candidates, d candidates the direction; each gradient is written once
    return {"forward": bx + bd, "full": 3 * (bx + bd), "full_dir": 2 * (bx + bd)}


def max_errors(fused, x, d, dev) -> dict[str, float]:
    """Largest deviation of the fused scores and gradients from the reference (fp32 from the same inputs)."""
    up = torch.randn(x.shape[:2], device=dev)
    res = []
    for fn, xx, dd in ((fused, x, d), (direction_scores_ref, x.float(), d.float())):
        xl, dl = xx.detach().clone().requires_grad_(), dd.detach().clone().requires_grad_()
        s = fn(xl, dl)
        (s * up).sum().backward()
        res.append((s.detach(), xl.grad.float(), dl.grad.float()))
    (s, gx, gd), (rs, rx, rd) = res
    return {
        "max_rel_err_scores": ((s - rs).abs().max() / rs.abs().max()).item(),
        "max_rel_err_grad_candidates": ((gx - rx).abs().max() / rx.abs().max()).item(),
        "max_rel_err_grad_direction": ((gd - rd).abs().max() / rd.abs().max()).item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 20 CPU, 200 CUDA)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype of candidates and direction")
    ap.add_argument("--layouts", nargs="+", default=["contiguous", "sampler"], choices=["contiguous", "sampler"])
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 repeats, SD1.5 shape, contiguous layout")
    ap.add_argument("--out", default=None, help="JSON path (default bench/out/bench_direction_tail.json)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    repeats = args.repeats or (3 if args.quick else 200 if dev.type == "cuda" else 20)
    shapes = ["sd15"] if args.quick else args.shapes
    layouts = ["contiguous"] if args.quick else args.layouts
    impls: dict[str, Callable[..., torch.Tensor]] = {"reference": direction_scores_ref}
    notes: list[str] = []
    peak_bw = None
    if dev.type == "cuda":
        from bench_loss import peak_bandwidth
        from spo_fast.kernels.direction_score import direction_score_fused

        impls["fused"] = direction_score_fused
        peak_bw = peak_bandwidth(dev)
    else:
        notes.append(
            "fused: needs CUDA; on CPU Triton runs in its interpreter (Python, not the kernel), so it is not timed"
        )
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for name in shapes:
        shape = SHAPES[name]
        for layout in layouts:
            x, d = make_inputs(shape, dtype, layout, dev)
            traffic = traffic_bytes(x, d)
            res = {impl: measure(fn, x, d, dev, repeats) for impl, fn in impls.items()}
            for impl, r in res.items():
                row: dict[str, Any] = {"shape": name, "layout": layout, "dtype": args.dtype, "impl": impl}
                for phase in PHASES:
                    row[f"{phase}_us"] = 1e6 * r[f"{phase}_s"]
                for phase in PHASES:
                    row[f"speedup_{phase}"] = res["reference"][f"{phase}_s"] / r[f"{phase}_s"]
                row["forward_GBps"] = traffic["forward"] / r["forward_s"] / 1e9
                row["full_GBps"] = traffic["full"] / r["full_s"] / 1e9
                if peak_bw:
                    row["forward_pct_peak"] = 100 * traffic["forward"] / r["forward_s"] / peak_bw
                    row["full_pct_peak"] = 100 * traffic["full"] / r["full_s"] / peak_bw
                row["saved_MB"] = r["saved_for_backward_bytes"] / 2**20
                if "cuda_peak_extra_bytes" in r:
                    row["cuda_peak_MB"] = r["cuda_peak_extra_bytes"] / 2**20
                if impl != "reference":
                    row.update(max_errors(impls[impl], x, d, dev))
                row["dims"] = list(shape)
                rows.append(row)
            if "fused" in res:
                summary[f"{name}/{layout}"] = {
                    f"fused_speedup_{p}": res["reference"][f"{p}_s"] / res["fused"][f"{p}_s"] for p in PHASES
                }
    cols = ["shape", "layout", "impl", *(f"{p}_us" for p in PHASES), *(f"speedup_{p}" for p in PHASES)]
    cols += ["forward_GBps", "full_GBps"]
    if peak_bw:
        cols += ["forward_pct_peak", "full_pct_peak"]
    cols.append("saved_MB")
    if dev.type == "cuda":
        cols += ["cuda_peak_MB", "max_rel_err_scores"]
    env = environment()
    print(f"device: {env['device']}  dtype: {args.dtype}  repeats: {repeats} (median)")
    print_table(rows, cols)
    for note in notes:
        print(f"note: {note}")
    payload = {
        "benchmark": "bench_direction_tail",
        "env": env,
        "repeats": repeats,
        "dtype": args.dtype,
        "shapes": {s: dict(zip(("k", "b", "C", "h", "w"), SHAPES[s])) for s in shapes},
        "fused_timed": "fused" in impls,
        "peak_bandwidth_Bps": peak_bw,
        "traffic_note": "GBps counts the minimum traffic: forward reads candidates + direction; full also re-reads "
        "both and writes both gradients; full_dir re-reads the candidates and writes the direction's gradient",
        "notes": notes,
        "summary": summary,
        "rows": rows,
    }
    path = write_json("bench_direction_tail", payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
