"""Step-aware preference model (SPM): a CLIP whose vision tower is conditioned on the diffusion timestep.

Architecture (matched to the official SPO ``HFTimeConditionedCLIPModel`` and to the golden tiny model to 1e-6):

- ``t_embedder``: DiT timestep embedder. Sinusoid of 256 frequencies ``exp(-ln(10000) * i / 128)``, laid out
  ``[cos, sin]`` (cos first), then ``Linear(256, D) -> SiLU -> Linear(D, D)``.
- every vision encoder layer owns ``adaLN_modulation = Sequential(SiLU, Linear(D, 6D))`` whose output chunks are
  ``shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp``. Pre-LN DiT block:
  ``h = h + gate_msa * attn(modulate(ln1(h), shift_msa, scale_msa))`` and likewise for the MLP, with
  ``modulate(x, shift, scale) = x * (1 + scale) + shift`` broadcast over tokens.
- the vision tower owns ``adaLN_modulation = Sequential(SiLU, Linear(D, 2D))`` -> ``(shift, scale)`` applied to the
  post-layernormed CLS token before ``visual_projection``.
- the text tower is plain CLIP. Score = ``logit_scale.exp() * cosine(image_features(t), text_features)``.

The modules are attached to a stock ``transformers`` ``CLIPModel`` rather than subclassing it: that keeps the
official ``model.``-prefixed key names (``model.vision_model.encoder.layers.0.adaLN_modulation.1.weight``) and
sidesteps transformers-5 weight initialisation (``post_init`` and ``from_pretrained`` would otherwise re-initialise
or drop the layers CLIP does not know about).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "PAPER_BACKBONE",
    "PAPER_PROCESSOR",
    "StepAwarePreferenceModel",
    "TimestepEmbedder",
    "load_spm_state_dict",
    "make_tiny_step_aware_model",
    "modulate",
    "preprocess_images",
    "tiny_clip_config",
    "write_tiny_clip_tokenizer",
]

PAPER_BACKBONE = "yuvalkirstain/PickScore_v1"
PAPER_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREFIX = "model."
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """DiT adaLN: ``x [b, n, d] * (1 + scale [b, d]) + shift [b, d]`` broadcast over the token axis."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> ``[n, hidden]``: sinusoid (cos first, then sin) followed by a two-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period

    def sinusoid(self, t: Tensor) -> Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.frequency_embedding_size % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        w = self.mlp[0].weight
        return self.mlp(self.sinusoid(t).to(w.dtype))


def _adaln(dim: int, chunks: int) -> nn.Sequential:
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim))


