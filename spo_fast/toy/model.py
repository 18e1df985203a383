"""The tiny Stable-Diffusion-structured base model of the toy world.

Made of the real classes (``CLIPTextModel``, ``AutoencoderKL``, ``UNet2DConditionModel``, ``DDIMScheduler``)
with SD1.5's scheduler settings, so that everything spo_fast does to Stable Diffusion it can do to this model
on a CPU in seconds:

- images 3x32x32 in [-1, 1]; VAE downsampling factor 4 -> latents 4x8x8 (the UNet input);
- text encoder: 2 layers, width 64, 16 positions (:data:`spo_fast.toy.tokenizer.MAX_LENGTH`);
- UNet: block_out_channels (32, 64), one layer per block, cross-attention in every block, 4 heads,
  cross_attention_dim 64 (= the text width); epsilon prediction.

The shipped weights (fp16 safetensors, a standard ``StableDiffusionPipeline`` folder) are the output of
``python -m spo_fast.toy.pretrain``; see ``assets/base_model/README.md`` for the exact command.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .tokenizer import MAX_LENGTH, load_toy_tokenizer
from .world import IMAGE_SIZE

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 4
VAE_BLOCKS = (16, 32, 32)  # three blocks -> downsampling factor 2**2 = 4
LATENT_SIZE = IMAGE_SIZE // 2 ** (len(VAE_BLOCKS) - 1)
TEXT_WIDTH = 64

SCHEDULER_CONFIG: dict[str, Any] = {
    # Stable Diffusion 1.5's DDIM settings.
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "trained_betas": None,
}


def toy_model_path() -> Path:
    """Folder of the shipped base model (a ``StableDiffusionPipeline`` folder, loadable with ``from_pretrained``)."""
    return Path(__file__).resolve().parent / "assets" / "base_model"


def text_encoder_config(vocab_size: int):  # -> transformers.CLIPTextConfig
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_WIDTH,
        hidden_act="quick_gelu",
        # CLIP's pooled output looks for the EOS id; ours is the last id of the vocabulary.
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def vae_config() -> dict[str, Any]:
    n = len(VAE_BLOCKS)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(VAE_BLOCKS),
        "layers_per_block": 1,
        "latent_channels": LATENT_CHANNELS,
        "norm_num_groups": 8,
        "sample_size": IMAGE_SIZE,
        "scaling_factor": 1.0,  # pretrain sets it to 1 / std of the latents, as SD's 0.18215
    }


def unet_config() -> dict[str, Any]:
    return {
        "sample_size": LATENT_SIZE,
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "cross_attention_dim": TEXT_WIDTH,
        "attention_head_dim": 4,  # diffusers' legacy name: this is the number of heads
        "norm_num_groups": 8,
        "time_embedding_dim": None,
    }


@dataclass
class ToyComponents:
    """The five parts of the toy model (what a ``StableDiffusionPipeline`` holds, minus the safety checker)."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    scheduler: Any

    def to(self, dtype: torch.dtype) -> ToyComponents:
        for m in (self.text_encoder, self.vae, self.unet):
            m.to(dtype=dtype)
        return self

    def pipeline(self):  # -> diffusers.StableDiffusionPipeline
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def build_toy_components(seed: int = 0, tokenizer_path: str | Path | None = None) -> ToyComponents:
    """Freshly initialised (random) toy model, deterministic for the seed."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = load_toy_tokenizer(tokenizer_path)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_encoder_config(len(tokenizer)))
    vae = AutoencoderKL(**vae_config())
    unet = UNet2DConditionModel(**unet_config())
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    return ToyComponents(tokenizer, text_encoder, vae, unet, scheduler)


def load_toy_pipeline(path: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """Loads the toy model (the shipped one when ``path`` is None) as a ``StableDiffusionPipeline``. The weights
    are stored in fp16 to keep the package small; CPU inference wants float32, the default here."""
    from diffusers import StableDiffusionPipeline

    try:  # diffusers renamed torch_dtype to dtype; the old name still works there, with a deprecation warning
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401

        dtype_kw = "dtype"
    except ImportError:
        dtype_kw = "torch_dtype"
    pipe = StableDiffusionPipeline.from_pretrained(str(path or toy_model_path()), **{dtype_kw: dtype})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_toy_components(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> ToyComponents:
    p = load_toy_pipeline(path, dtype)
    return ToyComponents(p.tokenizer, p.text_encoder, p.vae, p.unet, p.scheduler)


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids [n, MAX_LENGTH], padded like Stable Diffusion (to the max length, with EOS)."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_prompts(components: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder hidden states [n, MAX_LENGTH, 64] (what the UNet cross-attends to)."""
    ids = tokenize(components.tokenizer, prompts).to(components.text_encoder.device)
    return components.text_encoder(ids)[0]


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1] (clamped, as the pipeline's post-processing does)."""
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)


@torch.no_grad()
def generate(
    pipe_or_components: Any,
    prompts: Sequence[str],
    steps: int = 20,
    guidance: float = 5.0,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    return_latents: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Samples images [n, 3, 32, 32] in [-1, 1] with DDIM and classifier-free guidance.

    Works with a ``StableDiffusionPipeline`` or anything holding the same five components; it is the
    pipeline's sampling loop without its per-call checks and conversions (a few ms each, which matter at this
    model size). The empty prompt is the unconditional input, as in pretraining's condition dropout."""
    c = pipe_or_components
    unet, vae = c.unet, c.vae
    # A private scheduler copy: set_timesteps mutates state and callers may share one scheduler.
    scheduler = type(c.scheduler).from_config(c.scheduler.config)
    scheduler.set_timesteps(steps)
    dtype = unet.dtype
    device = unet.device
    cond = encode_prompts(c, prompts).to(dtype)
    use_cfg = guidance != 1.0
    if use_cfg:
        uncond = encode_prompts(c, [""]).to(dtype).expand(len(prompts), -1, -1)
        context = torch.cat([uncond, cond])
    else:
        context = cond
    shape = (len(prompts), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = torch.cat([latents, latents]) if use_cfg else latents
        eps = unet(inp.to(dtype), t, encoder_hidden_states=context).sample.float()
        if use_cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents, eta=eta, generator=generator).prev_sample
    images = decode_latents(vae, latents.to(vae.dtype)).float()
    return (images, latents) if return_latents else images
