"""The noisy-latent preference head against decode + teacher: cost per scored step, and SPO on the toy world.

Sections (``--sections``):

flops    per scored step at SD1.5 scale (k = 4, b = 10, CFG): FLOPs counted with ``torch.utils.flop_counter`` on
         meta-device models (nothing allocated): the teacher path (UNet with CFG on the k*b candidates, VAE decode
         to 512x512, a CLIP-ViT-H/14 vision tower at 224) against the head path (the direction head on the b pool
         means, or the latent / unet encoders on the k*b noisy candidates, plus the UNet with CFG on the b
         continuations only).
cpu      CPU seconds per scored step on the toy world (the shipped toy base model, k = 4, b = 8): teacher path
         (UNet on k*b with CFG, VAE decode, ToyImageScorer) against the head path (head, UNet on b).
spo      SPO on the toy world with the teacher against SPO with a trained head (``--head``): held-out score after
         each iteration against the compute spent (seconds and UNet rows). Needs ``--head``.

Writes bench/out/bench_head.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import environment, median_time, print_table, write_json

from spo_fast.config import PreferenceConfig
from spo_fast.head import HeadArchConfig, HeadScorer, NoisyLatentPreferenceHead, scheduler_signature

logger = logging.getLogger("bench_head")


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def flops_section(k: int = 4, b: int = 10) -> dict[str, Any]:
    from bench_e2e import _sd15_configs
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModel

    unet_cfg, vae_cfg, _, _ = _sd15_configs("full")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        vit = CLIPVisionModel(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=16,
                                               num_hidden_layers=32, image_size=224, patch_size=14))  # fmt: skip
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    n = 2
    x = torch.randn(n, 4, 64, 64, device="meta")
    t = torch.full((n,), 500, device="meta", dtype=torch.long)
    c = torch.randn(n, 77, 768, device="meta")
    per = {
        "unet_row": _flops(lambda: unet(x, t, encoder_hidden_states=c)) / n,
        "vae_decode": _flops(lambda: vae.decode(x)) / n,
        "vit_h_224": _flops(lambda: vit(pixel_values=torch.randn(n, 3, 224, 224, device="meta"))) / n,
    }
    heads = {}
    # the direction head three ways: free output (first order), potential scored by value (train_head's default),
    # potential scored by its gradient (first order: one forward and one backward per pool)
    variants = {
        "direction": ("direction", {}),
        "direction_potential": ("direction", {"potential": True}),
        "direction_potential_gradient": ("direction", {"potential": True, "score_rule": "gradient"}),
        "latent": ("latent", {}),
        "unet": ("unet", {}),
    }
    for name, (enc, extra) in variants.items():
        arch = HeadArchConfig(encoder=enc, latent_channels=4, text_dim=768, width=128, depth=4,
                              downsample=2 if enc == "latent" else 0, embed_dim=128, levels=[1, 2, 4],
                              scheduler=scheduler_signature(sched), **extra)  # fmt: skip
        with torch.device("meta"):
            head = NoisyLatentPreferenceHead(arch, unet=unet)
        text = torch.randn(1, 128, device="meta")
        idx = torch.zeros(n, dtype=torch.long, device="meta")
        if enc == "direction":  # one pool of k candidates per parent: the conv net runs once per pool
            cand = torch.randn(k, n, 4, 64, 64, device="meta")
            heads[name] = _flops(lambda h=head, e=text, i=idx, cd=cand: h.score_pools(cd, x, t, e, i)) / (k * n)
        else:
            heads[name] = _flops(lambda h=head, e=text, i=idx: h(x, t, e, i, c)) / n
        heads[f"{name}_params"] = sum(p.numel() for p in head.parameters())
    encs = tuple(variants)
    for e in encs:
        per[f"head_{e}"] = heads[e]
    teacher_step = 2 * k * b * per["unet_row"] + k * b * (per["vae_decode"] + per["vit_h_224"])
    head_step = {e: 2 * b * per["unet_row"] + k * b * per[f"head_{e}"] for e in encs}
    # Verified head (one-step x0 as in the official SD1.5 sampler): the head on the k*b candidates, the UNet (CFG) on
    # the proposed pair's 2b rows and on the continuations that are not one of the pair (b (1 - 2/k) expected: the
    # others reuse the pair's pass), decode + teacher on the pair only.
    verified = (
        2 * (2 + 1 - 2 / k) * b * per["unet_row"]
        + k * b * per["head_direction"]
        + 2 * b * (per["vae_decode"] + per["vit_h_224"])
    )
    return {
        "k": k,
        "b": b,
        "gflops_per_row": {key: v / 1e9 for key, v in per.items()},
        "head_parameters": {e: heads[f"{e}_params"] for e in encs},
        "scoring_gflops_per_candidate": {
            "decode+teacher": (per["vae_decode"] + per["vit_h_224"]) / 1e9,
            "unet_for_x0+decode+teacher": (2 * per["unet_row"] + per["vae_decode"] + per["vit_h_224"]) / 1e9,
            **{f"head_{e}": per[f"head_{e}"] / 1e9 for e in encs},
        },
        "scored_step_tflops": {
            "teacher": teacher_step / 1e12,
            **{f"head_{e}": v / 1e12 for e, v in head_step.items()},
            "verified_head_direction": verified / 1e12,
        },  # fmt: skip
        "scored_step_ratio": {
            **{f"head_{e}": teacher_step / v for e, v in head_step.items()},
            "verified_head_direction": teacher_step / verified,
        },  # fmt: skip
    }


def _toy(device: str = "cpu") -> tuple[Any, Any]:
    from spo_fast.pipeline import PromptEncoder, load_components
    from spo_fast.toy import toy_model_path

    comps = load_components(str(toy_model_path()), device=device)
    return comps, PromptEncoder(comps, device=device)


def cpu_section(heads: dict[str, str], repeats: int, k: int = 4, b: int = 8) -> dict[str, Any]:
    from spo_fast.ddim import ddim_coefficients, predict_x0_eps
    from spo_fast.head import load_head
    from spo_fast.pipeline import CFGDenoiser
    from spo_fast.toy import ToyImageScorer, prompt_splits

    comps, enc = _toy()
    prompts = list(prompt_splits()[1][:b])
    cond = enc(prompts)
    den = CFGDenoiser(comps.unet, enc([""]), 5.0)
    sched = comps.scheduler
    sched.set_timesteps(20)
    t_val = int(sched.timesteps[8])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(k * b, *comps.latent_shape, generator=g)
    ts = torch.full((k * b,), t_val)
    cols = torch.arange(b).repeat(k)
    cond_k = cond[cols]
    teacher = ToyImageScorer()
    coeffs = ddim_coefficients(sched, ts, 1.0, num_inference_steps=20)

    def teacher_step() -> None:
        pred = den(x, ts, cond_k)
        x0, _ = predict_x0_eps(coeffs, pred, x)
        teacher(comps.decode(x0).float(), ts, [prompts[i] for i in cols.tolist()])

    def unet_b() -> None:
        den(x[:b], ts[:b], cond)

    times = {"teacher_step": median_time(teacher_step, "cpu", repeats), "unet_b_cfg": median_time(unet_b, "cpu",
                                                                                                  repeats)}  # fmt: skip
    with torch.no_grad():
        times["unet_kb_cfg"] = median_time(lambda: den(x, ts, cond_k), "cpu", repeats)
        times["decode_kb"] = median_time(lambda: comps.decode(x), "cpu", repeats)
    for name, path in heads.items():
        head = load_head(path, comps) if path else NoisyLatentPreferenceHead(HeadArchConfig(
            encoder=name, latent_channels=4, text_dim=64, width=64, depth=4, scheduler=scheduler_signature(sched)),
            unet=comps.unet)  # fmt: skip
        hs = HeadScorer(head)
        px = x[:b]  # the parents' x0 estimate (read by the direction head only)
        times[f"head_{name}_kb"] = median_time(lambda hs=hs, px=px: hs(x, ts, cond, cols, parent_x0=px), "cpu", repeats)
        times[f"head_step_{name}"] = times[f"head_{name}_kb"] + times["unet_b_cfg"]
    return {
        "k": k,
        "b": b,
        "threads": torch.get_num_threads(),
        "seconds": times,
        "speedup_per_scored_step": {n: times["teacher_step"] / times[f"head_step_{n}"] for n in heads},
    }


SPO_METHODS = (
    "teacher", "head", "head_verify", "head_refresh", "head_refresh_labels", "head_refresh_carry", "head_refresh_x0",
    "teacher_k2", "oracle",
)  # fmt: skip


class _OracleDirection:
    """Diagnostic, not a speed-up: the teacher's own gradient at each pool mean (through the lookahead, the decoder
    and the differentiable toy score) as the direction, candidates scored ``<grad, x_i - mean>``. The ceiling of a
    direction head: what SPO would do with a perfect one."""

    def __init__(self, trainer: Any) -> None:
        from spo_fast.head import _differentiable
        from spo_fast.toy import ToyImageScorer

        self.trainer, self.grad_fn, self.sampler = trainer, _differentiable(ToyImageScorer()), None

    def __call__(self, latents, timesteps, cond, prompt_index, parent_x0=None):
        from spo_fast.head import _teacher_gradient, direction_scores

        b = parent_x0.shape[0]
        cand = latents.view(latents.shape[0] // b, b, *latents.shape[1:])
        tr = self.trainer
        g = _teacher_gradient(self.sampler, tr.components, self.grad_fn, cand.mean(0), int(timesteps[0]), cond,
                              tr.scorer.prompts)  # fmt: skip
        return direction_scores(cand, g).reshape(-1)


def spo_section(
    head_path: str,
    iterations: int,
    eval_prompts: int,
    methods: tuple[str, ...] = SPO_METHODS,
    seed: int = 0,
    threshold: float | None = None,
    refresh_every: int = 2,
    refresh_steps: int | None = None,
    head_max_timestep: int | None = None,
    audit_every: int = 0,
) -> dict:
    """Held-out score against time and UNet rows for SPO on the toy world with: the teacher (decode + score every
    candidate), the head alone (its labels trusted), the verified head (head proposes the pair, teacher orders it:
    2 of the k candidates decoded and scored), the head alone with its online refresh (``preference.head_refresh
    2``: ``head_refresh`` with every label the head's, ``head_refresh_labels`` with the refreshed steps labelled by
    the teacher's gradient, ``head_refresh_carry`` with that gradient carried to the steps in between; these three
    with the exact gradient, through the lookahead's UNet calls; ``head_refresh_x0`` the carry with the gradient
    stopped at the UNet outputs, the library defaults), the teacher with k = 2 (the same teacher work per pool as
    the verified head, on a random pair) and the first-order oracle (:class:`_OracleDirection`, a diagnostic).
    ``head_max_timestep``: the head methods score only the steps at or below it, the teacher the noisier ones
    (``preference.head_max_timestep``). ``audit_every``: the head methods audit their labels against the teacher
    on every N-th iteration (``preference.head_audit_every``; the audit's rows are not in ``unet_rows``)."""
    from spo_fast.config import make_config
    from spo_fast.head import audit_summary
    from spo_fast.sampler import PoolSampler
    from spo_fast.trainer import SPOTrainer

    out: dict[str, Any] = {}
    for method in methods:
        with tempfile.TemporaryDirectory() as tmp:
            sampling: dict[str, Any] = {"num_candidates": 2} if method == "teacher_k2" else {}
            if threshold is not None:  # the pair rule's margin threshold (default: the toy preset's)
                sampling["threshold"] = threshold
            # head_refresh*: the trainer builds the head and its online refresh (preference.head_refresh N).
            pref: dict[str, Any] = {}
            if method.startswith("head_refresh"):  # labels of the refreshed steps: the head's, or the teacher's
                pref = {"head": head_path, "head_refresh": refresh_every}
                pref["head_refresh_teacher_labels"] = method != "head_refresh"
                pref["head_refresh_carry"] = method in ("head_refresh_carry", "head_refresh_x0")
                # head_refresh_x0: the carry, with the teacher's gradient held constant at the lookahead's UNet outputs.
                pref["head_refresh_through_unet"] = method != "head_refresh_x0"
                if refresh_steps is not None:  # head optimizer steps per iteration (default: the library's)
                    pref["head_refresh_steps"] = refresh_steps
            if method in ("head", "head_verify"):  # the trainer's own head modes
                pref = {"head": head_path, "verify_head": method == "head_verify"}
            if pref and head_max_timestep is not None:
                pref["head_max_timestep"] = head_max_timestep
            if pref and audit_every:
                pref["head_audit_every"] = audit_every
            cfg = make_config("toy", overrides={
                "train": {"iterations": iterations, "seed": seed}, "data": {"num_eval_prompts": eval_prompts},
                "sampling": sampling, "log": {"output_dir": str(Path(tmp) / "run"), "progress": False, "eval_every": 1},
                "preference": pref,
            })  # fmt: skip
            tr = SPOTrainer(cfg)
            if method == "oracle":
                oracle = _OracleDirection(tr)
                s = tr.sampler
                tr.sampler = oracle.sampler = PoolSampler(s.denoiser, s.scheduler, None, s.config, head=oracle)
            curve = [{"iteration": 0, "seconds": 0.0, "unet_rows": 0, **tr.evaluate()}]
            spent = 0.0
            for it in range(iterations):
                t0 = time.perf_counter()
                pairs, prompts, stats = tr.sample_pairs(it)
                tr.train_on(pairs, prompts, it)
                refresh = tr.refresh_head()
                spent += time.perf_counter() - t0
                rows = sum(tr.unet_rows.values())  # sampling, training and (head_refresh) the teacher gradients
                curve.append({"iteration": it + 1, "seconds": spent, "unet_rows": rows, "pairs": len(pairs),
                              "valid_rate": stats["valid"] / max(1, stats["records"]), **refresh,
                              **tr.evaluate()})  # fmt: skip
                if "audit" in stats:  # the labels against the teacher on this iteration's (the policy's) pools
                    curve[-1]["head_audit"] = {**audit_summary(stats["audit"]), "unet_rows": stats["audit_rows"]}
                logger.info("%s it %d: %s", method, it + 1, curve[-1])
            out[method] = curve
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", nargs="+", default=["flops", "cpu"], choices=("flops", "cpu", "spo"))
    ap.add_argument("--head", default="", help="trained head.pt (spo section; cpu section when a direction head)")
    ap.add_argument("--latent-head", default="", help="trained latent-encoder head.pt (cpu section)")
    ap.add_argument("--unet-head", default="", help="trained unet-encoder head.pt (cpu section)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--spo-iterations", type=int, default=8)
    ap.add_argument("--spo-methods", nargs="+", default=list(SPO_METHODS), choices=SPO_METHODS)
    ap.add_argument("--spo-seed", type=int, default=0, help="the SPO runs' train.seed (prompts, noise, LoRA init)")
    ap.add_argument("--spo-threshold", type=float, default=None, help="the SPO runs' pair threshold (default: preset)")
    ap.add_argument("--spo-refresh-every", type=int, default=2, help="head_refresh methods: preference.head_refresh")
    ap.add_argument(
        "--spo-refresh-steps", type=int, default=None, help="head_refresh methods: preference.head_refresh_steps"
    )
    ap.add_argument(
        "--spo-head-max-timestep", type=int, default=None,
        help="head methods: preference.head_max_timestep (the teacher scores the steps above it; default: none)",
    )  # fmt: skip
    ap.add_argument(
        "--spo-audit-every", type=int, default=0,
        help="head methods: audit the labels against the teacher on every N-th iteration (preference.head_audit_every)",
    )  # fmt: skip
    ap.add_argument("--eval-prompts", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    payload: dict[str, Any] = {"environment": environment()}
    if "flops" in args.sections:
        f = flops_section()
        payload["flops"] = f
        print_table([{"path": k, "GFLOP/candidate": v} for k, v in f["scoring_gflops_per_candidate"].items()],
                    ["path", "GFLOP/candidate"])  # fmt: skip
        print("scored step TFLOP:", json.dumps(f["scored_step_tflops"]), "ratio:", json.dumps(f["scored_step_ratio"]))
    if "cpu" in args.sections:
        c = cpu_section({"direction": args.head, "latent": args.latent_head, "unet": args.unet_head}, args.repeats)
        payload["cpu"] = c
        print_table([{"phase": k, "seconds": v} for k, v in c["seconds"].items()], ["phase", "seconds"])
        print("speed-up per scored step:", json.dumps(c["speedup_per_scored_step"]))
    if "spo" in args.sections:
        if not args.head:
            ap.error("--sections spo needs --head (train one with python -m spo_fast.train_head)")
        s = spo_section(
            args.head,
            args.spo_iterations,
            args.eval_prompts,
            tuple(args.spo_methods),
            args.spo_seed,
            args.spo_threshold,
            args.spo_refresh_every,
            args.spo_refresh_steps,
            args.spo_head_max_timestep,
            args.spo_audit_every,
        )
        payload["spo"] = s
        payload["spo_audit_every"] = args.spo_audit_every
        payload["spo_threshold"] = args.spo_threshold
        payload["spo_refresh_every"] = args.spo_refresh_every
        payload["spo_head_max_timestep"] = args.spo_head_max_timestep
        # The effective value (None = the library's default at the time of the run).
        payload["spo_refresh_steps"] = (
            args.spo_refresh_steps if args.spo_refresh_steps is not None else PreferenceConfig().head_refresh_steps
        )
        for m, curve in s.items():
            last = curve[-1]
            print(
                f"{m}: eval {curve[0]['eval_score']:.4f} -> {last['eval_score']:.4f} in {last['seconds']:.1f} s, "
                f"{last['unet_rows']} UNet rows, median pairs {statistics.median(r.get('pairs', 0) for r in curve)}"
            )
    path = write_json("bench_head", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
