"""Sample grids: images in [-1, 1] with their captions, saved as one PNG (Pillow only)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image [3, H, W] in [-1, 1] -> RGB PIL image."""
    arr = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")


def save_grid(
    images: torch.Tensor,
    captions: Sequence[str] | None,
    path: str | Path,
    ncols: int | None = None,
    cell: int = 128,
    wrap: int = 22,
) -> Path:
    """Saves images [n, 3, H, W] (float in [-1, 1]) as a PNG grid, each image upscaled (nearest neighbour, so
    pixels stay visible) to ``cell`` pixels with its caption wrapped underneath. Returns the path."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [n, 3, H, W], got {tuple(images.shape)}")
    n = images.shape[0]
    captions = list(captions) if captions is not None else [""] * n
    if len(captions) != n:
        raise ValueError(f"got {n} images but {len(captions)} captions")
    ncols = ncols or max(1, min(n, math.ceil(math.sqrt(n))))
    nrows = max(1, math.ceil(n / ncols))
    font = ImageFont.load_default()
    wrapped = [textwrap.wrap(c, wrap) or [""] for c in captions]
    line_h = 12
    text_h = line_h * max((len(w) for w in wrapped), default=1) + 4
    pad = 4
    grid = Image.new("RGB", (ncols * (cell + pad) + pad, nrows * (cell + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, c = divmod(i, ncols)
        x0, y0 = pad + c * (cell + pad), pad + r * (cell + text_h + pad)
        grid.paste(to_pil(images[i]).resize((cell, cell), Image.NEAREST), (x0, y0))
        for j, line in enumerate(wrapped[i]):
            draw.text((x0, y0 + cell + 2 + j * line_h), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
