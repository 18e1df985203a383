"""The noisy-latent preference head: scores SPO pool candidates (noisy latent x_t, timestep t, prompt) directly, so
the sampler needs neither the VAE decoder nor the image preference model, nor a UNet pass on every candidate
(DESIGN.md section 3, point 3).

Encoders (``HeadArchConfig.encoder``):

* ``direction`` (the default): a pool-level head. From the pool mean, the parent's x0 estimate (free: the sampler
  made the pool's mean from it), the timestep and the prompt, a small adaLN conv net predicts a latent-shaped
  direction ``g``, and candidate i scores ``<g, x_i - mean>`` (:func:`direction_scores`). It is trained to be the
  teacher's gradient at the pool mean (:func:`direction_distillation_loss`; the target comes from the teacher
  through the lookahead jumps, the decoder and the image scorer, :func:`collect_pools` with ``gradients=True``).
  Why: the candidates of one pool differ only by sigma_t times noise, so the teacher's score differences are,
  to first order, ``<grad, x_i - x_j>``. On the toy world that first-order oracle orders 93% of the teacher's
  valid best/worst pairs correctly, while heads that embed each candidate on its own (below) reach ~57%: the
  differences they must resolve are tiny against the features they share. The conv net runs on the b pool means,
  not the k*b candidates. With ``potential`` (``train_head``'s default; ``--model.potential false`` for a free
  output) ``g`` is the latent gradient of a learned scalar potential, a conservative field as the teacher's gradient
  is; such a head then scores each candidate by the potential itself (``score_rule``, :meth:`potential_values`:
  k*b rows of the small net), which keeps the curvature the first-order rule drops (+1.4 points on 6144 held-out
  toy-world pools, +2.4 in the noisiest bucket).
* ``latent``: a small trainable conv encoder per candidate; every residual block is adaLN-modulated by the
  timestep (sinusoidal(256) -> MLP -> shift, scale, gate), as in the step-aware preference model's vision layers.
* ``unet``: the frozen base UNet's own conv_in, time embedding, down blocks and mid block (LoRA adapters
  disabled: the reference model), with a trainable adaLN-modulated block on top (LPO-like; no new large weights,
  but the cost of half a UNet per candidate). Its checkpoint holds only the small trainable part.

The per-candidate encoders end in the step-aware model's tail::

    F [n, W, h', w'] --pyramid average pooling (1x1, 2x2, 4x4 cells)--> p [n, cells * W]
    y = proj(p)                       [n, D]
    e = text_proj(mean over tokens of the cached prompt embeddings)   [b, D]   (once per prompt batch)
    score = exp(logit_scale) * cos(y, e[prompt_index])

That tail (pooling -> projection -> cosine -> scale) is :func:`score_tail`: one fused Triton launch on GPUs
(``spo_fast.kernels.head_score``), the PyTorch reference :func:`score_tail_ref` elsewhere. The direction head's
tail (centre each pool's candidates, project them on the pool's direction) is :func:`direction_scores`: one fused
Triton launch on GPUs (``spo_fast.kernels.direction_score``), :func:`direction_scores_ref` elsewhere.

The per-candidate encoders are trained with a pairwise ranking loss over each pool: for candidates i, j of one pool,
the head's pair probability ``sigmoid(h_i - h_j)`` is fitted by cross-entropy to the teacher's
``sigmoid(s_i - s_j)``. Those are exactly the softmax probabilities whose difference SPO's threshold rule reads
(``softmax([s_w, s_l])`` = (sigmoid(s_w - s_l), sigmoid(s_l - s_w))), so the head learns the teacher's margins,
not only its order, and the same ``threshold`` selects pairs in head mode. (The same loss on the direction head
alone stays at chance on the toy world; ``train.rank_weight`` adds it to gradient distillation.)

Status: on the toy world the trained direction head agrees with the teacher on up to 82.9% of held-out valid pairs
(target 85% per timestep bucket; a potential head scoring by value, 1536 recorded passes, a 6144-pool held-out set;
92.4 / 85.8 / 75.8% in (0,250] / (250,500] / (500,750]), and SPO driven by its labels alone does not learn: the
policy's pools drift away from the base model's, where the head was distilled. Two ways out: the sampler's verified
mode (the head proposes each pool's pair, the teacher orders it: ``PoolSampler(verify_head=True)``), and
:class:`RefreshingHeadScorer` (the head keeps distilling the teacher's gradient on the policy's own pools during SPO).
Either can be gated by timestep (``PoolSampler(head_max_timestep=)``, ``preference.head_max_timestep``): the teacher
keeps the noisiest steps, where the head is least accurate. README, "Noisy-latent preference head".
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "HeadArchConfig",
    "NoisyLatentPreferenceHead",
    "HeadScorer",
    "RefreshingHeadScorer",
    "HeadMismatchError",
    "audit_counts",
    "audit_summary",
    "score_tail",
    "score_tail_ref",
    "direction_scores",
    "direction_scores_ref",
    "direction_distillation_loss",
    "pyramid_pool_matrix",
    "pool_ranking_loss",
    "pairwise_agreement",
    "pool_directions",
    "scheduler_signature",
    "save_head",
    "load_head",
    "TRAIN_HEAD_COMMAND",
    "HEAD_VERSION",
]

HEAD_VERSION = 1
ENCODERS = ("direction", "latent", "unet")
SCORE_RULES = ("auto", "gradient", "value")
TRAIN_HEAD_COMMAND = "python -m spo_fast.train_head --model.pretrained {pretrained} --log.output_dir {out}"
TAIL_IMPL_ENV = "SPO_FAST_HEAD_IMPL"


class HeadMismatchError(ValueError):
    """A head checkpoint that does not fit the base model or scheduler it is used with."""


# ------------------------------------------------------------------------------------------------ the fused tail


def pyramid_pool_matrix(h: int, w: int, levels: Sequence[int], device=None, dtype=torch.float32) -> Tensor:
    """``[cells, h * w]`` averaging weights: row ``cell`` of level g (a g x g grid) averages its h/g x w/g block.
    Pooling is linear, so the fused kernel applies it as a small matrix and never materialises pooled maps."""
    rows = []
    for g in levels:
        if h % g or w % g:
            raise ValueError(f"feature map {h}x{w} is not divisible by the pyramid level {g}: use levels dividing it")
        bh, bw = h // g, w // g
        for a in range(g):
            for b in range(g):
                m = torch.zeros(h, w, dtype=dtype)
                m[a * bh : (a + 1) * bh, b * bw : (b + 1) * bw] = 1.0 / (bh * bw)
                rows.append(m.flatten())
    return torch.stack(rows).to(device)


def score_tail_ref(
    features: Tensor,
    pool: Tensor,
    weight: Tensor,
    bias: Tensor,
    text: Tensor,
    text_index: Tensor,
    logit_scale: Tensor,
    eps: float = 1e-6,
) -> Tensor:
    """Reference of the fused tail. ``features [n, W, h, w]``, ``pool [cells, h*w]`` (:func:`pyramid_pool_matrix`),
    ``weight [D, cells * W]`` indexed cell-major (column ``cell * W + c``), ``bias [D]``, ``text [m, D]`` (any norm),
    ``text_index [n]`` (row of ``text`` per candidate), ``logit_scale`` a 0-d tensor. Returns ``[n]`` float32:
    ``exp(logit_scale) * cos(weight @ pooled + bias, text[text_index])``. Accumulates in fp32."""
    n, c = features.shape[:2]
    f = features.float().reshape(n, c, -1)
    pooled = torch.einsum("nch,kh->nkc", f, pool.float()).reshape(n, -1)  # cell-major, as the weight's columns
    y = pooled @ weight.float().t() + bias.float()
    t = text.float()[text_index]
    cos = (y * t).sum(-1) / (y.norm(dim=-1).clamp_min(eps) * t.norm(dim=-1).clamp_min(eps))
    return logit_scale.float().exp() * cos


def tail_impl() -> str:
    """``SPO_FAST_HEAD_IMPL``: ``auto`` (Triton on CUDA, else the reference), ``triton`` or ``torch``."""
    v = os.environ.get(TAIL_IMPL_ENV, "auto").strip().lower() or "auto"
    if v not in ("auto", "triton", "torch"):
        raise ValueError(f"{TAIL_IMPL_ENV} must be auto, triton or torch, got {v!r}")
    return v


def _fused_kernel(module: str, name: str, on_cuda: bool) -> Any:
    """The fused kernel ``spo_fast.kernels.<module>.<name>`` when ``SPO_FAST_HEAD_IMPL`` asks for it (``triton``; or
    ``auto`` with CUDA inputs) and Triton imports, else None (the caller runs its PyTorch reference). With ``triton``
    a failed import is an error rather than a silent fallback."""
    impl = tail_impl()
    if not (impl == "triton" or (impl == "auto" and on_cuda)):
        return None
    try:
        return getattr(importlib.import_module(f".kernels.{module}", __package__), name)
    except ImportError as e:
        if impl == "triton":
            raise
        logger.info("the fused kernel %s is unavailable (%s): using the PyTorch reference", module, e)
        return None


def score_tail(
    features: Tensor,
    pool: Tensor,
    weight: Tensor,
    bias: Tensor,
    text: Tensor,
    text_index: Tensor,
    logit_scale: Tensor,
) -> Tensor:
    """The head's scoring tail (see :func:`score_tail_ref`): the fused Triton kernel on CUDA tensors when Triton is
    importable (or ``SPO_FAST_HEAD_IMPL=triton``), the PyTorch reference otherwise. Same values, same gradients."""
    fn = _fused_kernel("head_score", "head_score_fused", features.is_cuda) or score_tail_ref
    return fn(features, pool, weight, bias, text, text_index, logit_scale)


def direction_scores_ref(candidates: Tensor, direction: Tensor) -> Tensor:
    """Reference of the direction head's tail: ``[k, b]`` scores ``<g_j, x_ij - mean_i x_ij>`` of
    ``candidates [k, b, C, h, w]`` along ``direction [b, C, h, w]``, in fp32. Centering changes no score difference
    (so no pair and no margin); it makes the scores of a pool sum to zero."""
    x = candidates.float()
    return torch.einsum("kbchw,bchw->kb", x - x.mean(0, keepdim=True), direction.float())


def direction_scores(candidates: Tensor, direction: Tensor) -> Tensor:
    """The direction head's tail (see :func:`direction_scores_ref`): the fused Triton kernel
    (``spo_fast.kernels.direction_score``: one streaming pass over the candidates, centring in registers) on CUDA
    tensors when Triton is importable (or ``SPO_FAST_HEAD_IMPL=triton``), the PyTorch reference otherwise. Same
    values, same gradients."""
    fn = _fused_kernel("direction_score", "direction_score_fused", candidates.is_cuda) or direction_scores_ref
    return fn(candidates, direction)


# ------------------------------------------------------------------------------------------------ modules


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep features (the DiT / step-aware model's ``t_embedder`` input)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class AdaLNResBlock(nn.Module):
    """GroupNorm without affine -> (1 + scale(t)) * . + shift(t) -> SiLU -> conv3x3 -> gate(t) * . + residual.
    The modulation starts at zero (shift = scale = gate = 0), so a fresh block is the identity."""

    def __init__(self, width: int, cond_dim: int, groups: int = 8) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(min(groups, width), width, affine=False)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.mod = nn.Linear(cond_dim, 3 * width)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale, gate = self.mod(c)[:, :, None, None].chunk(3, dim=1)
        h = self.norm(x) * (1 + scale) + shift
        return x + (1 + gate) * self.conv(F.silu(h))


@dataclass
class HeadArchConfig:
    """Architecture of a head plus the signature of the base model and scheduler it was trained for."""

    encoder: str = "direction"  # direction | latent | unet
    latent_channels: int = 4
    text_dim: int = 768
    width: int = 64
    depth: int = 4
    downsample: int = 0  # stride-2 stages of the latent encoder (SD1.5 64x64 latents: 2 -> 16x16)
    embed_dim: int = 128
    levels: list = field(default_factory=lambda: [1, 2, 4])
    # direction encoder: the direction is the latent gradient of a learned scalar potential (a conservative field,
    # as the teacher's gradient is) instead of a free latent-shaped output
    potential: bool = False
    # how a direction head scores a pool's candidates: "gradient" (first order, <g(mean), x_i - mean>), "value"
    # (a potential head's own scalar at each candidate, phi(x_i) - mean_j phi(x_j)), "auto" (value for a potential
    # head, gradient otherwise)
    score_rule: str = "auto"
    scheduler: dict = field(default_factory=dict)  # scheduler_signature() of the base model's scheduler
    base_model: str = ""

    def validate(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"head encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        if self.potential and self.encoder != "direction":
            raise ValueError(
                f"a potential head is a 'direction' head (its direction is a gradient), got {self.encoder!r}"
            )
        if self.score_rule not in SCORE_RULES:
            raise ValueError(f"head score_rule must be one of {', '.join(SCORE_RULES)}, got {self.score_rule!r}")
        if self.score_rule == "value" and not self.potential:
            raise ValueError(
                "score_rule 'value' needs a potential head (a scalar to evaluate at each candidate): train one with "
                "--model.potential true, or use score_rule 'gradient'"
            )
        for k in ("latent_channels", "text_dim", "width", "depth", "embed_dim"):
            if getattr(self, k) < 1:
                raise ValueError(f"head {k} must be >= 1, got {getattr(self, k)}")


def scheduler_signature(scheduler: Any) -> dict[str, Any]:
    """The noise-schedule fields a head depends on (it reads x_t, whose statistics they define)."""
    c = scheduler.config
    return {
        "num_train_timesteps": int(c.num_train_timesteps),
        "beta_start": float(c.beta_start),
        "beta_end": float(c.beta_end),
        "beta_schedule": str(c.beta_schedule),
        "prediction_type": str(c.prediction_type),
        "rescale_betas_zero_snr": bool(getattr(c, "rescale_betas_zero_snr", False)),
    }


class NoisyLatentPreferenceHead(nn.Module):
    """Scores noisy latents: ``head(latents [n, C, h, w], timesteps [n], text_features [m, D], text_index [n])``.
    Text features come from :meth:`text_features` (once per prompt batch). See the module docstring."""

    def __init__(self, config: HeadArchConfig, unet: nn.Module | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        w = config.width
        self.t_embedder = nn.Sequential(nn.Linear(256, w), nn.SiLU(), nn.Linear(w, w))
        if config.encoder == "unet":
            if unet is None:
                raise ValueError("the 'unet' head encoder needs the base UNet (pass unet=components.unet)")
            # Held outside the module tree: the frozen base weights are not the head's parameters, and must not be
            # saved in (or loaded from) the head checkpoint.
            self._unet = [unet]
            feat = int(unet.config.block_out_channels[-1])
            self.adapt = nn.Conv2d(feat, w, 1)
            self.blocks = nn.ModuleList([AdaLNResBlock(w, w) for _ in range(max(1, config.depth // 2))])
        elif config.encoder == "direction":
            self._unet = []
            c = config.latent_channels
            # Input: the pool mean and the parent's x0 estimate (both [C, h, w]); output: a latent-shaped direction.
            self.conv_in = nn.Conv2d(2 * c, w, 3, padding=1)
            self.blocks = nn.ModuleList([AdaLNResBlock(w, w) for _ in range(config.depth)])
            if config.potential:
                # A per-position scalar, summed: the potential whose latent gradient is the direction.
                self.potential_out = nn.Sequential(nn.Conv2d(w, w, 1), nn.SiLU(), nn.Conv2d(w, 1, 1))
            else:
                self.conv_out = nn.Conv2d(w, c, 3, padding=1)
            self.text_proj = nn.Sequential(nn.Linear(config.text_dim, w), nn.SiLU(), nn.Linear(w, w))
            self._pool_cache = {}
            return
        else:
            self._unet = []
            self.conv_in = nn.Conv2d(config.latent_channels, w, 3, padding=1)
            self.blocks = nn.ModuleList([AdaLNResBlock(w, w) for _ in range(config.depth)])
            self.down = nn.ModuleList([nn.Conv2d(w, w, 3, stride=2, padding=1) for _ in range(config.downsample)])
        cells = sum(g * g for g in config.levels)
        self.proj = nn.Linear(cells * w, config.embed_dim)
        self.text_proj = nn.Sequential(
            nn.Linear(config.text_dim, config.embed_dim), nn.SiLU(), nn.Linear(config.embed_dim, config.embed_dim)
        )
        # CLIP's initial temperature; the teacher's logits (the toy scorer: 10 x a [0, 1] score) need ~10.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self._pool_cache: dict[tuple, Tensor] = {}

    # -- text
    def text_features(self, embeds: Tensor, pooled: Tensor | None = None) -> Tensor:
        """``[b, D]`` from the pipeline's cached prompt embeddings ``[b, L, text_dim]`` (mean over tokens: with
        CLIP's causal attention later positions, padding included, summarise the whole prompt)."""
        if embeds.shape[-1] != self.config.text_dim:
            raise HeadMismatchError(
                f"prompt embeddings have width {embeds.shape[-1]} but the head was trained for text width "
                f"{self.config.text_dim} (base model {self.config.base_model or '?'})"
            )
        return self.text_proj(embeds.float().mean(1))

    # -- image
    def _unet_features(self, x: Tensor, t: Tensor, cond_embeds: Tensor) -> Tensor:
        unet = self._unet[0]
        ctx = nullcontext()
        if getattr(unet, "_hf_peft_config_loaded", False):
            from .pipeline import adapters_disabled

            ctx = adapters_disabled(unet)
        dtype = next(unet.parameters()).dtype
        with ctx, torch.no_grad():
            emb = unet.time_embedding(unet.time_proj(t).to(dtype))
            h = unet.conv_in(x.to(dtype))
            c = cond_embeds.to(dtype)
            for block in unet.down_blocks:
                if getattr(block, "has_cross_attention", False):
                    h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=c)
                else:
                    h, _ = block(hidden_states=h, temb=emb)
            h = unet.mid_block(h, emb, encoder_hidden_states=c)
        return h.float()

    def image_features(self, latents: Tensor, timesteps: Tensor, cond_embeds: Tensor | None = None) -> Tensor:
        """Feature map ``[n, width, h', w']`` fed to the tail."""
        if latents.shape[1] != self.config.latent_channels:
            raise HeadMismatchError(
                f"latents have {latents.shape[1]} channels but the head was trained for {self.config.latent_channels} "
                f"latent channels (base model {self.config.base_model or '?'})"
            )
        c = self.t_embedder(timestep_embedding(timesteps.to(latents.device)))
        if self.config.encoder == "unet":
            if cond_embeds is None:
                raise ValueError("the 'unet' head encoder needs the prompt embeddings of every candidate")
            h = self.adapt(self._unet_features(latents, timesteps, cond_embeds))
            for blk in self.blocks:
                h = blk(h, c)
            return h
        h = self.conv_in(latents.float())
        per = max(1, len(self.blocks) // (len(self.down) + 1))
        for i, blk in enumerate(self.blocks):
            h = blk(h, c)
            j = (i + 1) // per - 1
            if (i + 1) % per == 0 and j < len(self.down):
                h = self.down[j](h)
        return h

    def direction(self, mean: Tensor, parent_x0: Tensor, timesteps: Tensor, text: Tensor) -> Tensor:
        """The direction encoder: ``g [b, C, h, w]`` from the pool mean ``[b, C, h, w]``, the parent's x0 estimate,
        the pools' timesteps ``[b]`` and text features ``[b, width]`` (rows of :meth:`text_features`). It is trained
        to be the teacher's gradient at the pool mean (see :func:`direction_distillation_loss`), so a candidate's
        score is the teacher's first-order change from the mean: ``<g, x_i - mean>``."""
        if self.config.encoder != "direction":
            raise ValueError(f"direction() needs a 'direction' head, this one is {self.config.encoder!r}")
        c = self.config.latent_channels
        if mean.shape[1] != c or parent_x0.shape != mean.shape:
            raise HeadMismatchError(
                f"latents have {mean.shape[1]} channels (parent x0 {tuple(parent_x0.shape)}) but the head was trained "
                f"for {c} latent channels (base model {self.config.base_model or '?'})"
            )
        cond = self.t_embedder(timestep_embedding(timesteps.to(mean.device))) + text
        if self.config.potential:
            return self._potential_gradient(mean, parent_x0, cond)
        h = self.conv_in(torch.cat([mean.float(), parent_x0.float()], 1))
        for blk in self.blocks:
            h = blk(h, cond)
        return self.conv_out(F.silu(h))

    def _potential_gradient(self, mean: Tensor, parent_x0: Tensor, cond: Tensor) -> Tensor:
        """``d phi / d mean`` of the potential ``phi = sum over positions of potential_out(features)``. Why: the
        teacher's gradient is the gradient of a score, so its field is conservative; a free latent-shaped output can
        be any field, this one cannot. On the toy world, same data and steps, three seeds: held-out agreement 81.1 ->
        83.3%, (500,750] 75.5 -> 79.9% (``bench/results/cpu/head_input_ablation.json``, ``potential_2026_12_05``), on
        the small held-out set; on an 8x larger one two such heads are level with a free one
        (``head_heldout_6144.json``).
        Training (grad enabled) keeps the graph of the gradient (double backward, ~3x the step time); scoring under
        ``no_grad`` does not, and costs a backward of the small net on the b pool means."""
        train = torch.is_grad_enabled()
        with torch.enable_grad():
            m = mean.float()
            if not m.requires_grad:  # a caller differentiating in the mean keeps its graph
                m = m.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self._phi(m, parent_x0, cond).sum(), m, create_graph=train)
        return g if train else g.detach()

    def _phi(self, x: Tensor, parent_x0: Tensor, cond: Tensor) -> Tensor:
        """The potential ``[n]`` of latents ``x [n, C, h, w]`` (``parent_x0 [n, ...]``, ``cond [n, width]``)."""
        h = self.conv_in(torch.cat([x.float(), parent_x0.float()], 1))
        for blk in self.blocks:
            h = blk(h, cond)
        return self.potential_out(F.silu(h)).flatten(1).sum(1)

    @property
    def scores_by_value(self) -> bool:
        """Whether :meth:`score_pools` scores by the potential's value (``HeadArchConfig.score_rule``)."""
        return self.config.potential and self.config.score_rule in ("auto", "value")

    def potential_values(self, candidates: Tensor, parent_x0: Tensor, timesteps: Tensor, text: Tensor) -> Tensor:
        """A potential head's ``[k, b]`` scores ``phi(x_i) - mean_j phi(x_j)`` of ``candidates [k, b, C, h, w]``
        (``text [b, width]``: rows of :meth:`text_features`). Why: the first-order rule ``<g(mean), x_i - mean>``
        is exact only for a linear score, and the pools at t > 500 are wide enough for the curvature to reorder
        pairs; the potential, fitted by its gradients, also carries that curvature. On the toy world's 6144
        held-out pools (``bench/results/cpu/head_heldout_6144.json``) the 768-pass head orders 81.9% of the
        teacher's valid pairs against 80.4%, 75.0% against 72.5% in (500,750] (right where the first-order rule is
        wrong 105 times, wrong where it is right 45); the 1536-pass head 82.9% against 81.3% (112 to 44).
        Costs k forwards of the small net instead of one forward and one backward."""
        if not self.config.potential:
            raise ValueError("potential_values() needs a potential head (HeadArchConfig.potential)")
        k, b = candidates.shape[:2]
        c = self.config.latent_channels
        if candidates.shape[2] != c or parent_x0.shape != candidates.shape[1:]:
            raise HeadMismatchError(
                f"candidates {tuple(candidates.shape)} / parent x0 {tuple(parent_x0.shape)} do not match a head "
                f"trained for {c} latent channels (base model {self.config.base_model or '?'})"
            )
        cond = self.t_embedder(timestep_embedding(timesteps.to(candidates.device))) + text
        # rows r * b + j: candidate r of pool j
        phi = self._phi(candidates.flatten(0, 1), parent_x0.repeat(k, 1, 1, 1), cond.repeat(k, 1)).view(k, b)
        return phi - phi.mean(0, keepdim=True)

    def score_pools(
        self, candidates: Tensor, parent_x0: Tensor, timesteps: Tensor, text: Tensor, text_index: Tensor
    ) -> Tensor:
        """Direction head: ``[k, b]`` scores of ``candidates [k, b, C, h, w]``; ``timesteps [b]``, ``text [m, width]``,
        ``text_index [b]``. By the first-order rule the conv net runs on the b pool means only; a potential head
        scores by its value (:meth:`potential_values`, k*b rows) unless ``score_rule`` is ``gradient``."""
        rows = text[text_index.to(text.device)]
        if self.scores_by_value:
            return self.potential_values(candidates, parent_x0, timesteps, rows)
        g = self.direction(candidates.mean(0), parent_x0, timesteps, rows)
        return direction_scores(candidates, g)

    def _pool(self, h: int, w: int, device: torch.device) -> Tensor:
        key = (h, w, str(device))
        if key not in self._pool_cache:
            self._pool_cache[key] = pyramid_pool_matrix(h, w, self.config.levels, device=device)
        return self._pool_cache[key]

    def forward(
        self,
        latents: Tensor,
        timesteps: Tensor,
        text: Tensor,
        text_index: Tensor,
        cond_embeds: Tensor | None = None,
        parent_x0: Tensor | None = None,
    ) -> Tensor:
        """Scores ``[n]`` (float32, in the teacher's logit units). The direction head reads the ``n = k * b``
        candidates as pools (candidate ``r * b + j`` belongs to pool j, the sampler's layout) and needs
        ``parent_x0 [b, C, h, w]``."""
        if self.config.encoder == "direction":
            if parent_x0 is None:
                raise ValueError("the 'direction' head scores whole pools: pass parent_x0 [b, C, h, w]")
            b = parent_x0.shape[0]
            if latents.shape[0] % b:
                raise ValueError(f"{latents.shape[0]} candidates do not form pools of the {b} parents")
            k = latents.shape[0] // b
            cand = latents.view(k, b, *latents.shape[1:])
            return self.score_pools(cand, parent_x0, timesteps[:b], text, text_index[:b]).reshape(-1)
        feats = self.image_features(latents, timesteps, cond_embeds)
        pool = self._pool(feats.shape[2], feats.shape[3], feats.device)
        return score_tail(
            feats, pool, self.proj.weight, self.proj.bias, text, text_index.to(feats.device), self.logit_scale
        )

    def check_compatible(self, latent_channels: int, text_dim: int, scheduler: Any | None, base: str = "") -> None:
        """Raise :class:`HeadMismatchError` naming both sides when the head was trained for another base model or
        scheduler."""
        cfg = self.config
        what = f"the head (trained for {cfg.base_model or 'an unnamed base model'})"
        here = f"this base model{f' ({base})' if base else ''}"
        if latent_channels != cfg.latent_channels:
            raise HeadMismatchError(
                f"{what} expects {cfg.latent_channels} latent channels, {here} has {latent_channels}: train a head "
                "for this model with `python -m spo_fast.train_head --model.pretrained <model>`"
            )
        if text_dim != cfg.text_dim:
            raise HeadMismatchError(
                f"{what} expects text embeddings of width {cfg.text_dim}, {here} has {text_dim}: train a head for "
                "this model with `python -m spo_fast.train_head --model.pretrained <model>`"
            )
        if scheduler is not None and cfg.scheduler:
            sig = scheduler_signature(scheduler)
            diff = {k: (cfg.scheduler.get(k), v) for k, v in sig.items() if cfg.scheduler.get(k) != v}
            if diff:
                parts = ", ".join(f"{k}: head {a!r} vs scheduler {b!r}" for k, (a, b) in diff.items())
                raise HeadMismatchError(f"{what} was trained for another noise schedule ({parts})")


