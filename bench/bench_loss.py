"""SPO loss: the official formulation against spo_fast's closed form, forward and forward+backward.

official: four separate DDIM log-prob evaluations (policy/reference x win/lose, ~25 elementwise passes each,
          as in the official trainer), then ratios and the loss.
closed:   spo_fast.spo_loss (closed-form log-ratio; win and lose share the policy/reference predictions).

Shapes: SD1.5 training (10 pairs x 4x64x64) and SDXL (2 pairs x 4x128x128). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse

import torch
from _common import environment, median_time, peak_memory, print_table, write_json
from diffusers import DDIMScheduler

import spo_fast
from spo_fast.loss import spo_loss_from_log_ratios

SHAPES = {"sd15": (10, 4, 64, 64), "sdxl": (2, 4, 128, 128)}


def official_loss(policy, ref, x, xw, xl, t, sched, eta=1.0, beta=10.0, eps=0.1):
    lp_pw = spo_fast.ddim_step_log_prob(sched, policy, t, x, xw, eta)
    lp_pl = spo_fast.ddim_step_log_prob(sched, policy, t, x, xl, eta)
    with torch.no_grad():
        lp_rw = spo_fast.ddim_step_log_prob(sched, ref, t, x, xw, eta)
        lp_rl = spo_fast.ddim_step_log_prob(sched, ref, t, x, xl, eta)
    per_pair, _, _ = spo_loss_from_log_ratios(lp_pw - lp_rw, lp_pl - lp_rl, beta, eps)
    return per_pair.mean()


def closed_loss(policy, ref, x, xw, xl, t, sched):
    return spo_fast.spo_loss(policy, ref, x, xw, xl, t, sched).loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 20 CPU, 100 CUDA)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--out", default=None, help="JSON path (default bench/out/bench_loss.json)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    repeats = args.repeats or (100 if dev.type == "cuda" else 20)
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    sched.set_timesteps(20)
    rows = []
    for name in args.shapes:
        shape = SHAPES[name]
        g = torch.Generator(device=dev).manual_seed(0)
        x, xw, xl, ref = (torch.randn(shape, generator=g, device=dev) for _ in range(4))
        policy = (ref + 0.01 * torch.randn(shape, generator=g, device=dev)).requires_grad_()
        t = sched.timesteps[torch.randint(0, 20, (shape[0],), generator=g, device=dev).cpu()].to(dev)
        impls = {"official": official_loss, "closed": closed_loss}
        res = {}
        for impl, fn in impls.items():
            inputs = (policy, ref, x, xw, xl, t, sched)

            def fwd(fn=fn, a=inputs):
                with torch.no_grad():
                    fn(*a)

            def full(fn=fn, a=inputs):
                a[0].grad = None
                fn(*a).backward()

            res[impl] = {
                "forward_s": median_time(fwd, dev, repeats),
                "fwd_bwd_s": median_time(full, dev, repeats),
                **peak_memory(full, dev),
            }
        for impl in impls:
            r = res[impl]
            rows.append(
                {
                    "shape": name,
                    "impl": impl,
                    "forward_ms": 1e3 * r["forward_s"],
                    "fwd_bwd_ms": 1e3 * r["fwd_bwd_s"],
                    "saved_MB": r["saved_for_backward_bytes"] / 2**20,
                    "speedup_fwd": res["official"]["forward_s"] / r["forward_s"],
                    "speedup_fwd_bwd": res["official"]["fwd_bwd_s"] / r["fwd_bwd_s"],
                    **({"cuda_peak_MB": r["cuda_peak_extra_bytes"] / 2**20} if "cuda_peak_extra_bytes" in r else {}),
                    "dims": list(shape),
                }
            )
    cols = ["shape", "impl", "forward_ms", "fwd_bwd_ms", "saved_MB", "speedup_fwd", "speedup_fwd_bwd"]
    if dev.type == "cuda":
        cols.append("cuda_peak_MB")
    print_table(rows, cols)
    path = write_json(
        "bench_loss", {"benchmark": "bench_loss", "env": environment(), "repeats": repeats, "rows": rows}, args.out
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
