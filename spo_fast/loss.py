"""The SPO loss: closed-form log-ratio, clipped ratios, DPO-style sigmoid loss.

Per pair (x_t, x_w, x_l, t), with policy and reference step means mu_theta, mu_ref and N elements per sample:

    lr   = sum((mu_theta - mu_ref) * (2 x' - mu_theta - mu_ref)) / (2 sigma^2 N)   = logp_theta(x') - logp_ref(x')
    r    = clamp(exp(lr), 1 - eps, 1 + eps)
    loss = -log sigmoid(beta * (log r_w - log r_l))

The log sigma and constant terms of the two Gaussian log-densities cancel, so the difference form avoids the
catastrophic cancellation of subtracting two large log-probs (they reach -1e4 at small t). Accumulation is in
float32 at least, whatever the input dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .ddim import DDIMCoefficients, _check_same, _expand, ddim_coefficients, ddim_step_mean

__all__ = ["SPOLoss", "spo_log_ratio", "spo_log_ratios", "spo_loss_from_log_ratios", "spo_loss", "spo_loss_per_pair"]


class SPOLoss(NamedTuple):
    """``loss`` is the mean over pairs; ratios are the clipped per-pair ratios (for logging)."""

    loss: Tensor
    ratio_win: Tensor
    ratio_lose: Tensor


def _acc_dtype(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def spo_log_ratios(
    coeffs: DDIMCoefficients, policy_pred: Tensor, ref_pred: Tensor, sample: Tensor, *prev_samples: Tensor
) -> list[Tensor]:
    """``logp_policy(x' | sample) - logp_ref(x' | sample)`` per sample for each ``x'`` in ``prev_samples``.

    Closed form ``(2 <d, x' - mu_ref> - <d, d>) / (2 sigma^2 N)`` with ``d = mu_theta - mu_ref``: d and <d, d>
    are shared by all ``x'`` (win and lose), and autograd keeps only d and each ``x' - mu_ref`` for backward.
    """
    acc = _acc_dtype(policy_pred, ref_pred, sample, *prev_samples)
    c = coeffs.to(dtype=acc, device=sample.device)
    x = sample.to(acc)
    if c.is_linear:
        # mu_theta - mu_ref = c2 * (pred_theta - pred_ref): one subtraction, no x0 round trip.
        d = _expand(c.c2, x) * (policy_pred.to(acc) - ref_pred.to(acc))
        mu_ref = _expand(c.c1, x) * x + _expand(c.c2, x) * ref_pred.detach().to(acc)
    else:
        mu_ref = ddim_step_mean(c, ref_pred.detach().to(acc), x)
        d = ddim_step_mean(c, policy_pred.to(acc), x) - mu_ref
    scale = 1.0 / (2 * c.sigma**2 * x[0].numel())
    dd = d.square().flatten(1).sum(1)
    return [(2 * (d * (xp.detach().to(acc) - mu_ref)).flatten(1).sum(1) - dd) * scale for xp in prev_samples]


def spo_log_ratio(
    coeffs: DDIMCoefficients, policy_pred: Tensor, ref_pred: Tensor, sample: Tensor, prev_sample: Tensor
) -> Tensor:
    """``logp_policy(prev_sample | sample) - logp_ref(prev_sample | sample)`` per sample, in closed form."""
    return spo_log_ratios(coeffs, policy_pred, ref_pred, sample, prev_sample)[0]


def spo_loss_from_log_ratios(
    log_ratio_win: Tensor, log_ratio_lose: Tensor, beta: float = 10.0, eps: float = 0.1
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair loss and clipped ratios from per-pair log-ratios. A clamped ratio passes no gradient."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (the paper uses 10), got {beta}")
    if not 0 < eps < 1:
        raise ValueError(f"eps (the ratio clip) must lie in (0, 1) (the paper uses 0.1), got {eps}")
    ratio_w = torch.clamp(torch.exp(log_ratio_win), 1 - eps, 1 + eps)
    ratio_l = torch.clamp(torch.exp(log_ratio_lose), 1 - eps, 1 + eps)
    per_pair = -F.logsigmoid(beta * (torch.log(ratio_w) - torch.log(ratio_l)))
    return per_pair, ratio_w, ratio_l


def _pair(x: Tensor | tuple[Tensor, Tensor], name: str) -> tuple[Tensor, Tensor]:
    if isinstance(x, Tensor):
        return x, x
    if isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(v, Tensor) for v in x):
        return x[0], x[1]
    raise ValueError(f"{name} must be a tensor (shared by win and lose) or a (win, lose) pair of tensors")


def spo_loss_per_pair(
    policy_pred: Tensor | tuple[Tensor, Tensor],
    ref_pred: Tensor | tuple[Tensor, Tensor],
    sample: Tensor,
    win_sample: Tensor,
    lose_sample: Tensor,
    timesteps: Tensor | int | list[int],
    scheduler: Any,
    eta: float = 1.0,
    beta: float = 10.0,
    eps: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(per_pair_loss, ratio_win, ratio_lose, log_ratio_win, log_ratio_lose)``, all ``[b]``."""
    pw, pl = _pair(policy_pred, "policy_pred")
    rw, rl = _pair(ref_pred, "ref_pred")
    for name, t in (("policy_pred", pw), ("ref_pred", rw), ("win_sample", win_sample), ("lose_sample", lose_sample)):
        _check_same(name, t, "sample", sample)
    _check_same("policy_pred (lose)", pl, "sample", sample)
    _check_same("ref_pred (lose)", rl, "sample", sample)
    if sample.ndim < 2 or sample.shape[0] == 0:
        raise ValueError(f"sample must be a non-empty batch [b, ...], got shape {tuple(sample.shape)}")
    coeffs = ddim_coefficients(scheduler, timesteps, eta, batch_size=sample.shape[0], device=sample.device)
    if not bool((coeffs.sigma > 0).all()):
        raise ValueError("the SPO loss needs a stochastic step: eta must be > 0 (sigma_t is 0, the log-prob diverges)")
    if pw is pl and rw is rl:
        lr_w, lr_l = spo_log_ratios(coeffs, pw, rw, sample, win_sample, lose_sample)
    else:
        lr_w = spo_log_ratio(coeffs, pw, rw, sample, win_sample)
        lr_l = spo_log_ratio(coeffs, pl, rl, sample, lose_sample)
    per_pair, ratio_w, ratio_l = spo_loss_from_log_ratios(lr_w, lr_l, beta, eps)
    return per_pair, ratio_w, ratio_l, lr_w, lr_l


def spo_loss(
    policy_pred: Tensor | tuple[Tensor, Tensor],
    ref_pred: Tensor | tuple[Tensor, Tensor],
    sample: Tensor,
    win_sample: Tensor,
    lose_sample: Tensor,
    timesteps: Tensor | int | list[int],
    scheduler: Any,
    eta: float = 1.0,
    beta: float = 10.0,
    eps: float = 0.1,
) -> SPOLoss:
    """Mean SPO loss over pairs sharing x_t (``sample``), with the clipped win/lose ratios.

    ``policy_pred`` / ``ref_pred`` are the (CFG-combined) model outputs at ``sample``; win and lose share them.
    Code that ran separate forwards for win and lose may pass ``(pred_win, pred_lose)`` tuples instead.
    """
    per_pair, ratio_w, ratio_l, _, _ = spo_loss_per_pair(
        policy_pred, ref_pred, sample, win_sample, lose_sample, timesteps, scheduler, eta, beta, eps
    )
    return SPOLoss(per_pair.mean(), ratio_w, ratio_l)
