"""The toy text-to-image world: coloured shapes on coloured backgrounds, described by short prompts.

Grammar (every prompt names every attribute, so a prompt fully determines its canonical image)::

    a {size} {colour} {shape} {position} on a {background colour} background

    size       small | large
    colour     red | green | blue | yellow | purple | white | black     (object colour != background colour)
    shape      circle | square | triangle | diamond
    position   in the center | on the left | on the right | at the top | at the bottom

e.g. ``"a small red circle on the left on a blue background"``. That gives 2 * 7 * 4 * 5 * 6 = 1680 prompts,
split deterministically into train and held-out prompts (:func:`prompt_splits`). The held-out prompts are
unseen *combinations* of attributes that all occur in training, so they test compositional generalisation.

Images are RGB, float in [-1, 1] (the range a diffusers VAE decodes to), rendered analytically with 4x4
supersampling so that edges are anti-aliased. :func:`render` draws the canonical image of a prompt; with a
generator it adds a small random jitter of position (+-2 px at 32 px) and size (+-12%), which is what the base
model is trained on: a prompt then describes a small distribution of images instead of a single one.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

IMAGE_SIZE = 32

SIZES: dict[str, float] = {"small": 0.15, "large": 0.27}  # shape "radius" as a fraction of the image side
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.15, 0.75),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Centre of the object as a fraction of the image side (x, y); y grows downwards as in image coordinates.
POSITIONS: dict[str, tuple[float, float]] = {
    "in the center": (0.5, 0.5),
    "on the left": (0.28, 0.5),
    "on the right": (0.72, 0.5),
    "at the top": (0.5, 0.28),
    "at the bottom": (0.5, 0.72),
}

# Jitter of the training distribution, relative to the image side / to the size.
POSITION_JITTER = 2.0 / 32.0
SIZE_JITTER = 0.12

_PROMPT_RE = re.compile(
    r"^an? (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) (?P<position>in the center|on the left|on the right|"
    r"at the top|at the bottom) on an? (?P<background>\w+) background$"
)


@dataclass(frozen=True)
class ToyAttributes:
    """The parsed content of one prompt."""

    size: str
    colour: str
    shape: str
    position: str
    background: str

    def prompt(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {self.position} on a {self.background} background"


def vocabulary() -> list[str]:
    """Every word the grammar can produce (what the tokenizer gives a single token each)."""
    words: list[str] = ["a", "an", "on", "background"]
    words += list(SIZES) + list(COLOURS) + list(SHAPES)
    for phrase in POSITIONS:
        words += phrase.split()
    return sorted(set(words))


def all_attributes() -> list[ToyAttributes]:
    """Every valid attribute combination, in a fixed order."""
    return [
        ToyAttributes(size, colour, shape, position, background)
        for size in SIZES
        for colour in COLOURS
        for shape in SHAPES
        for position in POSITIONS
        for background in COLOURS
        if background != colour
    ]


def all_prompts() -> list[str]:
    return [a.prompt() for a in all_attributes()]


@lru_cache(maxsize=8192)
def parse_prompt(prompt: str) -> ToyAttributes:
    """Parses a prompt of the grammar (case and surrounding whitespace ignored); cached, since scorers see the
    same prompts again and again. Raises ValueError for anything else."""
    m = _PROMPT_RE.match(" ".join(prompt.lower().split()))
    if m is None:
        raise ValueError(
            f"not a toy-world prompt (expected 'a <size> <colour> <shape> <position> on a <colour> "
            f"background'): {prompt!r}"
        )
    attrs = ToyAttributes(**m.groupdict())
    if attrs.size not in SIZES or attrs.colour not in COLOURS or attrs.shape not in SHAPES:
        raise ValueError(f"unknown size, colour or shape in toy-world prompt {prompt!r}")
    if attrs.background not in COLOURS:
        raise ValueError(f"unknown background colour in toy-world prompt {prompt!r}")
    return attrs


@lru_cache(maxsize=16)
def prompt_splits(seed: int = 0, held_out_fraction: float = 0.15) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Deterministic (train, held_out) split of all prompts. The default split (seed 0) is the one the shipped
    base model was trained on; evaluate generalisation on its held-out prompts."""
    prompts = all_prompts()
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    n_held = int(round(held_out_fraction * len(prompts)))
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return tuple(prompts[i] for i in train), tuple(prompts[i] for i in held)


def sample_prompts(n: int, seed: int = 0, split: str = "train") -> list[str]:
    """``n`` prompts drawn with replacement from a split ('train', 'held_out' or 'all'), deterministic for a seed."""
    train, held = prompt_splits()
    pool = {"train": train, "held_out": held, "all": train + held}.get(split)
    if pool is None:
        raise ValueError(f"split must be 'train', 'held_out' or 'all', got {split!r}")
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(n)]


