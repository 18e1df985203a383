"""Diffusion model components for SPO: loading (SD1.5 / SDXL, local folder or hub id), cached prompt embeddings,
a classifier-free-guidance denoiser, and LoRA in the diffusers format.

Nothing here knows about training: the trainer and the benchmarks compose these pieces.
"""

from __future__ import annotations

import json
import logging
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "DiffusionComponents",
    "PromptEmbeds",
    "PromptEncoder",
    "CFGDenoiser",
    "load_components",
    "detect_kind",
    "add_lora",
    "save_lora",
    "lora_state_dict",
    "DTYPES",
]

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_KINDS = ("sd15", "sdxl")


def detect_kind(path: str | os.PathLike) -> str | None:
    """``sdxl`` / ``sd15`` from a local folder's model_index.json; None for hub ids not on disk."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    cls = json.loads(index.read_text()).get("_class_name", "")
    return "sdxl" if "XL" in cls or (Path(path) / "text_encoder_2").is_dir() else "sd15"


def _check_model_path(path: str) -> None:
    p = Path(path)
    if p.exists():
        if not (p / "model_index.json").is_file() or not (p / "unet").is_dir():
            raise ValueError(
                f"{path} is not a diffusers pipeline folder (needs model_index.json and unet/): pass the folder "
                "written by `pipeline.save_pretrained(...)` or a hub id such as runwayml/stable-diffusion-v1-5"
            )
        return
    # Anything but "owner/name" is a local path that is missing (hub ids are checked by from_pretrained).
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ValueError(f"model path {path} does not exist: pass a local diffusers folder or a hub id (owner/name)")


@dataclass
class DiffusionComponents:
    """The parts of a Stable Diffusion pipeline that SPO uses."""

    unet: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    scheduler: Any
    kind: str = "sd15"
    resolution: int = 512

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.resolution // self.vae_scale_factor
        return (self.unet.config.in_channels, s, s)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in [-1, 1] (the VAE's own dtype; fp16-unsafe VAEs need the fp16-fix VAE)."""
        vae_dtype = next(self.vae.parameters()).dtype
        z = latents.to(vae_dtype) / self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift:
            z = z + shift
        return self.vae.decode(z).sample.clamp(-1, 1)


def load_components(
    pretrained: str,
    kind: str | None = None,
    dtype: str | torch.dtype = "fp32",
    vae: str | None = None,
    resolution: int | None = None,
    device: str | torch.device = "cpu",
) -> DiffusionComponents:
    """Load unet/vae/text encoders/tokenizers/scheduler from a local diffusers folder or a hub id.

    The scheduler is a ``DDIMScheduler`` built from the pipeline's scheduler config (SPO samples with DDIM).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    _check_model_path(pretrained)
    detected = detect_kind(pretrained)
    kind = kind or detected or "sd15"
    if kind not in _KINDS:
        raise ValueError(f"model kind must be one of {_KINDS}, got {kind!r}")
    if detected and detected != kind:
        raise ValueError(
            f"{pretrained} holds an {detected} pipeline, not {kind}: use --preset {detected} or model.kind={detected}"
        )
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", torch_dtype=torch_dtype)
    if vae:
        vae_model = AutoencoderKL.from_pretrained(vae, torch_dtype=torch_dtype)
    else:
        vae_model = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", torch_dtype=torch_dtype)
    tokenizers = [AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer")]
    encoders: list[nn.Module] = [
        CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", torch_dtype=torch_dtype)
    ]
    if kind == "sdxl":
        tokenizers.append(AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2"))
        encoders.append(
            CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder="text_encoder_2", torch_dtype=torch_dtype)
        )
    scheduler = DDIMScheduler.from_pretrained(pretrained, subfolder="scheduler")
    for m in (unet, vae_model, *encoders):
        m.requires_grad_(False)
        m.eval()
        m.to(device)
    if resolution is None:
        resolution = int(unet.config.sample_size) * 2 ** (len(vae_model.config.block_out_channels) - 1)
    return DiffusionComponents(unet, vae_model, encoders, tokenizers, scheduler, kind, resolution)


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch: ``embeds [b, L, D]``; SDXL adds ``pooled [b, P]`` and ``time_ids [b, 6]``."""

    embeds: Tensor
    pooled: Tensor | None = None
    time_ids: Tensor | None = None

    def __getitem__(self, idx: Tensor | slice) -> PromptEmbeds:
        return PromptEmbeds(
            self.embeds[idx],
            None if self.pooled is None else self.pooled[idx],
            None if self.time_ids is None else self.time_ids[idx],
        )

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PromptEmbeds:
        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return PromptEmbeds(cast(self.embeds), cast(self.pooled), cast(self.time_ids))

    @staticmethod
    def cat(items: Sequence[PromptEmbeds]) -> PromptEmbeds:
        def c(ts: list[Tensor | None]) -> Tensor | None:
            return None if ts[0] is None else torch.cat(ts)  # type: ignore[arg-type]

        return PromptEmbeds(
            torch.cat([i.embeds for i in items]), c([i.pooled for i in items]), c([i.time_ids for i in items])
        )