def preprocess_images(
    images: Tensor,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Tensor:
    """Official SPM preprocessing of ``[-1, 1]`` images ``[n, 3, H, W]`` -> normalised ``[n, 3, size, size]`` float32.

    Bicubic resize (align_corners=False) so the short side becomes ``size`` (each side ``int(side * scale + 0.5)``),
    centre crop with ``top = round((H - size) / 2)`` (Python rounding, as torchvision's CenterCrop), map to [0, 1] by
    ``x / 2 + 0.5`` with a clamp, then normalise.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [n, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
    # Resize in float32: bicubic on half is unsupported on some CPU builds and the cost is negligible next to the ViT.
    x = images.float()
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False)
    if new_h != new_w:
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        x = x[..., top : top + size, left : left + size]
    x = (x / 2 + 0.5).clamp(0, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _clip_classes() -> tuple[type, type]:
    from transformers import CLIPConfig, CLIPModel

    return CLIPConfig, CLIPModel


def _is_local(path: str | os.PathLike) -> bool:
    return Path(path).expanduser().exists()


def _check_backbone_ref(backbone: str | os.PathLike) -> str:
    ref = os.fspath(backbone)
    if _is_local(ref):
        return str(Path(ref).expanduser())
    # Anything that is not shaped like "org/name" (absolute paths, ./relative, several slashes) must be local.
    if not _HUB_ID.match(ref):
        raise FileNotFoundError(
            f"CLIP backbone path {ref!r} does not exist. Pass a local folder holding a CLIP config.json "
            f"(and weights when no SPO checkpoint is given) or a hub id such as {PAPER_BACKBONE!r}."
        )
    return ref


def load_spm_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Reads an SPM checkpoint (``.bin``/``.pt``/``.pth`` torch state dict or ``.safetensors``) on the CPU."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"step-aware preference model checkpoint {str(p)!r} does not exist (expected a .bin or .safetensors "
            f"state dict with 'model.'-prefixed keys, as the official SPO checkpoints)"
        )
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(p), device="cpu")
    else:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise ValueError(f"{str(p)!r} does not hold a state dict (got {type(sd).__name__})")
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    return dict(sd)


def _name_keys(keys: Sequence[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _read_image_settings(processor: Any, default_size: int) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(short side, mean, std) from a processor object, an image-processor object or a ``preprocessor_config`` dict."""
    ip = getattr(processor, "image_processor", processor)
    if isinstance(ip, Mapping):
        size, mean, std = ip.get("size"), ip.get("image_mean"), ip.get("image_std")
    else:
        size, mean, std = getattr(ip, "size", None), getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
    if isinstance(size, Mapping):
        size = size.get("shortest_edge", size.get("height"))
    return (
        int(size) if size is not None else default_size,
        tuple(float(v) for v in (mean if mean is not None else CLIP_MEAN)),
        tuple(float(v) for v in (std if std is not None else CLIP_STD)),
    )


def _load_processor_parts(ref: str, required: bool, default_size: int) -> tuple[Any, int, tuple, tuple]:
    """Tokenizer and image settings from a folder or hub id.

    The image settings come straight from ``preprocessor_config.json`` so that no image-processor backend
    (torchvision for the transformers-5 fast processors) is needed for three numbers.
    """
    from transformers import AutoTokenizer
    from transformers.utils import cached_file

    def has(name: str) -> bool:
        try:
            return bool(cached_file(ref, name, _raise_exceptions_for_missing_entries=False))
        except OSError:
            return False

    tokenizer = None
    # transformers 5 builds an empty (2-token) tokenizer from a folder holding only config.json instead of failing,
    # so look for the vocabulary files first.
    try:
        if not (has("tokenizer.json") or has("vocab.json")):
            raise OSError("no tokenizer.json or vocab.json")
        tokenizer = AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError) as e:
        if required:
            raise OSError(f"could not load a CLIP tokenizer from processor {ref!r}: {e}") from e
        logger.warning(
            "no tokenizer found at %r; score(images, timesteps, prompts) needs one, pass processor=%r "
            "(the paper's) or any CLIP tokenizer folder",
            ref,
            PAPER_PROCESSOR,
        )
    size, mean, std = default_size, CLIP_MEAN, CLIP_STD
    if has("preprocessor_config.json"):
        cfg_file = cached_file(ref, "preprocessor_config.json")
        size, mean, std = _read_image_settings(json.loads(Path(cfg_file).read_text()), default_size)
    else:
        logger.info("no preprocessor_config.json at %r: image size %d and the CLIP mean/std", ref, default_size)
    return tokenizer, size, mean, std


