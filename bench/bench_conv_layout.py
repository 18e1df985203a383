"""Memory layout and cuDNN autotuning for the convolution-heavy forwards of sampling: the VAE decode of the
candidates' x0 (8.4 s of the fast path's 14 s sampling phase on an H200 at SD1.5 size, bench_e2e) and the UNet's
CFG forward.

variants:  ``nchw`` (PyTorch's default, what spo_fast runs today), ``channels_last`` (module weights and inputs in
           NHWC: cuDNN's tensor-core convolutions are native NHWC), each with ``torch.backends.cudnn.benchmark``
           off and on (CUDA only: autotuning picks the fastest algorithm per shape on the first call).
models:    random weights, SD1.5 sizes (``--scale full``: VAE decode of 8 latents 4x64x64 -> 8 images 512x512, UNet
           on 20 rows = CFG on 10 prompts) or the e2e bench's tiny look-alikes (``--scale small``, for CPU).

Each variant's output is compared with the NCHW output (max abs difference relative to its scale): a layout
change must not change the result beyond the dtype's rounding. Prints a table, writes JSON with medians and each
variant's ratio to NCHW (bench/out/ by default; measured results are kept under bench/results/<device>/).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from _common import environment, median_time, print_table, write_json
from bench_e2e import _sd15_configs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(scale: str, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[Any, Any, int, int]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet_cfg, vae_cfg, text_cfg, max_len = _sd15_configs(scale)
    vae = AutoencoderKL(**vae_cfg).to(device, dtype).eval()
    unet = UNet2DConditionModel(**unet_cfg).to(device, dtype).eval()
    return vae, unet, text_cfg["hidden_size"], max_len


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=("full", "small"), default="full")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", nargs="+", default=None, help="default: bf16 fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--decode-batch", type=int, default=8, help="latents per VAE decode call")
    ap.add_argument("--unet-rows", type=int, default=20, help="rows per UNet call (CFG on 10 prompts: 20)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtypes = args.dtypes or (["bf16", "fp16"] if cuda else ["fp32"])
    for name in dtypes:
        if name not in DTYPES:
            ap.error(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    benchmark_modes = (False, True) if cuda else (False,)
    rows: list[dict[str, Any]] = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        vae, unet, cond_dim, cond_len = build(args.scale, device, dtype, args.seed)
        g = torch.Generator(device=device).manual_seed(args.seed)
        size = unet.config.sample_size
        lat = torch.randn(args.decode_batch, 4, size, size, generator=g, device=device).to(dtype)
        x = torch.randn(args.unet_rows, 4, size, size, generator=g, device=device).to(dtype)
        cond = torch.randn(args.unet_rows, cond_len, cond_dim, generator=g, device=device).to(dtype)
        t = torch.full((args.unet_rows,), 500, device=device, dtype=torch.long)
        calls = {
            "vae_decode": (vae, lambda m, fmt, lat=lat: m.decode(lat.contiguous(memory_format=fmt)).sample),
            "unet": (
                unet,
                lambda m, fmt, x=x, t=t, c=cond: m(x.contiguous(memory_format=fmt), t, encoder_hidden_states=c).sample,
            ),
        }
        for what, (module, call) in calls.items():
            base_out = None
            base_time = None
            for layout, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
                module.to(memory_format=fmt)
                for bench in benchmark_modes:
                    torch.backends.cudnn.benchmark = bench
                    with torch.no_grad():
                        out = call(module, fmt).float()
                        sec = median_time(lambda c=call, m=module, f=fmt: c(m, f), device, args.repeats, warmup=3)
                    if base_out is None:
                        base_out, base_time = out, sec
                    rel = ((out - base_out).abs().max() / base_out.abs().max().clamp_min(1e-12)).item()
                    rows.append(
                        {
                            "model": what,
                            "dtype": dname,
                            "layout": layout,
                            "cudnn_benchmark": bench,
                            "median_ms": sec * 1e3,
                            "vs_nchw": base_time / sec,
                            "max_rel_diff": rel,
                        }
                    )
            module.to(memory_format=torch.contiguous_format)
        torch.backends.cudnn.benchmark = False
        del vae, unet
        if cuda:
            torch.cuda.empty_cache()
    print_table(rows, list(rows[0]))
    config = {k: getattr(args, k) for k in ("scale", "decode_batch", "unet_rows", "repeats")}
    path = write_json("bench_conv_layout", {"environment": environment(), "config": config, "rows": rows}, args.out)
    print(f"wrote {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
