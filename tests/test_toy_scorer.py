"""The analytic toy preference: separation, components, input validation, SPO-sampler signature."""

import pytest
import torch

from spo_fast.toy import ToyImageScorer, all_prompts, parse_prompt, render, sample_prompts, score, score_components
from spo_fast.toy.world import COLOURS, POSITIONS, SHAPES, SIZES, ToyAttributes


def _neighbours(p: str) -> list[str]:
    """Prompts that differ from p in exactly one attribute: the hardest cases to separate."""
    a = parse_prompt(p)
    out = []
    for field, values in (
        ("size", SIZES),
        ("colour", COLOURS),
        ("shape", SHAPES),
        ("position", POSITIONS),
        ("background", COLOURS),
    ):
        for v in values:
            b = ToyAttributes(**{**a.__dict__, field: v})
            if v != getattr(a, field) and b.colour != b.background:
                out.append(b.prompt())
    return out


def test_rendered_image_beats_other_prompts_images():
    prompts = sample_prompts(200, seed=7, split="all")
    everything = all_prompts()
    index = {p: i for i, p in enumerate(everything)}
    canonical = render(everything)  # every image of the world, rendered once
    gen = torch.Generator().manual_seed(0)
    wins = 0
    for p in prompts:
        # All one-attribute neighbours (the hardest cases) plus 16 random other prompts.
        idx = torch.randint(0, len(everything), (16,), generator=gen).tolist()
        others = [q for q in _neighbours(p) + [everything[i] for i in idx] if q != p]
        images = canonical[[index[p]] + [index[q] for q in others]]
        s = score(images, [p] * len(images))
        wins += int(bool((s[0] > s[1:]).all()))
    assert wins >= 0.95 * len(prompts)


def test_score_orders_quality():
    prompts = sample_prompts(32, seed=1)
    gt = render(prompts)
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(gt, (1, 1, 1, 1), mode="replicate"), 3, 1)
    noisy = (gt + 0.3 * torch.randn(gt.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    s_gt, s_blur, s_noise = score(gt, prompts), score(blurred, prompts), score(noisy, prompts)
    s_flat = score(torch.zeros_like(gt), prompts)
    assert float(s_gt.mean()) > 0.9
    assert (s_gt > s_blur).all() and (s_gt > s_noise).all() and (s_blur > s_flat).all()
    parts = score_components(blurred, prompts)
    assert set(parts) == {"score", "layout", "crispness"}
    assert float(parts["crispness"].mean()) < float(score_components(gt, prompts)["crispness"].mean())
    # Larger images are scored against masks rendered at their size.
    assert float(score(render(prompts[:4], size=64), prompts[:4]).mean()) > 0.9


def test_score_rejects_bad_inputs():
    p = ["a small red circle on the left on a blue background"]
    good = render(p)
    with pytest.raises(ValueError, match="shape"):
        score(good[0], p)
    with pytest.raises(ValueError, match="shape"):
        score(good[:, :1], p)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        score((good + 1) * 127.5, p)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        score(torch.full_like(good, float("nan")), p)
    with pytest.raises(ValueError, match="floating"):
        score(good.to(torch.uint8), p)
    with pytest.raises(ValueError, match="prompts"):
        score(good, p * 2)
    with pytest.raises(ValueError, match="toy-world prompt"):
        score(good, ["a photo of a cat"])


def test_toy_image_scorer_signature():
    prompts = sample_prompts(4, seed=2)
    scorer = ToyImageScorer(scale=10.0)
    images = render(prompts)
    out = scorer(images, torch.tensor([999, 500, 20, 0]), prompts)
    assert out.shape == (4,) and out.dtype == torch.float32
    torch.testing.assert_close(out, 10.0 * score(images, prompts))
