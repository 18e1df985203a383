"""Tiny SD1.5- and SDXL-structured pipelines built from configs (random weights) for CPU tests: saved to a folder
and loaded back through the same code path as real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_tiny_clip_tokenizer(path: Path, max_length: int = 16) -> None:
    """A real CLIP BPE tokenizer over lowercase letters (character-level; no merges)."""
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789,.")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(
        str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=max_length, unk_token="<|endoftext|>"
    )
    tok.save_pretrained(path)


def _text_encoder(vocab_size: int, hidden: int, projection: bool, max_len: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=max_len, projection_dim=hidden, bos_token_id=0,
        eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def make_tiny_pipeline(path: Path, kind: str = "sd15", seed: int = 0) -> Path:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    path = Path(path)
    write_tiny_clip_tokenizer(path / "_tok")
    tok = CLIPTokenizer.from_pretrained(path / "_tok")
    hidden = 16
    unet_kw = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, norm_num_groups=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    )  # fmt: skip
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )  # fmt: skip
    if kind == "sd15":
        unet = UNet2DConditionModel(cross_attention_dim=hidden, **unet_kw)
        te = _text_encoder(len(tok), hidden, False, 16)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    else:
        unet = UNet2DConditionModel(
            cross_attention_dim=2 * hidden, addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=hidden + 6 * 4, **unet_kw,
        )  # fmt: skip
        te1 = _text_encoder(len(tok), hidden, False, 16)
        te2 = _text_encoder(len(tok), hidden, True, 16)
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched,
        )  # fmt: skip
    pipe.save_pretrained(path)
    return path


def assert_teacher_gradient(sampler, components, denoiser, teacher, mean, t, cond, prompts, grad, h, atol, seed):
    """``grad`` (the analytic gradient under test) against central differences of the teacher's score of the
    lookahead x0 reached from ``mean`` at step ``t``, along three random unit directions per sample."""

    def f(x):
        with torch.no_grad():
            ts = torch.full((x.shape[0],), int(t))
            x0, _ = sampler._lookahead_x0(x, denoiser(x, ts, cond), t, cond)
            return teacher(components.decode(x0).float(), ts, prompts).double()

    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        v = torch.randn(mean.shape, generator=g)
        v = v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        fd = (f(mean + h * v) - f(mean - h * v)) / (2 * h)
        torch.testing.assert_close((grad * v).sum((1, 2, 3)).double(), fd, rtol=0.1, atol=atol)
