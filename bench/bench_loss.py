"""SPO loss: the official formulation, spo_fast's closed form (eager and torch.compile) and the fused Triton kernel.

official:        four separate DDIM log-prob evaluations (policy/reference x win/lose, ~25 elementwise passes each,
                 as in the official trainer), then ratios and the loss.
closed:          spo_fast.spo_loss with SPO_FAST_LOSS_IMPL=torch (the PyTorch closed-form reference).
closed_core:     the same closed form with DDIM coefficients precomputed (as a trainer would cache them), eager.
closed_compile:  torch.compile of closed_core.
triton:          spo_fast.spo_loss with SPO_FAST_LOSS_IMPL=triton (the fused kernel; CUDA only here).
triton_core:     the kernel entry point with precomputed coefficients (compare with closed_compile).

Phases: forward (no grad), backward (alone, on a retained graph) and full (forward + backward). Shapes: SD1.5
training (10 pairs x 4x64x64) and SDXL (2 pairs x 4x128x128). Bandwidth counts the minimum traffic of the fused
algorithm (forward reads x_t, x_w, x_l, eps_theta, eps_ref; backward reads four and writes the gradient), so it
reads as "how close to a memory-bound kernel" for every implementation. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from _common import environment, median_time, peak_memory, print_table, sync, write_json
from diffusers import DDIMScheduler

import spo_fast
from spo_fast.ddim import ddim_coefficients
from spo_fast.loss import spo_log_ratios, spo_loss_from_log_ratios

SHAPES = {"sd15": (10, 4, 64, 64), "sdxl": (2, 4, 128, 128)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Peak HBM bandwidth in bytes/s by a substring of torch.cuda.get_device_name() (first match wins).
PEAK_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM
    ("A100-SXM4-80GB", 2.04e12),
    ("A100", 1.56e12),
    ("L40S", 0.864e12),
    ("RTX 4090", 1.008e12),
    ("A10G", 0.6e12),
    ("T4", 0.32e12),
]


def peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)


def official_loss(policy, ref, x, xw, xl, t, sched, eta=1.0, beta=10.0, eps=0.1):
    lp_pw = spo_fast.ddim_step_log_prob(sched, policy, t, x, xw, eta)
    lp_pl = spo_fast.ddim_step_log_prob(sched, policy, t, x, xl, eta)
    with torch.no_grad():
        lp_rw = spo_fast.ddim_step_log_prob(sched, ref, t, x, xw, eta)
        lp_rl = spo_fast.ddim_step_log_prob(sched, ref, t, x, xl, eta)
    per_pair, _, _ = spo_loss_from_log_ratios(lp_pw - lp_rw, lp_pl - lp_rl, beta, eps)
    return per_pair.mean()


def public_loss(impl: str) -> Callable[..., torch.Tensor]:
    def fn(policy, ref, x, xw, xl, t, sched):
        os.environ["SPO_FAST_LOSS_IMPL"] = impl
        return spo_fast.spo_loss(policy, ref, x, xw, xl, t, sched).loss

    return fn


def core_closed(coeffs):
    def fn(policy, ref, x, xw, xl, t, sched):
        lr_w, lr_l = spo_log_ratios(coeffs, policy, ref, x, xw, xl)
        return spo_loss_from_log_ratios(lr_w, lr_l)[0].mean()

    return fn


def core_triton(coeffs):
    from spo_fast.kernels.spo_loss import spo_loss_fused

    def fn(policy, ref, x, xw, xl, t, sched):
        return spo_loss_fused(coeffs, policy, ref, x, xw, xl)[0].mean()

    return fn


def backward_time(fn, inputs, dev, repeats: int, warmup: int = 2) -> float:
    """Median time of ``backward()`` alone: each run gets a fresh graph built outside the timed region (a retained
    graph would not do: compiled backwards donate their buffers and refuse ``retain_graph``)."""
    policy = inputs[0]
    times = []
    for i in range(warmup + repeats):
        policy.grad = None
        loss = fn(*inputs)
        sync(dev)
        t0 = time.perf_counter()
        loss.backward()
        sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(fn, inputs, dev, repeats) -> dict[str, float]:
    policy = inputs[0]

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def full():
        policy.grad = None
        fn(*inputs).backward()

    out = {
        "forward_s": median_time(fwd, dev, repeats),
        "backward_s": backward_time(fn, inputs, dev, repeats),
        "full_s": median_time(full, dev, repeats),
    }
    return {**out, **peak_memory(full, dev)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 20 CPU, 200 CUDA)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype of latents and predictions")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (slow to build on CPU)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/out/bench_loss.json)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    repeats = args.repeats or (200 if dev.type == "cuda" else 20)
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    sched.set_timesteps(20)
    peak_bw = peak_bandwidth(dev)
    notes: list[str] = []
    rows = []
    saved_impl = os.environ.get("SPO_FAST_LOSS_IMPL")
    for name in args.shapes:
        shape = SHAPES[name]
        g = torch.Generator(device=dev).manual_seed(0)
        x, xw, xl, ref = (torch.randn(shape, generator=g, device=dev).to(dtype) for _ in range(4))
        policy = (ref.float() + 0.01 * torch.randn(shape, generator=g, device=dev)).to(dtype).requires_grad_()
        t = sched.timesteps[torch.randint(0, 20, (shape[0],), generator=g, device=dev).cpu()].to(dev)
        coeffs = ddim_coefficients(sched, t, 1.0)
        inputs = (policy, ref, x, xw, xl, t, sched)
        impls: dict[str, Callable[..., torch.Tensor]] = {"official": official_loss, "closed": public_loss("torch")}
        impls["closed_core"] = core_closed(coeffs)
        if not args.no_compile:
            compiled = torch.compile(core_closed(coeffs))
            try:
                compiled(*inputs).backward()  # builds forward and backward graphs outside the timed runs
                with torch.no_grad():
                    compiled(*inputs)
                impls["closed_compile"] = compiled
            except Exception as exc:  # a missing C++ compiler or an inductor failure must not end the benchmark
                notes.append(f"{name}: torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0]})")
        if dev.type == "cuda":
            impls["triton"] = public_loss("triton")
            impls["triton_core"] = core_triton(coeffs)
        res = {impl: measure(fn, inputs, dev, repeats) for impl, fn in impls.items()}
        elem_bytes = policy.numel() * policy.element_size()
        traffic = {"forward": 5 * elem_bytes, "backward": 5 * elem_bytes, "full": 10 * elem_bytes}
        for impl, r in res.items():
            row = {"shape": name, "dtype": args.dtype, "impl": impl}
            for phase in ("forward", "backward", "full"):
                row[f"{phase}_ms"] = 1e3 * r[f"{phase}_s"]
                row[f"speedup_{phase}"] = res["official"][f"{phase}_s"] / r[f"{phase}_s"]
            row["full_GBps"] = traffic["full"] / r["full_s"] / 1e9
            if peak_bw:
                row["full_pct_peak"] = 100 * traffic["full"] / r["full_s"] / peak_bw
            row["saved_MB"] = r["saved_for_backward_bytes"] / 2**20
            if "cuda_peak_extra_bytes" in r:
                row["cuda_peak_MB"] = r["cuda_peak_extra_bytes"] / 2**20
            row["dims"] = list(shape)
            rows.append(row)
    if saved_impl is None:
        os.environ.pop("SPO_FAST_LOSS_IMPL", None)
    else:
        os.environ["SPO_FAST_LOSS_IMPL"] = saved_impl
    if dev.type != "cuda":
        notes.append("triton rows: CUDA only (the interpreter on CPU measures Python, not the kernel)")
    if args.no_compile:
        notes.append("closed_compile: skipped (--no-compile)")
    cols = ["shape", "impl", "forward_ms", "backward_ms", "full_ms"]
    cols += ["speedup_forward", "speedup_backward", "speedup_full", "full_GBps"]
    if peak_bw:
        cols.append("full_pct_peak")
    cols.append("saved_MB")
    if dev.type == "cuda":
        cols.append("cuda_peak_MB")
    env = environment()
    print(f"device: {env['device']}  dtype: {args.dtype}  repeats: {repeats} (median)")
    print_table(rows, cols)
    for note in notes:
        print(f"note: {note}")
    payload = {
        "benchmark": "bench_loss",
        "env": env,
        "repeats": repeats,
        "peak_bandwidth_Bps": peak_bw,
        "notes": notes,
        "rows": rows,
    }
    path = write_json("bench_loss", payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