# ------------------------------------------------------------------------------------------------ sampler adapter


class HeadScorer:
    """The pool sampler's ``head(latents, timesteps, cond, prompt_index) -> scores``: caches the text features of
    the current prompt batch (one small MLP per pass, not per scored step)."""

    def __init__(self, head: NoisyLatentPreferenceHead) -> None:
        self.head = head.eval().requires_grad_(False)
        self._key: tuple | None = None
        self._text: Tensor | None = None

    @torch.no_grad()
    def __call__(
        self, latents: Tensor, timesteps: Tensor, cond: Any, prompt_index: Tensor, parent_x0: Tensor | None = None
    ) -> Tensor:
        embeds = cond.embeds if hasattr(cond, "embeds") else cond
        key = (embeds.data_ptr(), tuple(embeds.shape), embeds._version)
        if key != self._key:
            self._text = self.head.text_features(embeds.to(latents.device))
            self._key = key
        idx = prompt_index.to(latents.device)
        cond_embeds = embeds[idx].to(latents.device) if self.head.config.encoder == "unet" else None
        return self.head(latents, timesteps, self._text, idx, cond_embeds, parent_x0=parent_x0)


# ------------------------------------------------------------------------------------------------ losses and metrics


def pool_ranking_loss(head_scores: Tensor, teacher_scores: Tensor, valid: Tensor | None = None) -> Tensor:
    """Pairwise ranking loss over pools ``[P, k]``: for every ordered pair (i, j), i != j, the cross-entropy of the
    head's ``sigmoid(h_i - h_j)`` against the teacher's ``sigmoid(s_i - s_j)`` (its softmax pair probability, so
    the head also learns the teacher's margin). ``valid [P, k]`` masks missing candidates."""
    dh = head_scores[:, :, None] - head_scores[:, None, :]
    target = torch.sigmoid(teacher_scores[:, :, None] - teacher_scores[:, None, :])
    loss = F.binary_cross_entropy_with_logits(dh, target, reduction="none")
    # Subtract the target's own entropy: the loss is then 0 at a perfect fit (easier to read in the report).
    ent = F.binary_cross_entropy(target, target, reduction="none")
    k = head_scores.shape[1]
    mask = ~torch.eye(k, dtype=torch.bool, device=dh.device)[None]
    if valid is not None:
        mask = mask & valid[:, :, None] & valid[:, None, :]
    return ((loss - ent) * mask).sum() / mask.sum().clamp_min(1)