def _coverage(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Inside-test of a shape centred at 0 with radius ``r``; dx, dy in pixels. Sizes are chosen so the four
    shapes have similar areas: telling them apart must come from the outline, not from the amount of colour."""
    if shape == "circle":
        return (dx * dx + dy * dy <= r * r).float()
    if shape == "square":
        h = r * (math.pi / 4.0) ** 0.5
        return ((dx.abs() <= h) & (dy.abs() <= h)).float()
    if shape == "diamond":
        h = r * (math.pi / 2.0) ** 0.5
        return (dx.abs() + dy.abs() <= h).float()
    if shape == "triangle":
        # Upward equilateral triangle with its centroid at 0, same area as the circle.
        side = r * (4.0 * math.pi / math.sqrt(3.0)) ** 0.5
        height = side * math.sqrt(3.0) / 2.0
        top = -2.0 / 3.0 * height
        bottom = height / 3.0
        half_width = (dy - top) / height * (side / 2.0)
        return ((dy >= top) & (dy <= bottom) & (dx.abs() <= half_width)).float()
    raise ValueError(f"unknown shape {shape!r}")


def render_masks(
    attrs: Sequence[ToyAttributes],
    size: int | tuple[int, int] = IMAGE_SIZE,
    offsets: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    supersample: int = 4,
) -> torch.Tensor:
    """Anti-aliased object coverage masks, float [n, H, W] in [0, 1].

    ``offsets`` [n, 2] shifts the centre by (dx, dy) in fractions of the image side, ``scales`` [n] multiplies
    the radius; both default to the canonical layout."""
    h, w = (size, size) if isinstance(size, int) else size
    n = len(attrs)
    s = supersample
    # Supersampled pixel centres, in output-pixel units.
    ys = (torch.arange(h * s, dtype=torch.float32) + 0.5) / s
    xs = (torch.arange(w * s, dtype=torch.float32) + 0.5) / s
    side = float(min(h, w))
    out = torch.zeros(n, h * s, w * s)
    for i, a in enumerate(attrs):
        cx, cy = POSITIONS[a.position]
        cx, cy = cx * w, cy * h
        if offsets is not None:
            cx = cx + float(offsets[i, 0]) * side
            cy = cy + float(offsets[i, 1]) * side
        r = SIZES[a.size] * side * (float(scales[i]) if scales is not None else 1.0)
        dy = (ys - cy)[:, None].expand(h * s, w * s)
        dx = (xs - cx)[None, :].expand(h * s, w * s)
        out[i] = _coverage(a.shape, dx, dy, torch.tensor(r))
    return torch.nn.functional.avg_pool2d(out[:, None], s)[:, 0]


def colour_tensor(names: Sequence[str]) -> torch.Tensor:
    """[n, 3] colours in [-1, 1]."""
    return torch.tensor([COLOURS[c] for c in names]) * 2.0 - 1.0


def render(
    prompts: Sequence[str] | Sequence[ToyAttributes],
    size: int = IMAGE_SIZE,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Images of prompts, float [n, 3, size, size] in [-1, 1]. Without a generator: the canonical image of each
    prompt. With one: position and size jitter drawn from it (deterministic for the generator's seed)."""
    attrs = [p if isinstance(p, ToyAttributes) else parse_prompt(p) for p in prompts]
    n = len(attrs)
    offsets = scales = None
    if generator is not None:
        offsets = (torch.rand(n, 2, generator=generator) * 2 - 1) * POSITION_JITTER
        scales = 1.0 + (torch.rand(n, generator=generator) * 2 - 1) * SIZE_JITTER
    mask = render_masks(attrs, size, offsets, scales)[:, None]
    fg = colour_tensor([a.colour for a in attrs])[:, :, None, None]
    bg = colour_tensor([a.background for a in attrs])[:, :, None, None]
    return bg * (1 - mask) + fg * mask


def make_dataset(n: int, seed: int = 0, split: str = "train", size: int = IMAGE_SIZE) -> tuple[list[str], torch.Tensor]:
    """``n`` (prompt, jittered image) pairs from a split, deterministic for the seed."""
    prompts = sample_prompts(n, seed=seed, split=split)
    g = torch.Generator().manual_seed(seed)
    images = (
        torch.cat([render(prompts[i : i + 512], size, g) for i in range(0, n, 512)])
        if n
        else torch.zeros(0, 3, size, size)
    )
    return prompts, images