class StepAwarePreferenceModel(nn.Module):
    """Time-conditioned CLIP preference model; ``model(images, timesteps, prompts) -> scores [n]``.

    ``self.model`` is a ``transformers.CLIPModel`` carrying the extra ``t_embedder`` and ``adaLN_modulation``
    modules, so ``state_dict()`` has exactly the official ``model.``-prefixed keys.

    Args:
        clip: the backbone; the adaLN layers are attached to it with the identity initialisation (zero weights,
            gates 1, see :meth:`reset_time_conditioning`), so the model equals plain CLIP at every timestep until
            SPM weights are loaded.
        tokenizer: a CLIP tokenizer (needed only to score prompt strings).
        image_size, image_mean, image_std: preprocessing; default the vision config's size and the CLIP mean/std.
        text_cache_size: how many prompts' text features are kept (least recently used are evicted).
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Any = None,
        image_size: int | None = None,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        text_cache_size: int = 8192,
    ) -> None:
        super().__init__()
        self.model = clip
        vcfg = clip.config.vision_config
        dim = vcfg.hidden_size
        device = next(clip.parameters()).device
        dtype = clip.visual_projection.weight.dtype
        # Built on the backbone's device: a meta backbone (checkpoint loading) then gets meta adaLN layers too.
        with torch.device(device):
            clip.t_embedder = TimestepEmbedder(dim).to(dtype)
            clip.vision_model.adaLN_modulation = _adaln(dim, 2).to(dtype)
            for layer in clip.vision_model.encoder.layers:
                layer.adaLN_modulation = _adaln(dim, 6).to(dtype)
        if device.type != "meta":
            self.reset_time_conditioning()
        self.tokenizer = tokenizer
        self.image_size = int(image_size or vcfg.image_size)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        if text_cache_size < 0:
            raise ValueError(f"text_cache_size must be >= 0, got {text_cache_size}")
        self.text_cache_size = int(text_cache_size)
        self._text_cache: OrderedDict[str, Tensor] = OrderedDict()

    # ------------------------------------------------------------------ construction

    @torch.no_grad()
    def reset_time_conditioning(self, std: float = 0.0, generator: torch.Generator | None = None) -> None:
        """Initialises the timestep embedder and every adaLN layer.

        ``std == 0`` is the identity initialisation the official code intends when starting from a plain CLIP:
        adaLN weights 0, shifts and scales 0, gates 1, so features equal plain CLIP's at any timestep. (The
        official constructor sets the whole bias to ones and then relies on transformers re-zeroing biases; the
        gates-at-one form is what makes the layer an identity.) ``t_embedder`` weights are N(0, 0.02), as DiT.
        ``std > 0`` draws every adaLN/t_embedder parameter from N(0, std) instead (random test models).
        """
        clip = self.model

        def normal_(p: Tensor, s: float) -> None:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype) * s)

        for lin in (clip.t_embedder.mlp[0], clip.t_embedder.mlp[2]):
            normal_(lin.weight, std or 0.02)
            if std:
                normal_(lin.bias, std)
            else:
                lin.bias.zero_()
        mods = [layer.adaLN_modulation[1] for layer in clip.vision_model.encoder.layers]
        mods.append(clip.vision_model.adaLN_modulation[1])
        for lin in mods:
            if std:
                normal_(lin.weight, std)
                normal_(lin.bias, std)
                continue
            lin.weight.zero_()
            lin.bias.zero_()
            if lin.out_features == 6 * lin.in_features:
                d = lin.in_features
                lin.bias[2 * d : 3 * d] = 1  # gate_msa
                lin.bias[5 * d :] = 1  # gate_mlp

    @classmethod
    def from_pretrained(
        cls,
        backbone: str | os.PathLike = PAPER_BACKBONE,
        checkpoint: str | os.PathLike | Mapping[str, Tensor] | None = None,
        processor: Any = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        text_cache_size: int = 8192,
    ) -> StepAwarePreferenceModel:
        """Builds the SPM on a CLIP backbone and loads an official checkpoint unchanged.

        Args:
            backbone: local folder or hub id of the CLIP the SPM was trained from (the paper: PickScore_v1). With a
                ``checkpoint`` only its ``config.json`` is read (the checkpoint holds every weight); without one the
                CLIP weights are loaded and the adaLN layers get the identity initialisation.
            checkpoint: official SPM state dict (``.bin``/``.safetensors`` path or a mapping), ``model.``-prefixed.
            processor: where the tokenizer and ``preprocessor_config.json`` come from: a folder or hub id (the paper:
                ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``), or a loaded ``CLIPProcessor``. ``None``: the backbone,
                falling back to the config's image size and the CLIP mean/std when it has none.
            dtype, device: where the model lives. Returned in eval mode with gradients off (SPO keeps it frozen).
        """
        CLIPConfig, CLIPModel = _clip_classes()
        ref = _check_backbone_ref(backbone)
        if checkpoint is not None:
            sd = checkpoint if isinstance(checkpoint, Mapping) else load_spm_state_dict(checkpoint)
            try:
                config = CLIPConfig.from_pretrained(ref)
            except OSError as e:
                raise OSError(f"could not read a CLIP config.json from backbone {ref!r}: {e}") from e
            # Meta construction: the checkpoint overwrites every parameter, so random-initialising a ViT-H first
            # would only cost time and memory.
            with torch.device("meta"):
                clip = CLIPModel(config)
            model = cls(clip, text_cache_size=text_cache_size)
            model.load_official_state_dict(sd, source=str(checkpoint) if not isinstance(checkpoint, Mapping) else "")
        else:
            try:
                clip = CLIPModel.from_pretrained(ref, dtype=torch.float32)
            except OSError as e:
                raise OSError(
                    f"could not load CLIP weights from backbone {ref!r} (neither a local folder with a CLIP model nor "
                    f"a reachable hub id): {e}"
                ) from e
            model = cls(clip, text_cache_size=text_cache_size)
            logger.info("no SPM checkpoint: adaLN layers start as the identity (plain CLIP at every timestep)")

        default_size = int(model.model.config.vision_config.image_size)
        if processor is None:
            tok, size, mean, std = _load_processor_parts(ref, required=False, default_size=default_size)
        elif isinstance(processor, (str, os.PathLike)):
            pref = os.fspath(processor)
            if not _is_local(pref) and not _HUB_ID.match(pref):
                raise FileNotFoundError(f"processor path {pref!r} does not exist (or pass a hub id)")
            tok, size, mean, std = _load_processor_parts(pref, required=True, default_size=default_size)
        else:
            tok = getattr(processor, "tokenizer", None)
            size, mean, std = _read_image_settings(processor, default_size)
        model.tokenizer = tok
        model.image_size, model.image_mean, model.image_std = size, mean, std
        model.to(device=device, dtype=dtype)
        model.eval().requires_grad_(False)
        return model

    @torch.no_grad()
    def load_official_state_dict(self, state_dict: Mapping[str, Tensor], source: str = "") -> None:
        """Loads an official SPM state dict, strictly: names missing/unexpected keys and mismatching shapes.

        Keys without the ``model.`` prefix are accepted when none has it. Stale copies of non-persistent buffers
        (``position_ids``, saved by older transformers) are accepted when they hold the expected values.
        """
        where = f" in {source!r}" if source else ""
        sd = dict(state_dict)
        if sd and not any(k.startswith(PREFIX) for k in sd):
            sd = {PREFIX + k: v for k, v in sd.items()}
        expected = self.state_dict()
        buffers = {f"{PREFIX}{n}" for n, _ in self.model.named_buffers()}
        unexpected = [k for k in sd if k not in expected and k not in buffers]
        missing = [k for k in expected if k not in sd]
        if missing or unexpected:
            msg = [f"SPM checkpoint{where} does not match the step-aware preference model:"]
            if missing:
                msg.append(f"missing keys ({len(missing)}): {_name_keys(missing)}")
            if unexpected:
                msg.append(f"unexpected keys ({len(unexpected)}): {_name_keys(unexpected)}")
            msg.append(
                "Pass an official SPO step-aware preference model checkpoint (state dict keyed "
                "'model.vision_model.encoder.layers.N.adaLN_modulation.1.weight', 'model.t_embedder.mlp.0.weight', "
                "...); a plain CLIP goes to backbone= without checkpoint=."
            )
            raise KeyError("\n".join(msg))
        bad = [
            f"{k}: checkpoint {tuple(sd[k].shape)} vs backbone {tuple(v.shape)}"
            for k, v in expected.items()
            if tuple(sd[k].shape) != tuple(v.shape)
        ]
        if bad:
            raise ValueError(
                f"SPM checkpoint{where} was trained on a CLIP of another size than the backbone config "
                f"({len(bad)} tensors differ): "
                + "; ".join(bad[:6])
                + ("; ..." if len(bad) > 6 else "")
                + f". Pass the backbone the SPM was trained from (the paper's: {PAPER_BACKBONE!r})."
            )
        for k in [k for k in sd if k in buffers and k not in expected]:
            buf = self.model.get_buffer(k[len(PREFIX) :])
            if buf.device.type != "meta" and not torch.equal(sd[k].to(buf.dtype), buf.cpu()):
                raise ValueError(f"checkpoint buffer {k}{where} differs from the model's own {k}")
            del sd[k]
        meta = any(p.device.type == "meta" for p in self.model.parameters())
        self.load_state_dict(sd, strict=True, assign=meta)
        if meta:
            self._materialise_buffers()
        self.clear_text_cache()

    def _materialise_buffers(self) -> None:
        # Non-persistent buffers are not in checkpoints; after a meta construction rebuild them as CLIP does.
        for module in self.model.modules():
            pos = getattr(module, "position_ids", None)
            if isinstance(pos, Tensor) and pos.device.type == "meta":
                module.register_buffer("position_ids", torch.arange(pos.shape[-1]).expand((1, -1)), persistent=False)
        left = [n for n, t in self.named_buffers() if t.device.type == "meta"]
        left += [n for n, t in self.named_parameters() if t.device.type == "meta"]
        if left:
            raise RuntimeError(f"tensors left uninitialised after loading the checkpoint: {_name_keys(left)}")

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Writes the state dict in the official format (``model.``-prefixed keys); ``.safetensors`` or torch."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if p.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(p))
        else:
            torch.save(sd, str(p))
        return p

    # ------------------------------------------------------------------ features

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale

    def timestep_embedding(self, timesteps: Tensor | float | int, n: int, dtype: torch.dtype) -> Tensor:
        t = torch.as_tensor(timesteps, device=self.logit_scale.device)
        if t.ndim == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"timesteps must be a scalar or have shape [{n}] (one per image), got {tuple(t.shape)}")
        # As the official code: timesteps are cast to the pixel dtype before the float32 sinusoid.
        return self.model.t_embedder(t.to(dtype))

    def image_features(self, pixel_values: Tensor, timesteps: Tensor | float | int) -> Tensor:
        """Projected, unnormalised image features ``[n, proj]`` of preprocessed ``pixel_values`` at ``timesteps``."""
        clip = self.model
        vm = clip.vision_model
        w = vm.embeddings.patch_embedding.weight
        pixel_values = pixel_values.to(w.device, w.dtype)
        t_emb = self.timestep_embedding(timesteps, pixel_values.shape[0], pixel_values.dtype)
        h = vm.pre_layrnorm(vm.embeddings(pixel_values))
        for layer in vm.encoder.layers:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = layer.adaLN_modulation(t_emb).chunk(6, 1)
            a, _ = layer.self_attn(hidden_states=modulate(layer.layer_norm1(h), shift_msa, scale_msa))
            h = h + gate_msa.unsqueeze(1) * a
            h = h + gate_mlp.unsqueeze(1) * layer.mlp(modulate(layer.layer_norm2(h), shift_mlp, scale_mlp))
        pooled = vm.post_layernorm(h[:, 0])
        shift, scale = vm.adaLN_modulation(t_emb).chunk(2, dim=1)
        return clip.visual_projection(pooled * (1 + scale) + shift)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Projected, unnormalised text features ``[n, proj]`` (plain CLIP text tower)."""
        out = self.model.text_model(
            input_ids=input_ids.to(self.logit_scale.device), attention_mask=attention_mask, return_dict=True
        )
        return self.model.text_projection(out.pooler_output)

    def preprocess(self, images: Tensor) -> Tensor:
        """``[-1, 1]`` images of any size -> normalised model inputs (see :func:`preprocess_images`)."""
        return preprocess_images(images, self.image_size, self.image_mean, self.image_std)

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        if self.tokenizer is None:
            raise RuntimeError(
                "this StepAwarePreferenceModel has no tokenizer: pass processor= to from_pretrained (the paper's is "
                f"{PAPER_PROCESSOR!r}) or set model.tokenizer, or score token ids with score_input_ids()"
            )
        max_len = min(int(self.tokenizer.model_max_length), int(self.model.config.text_config.max_position_embeddings))
        # As the official prompt dataset: pad to max length, truncate, no attention mask (CLIP's text tower is causal
        # and pools at the EOS token, so padding after it cannot change the features).
        return self.tokenizer(
            list(prompts), max_length=max_len, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids

    # ------------------------------------------------------------------ text cache

    def clear_text_cache(self) -> None:
        """Drops cached prompt features (call after changing the text tower's weights)."""
        self._text_cache.clear()

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised text features ``[n, proj]``; each distinct prompt runs the text tower once, then is cached."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not a single string")
        cache = self._text_cache
        todo = list(dict.fromkeys(p for p in prompts if p not in cache))
        fresh: dict[str, Tensor] = {}
        if todo:
            feats = F.normalize(self.text_features(self.tokenize(todo)).float(), dim=-1)
            fresh = dict(zip(todo, feats))
        out = []
        for p in prompts:
            f = fresh.get(p)
            if f is None:
                f = cache[p]
                cache.move_to_end(p)
            out.append(f)
        if self.text_cache_size:
            for p, f in fresh.items():
                cache[p] = f
            while len(cache) > self.text_cache_size:
                cache.popitem(last=False)
        return torch.stack(out)

    # ------------------------------------------------------------------ scores

    def _score(self, images: Tensor, timesteps: Tensor | float | int, text: Tensor) -> Tensor:
        img = F.normalize(self.image_features(self.preprocess(images), timesteps).float(), dim=-1)
        return self.logit_scale.exp().float() * (img * text.to(img.device)).sum(dim=-1)

    def score_input_ids(self, images: Tensor, timesteps: Tensor | float | int, input_ids: Tensor) -> Tensor:
        """The official ``get_preference_score(images, input_ids, timesteps)``: float32 scores ``[n]``, no caching."""
        text = F.normalize(self.text_features(input_ids).float(), dim=-1)
        return self._score(images, timesteps, text)

    def score(self, images: Tensor, timesteps: Tensor | float | int, prompts: Sequence[str]) -> Tensor:
        """Preference scores ``[n]`` (float32) of ``[-1, 1]`` images ``[n, 3, H, W]`` at ``timesteps`` for ``prompts``.

        ``logit_scale.exp() * cosine(image features at the timestep, text features)``; text features are cached.
        """
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
        return self._score(images, timesteps, self.encode_prompts(prompts))

    def forward(self, images: Tensor, timesteps: Tensor | float | int, prompts: Sequence[str]) -> Tensor:
        """Same as :meth:`score`, so the instance is the ``image_scorer(images, timesteps, prompts)`` of the sampler."""
        return self.score(images, timesteps, prompts)