def direction_distillation_loss(direction: Tensor, target: Tensor, norm_weight: float = 0.1) -> Tensor:
    """Gradient distillation for the direction head: ``1 - cos(g, g*)`` per pool plus ``norm_weight`` times the
    squared log ratio of their norms, averaged over pools whose target is non-zero. ``g* [P, C, h, w]`` is the
    teacher's gradient at the pool mean. Why the gradient and not only the ranks: the pools' score differences are
    tiny projections of it onto the candidates' noise, so a ranking loss alone carries almost no signal (a head
    trained that way stayed at chance on the toy world), while one gradient gives the whole latent-shaped answer;
    the cosine term sets the order of the candidates, the norm term the size of the margins (so SPO's threshold
    means the same)."""
    g, t = direction.float().flatten(1), target.float().flatten(1)
    tn = t.norm(dim=1)
    ok = tn > 0
    if not bool(ok.any()):
        return direction.sum() * 0.0
    cos = F.cosine_similarity(g[ok], t[ok], dim=1)
    lognorm = torch.log(g[ok].norm(dim=1) + 1e-12) - torch.log(tn[ok])
    return (1 - cos).mean() + norm_weight * (lognorm**2).mean()


def pairwise_agreement(head_scores: Tensor, teacher_scores: Tensor, threshold: float = 0.3) -> dict[str, Tensor]:
    """Per pool ``[P, k]``: ``valid`` (the teacher's best/worst pair passes the threshold), ``agree_pair`` (the head
    orders the teacher's best above its worst), ``agree_all`` (fraction of the pool's pairs ordered alike, teacher
    ties excluded), ``same_selection`` (the head picks the same win and lose), ``same_valid`` (head and teacher
    agree on whether the step yields a pair)."""
    from .selection import select_pairs

    (tw, tl_), tvalid = select_pairs(teacher_scores.t().float(), threshold)
    (hw, hl), hvalid = select_pairs(head_scores.t().float(), threshold)
    rows = torch.arange(head_scores.shape[0])
    agree_pair = head_scores[rows, tw] > head_scores[rows, tl_]
    dt = teacher_scores[:, :, None] - teacher_scores[:, None, :]
    dh = head_scores[:, :, None] - head_scores[:, None, :]
    m = dt > 0
    agree_all = ((dh > 0) & m).sum((1, 2)).float() / m.sum((1, 2)).clamp_min(1).float()
    return {
        "valid": tvalid,
        "agree_pair": agree_pair,
        "agree_all": agree_all,
        "same_selection": (hw == tw) & (hl == tl_),
        "same_valid": hvalid == tvalid,
    }