@dataclass
class PromptEncoder:
    """Encodes prompts with the frozen text encoder(s) once per prompt and caches the result (on CPU by default,
    so a 4k-prompt epoch does not re-run CLIP; the cache moves entries to the compute device on use)."""

    components: DiffusionComponents
    device: torch.device | str = "cpu"
    cache_device: torch.device | str = "cpu"
    _cache: dict[str, PromptEmbeds] = field(default_factory=dict)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        c = self.components
        hidden, pooled = [], None
        for tok, enc in zip(c.tokenizers, c.text_encoders):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)  # fmt: skip
            if c.kind == "sdxl":
                out = enc(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
                pooled = out[0] if out[0].ndim == 2 else pooled  # text_embeds of the projection model
            else:
                hidden.append(enc(ids)[0])
        embeds = torch.cat(hidden, dim=-1)
        time_ids = None
        if c.kind == "sdxl":
            r = c.resolution
            # (original size, crop top-left, target size): SDXL's micro-conditioning for an uncropped square image.
            time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=embeds.dtype, device=embeds.device).expand(
                len(prompts), 6
            )
        return PromptEmbeds(embeds, pooled, time_ids)

    def __call__(self, prompts: Sequence[str]) -> PromptEmbeds:
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            enc = self._encode(missing).to(self.cache_device)
            for i, p in enumerate(missing):
                self._cache[p] = enc[i : i + 1]
        return PromptEmbeds.cat([self._cache[p] for p in prompts]).to(self.device)

    def clear(self) -> None:
        self._cache.clear()


class CFGDenoiser:
    """``denoiser(latents, timesteps, cond) -> model_output`` with classifier-free guidance.

    One UNet call on the concatenated [uncond; cond] batch; ``guidance_scale <= 1`` skips the unconditional half.
    ``return_halves=True`` returns ``(uncond, cond)`` (for the fused loss that combines them itself).
    """

    def __init__(self, unet: nn.Module, uncond: PromptEmbeds, guidance_scale: float = 5.0) -> None:
        self.unet = unet
        self.uncond = uncond
        self.guidance_scale = float(guidance_scale)

    def unet_forward(self, latents: Tensor, timesteps: Tensor, cond: PromptEmbeds) -> Tensor:
        added = None
        if cond.pooled is not None:
            added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        dtype = next(self.unet.parameters()).dtype
        out = self.unet(
            latents.to(dtype), timesteps, encoder_hidden_states=cond.embeds.to(dtype), added_cond_kwargs=added
        ).sample
        return out.to(latents.dtype)

    def __call__(
        self, latents: Tensor, timesteps: Tensor, cond: PromptEmbeds, return_halves: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        b = latents.shape[0]
        t = timesteps.expand(b) if timesteps.ndim == 0 or timesteps.numel() == 1 else timesteps
        if self.guidance_scale <= 1.0 and not return_halves:
            return self.unet_forward(latents, t, cond)
        # Index on the embeddings' device: a CPU index into CUDA tensors is a blocking copy that breaks graph capture.
        uncond = self.uncond[torch.zeros(b, dtype=torch.long, device=self.uncond.embeds.device)].to(latents.device)
        both = PromptEmbeds.cat([uncond, cond])
        out = self.unet_forward(torch.cat([latents, latents]), torch.cat([t, t]), both)
        u, c = out.chunk(2)
        if return_halves:
            return u, c
        return u + self.guidance_scale * (c - u)


def add_lora(
    unet: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
    init: str = "gaussian",
) -> list[nn.Parameter]:
    """Attach a peft LoRA adapter (the official SPO setup: rank 4, alpha = rank, gaussian init); returns the
    trainable parameters (kept in fp32 so the optimizer state is fp32 even when the UNet is bf16/fp16)."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        init_lora_weights=init,
        target_modules=list(target_modules),
    )
    unet.add_adapter(cfg)
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"LoRA target modules {list(target_modules)} matched no layer of the UNet")
    for p in params:
        p.data = p.data.float()
    return params


# UNet -> (its adapters, its peft adapter layers), found once per UNet and adapter set.
_LORA_LAYERS: weakref.WeakKeyDictionary[nn.Module, tuple[list[tuple[str, Any]], list[nn.Module]]]
_LORA_LAYERS = weakref.WeakKeyDictionary()


class adapters_disabled:  # noqa: N801 (used as a context manager, like torch.no_grad)
    """Context manager: the UNet's LoRA adapters off (the frozen base model: SPO's reference), then back on.

    diffusers' ``unet.disable_adapters()`` / ``enable_adapters()`` walk every module of the UNet on each call (4 ms
    on the tiny bench UNet, twice per training micro-batch); here the adapter layers are found once per UNet (again
    when its adapters change) and toggled through peft's public ``BaseTunerLayer.enable_adapters``.
    """

    def __init__(self, unet: nn.Module) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        # Names and config objects: an adapter removed and added again under the same name gets a new config. The
        # cache holds the configs themselves (compared by identity), so a freed config's id cannot be reused.
        key = list((getattr(unet, "peft_config", None) or {}).items())
        if not key:
            raise ValueError("the UNet has no LoRA adapter to disable (add one with spo_fast.pipeline.add_lora)")
        cached = _LORA_LAYERS.get(unet)
        if (
            cached is None
            or len(cached[0]) != len(key)
            or any(n != m or c is not d for (n, c), (m, d) in zip(cached[0], key))
        ):
            cached = (key, [m for m in unet.modules() if isinstance(m, BaseTunerLayer)])
            _LORA_LAYERS[unet] = cached
        self.layers = cached[1]

    def __enter__(self) -> None:
        for m in self.layers:
            m.enable_adapters(False)

    def __exit__(self, *exc: Any) -> None:
        for m in self.layers:
            m.enable_adapters(True)


def lora_state_dict(unet: nn.Module) -> dict[str, Tensor]:
    """The UNet's LoRA weights keyed in the diffusers format (``unet.`` prefix added by ``save_lora``)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet: nn.Module, out_dir: str | os.PathLike, kind: str = "sd15") -> Path:
    """Write ``pytorch_lora_weights.safetensors`` loadable with ``pipeline.load_lora_weights(out_dir)``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe_cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    sd = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(unet).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe_cls.save_lora_weights(out, unet_lora_layers=sd, safe_serialization=True)
    return out / "pytorch_lora_weights.safetensors"