# ---------------------------------------------------------------------- tiny models for tests


def tiny_clip_config(vocab_size: int = 99, eos_token_id: int | None = None, **overrides: Any) -> Any:
    """A CLIPConfig with the golden tiny model's sizes (32-wide, 2 layers, 32 px images, 8 px patches)."""
    CLIPConfig, _ = _clip_classes()
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=16,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
    )
    if eos_token_id is not None:
        text.update(eos_token_id=eos_token_id, bos_token_id=eos_token_id - 1, pad_token_id=eos_token_id)
    vision = dict(
        hidden_size=32, image_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, patch_size=8
    )
    text.update(overrides.pop("text_config", {}))
    vision.update(overrides.pop("vision_config", {}))
    kw = dict(projection_dim=16, logit_scale_init_value=2.6592)
    kw.update(overrides)
    return CLIPConfig(text_config=text, vision_config=vision, **kw)


def write_tiny_clip_tokenizer(folder: str | os.PathLike, model_max_length: int = 16) -> Any:
    """Saves a tiny CLIP BPE tokenizer (lower-case letters, digits, a little punctuation) to ``folder``.

    Returns the tokenizer; ``len(tokenizer)`` is its vocabulary size. Characters outside the vocabulary map to
    ``<|endoftext|>`` (CLIP's unk token), so keep test prompts to ``[a-z0-9 ,.!?'-]``.
    """
    from transformers import CLIPTokenizer

    symbols = list("abcdefghijklmnopqrstuvwxyz0123456789,.!?'-")
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    merges = [("a", "t</w>"), ("c", "at</w>"), ("o", "g</w>"), ("d", "og</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tok.save_pretrained(str(folder))
    return tok


def make_tiny_step_aware_model(
    folder: str | os.PathLike, seed: int = 0, adaln_std: float = 0.05, checkpoint_name: str = "spm.bin"
) -> tuple[Path, Path]:
    """Writes a tiny random SPM for CPU tests: a CLIP backbone folder and an official-format checkpoint.

    ``folder/backbone`` gets the CLIP config and weights, a tiny tokenizer and a ``preprocessor_config.json`` (so
    it also serves as ``processor``); ``folder/checkpoint_name`` the SPM state dict with random, time-dependent
    adaLN/t_embedder weights drawn from N(0, adaln_std). Returns ``(backbone_dir, checkpoint_path)``; load with
    ``StepAwarePreferenceModel.from_pretrained(backbone_dir, checkpoint_path)``.
    """
    _, CLIPModel = _clip_classes()
    folder = Path(folder)
    backbone = folder / "backbone"
    backbone.mkdir(parents=True, exist_ok=True)
    tok = write_tiny_clip_tokenizer(backbone)
    torch.manual_seed(seed)
    config = tiny_clip_config(vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    clip = CLIPModel(config)
    clip.save_pretrained(str(backbone))
    (backbone / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "size": {"shortest_edge": config.vision_config.image_size},
                "crop_size": {"height": config.vision_config.image_size, "width": config.vision_config.image_size},
                "image_mean": list(CLIP_MEAN),
                "image_std": list(CLIP_STD),
            },
            indent=2,
        )
    )
    spm = StepAwarePreferenceModel(clip, tokenizer=tok)
    spm.reset_time_conditioning(std=adaln_std, generator=torch.Generator().manual_seed(seed))
    return backbone, spm.save_checkpoint(folder / checkpoint_name)
