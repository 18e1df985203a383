"""The toy world's preference: an analytic score of how well an image shows its prompt, and how cleanly.

For a prompt with object colour ``c_o`` and background colour ``c_b`` and an image ``x`` (float [-1, 1]):

- colour memberships ``m_o = exp(-|x - c_o|^2 / (2 s^2))`` and ``m_b`` likewise (per pixel, ``s`` =
  :data:`COLOUR_TOLERANCE`, in the [-1, 1] scale);
- the canonical object mask ``M`` of the prompt (shape, size, position; anti-aliased, rendered once per prompt
  and image size and cached) is shifted by every offset up to :data:`SHIFT_TOLERANCE` of the image side (the
  world's position jitter), and
  ``layout = max over shifts of  W_OBJECT * IoU(m_o, M_shift) + (1 - W_OBJECT) * IoU(m_b, 1 - M_shift)``
  with the soft IoU ``sum(min) / sum(max)``: the object must have the right colour, shape, size and position,
  and the background the right colour;
- the "aesthetic" ``crispness = mean over pixels of max(m_o', m_b')`` with a tighter tolerance
  :data:`CRISP_TOLERANCE`: the fraction of pixels that are cleanly one of the two prompt colours. Blur (soft
  edges), noise, colour casts and washed-out colours all lower it. Rendered images reach ~0.95 (only the
  anti-aliased edge pixels lose), a small VAE-based diffusion model does not: this is what preference
  optimisation can improve beyond prompt following;
- ``score = W_LAYOUT * layout + (1 - W_LAYOUT) * crispness``, in [0, 1].

Everything is vectorised over the batch: the only per-prompt work (parsing, rendering the shifted masks) is
cached. The rendered image of a prompt scores higher under that prompt than the images of other prompts do
(tested on random prompts, see tests/test_toy_scorer.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from .world import COLOURS, colour_tensor, parse_prompt, render_masks

COLOUR_TOLERANCE = 0.35
CRISP_TOLERANCE = 0.15
SHIFT_TOLERANCE = 2.0 / 32.0
W_OBJECT = 0.6
W_LAYOUT = 0.7

_COLOUR_INDEX = {c: i for i, c in enumerate(COLOURS)}


@lru_cache(maxsize=4096)
def _shifted_masks(prompt: str, h: int, w: int) -> torch.Tensor:
    """[S, H, W] canonical masks of the prompt shifted by every integer offset within the tolerance."""
    attrs = parse_prompt(prompt)
    mask = render_masks([attrs], (h, w))[0]
    rx = max(0, int(round(SHIFT_TOLERANCE * w)))
    ry = max(0, int(round(SHIFT_TOLERANCE * h)))
    # Pad with background (0) rather than wrap, so shifting never moves object pixels to the far side.
    padded = torch.nn.functional.pad(mask, (rx, rx, ry, ry))
    shifts = [
        padded[ry + dy : ry + dy + h, rx + dx : rx + dx + w] for dy in range(-ry, ry + 1) for dx in range(-rx, rx + 1)
    ]
    return torch.stack(shifts).contiguous()


def _check_images(images: torch.Tensor, n_prompts: int) -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [n, 3, H, W], got {tuple(images.shape)}")
    if images.shape[0] != n_prompts:
        raise ValueError(f"got {images.shape[0]} images but {n_prompts} prompts")
    if images.shape[2] < 4 or images.shape[3] < 4:
        raise ValueError(f"images are too small to score: {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got dtype {images.dtype}")
    if images.numel():
        lo, hi = torch.aminmax(images.detach())
        lo, hi = float(lo), float(hi)
        # NaN fails both comparisons; the small slack allows a decoder's rounding overshoot, while uint8 or
        # [0, 255] inputs are caught.
        if not (lo >= -1.01 and hi <= 1.01):
            raise ValueError(
                f"images must be finite and in [-1, 1] (as a diffusers VAE decodes), got range [{lo:.3f}, {hi:.3f}]"
            )


def score_components(
    images: torch.Tensor, prompts: Sequence[str], differentiable: bool = False
) -> dict[str, torch.Tensor]:
    """The score and its parts (``layout``, ``crispness``), each a float32 Tensor[n]. See the module docstring.
    ``differentiable=True`` keeps the graph to ``images`` (the direction head distils the score's gradient)."""
    prompts = list(prompts)
    _check_images(images, len(prompts))
    n, _, h, w = images.shape
    x = (images if differentiable else images.detach()).float().clamp(-1, 1)
    attrs = [parse_prompt(p) for p in prompts]
    device = x.device
    c_o = colour_tensor([a.colour for a in attrs]).to(device)[:, :, None, None]
    c_b = colour_tensor([a.background for a in attrs]).to(device)[:, :, None, None]
    d_o = ((x - c_o) ** 2).sum(1)  # [n, H, W] squared colour distances
    d_b = ((x - c_b) ** 2).sum(1)
    m_o = torch.exp(-d_o / (2 * COLOUR_TOLERANCE**2))
    m_b = torch.exp(-d_b / (2 * COLOUR_TOLERANCE**2))

    masks = torch.stack([_shifted_masks(p, h, w) for p in prompts]).to(device)  # [n, S, H, W]
    # Soft IoU = sum(min) / (sum(a) + sum(b) - sum(min)): one pass over the [n, S, H, W] shifted masks per term.
    inter_o = torch.minimum(m_o[:, None], masks).sum((2, 3))
    inter_b = torch.minimum(m_b[:, None], 1 - masks).sum((2, 3))
    area = masks.sum((2, 3))
    iou_o = inter_o / (m_o.sum((1, 2))[:, None] + area - inter_o).clamp_min(1e-6)
    iou_b = inter_b / (m_b.sum((1, 2))[:, None] + (h * w - area) - inter_b).clamp_min(1e-6)
    layout = (W_OBJECT * iou_o + (1 - W_OBJECT) * iou_b).amax(1)

    crisp_o = torch.exp(-d_o / (2 * CRISP_TOLERANCE**2))
    crisp_b = torch.exp(-d_b / (2 * CRISP_TOLERANCE**2))
    crispness = torch.maximum(crisp_o, crisp_b).mean((1, 2))
    total = W_LAYOUT * layout + (1 - W_LAYOUT) * crispness
    return {"score": total, "layout": layout, "crispness": crispness}


def score(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """How well each image [n, 3, H, W] (float in [-1, 1]) shows its prompt, Tensor[n] in [0, 1], higher is
    better. Raises ValueError for a wrong shape, dtype or range, a count mismatch or a non-world prompt."""
    return score_components(images, prompts)["score"]


class ToyImageScorer:
    """The analytic score with the SPO sampler's scorer signature
    ``scorer(images [n, 3, H, W] in [-1, 1], timesteps [n], prompts) -> Tensor[n]``.

    It ignores the timesteps (it judges the decoded x0 estimate as a finished image). ``scale`` multiplies the
    [0, 1] score into the range of preference-model logits (PickScore's are ~100 * cosine), so that SPO's
    softmax-margin threshold (0.3 by default) means something: with ``scale=10`` a pair is valid when the raw
    scores differ by more than ~0.062."""

    def __init__(self, scale: float = 10.0) -> None:
        self.scale = float(scale)

    def __call__(self, images: torch.Tensor, timesteps: torch.Tensor | None, prompts: Sequence[str]) -> torch.Tensor:
        return score(images, prompts) * self.scale

    def differentiable_score(
        self, images: torch.Tensor, timesteps: torch.Tensor | None, prompts: Sequence[str]
    ) -> torch.Tensor:
        """The same score with autograd through ``images`` (for gradient distillation)."""
        return score_components(images, prompts, differentiable=True)["score"] * self.scale

    def __repr__(self) -> str:
        return f"ToyImageScorer(scale={self.scale})"


def colour_index(name: str) -> int:
    """Index of a colour name in the world's palette order."""
    return _COLOUR_INDEX[name]
