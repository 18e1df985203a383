"""The SPO loss: closed-form log-ratio, clipped ratios, DPO-style sigmoid loss.

Per pair (x_t, x_w, x_l, t), with policy and reference step means mu_theta, mu_ref and N elements per sample:

    lr   = sum((mu_theta - mu_ref) * (2 x' - mu_theta - mu_ref)) / (2 sigma^2 N)   = logp_theta(x') - logp_ref(x')
    r    = clamp(exp(lr), 1 - eps, 1 + eps)
    loss = -log sigmoid(beta * (log r_w - log r_l))

The log sigma and constant terms of the two Gaussian log-densities cancel, so the difference form avoids the
catastrophic cancellation of subtracting two large log-probs (they reach -1e4 at small t). Accumulation is in
float32 at least, whatever the input dtype.

Implementations: :func:`spo_loss` and :func:`spo_loss_per_pair` evaluate the closed form below either with the
PyTorch reference (:func:`spo_log_ratios` + :func:`spo_loss_from_log_ratios`) or with the fused Triton kernel
(``spo_fast.kernels.spo_loss``), chosen by :func:`loss_impl`:

- ``SPO_FAST_LOSS_IMPL=auto`` (default): the kernel for CUDA tensors in fp32/bf16/fp16 when Triton is importable,
  otherwise the reference;
- ``SPO_FAST_LOSS_IMPL=triton``: always the kernel (on CPU tensors this needs ``TRITON_INTERPRET=1`` set before
  Triton is imported; it is how the tests run the kernel without a GPU);
- ``SPO_FAST_LOSS_IMPL=torch``: always the reference.

Schedulers with ``clip_sample=True`` make the mean nonlinear in the prediction: they always use the reference.

Classifier-free guidance: pass ``CFGPrediction(uncond, cond, guidance_scale)`` as the policy (or reference)
prediction; the combination ``uncond + g * (cond - uncond)`` happens in the accumulation dtype (inside the kernel
on the fused path) and both halves receive their gradient (``g`` and ``1 - g`` times d loss / d eps).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .ddim import DDIMCoefficients, _check_same, _expand, ddim_coefficients, ddim_step_mean

__all__ = [
    "CFGPrediction",
    "SPOLoss",
    "loss_impl",
    "spo_log_ratio",
    "spo_log_ratios",
    "spo_loss_from_log_ratios",
    "spo_loss",
    "spo_loss_per_pair",
]

logger = logging.getLogger(__name__)

LOSS_IMPL_ENV = "SPO_FAST_LOSS_IMPL"
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SPOLoss(NamedTuple):
    """``loss`` is the mean over pairs; ratios are the clipped per-pair ratios (for logging)."""

    loss: Tensor
    ratio_win: Tensor
    ratio_lose: Tensor


@dataclass(frozen=True)
class CFGPrediction:
    """A classifier-free-guidance prediction given as its two halves: ``uncond + guidance_scale * (cond - uncond)``.

    ``uncond`` and ``cond`` are ``[b, ...]`` like the sample. Passing the halves instead of the combined tensor
    lets the fused loss combine them while it streams the data (no combined tensor is written) and write
    ``d/d cond = g * d/d eps`` and ``d/d uncond = (1 - g) * d/d eps`` directly.
    """

    uncond: Tensor
    cond: Tensor
    guidance_scale: float

    def combined(self, dtype: torch.dtype | None = None) -> Tensor:
        """``uncond + g * (cond - uncond)`` in ``dtype`` (default: the halves' own dtype)."""
        u = self.uncond if dtype is None else self.uncond.to(dtype)
        c = self.cond if dtype is None else self.cond.to(dtype)
        return u + self.guidance_scale * (c - u)


def _acc_dtype(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _as_eps(pred: Tensor | CFGPrediction, acc: torch.dtype) -> Tensor:
    return pred.combined(acc) if isinstance(pred, CFGPrediction) else pred.to(acc)


def _tensors(pred: Tensor | CFGPrediction) -> tuple[Tensor, ...]:
    return (pred.uncond, pred.cond) if isinstance(pred, CFGPrediction) else (pred,)


def spo_log_ratios(
    coeffs: DDIMCoefficients,
    policy_pred: Tensor | CFGPrediction,
    ref_pred: Tensor | CFGPrediction,
    sample: Tensor,
    *prev_samples: Tensor,
) -> list[Tensor]:
    """``logp_policy(x' | sample) - logp_ref(x' | sample)`` per sample for each ``x'`` in ``prev_samples``.

    Closed form ``(2 <d, x' - mu_ref> - <d, d>) / (2 sigma^2 N)`` with ``d = mu_theta - mu_ref``: d and <d, d>
    are shared by all ``x'`` (win and lose), and autograd keeps only d and each ``x' - mu_ref`` for backward.
    A non-finite input makes the affected log-ratio NaN: an inf would otherwise give an infinite log-ratio whose
    ratio the clip turns into a finite loss with zero gradient, silently training on garbage.
    """
    acc = _acc_dtype(*_tensors(policy_pred), *_tensors(ref_pred), sample, *prev_samples)
    c = coeffs.to(dtype=acc, device=sample.device)
    x = sample.to(acc)
    eps_theta = _as_eps(policy_pred, acc)
    with torch.no_grad():
        eps_ref = _as_eps(ref_pred, acc)
    if c.is_linear:
        # mu_theta - mu_ref = c2 * (pred_theta - pred_ref): one subtraction, no x0 round trip.
        d = _expand(c.c2, x) * (eps_theta - eps_ref)
        mu_ref = _expand(c.c1, x) * x + _expand(c.c2, x) * eps_ref
    else:
        mu_ref = ddim_step_mean(c, eps_ref, x)
        d = ddim_step_mean(c, eps_theta, x) - mu_ref
    scale = 1.0 / (2 * c.sigma**2 * x[0].numel())
    dd = d.square().flatten(1).sum(1)
    out = []
    for xp in prev_samples:
        dx = (d * (xp.detach().to(acc) - mu_ref)).flatten(1).sum(1)
        lr = (2 * dx - dd) * scale
        out.append(torch.where(torch.isfinite(dd) & torch.isfinite(dx), lr, torch.nan))
    return out


def spo_log_ratio(
    coeffs: DDIMCoefficients,
    policy_pred: Tensor | CFGPrediction,
    ref_pred: Tensor | CFGPrediction,
    sample: Tensor,
    prev_sample: Tensor,
) -> Tensor:
    """``logp_policy(prev_sample | sample) - logp_ref(prev_sample | sample)`` per sample, in closed form."""
    return spo_log_ratios(coeffs, policy_pred, ref_pred, sample, prev_sample)[0]


def _check_beta_eps(beta: float, eps: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (the paper uses 10), got {beta}")
    if not 0 < eps < 1:
        raise ValueError(f"eps (the ratio clip) must lie in (0, 1) (the paper uses 0.1), got {eps}")


def spo_loss_from_log_ratios(
    log_ratio_win: Tensor, log_ratio_lose: Tensor, beta: float = 10.0, eps: float = 0.1
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair loss and clipped ratios from per-pair log-ratios. A clamped ratio passes no gradient."""
    _check_beta_eps(beta, eps)
    ratio_w = torch.clamp(torch.exp(log_ratio_win), 1 - eps, 1 + eps)
    ratio_l = torch.clamp(torch.exp(log_ratio_lose), 1 - eps, 1 + eps)
    per_pair = -F.logsigmoid(beta * (torch.log(ratio_w) - torch.log(ratio_l)))
    return per_pair, ratio_w, ratio_l


Prediction = Tensor | CFGPrediction


def _pair(x: Prediction | tuple[Prediction, Prediction], name: str) -> tuple[Prediction, Prediction]:
    if isinstance(x, (Tensor, CFGPrediction)):
        return x, x
    if isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(v, (Tensor, CFGPrediction)) for v in x):
        return x[0], x[1]
    raise ValueError(
        f"{name} must be a tensor or a CFGPrediction (shared by win and lose) or a (win, lose) pair of them"
    )


def _named_tensors(name: str, pred: Prediction) -> list[tuple[str, Tensor]]:
    if isinstance(pred, CFGPrediction):
        return [(f"{name}.uncond", pred.uncond), (f"{name}.cond", pred.cond)]
    return [(name, pred)]


def loss_impl() -> str:
    """The implementation requested by ``SPO_FAST_LOSS_IMPL``: ``"auto"`` (default), ``"triton"`` or ``"torch"``."""
    value = os.environ.get(LOSS_IMPL_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "triton", "torch"):
        raise ValueError(f"{LOSS_IMPL_ENV} must be auto, triton or torch, got {value!r}")
    return value


_TRITON_AVAILABLE: bool | None = None


def _triton_available() -> bool:
    global _TRITON_AVAILABLE
    if _TRITON_AVAILABLE is None:
        try:
            import triton  # noqa: F401

            _TRITON_AVAILABLE = True
        except ImportError as exc:
            logger.info("triton is not importable (%s): the SPO loss uses the PyTorch reference", exc)
            _TRITON_AVAILABLE = False
    return _TRITON_AVAILABLE


def _use_kernel(coeffs: DDIMCoefficients, tensors: list[Tensor]) -> bool:
    if not coeffs.is_linear:
        return False  # clip_sample makes the mean nonlinear in the prediction: no closed-form kernel
    impl = loss_impl()
    if impl != "auto":
        return impl == "triton"
    # fp64 stays on the reference in auto mode: it is a debugging precision, and fp64 is slow on most GPUs.
    return all(t.is_cuda and t.dtype in _KERNEL_DTYPES for t in tensors) and _triton_available()


def spo_loss_per_pair(
    policy_pred: Prediction | tuple[Prediction, Prediction],
    ref_pred: Prediction | tuple[Prediction, Prediction],
    sample: Tensor,
    win_sample: Tensor,
    lose_sample: Tensor,
    timesteps: Tensor | int | list[int],
    scheduler: Any,
    eta: float = 1.0,
    beta: float = 10.0,
    eps: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(per_pair_loss, ratio_win, ratio_lose, log_ratio_win, log_ratio_lose)``, all ``[b]``.

    Predictions are tensors ``[b, ...]`` like ``sample`` or :class:`CFGPrediction` halves. Inputs may mix floating
    dtypes (e.g. a bf16 UNet output with fp32 latents): each is read in its own dtype and accumulated in fp32
    (fp64 if any input is fp64). Outputs are in the accumulation dtype.
    """
    pw, pl = _pair(policy_pred, "policy_pred")
    rw, rl = _pair(ref_pred, "ref_pred")
    named = [
        *_named_tensors("policy_pred", pw),
        *_named_tensors("ref_pred", rw),
        ("win_sample", win_sample),
        ("lose_sample", lose_sample),
    ]
    if pl is not pw:
        named += _named_tensors("policy_pred (lose)", pl)
    if rl is not rw:
        named += _named_tensors("ref_pred (lose)", rl)
    for name, t in named:
        _check_same(name, t, "sample", sample)
    for name, t in [*named, ("sample", sample)]:
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if sample.ndim < 2 or sample.shape[0] == 0:
        raise ValueError(f"sample must be a non-empty batch [b, ...], got shape {tuple(sample.shape)}")
    _check_beta_eps(beta, eps)
    coeffs = ddim_coefficients(scheduler, timesteps, eta, batch_size=sample.shape[0], device=sample.device)
    if not bool((coeffs.sigma > 0).all()):
        raise ValueError("the SPO loss needs a stochastic step: eta must be > 0 (sigma_t is 0, the log-prob diverges)")
    if _use_kernel(coeffs, [t for _, t in named] + [sample]):
        from .kernels.spo_loss import spo_loss_fused

        if pw is pl and rw is rl:
            return spo_loss_fused(coeffs, pw, rw, sample, win_sample, lose_sample, beta, eps)
        # Separate win/lose forwards (the official four-forward style): one kernel pass per side for its log-ratio
        # (the other slot repeats the same sample), then the scalar loss on the two log-ratios.
        lr_w = spo_loss_fused(coeffs, pw, rw, sample, win_sample, win_sample, beta, eps)[3]
        lr_l = spo_loss_fused(coeffs, pl, rl, sample, lose_sample, lose_sample, beta, eps)[3]
    elif pw is pl and rw is rl:
        lr_w, lr_l = spo_log_ratios(coeffs, pw, rw, sample, win_sample, lose_sample)
    else:
        lr_w = spo_log_ratio(coeffs, pw, rw, sample, win_sample)
        lr_l = spo_log_ratio(coeffs, pl, rl, sample, lose_sample)
    per_pair, ratio_w, ratio_l = spo_loss_from_log_ratios(lr_w, lr_l, beta, eps)
    return per_pair, ratio_w, ratio_l, lr_w, lr_l


def spo_loss(
    policy_pred: Prediction | tuple[Prediction, Prediction],
    ref_pred: Prediction | tuple[Prediction, Prediction],
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

    ``policy_pred`` / ``ref_pred`` are the model outputs at ``sample`` ``[b, ...]``; win and lose share them. A
    :class:`CFGPrediction` passes the unconditional and conditional halves instead of the combined output (both
    halves get their gradient). Code that ran separate forwards for win and lose may pass ``(pred_win,
    pred_lose)`` tuples instead. The fused Triton kernel runs when :func:`loss_impl` allows it (see the module doc).
    """
    per_pair, ratio_w, ratio_l, _, _ = spo_loss_per_pair(
        policy_pred, ref_pred, sample, win_sample, lose_sample, timesteps, scheduler, eta, beta, eps
    )
    return SPOLoss(per_pair.mean(), ratio_w, ratio_l)