# ------------------------------------------------------------------------------------------------ checkpoints


def save_head(head: NoisyLatentPreferenceHead, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Atomic write of ``{"version", "config", "state_dict", ...extra}`` (the frozen UNet is never included)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "version": HEAD_VERSION,
        "config": asdict(head.config),
        "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        **(extra or {}),
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_head(
    path: str | os.PathLike | None,
    components: Any | None = None,
    device: torch.device | str = "cpu",
    pretrained: str = "<model>",
) -> NoisyLatentPreferenceHead:
    """Load a head checkpoint and check it against ``components`` (latent channels, text width, scheduler).

    A missing path raises ``FileNotFoundError`` with the command that trains one; a head trained for another base
    model or scheduler raises :class:`HeadMismatchError` naming both."""
    if not path or not Path(path).is_file():
        cmd = TRAIN_HEAD_COMMAND.format(pretrained=pretrained, out="outputs/head")
        raise FileNotFoundError(
            f"no trained noisy-latent preference head at {str(path) or '(preference.head is empty)'}: train one with "
            f"`{cmd}` and pass outputs/head/head.pt"
        )
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("version") != HEAD_VERSION or "state_dict" not in state:
        raise ValueError(f"{path} is not a spo_fast head checkpoint (version {HEAD_VERSION})")
    cfg = HeadArchConfig(**state["config"])
    unet = components.unet if components is not None and cfg.encoder == "unet" else None
    if cfg.encoder == "unet" and unet is None:
        raise ValueError(f"{path} holds a 'unet'-encoder head: pass the base model's components to load it")
    head = NoisyLatentPreferenceHead(cfg, unet=unet)
    if components is not None:
        head.check_compatible(
            int(components.unet.config.in_channels),
            int(components.text_encoders[0].config.hidden_size)
            + sum(int(e.config.hidden_size) for e in components.text_encoders[1:]),
            components.scheduler,
        )
    head.load_state_dict(state["state_dict"])
    # The pools and x0 estimate it was distilled on (train_head writes them; older heads have none).
    head.distillation = dict(state.get("distillation") or {})
    return head.to(device)


# ------------------------------------------------------------------------------------------------ distillation


@dataclass
class PoolRecord:
    """Distillation data: ``latents [P, k, C, h, w]`` (the noisy candidates the sampler scored), ``timesteps [P]``
    (their score timestep; 0 for the final x_0), ``prompt [P]`` (index into ``prompts``), ``scores [P, k]`` (the
    teacher's), the prompt list, and for the direction head ``parent_x0 [P, C, h, w]`` (the x0 estimate of the
    pool's parent) and ``grad [P, C, h, w]`` (the teacher's gradient at the pool mean)."""

    latents: Tensor
    timesteps: Tensor
    prompt: Tensor
    scores: Tensor
    prompts: list[str]
    parent_x0: Tensor | None = None
    grad: Tensor | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]

    def state_dict(self) -> dict[str, Any]:
        keys = ("latents", "timesteps", "prompt", "scores", "prompts", "parent_x0", "grad")
        return {k: getattr(self, k) for k in keys}

    def subset(self, idx: Tensor | slice) -> PoolRecord:
        """The pools ``idx`` (same prompt list)."""
        opt = {k: (None if getattr(self, k) is None else getattr(self, k)[idx]) for k in ("parent_x0", "grad")}
        return PoolRecord(
            self.latents[idx], self.timesteps[idx], self.prompt[idx], self.scores[idx], self.prompts, **opt
        )

    @staticmethod
    def cat(items: Sequence[PoolRecord]) -> PoolRecord:
        prompts: list[str] = []
        index: dict[str, int] = {}
        remapped = []
        for it in items:
            m = torch.tensor([index.setdefault(p, len(index)) for p in it.prompts], dtype=torch.long)
            remapped.append(m[it.prompt] if len(it.prompts) else it.prompt)
        prompts = list(index)
        opt = {
            k: torch.cat([getattr(i, k) for i in items]) if all(getattr(i, k) is not None for i in items) else None
            for k in ("parent_x0", "grad")
        }
        return PoolRecord(
            torch.cat([i.latents for i in items]),
            torch.cat([i.timesteps for i in items]),
            torch.cat(remapped),
            torch.cat([i.scores for i in items]),
            prompts,
            **opt,
        )


