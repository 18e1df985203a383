"""Win/lose pair selection from a pool's preference scores (the official ``preference_score_compare``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["select_pairs", "pair_margin", "check_threshold"]


def check_threshold(threshold: float) -> float:
    if not (isinstance(threshold, (int, float)) and 0 <= threshold < 1 and math.isfinite(threshold)):
        raise ValueError(f"threshold must lie in [0, 1) (a softmax margin; the paper uses 0.3), got {threshold}")
    return float(threshold)


def pair_margin(score_win: Tensor, score_lose: Tensor) -> Tensor:
    """softmax([s_w, s_l])[0] - softmax([s_w, s_l])[1] == tanh((s_w - s_l) / 2)."""
    p = torch.stack([score_win, score_lose]).softmax(dim=0)
    return p[0] - p[1]


def select_pairs(scores: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Best/worst candidate per prompt.

    Args:
        scores: ``[k, b]`` preference scores of k candidates for each of b prompts.
        threshold: a pair is valid when the softmax margin of (best, worst) exceeds it.

    Returns:
        ``(indices [2, b], valid [b])``: row 0 the winner, row 1 the loser, as the official
        ``preference_score_compare``. Ties resolve like a stable descending sort (winner = first of the best,
        loser = last of the worst), so win != lose whenever k >= 2. NaN scores never win or lose; a prompt with
        fewer than two finite scores yields an invalid pair.
    """
    check_threshold(threshold)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape [k, b] (candidates x prompts), got {tuple(scores.shape)}")
    k, b = scores.shape
    if k < 2:
        raise ValueError(f"a pool needs k >= 2 candidates to form a pair, got k={k}")
    if b == 0:
        raise ValueError("scores has an empty batch (b = 0)")
    finite = torch.isfinite(scores)
    win_key = torch.where(finite, scores, torch.full_like(scores, -math.inf))
    lose_key = torch.where(finite, scores, torch.full_like(scores, math.inf))
    win = torch.sort(win_key, dim=0, descending=True, stable=True).indices[0]
    lose = torch.sort(lose_key, dim=0, descending=True, stable=True).indices[-1]
    s_w = scores.gather(0, win[None])[0]
    s_l = scores.gather(0, lose[None])[0]
    valid = (finite.sum(0) >= 2) & (pair_margin(s_w, s_l) > threshold)
    return torch.stack([win, lose]), valid
