"""Pretrains the toy world's base model from scratch: ``python -m spo_fast.toy.pretrain --out DIR``.

Two phases, deterministic for a seed (on a given machine and thread count):

1. VAE: reconstruction (MSE + L1) with a small KL term (SD-style latents that stay close to the encoder mean),
   on jittered renders of training prompts. Its ``scaling_factor`` is then set to 1 / std of the latents, the
   role of SD's 0.18215, so that the diffusion model sees unit-variance latents.
2. Text encoder + UNet jointly, epsilon prediction with Min-SNR-5 loss weighting (converges much faster than
   plain MSE in a short schedule), 10% of prompts replaced by the empty prompt so that classifier-free
   guidance works, an EMA of the weights (what is saved: it smooths the short, high-learning-rate run).

The output is a standard ``StableDiffusionPipeline`` folder in fp16 safetensors. The shipped base model is this
script's output; the exact command is in ``spo_fast/toy/assets/base_model/README.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .model import build_toy_components, generate, toy_model_path
from .scorer import score
from .tokenizer import write_tokenizer_files
from .world import make_dataset, prompt_splits, render


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _lr_lambda(warmup: int, total: int, floor: float = 0.1):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(max(1, steps // 20), steps))
    vae.train()
    loss_ema = float("nan")
    bar = tqdm(range(steps), desc="vae", dynamic_ncols=True)
    for _ in bar:
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        # L1 keeps edges sharp (MSE alone averages them out); the KL weight is tiny, as in SD's autoencoder.
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_ema = loss.item() if math.isnan(loss_ema) else 0.98 * loss_ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.4f}")
    vae.eval()
    return loss_ema


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(images[i : i + batch_size]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_diffusion(
    c,
    prompts: list[str],
    lat_mean: torch.Tensor,
    lat_std: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    cfg_dropout: float,
    ema_decay: float,
) -> tuple[float, dict, dict]:
    g = torch.Generator().manual_seed(seed + 1)
    tok = c.tokenizer
    # Tokenize the whole dataset once (and the empty prompt): the tokenizer is the slowest per-step host work.
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    ids = ids.input_ids
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids[0]
    sf = c.vae.config.scaling_factor
    alphas = c.scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    params = list(c.unet.parameters()) + list(c.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(max(1, steps // 25), steps))
    ema_unet = copy.deepcopy(c.unet.state_dict())
    ema_text = copy.deepcopy(c.text_encoder.state_dict())
    c.unet.train()
    c.text_encoder.train()
    loss_ema = float("nan")
    bar = tqdm(range(steps), desc="unet+text", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(prompts), (batch_size,), generator=g)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * sf
        t = torch.randint(0, c.scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        zt = c.scheduler.add_noise(z0, noise, t)
        batch_ids = ids[idx].clone()
        drop = torch.rand(batch_size, generator=g) < cfg_dropout
        batch_ids[drop] = empty
        context = c.text_encoder(batch_ids)[0]
        pred = c.unet(zt, t, encoder_hidden_states=context).sample
        # Min-SNR-gamma weighting for epsilon prediction: min(snr, 5) / snr.
        w = snr[t].clamp(max=5.0) / snr[t]
        loss = (w * ((pred - noise) ** 2).mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        # EMA warm-up (as in diffusers' EMAModel): early averages must not stay anchored to the random init.
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, model in ((ema_unet, c.unet), (ema_text, c.text_encoder)):
                for k, v in model.state_dict().items():
                    if v.is_floating_point():
                        ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
                    else:
                        ema[k].copy_(v)
        loss_ema = loss.item() if math.isnan(loss_ema) else 0.98 * loss_ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.4f}")
    c.unet.eval()
    c.text_encoder.eval()
    return loss_ema, ema_unet, ema_text


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", type=Path, default=toy_model_path(), help="output pipeline folder (default: the shipped one)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-images", type=int, default=8192, help="jittered training renders")
    ap.add_argument("--vae-steps", type=int, default=400)
    ap.add_argument("--vae-batch-size", type=int, default=16)
    ap.add_argument("--vae-lr", type=float, default=3e-3)
    ap.add_argument("--unet-steps", type=int, default=1800)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--cfg-dropout", type=float, default=0.1, help="fraction of empty prompts (for CFG)")
    ap.add_argument("--ema-decay", type=float, default=0.99)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts for the final score summary")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    _seed_all(args.seed)
    t_start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = write_tokenizer_files(out / "tokenizer")
    c = build_toy_components(args.seed, tok_dir)
    prompts, images = make_dataset(args.num_images, seed=args.seed, split="train")

    t0 = time.perf_counter()
    vae_loss = train_vae(c.vae, images, args.vae_steps, args.vae_batch_size, args.vae_lr, args.seed)
    lat_mean, lat_std = encode_dataset(c.vae, images)
    sample_std = float((lat_mean + lat_std * torch.randn_like(lat_mean)).std())
    c.vae.register_to_config(scaling_factor=1.0 / sample_std)
    t_vae = time.perf_counter() - t0

    t0 = time.perf_counter()
    unet_loss, ema_unet, ema_text = train_diffusion(
        c,
        prompts,
        lat_mean,
        lat_std,
        args.unet_steps,
        args.batch_size,
        args.lr,
        args.seed,
        args.cfg_dropout,
        args.ema_decay,
    )
    c.unet.load_state_dict(ema_unet)
    c.text_encoder.load_state_dict(ema_text)
    t_unet = time.perf_counter() - t0

    # Save in fp16 (package size), then evaluate exactly what was saved.
    c.to(torch.float16)
    pipe = c.pipeline()
    pipe.save_pretrained(out, safe_serialization=True)
    write_tokenizer_files(out / "tokenizer")  # our hand-written files, not the backend's re-serialisation
    c.to(torch.float32)

    _, held = prompt_splits()
    eval_prompts = list(held[: args.eval_prompts])
    with torch.no_grad():
        recon = c.vae.decode(c.vae.encode(render(eval_prompts)).latent_dist.mean).sample.clamp(-1, 1)
        samples = generate(c, eval_prompts, generator=torch.Generator().manual_seed(args.seed))
    summary = {
        "seed": args.seed,
        "vae_steps": args.vae_steps,
        "unet_steps": args.unet_steps,
        "vae_final_loss": round(vae_loss, 5),
        "unet_final_loss": round(unet_loss, 5),
        "scaling_factor": round(1.0 / sample_std, 5),
        "vae_seconds": round(t_vae, 1),
        "unet_seconds": round(t_unet, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "held_out_score_ground_truth": round(float(score(render(eval_prompts), eval_prompts).mean()), 4),
        "held_out_score_vae_reconstruction": round(float(score(recon, eval_prompts).mean()), 4),
        "held_out_score_samples": round(float(score(samples, eval_prompts).mean()), 4),
        "size_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
    }
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))  # the CLI's final summary
    return summary


if __name__ == "__main__":
    main()