class _PoolTeacher:
    """The pixel-space teacher as the sampler's scorer: decode the x0 estimate, score the image."""

    def __init__(self, components: Any, image_scorer: Any) -> None:
        self.components, self.image_scorer = components, image_scorer
        self.prompts: list[str] = []

    @torch.no_grad()
    def __call__(self, x0: Tensor, timesteps: Tensor, prompt_index: Tensor) -> Tensor:
        images = self.components.decode(x0).float()
        return self.image_scorer(images, timesteps, [self.prompts[i] for i in prompt_index.tolist()]).float()


@torch.no_grad()
def collect_pools(
    components: Any,
    encoder: Any,
    image_scorer: Any,
    prompts: Sequence[str],
    passes: int,
    batch_size: int,
    sampler_config: Any,
    guidance_scale: float = 5.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    gradients: bool = False,
    gradient_at: str = "mean",
    parents: bool = False,
    pass_range: tuple[int, int] | None = None,
) -> PoolRecord:
    """Sample SPO pools with the base model and the pixel-space teacher and record every scored pool.

    ``encoder`` is a :class:`~spo_fast.pipeline.PromptEncoder`; ``image_scorer(images, timesteps, prompts)`` the
    teacher (the toy world: :class:`~spo_fast.toy.ToyImageScorer`). Prompts are drawn uniformly with ``seed``.
    ``gradients=True`` also records each pool's parent x0 and the teacher's gradient at the pool mean (through the
    same x0 estimate the scorer judges: the lookahead jumps, the decoder, the teacher): the direction head's target.
    It costs one backward pass per pool (b rows, not k*b). ``parents=True`` (without ``gradients``) records the
    parent x0 only: the input a potential head scores candidates with, for pools that teach its ranking term alone
    (a third of a midpoint-gradient pass's recording time on the toy world). ``gradient_at="midpoints"`` records
    instead the mean of the teacher's gradients at the k midpoints ``mean + (x_i - mean) / 2`` (k*b rows): a
    smoothed gradient, the better pool direction where the score is not linear over the pool. On the toy world's
    held-out pools its first-order rule orders 95.5% of the teacher's valid pairs (89.6% at t in (500, 750]) against
    92.9% (85.1%) for the gradient at the mean, and a head distilled from it on the same 96 passes reaches 80.3%
    instead of 77.9% (two seeds; 76.4% vs 72.8% in (500, 750]).

    ``pass_range=(a, b)`` records only passes ``a <= p < b`` of the ``passes``, bit for bit the pools those passes have
    in the whole recording: recordings in shards (resumable, or split over processes) join into the same data."""
    if gradient_at not in ("mean", "midpoints"):
        raise ValueError(f"gradient_at must be 'mean' or 'midpoints', got {gradient_at!r}")
    first, stop = pass_range if pass_range is not None else (0, passes)
    if not 0 <= first < stop <= passes:
        raise ValueError(f"pass_range {pass_range} must be a non-empty range within the {passes} passes")
    from .pipeline import CFGDenoiser
    from .sampler import PoolSampler

    prompts = list(prompts)
    uncond = encoder([""])
    den = CFGDenoiser(components.unet, uncond, guidance_scale)
    teacher = _PoolTeacher(components, image_scorer)
    records: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    ids = torch.empty(0, dtype=torch.long)

    grad_fn = _differentiable(image_scorer) if gradients else None
    cond: Any = None

    def observe(candidates: Tensor, t: int, scores: Tensor, parent_x0: Tensor) -> None:
        # Candidate r * b + j belongs to prompt j: pools are the columns of the [k, b] view.
        b = candidates.shape[1]
        lat = candidates.detach().float().cpu().transpose(0, 1).contiguous()
        rec = [lat, torch.full((b,), int(t)), ids.clone(), scores.detach().float().cpu().t().contiguous()]
        if grad_fn is not None:
            mean = candidates.mean(0)
            if gradient_at == "mean":
                g = _teacher_gradient(sampler, components, grad_fn, mean, int(t), cond, teacher.prompts)
            else:  # rows r * b + j: candidate r's midpoint of pool j (the sampler's [k, b] layout)
                k = candidates.shape[0]
                mid = (mean + (candidates - mean) / 2).flatten(0, 1)
                g = _teacher_gradient(sampler, components, grad_fn, mid, int(t), type(cond).cat([cond] * k),
                                      list(teacher.prompts) * k).view(candidates.shape).mean(0)  # fmt: skip
            rec += [parent_x0.detach().float().cpu(), g.float().cpu()]
        elif parents:
            rec.append(parent_x0.detach().float().cpu())
        records.append(tuple(rec))

    sampler = PoolSampler(den, components.scheduler, teacher, sampler_config, observer=observe)
    g = torch.Generator().manual_seed(seed)
    # Every pass's prompts drawn in order, including the passes before the range: a shard of passes records
    # exactly the pools of the same passes in one long recording.
    draws = [torch.randint(0, len(prompts), (batch_size,), generator=g) for _ in range(stop)]
    it = range(first, stop)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="teacher pools")
    for p in it:
        ids = draws[p]
        batch = [prompts[i] for i in ids.tolist()]
        teacher.prompts = batch
        gen = torch.Generator(device=device).manual_seed(seed * 100003 + p)
        lat = torch.randn((batch_size, *components.latent_shape), generator=gen, device=device)
        cond = encoder(batch)
        sampler.sample(cond, lat * components.scheduler.init_noise_sigma, gen, pass_index=p, seed=seed)
    cols = [torch.cat(x) for x in zip(*records)]
    return PoolRecord(*cols[:4], prompts, *cols[4:])


def _differentiable(image_scorer: Any) -> Any:
    """``f(images, timesteps, prompts)`` with autograd to the images, or a clear error."""
    fn = getattr(image_scorer, "differentiable_score", None)
    if fn is not None:
        return fn
    if isinstance(image_scorer, nn.Module):  # the step-aware model: plain modules (text features are cached)
        return image_scorer
    raise TypeError(
        f"the direction head distils the teacher's gradient, but {type(image_scorer).__name__} is not differentiable: "
        "give it a differentiable_score(images, timesteps, prompts) method or use --model.encoder latent"
    )


class _NoGradDenoiser:
    """A denoiser whose output is a constant for autograd: the teacher gradient's ``through_unet=False`` form."""

    def __init__(self, denoiser: Any) -> None:
        self.denoiser = denoiser

    def __call__(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        with torch.no_grad():
            # A clone: a CUDA-graphed denoiser returns its static output buffer, which its next call overwrites.
            return self.denoiser(x.detach(), t, cond).clone()


def _with_denoiser(sampler: Any, denoiser: Any) -> Any:
    """A shallow copy of ``sampler`` whose lookahead runs ``denoiser`` (the sampler itself is left as it is)."""
    import copy

    out = copy.copy(sampler)
    out.denoiser = denoiser
    return out


def _teacher_gradient(
    sampler: Any,
    components: Any,
    grad_fn: Any,
    mean: Tensor,
    t: int,
    cond: Any,
    prompts: list[str],
    through_unet: bool = True,
) -> Tensor:
    """The teacher's gradient ``[b, C, h, w]`` at the pool means: through the x0 estimate the scorer judges (the
    sampler's lookahead jumps; the final step's x_0 is judged as it is), the decoder and the image scorer.

    ``through_unet=False`` holds the UNet outputs of the lookahead constant: the gradient then reaches the mean only
    through the jumps' linear DDIM algebra (for epsilon prediction ``1 / sqrt(alpha_bar_t)`` times the teacher's
    gradient at the lookahead x0). It skips the UNet's backward pass (about two thirds of the pass) and runs on a
    no-grad (CUDA-graphable) denoiser."""
    b = mean.shape[0]
    if not through_unet:
        sampler = _with_denoiser(sampler, _NoGradDenoiser(sampler.denoiser))
    with torch.enable_grad():
        x = mean.detach().clone().requires_grad_(True)
        if t > 0:
            ts = torch.full((b,), t, dtype=torch.long, device=x.device)
            x0, _ = sampler._lookahead_x0(x, sampler.denoiser(x, ts, cond), t, cond)
        else:
            x0 = x
        images = components.decode(x0).float()
        score = grad_fn(images, torch.full((b,), t, device=x.device), prompts)
        (g,) = torch.autograd.grad(score.float().sum(), x)
    return g.detach()


def timestep_buckets(timesteps: Tensor, edges: Sequence[int] = (0, 250, 500, 750, 1000)) -> list[str]:
    """Bucket names per pool: ``t=0`` for the final x_0, else ``(lo, hi]`` of ``edges``."""
    out = []
    for t in timesteps.tolist():
        if t == 0:
            out.append("t=0")
            continue
        for lo, hi in zip(edges[:-1], edges[1:]):
            if lo < t <= hi:
                out.append(f"({lo},{hi}]")
                break
        else:
            out.append(f">{edges[-1]}")
    return out


def audit_counts(log: Any, threshold: float, counts: dict[str, dict[str, int]] | None = None) -> dict:
    """Additive counts of a sampler log's label audit (``PoolSampler.audit``), per timestep bucket and ``all``:
    ``pools`` audited, ``valid`` (the teacher's best/worst pair passes ``threshold``), ``agree`` (of those, the labels
    order the teacher's best above its worst: the held-out agreement of :func:`evaluate_agreement`, on the policy's
    pools), ``pairs`` (the labels' own valid pairs, the ones SPO trains on) and ``pairs_agree`` (of those, the
    teacher orders win above lose). Counts add over passes and ranks (pass ``counts`` to accumulate);
    :func:`audit_summary` turns them into rates."""
    counts = {} if counts is None else counts
    for t, labels, teacher, valid, win, lose in zip(
        log.score_timesteps, log.scores, log.audit_scores, log.valid, log.win, log.lose
    ):
        if teacher is None:
            continue
        a = pairwise_agreement(labels.t().float().cpu(), teacher.t().float(), threshold)
        cols = torch.arange(teacher.shape[1])
        own = valid.cpu().bool()
        own_agree = own & (teacher[win.cpu(), cols] > teacher[lose.cpu(), cols])
        for name in ("all", timestep_buckets(torch.tensor([int(t)]))[0]):
            c = counts.setdefault(name, {"pools": 0, "valid": 0, "agree": 0, "pairs": 0, "pairs_agree": 0})
            c["pools"] += teacher.shape[1]
            c["valid"] += int(a["valid"].sum())
            c["agree"] += int((a["valid"] & a["agree_pair"]).sum())
            c["pairs"] += int(own.sum())
            c["pairs_agree"] += int(own_agree.sum())
    return counts


def audit_summary(counts: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Rates of :func:`audit_counts`: per bucket (and ``all``) ``agree_valid`` = agree / valid and
    ``pair_precision`` = pairs_agree / pairs (None where the denominator is 0), with the counts."""

    def rate(a: int, b: int) -> float | None:
        return round(a / b, 4) if b else None

    return {
        name: {**c, "agree_valid": rate(c["agree"], c["valid"]), "pair_precision": rate(c["pairs_agree"], c["pairs"])}
        for name, c in sorted(counts.items())
    }


@torch.no_grad()
def pool_directions(
    head: NoisyLatentPreferenceHead, data: PoolRecord, text_embeds: Tensor, batch_pools: int = 256
) -> Tensor:
    """A direction head's ``g [P, C, h, w]`` for recorded pools (needs ``data.parent_x0``)."""
    if data.parent_x0 is None:
        raise ValueError("these pools have no parent_x0: record them with collect_pools(gradients=True)")
    dev = next(head.parameters()).device
    was = head.training
    head.eval()
    text = head.text_features(text_embeds.to(dev))
    out = []
    for s in range(0, len(data), batch_pools):
        sub = data.subset(slice(s, s + batch_pools))
        mean = sub.latents.to(dev).mean(1)
        out.append(head.direction(mean, sub.parent_x0.to(dev), sub.timesteps.to(dev), text[sub.prompt.to(dev)]).cpu())
    head.train(was)
    return torch.cat(out)


@torch.no_grad()
def head_scores_for(
    head: NoisyLatentPreferenceHead,
    data: PoolRecord,
    text_embeds: Tensor,
    batch_pools: int = 256,
    directions: Tensor | None = None,
) -> Tensor:
    """Head scores ``[P, k]`` of recorded pools (by the head's own rule, as the sampler scores them);
    ``text_embeds [len(data.prompts), L, text_dim]``. A first-order direction head may pass its
    :func:`pool_directions` (computed once) as ``directions``."""
    if head.config.encoder == "direction" and not head.scores_by_value:
        g = directions if directions is not None else pool_directions(head, data, text_embeds, batch_pools)
        return direction_scores(data.latents.transpose(0, 1), g).t()
    dev = next(head.parameters()).device
    was = head.training
    head.eval()
    text = head.text_features(text_embeds.to(dev))
    out = []
    k = data.latents.shape[1]
    if head.config.encoder == "direction":  # a potential head scoring by value
        if data.parent_x0 is None:
            raise ValueError("these pools have no parent_x0: record them with collect_pools(gradients=True)")
        for s in range(0, len(data), batch_pools):
            sub = data.subset(slice(s, s + batch_pools))
            v = head.potential_values(
                sub.latents.to(dev).transpose(0, 1), sub.parent_x0.to(dev), sub.timesteps.to(dev),
                text[sub.prompt.to(dev)],
            )  # fmt: skip
            out.append(v.t().cpu())
        head.train(was)
        return torch.cat(out)
    for s in range(0, len(data), batch_pools):
        lat = data.latents[s : s + batch_pools].to(dev)
        n = lat.shape[0]
        idx = data.prompt[s : s + batch_pools].to(dev).repeat_interleave(k)
        ts = data.timesteps[s : s + batch_pools].to(dev).repeat_interleave(k)
        ce = text_embeds.to(dev)[idx] if head.config.encoder == "unet" else None
        out.append(head(lat.flatten(0, 1), ts, text, idx, ce).view(n, k).cpu())
    head.train(was)
    return torch.cat(out)


def evaluate_agreement(
    head: NoisyLatentPreferenceHead, data: PoolRecord, text_embeds: Tensor, threshold: float
) -> dict[str, Any]:
    """Held-out agreement with the teacher, overall and per timestep bucket (see :func:`pairwise_agreement`).
    ``agree_valid`` is the headline: on pools whose best/worst pair the teacher calls valid, how often the head
    orders that pair the same way; ``agree_valid_se`` its binomial standard error."""
    g = pool_directions(head, data, text_embeds) if head.config.encoder == "direction" else None
    hs = head_scores_for(head, data, text_embeds, directions=g)
    a = pairwise_agreement(hs, data.scores, threshold)
    buckets = timestep_buckets(data.timesteps)

    def summary(mask: Tensor) -> dict[str, Any]:
        v = a["valid"] & mask
        n = int(v.sum())
        p = float(a["agree_pair"][v].float().mean()) if n else None
        return {
            "pools": int(mask.sum()),
            "teacher_valid": n,
            "agree_valid": p,
            # Binomial standard error of agree_valid. Why: a few hundred valid pairs per bucket leave ~2-3 points
            # of noise, enough to mistake a lucky held-out set for a better head (a 768-pool set read 83.6% for a
            # head that orders 78.8% of a 6144-pool set's pairs).
            "agree_valid_se": math.sqrt(p * (1 - p) / n) if n else None,
            "agree_all_pairs": float(a["agree_all"][mask].mean()) if mask.any() else None,
            "same_selection_valid": float(a["same_selection"][v].float().mean()) if v.any() else None,
            "same_valid_decision": float(a["same_valid"][mask].float().mean()) if mask.any() else None,
        }

    out: dict[str, Any] = {"overall": summary(torch.ones(len(data), dtype=torch.bool)), "buckets": {}}
    if head.config.encoder == "direction":
        out["score_rule"] = "value" if head.scores_by_value else "gradient"
        if head.scores_by_value and g is not None:  # the first-order rule of the same head, for comparison
            fo = pairwise_agreement(direction_scores(data.latents.transpose(0, 1), g).t(), data.scores, threshold)
            v = fo["valid"]
            out["overall"]["agree_valid_gradient_rule"] = float(fo["agree_pair"][v].float().mean()) if v.any() else None
    if g is not None and data.grad is not None:
        # How well the direction matches the teacher's gradient (1 = the first-order oracle).
        out["overall"]["grad_cosine"] = float(F.cosine_similarity(g.flatten(1), data.grad.flatten(1).float()).mean())
    for name in sorted(set(buckets), key=lambda s: (s != "t=0", s)):
        out["buckets"][name] = summary(torch.tensor([b == name for b in buckets]))
    if data.grad is not None:
        # The first-order oracle: the teacher's own gradient as the direction. The ceiling of a direction head.
        o = pairwise_agreement(direction_scores(data.latents.transpose(0, 1), data.grad).t(), data.scores, threshold)
        out["oracle_agree_valid"] = {"overall": float(o["agree_pair"][o["valid"]].float().mean())} | {
            name: float(o["agree_pair"][m].float().mean())
            for name in out["buckets"]
            if (m := torch.tensor([b == name for b in buckets]) & o["valid"]).any()
        }
    return out


# ------------------------------------------------------------------------------------------------ online refresh


class RefreshingHeadScorer(HeadScorer):
    """A direction head that keeps learning from the teacher while SPO moves the policy (``preference.head_refresh``).

    Why: a head distilled on the base model's pools is judged, during SPO, on the policy's pools, which drift away
    from them; on the toy world its agreement with the teacher on the pairs it picks falls from ~80% to ~65% within a
    few iterations and SPO on its labels alone then oscillates and falls (4.10 -> 1.8-3.8 after 40 iterations across
    seeds and runs). So on every ``every``-th scored step the teacher's gradient at the pool means is recorded (the same
    target as ``train_head``: through the lookahead jumps, the decoder and the image scorer, with the current
    policy's UNet), and :meth:`update` (once per iteration) takes ``steps`` AdamW steps of gradient distillation on
    batches drawn from the last ``buffer`` recorded steps. With ``teacher_labels`` (the default) the recorded steps'
    pools are labelled by that gradient (first-order scores ``<g*, x_i - mean>``, which order 93% of the teacher's
    valid pairs on the toy world) and the other steps' by the head; without it every label is the head's. With
    ``carry`` the steps in between are labelled by the pass's last recorded gradient instead of the head.
    Measured on the toy world (40 iterations, three seeds, ``bench/results/cpu/bench_head_spo_refresh*.json``): the
    head alone falls to 1.8-1.9, refreshed with head labels to 3.1-4.2; with teacher labels 4.42-4.49, with the
    carry 4.43-4.65 (every = 2), and with the carry every 3rd step 4.52-4.65, mean 4.60 against the teacher's
    4.49-4.67, mean 4.59, with ~55% of the teacher's UNet rows (the defaults: teacher labels and carry on). With the
    carry the head labels only each pass's scored steps before its first recorded one (~6% of the labels every 3rd
    step), so its updates matter little: 5 steps per iteration (the default) end at a mean 4.59 as 20 did (4.58),
    at a quarter of the update's cost; ``steps = 0`` keeps the head as trained and skips the buffer.

    ``through_unet=False`` (the default) holds the lookahead's UNet outputs constant in that gradient (forward passes
    on the sampler's own no-grad denoiser, no UNet backward). It is a cruder label (its first-order rule orders 77.6%
    of the teacher's valid held-out pairs against 92.9% for the exact gradient) but SPO learns as well on it (toy,
    40 iterations, three seeds, final 4.65 / 4.54 / 4.54, mean 4.58, against 4.75 / 4.46 / 4.49, mean 4.57, exact;
    ``bench/results/cpu/bench_head_spo_refresh_x0_seed*.json``), with more pairs over the threshold, and the compiled
    small iteration runs at 2.65x the official loop instead of 2.38x (``bench_e2e_small_refresh_x0_compile.json``).

    ``grad_denoiser(x, t, cond)`` must be differentiable in ``x`` (the sampler's own denoiser may be a CUDA graph);
    ``sampler`` and ``prompts`` (the current pass's prompt list, e.g. the trainer's ``DecodeScorer``) are set by the
    caller once the sampler exists. ``encode(prompts) -> embeds`` re-encodes a buffered step's prompts (cheaper to
    keep than their embeddings). Multi-process runs average the head's gradients over ranks, so every rank's copy
    stays the same."""

    def __init__(
        self,
        head: NoisyLatentPreferenceHead,
        components: Any,
        image_scorer: Any,
        grad_denoiser: Any,
        encode: Any,
        every: int = 2,
        steps: int = 5,
        lr: float = 1e-3,
        buffer: int = 200,
        steps_per_batch: int = 4,
        seed: int = 0,
        teacher_labels: bool = True,
        carry: bool = True,
        through_unet: bool = False,
    ) -> None:
        if head.config.encoder != "direction":
            raise ValueError(
                f"preference.head_refresh distils the teacher's gradient and needs a 'direction' head; this head's "
                f"encoder is {head.config.encoder!r}: train one with `python -m spo_fast.train_head` (the default "
                "--model.encoder direction) or set --preference.head_refresh 0"
            )
        if every < 1 or steps < 0 or buffer < 1 or lr <= 0:
            raise ValueError(
                f"head refresh needs every >= 1, steps >= 0, buffer >= 1 and lr > 0 (got {every}, {steps}, {buffer}, "
                f"{lr})"
            )
        if steps == 0 and not (teacher_labels or carry):
            raise ValueError(
                "a head refresh with steps = 0 (the head stays as trained) and neither teacher labels nor the carry "
                "would compute the teacher's gradients for nothing: enable one of them or set steps >= 1"
            )
        super().__init__(head)
        self.head.requires_grad_(True)  # scoring stays under no_grad (HeadScorer.__call__); update() trains it
        self.components, self.grad_denoiser, self.encode = components, grad_denoiser, encode
        self.grad_fn = _differentiable(image_scorer)
        self.every, self.steps, self.buffer_size, self.steps_per_batch = every, steps, buffer, steps_per_batch
        self.seed, self.teacher_labels, self.carry, self.through_unet = seed, teacher_labels, carry, through_unet
        self._last: tuple[int, Tensor] | None = None
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=1e-4)
        self.buffer: list[dict[str, Any]] = []
        self.calls = 0
        self.updates = 0
        self.unet_rows = 0  # UNet rows of the teacher-gradient passes (forward; through_unet: the backward ~2x more)
        self.sampler: Any = None
        self.prompts: Any = None
        self.dist: Any = None

    def __call__(
        self, latents: Tensor, timesteps: Tensor, cond: Any, prompt_index: Tensor, parent_x0: Tensor | None = None
    ) -> Tensor:
        # The head runs only where its scores are the labels: a recorded step with teacher labels, or a carried one,
        # is labelled by a teacher gradient instead.
        self.calls += 1
        b = parent_x0.shape[0]
        cand = latents.view(latents.shape[0] // b, b, *latents.shape[1:])
        t = int(timesteps[0])
        if self.calls % self.every == 0:
            g = self._record(latents, timesteps, cond, prompt_index, parent_x0)
            self._last = (t, g)
            if self.teacher_labels:
                # The teacher's gradient is at hand for these pools: their labels use it (first-order scores).
                return direction_scores(cand, g.to(cand.dtype)).reshape(-1)
        elif self.carry and self._last is not None:
            if self._last[0] > t and self._last[1].shape == cand.shape[1:]:
                # The same pass's last recorded gradient, a scored step or more back: consecutive steps' gradients
                # point the same way (toy world: cosine 0.5-0.7 at t > 500, 0.8-0.99 below).
                return direction_scores(cand, self._last[1].to(cand.dtype)).reshape(-1)
            self._last = None  # a new pass (t rose again) or another batch: nothing to carry
        return super().__call__(latents, timesteps, cond, prompt_index, parent_x0=parent_x0)

    def _record(self, latents: Tensor, timesteps: Tensor, cond: Any, prompt_index: Tensor, parent_x0: Tensor) -> Tensor:
        if self.sampler is None or self.prompts is None:
            raise RuntimeError("RefreshingHeadScorer needs .sampler and .prompts set before sampling")
        b = parent_x0.shape[0]
        mean = latents.view(latents.shape[0] // b, b, *latents.shape[1:]).float().mean(0)
        t = int(timesteps[0])
        # Through the UNet: the sampler's lookahead on a differentiable denoiser (a graphed one has no autograd).
        grad_sampler = _with_denoiser(self.sampler, self.grad_denoiser) if self.through_unet else self.sampler
        prompts = list(getattr(self.prompts, "prompts", self.prompts))
        idx = prompt_index[:b].cpu()
        pool_prompts = [prompts[i] for i in idx.tolist()]
        g = _teacher_gradient(grad_sampler, self.components, self.grad_fn, mean.to(latents.dtype), t, cond[idx],
                              pool_prompts, through_unet=self.through_unet)  # fmt: skip
        if t > 0:
            self.unet_rows += b * self.sampler.config.lookahead_steps
        if self.steps == 0:  # the head stays as trained: nothing to keep for update()
            return g
        self.buffer.append({
            "mean": mean.detach().cpu(), "parent_x0": parent_x0.detach().float().cpu(),
            "t": torch.full((b,), t, dtype=torch.long), "prompts": pool_prompts, "grad": g.float().cpu(),
        })  # fmt: skip
        del self.buffer[: -self.buffer_size]
        return g

    def update(self) -> dict[str, float]:
        """``steps`` distillation steps on the buffer; returns the mean loss and cosine (empty buffer: ``{}``)."""
        if not self.buffer or self.steps == 0:
            return {}
        dev = next(self.head.parameters()).device
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.updates) % (2**63 - 1))
        self.head.train()
        losses, cosines = [], []
        for _ in range(self.steps):
            pick = torch.randperm(len(self.buffer), generator=gen)[: self.steps_per_batch].tolist()
            items = [self.buffer[i] for i in pick]
            mean = torch.cat([it["mean"] for it in items]).to(dev)
            px0 = torch.cat([it["parent_x0"] for it in items]).to(dev)
            ts = torch.cat([it["t"] for it in items]).to(dev)
            target = torch.cat([it["grad"] for it in items]).to(dev)
            with torch.no_grad():
                embeds = self.encode([p for it in items for p in it["prompts"]]).float()
            text = self.head.text_features(embeds.to(dev))
            g = self.head.direction(mean, px0, ts, text)
            loss = direction_distillation_loss(g, target)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.dist is not None and self.dist.enabled:
                self._average_grads()
            torch.nn.utils.clip_grad_norm_(self.head.parameters(), 1.0)
            self.optimizer.step()
            losses.append(loss.item())
            cosines.append(F.cosine_similarity(g.detach().flatten(1), target.flatten(1), dim=1).mean().item())
        self.head.eval()
        self.updates += 1
        self._key = None  # the cached text features came from the old weights
        return {"head_refresh_loss": sum(losses) / len(losses), "head_refresh_cos": sum(cosines) / len(cosines)}

    def _average_grads(self) -> None:
        import torch.distributed as dist

        world = dist.get_world_size()
        for p in self.head.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world

    def state_dict(self) -> dict[str, Any]:
        return {
            "head": {k: v.detach().cpu() for k, v in self.head.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "buffer": self.buffer,
            "calls": self.calls,
            "updates": self.updates,
            "unet_rows": self.unet_rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer = list(state["buffer"])
        self.calls, self.updates, self.unet_rows = state["calls"], state["updates"], state["unet_rows"]
        self._key = None
