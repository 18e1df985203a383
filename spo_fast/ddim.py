"""DDIM step math, vectorised over per-sample timesteps.

Everything here follows the official SPO implementation (itself ddpo-pytorch's ``ddim_step_with_logprob``):

    x0_hat   = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)           a_t = alpha_bar(t), a_p = alpha_bar(t_prev)
    sigma_t  = eta * sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    mean     = sqrt(a_p) * x0_hat + sqrt(1 - a_p - sigma_t^2) * eps
    x_{t-1}  = mean + sigma_t * z

with ``t_prev = clamp(t - T_train // N, 0, T_train - 1)`` (the official clamping: at the last step this picks
``alpha_bar(0)``, which equals ``final_alpha_cumprod`` for ``set_alpha_to_one=False`` schedulers).

For every prediction type without clipping the mean is linear in the model output,
``mean = c1 * x_t + c2 * model_output`` with per-sample scalars (see :class:`DDIMCoefficients`), which is what
the closed-form log-ratio and the fused loss kernel use.

This module imports nothing of spo_fast (it is the bottom layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PREDICTION_TYPES",
    "DDIMCoefficients",
    "ddim_coefficients",
    "predict_x0_eps",
    "ddim_step_mean",
    "ddim_step",
    "ddim_log_prob",
    "ddim_step_log_prob",
    "previous_timesteps",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _cfg(scheduler: Any, key: str, default: Any = None) -> Any:
    config = getattr(scheduler, "config", scheduler)
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _expand(v: Tensor, like: Tensor) -> Tensor:
    """[b] -> [b, 1, 1, ...] so per-sample scalars broadcast over a sample's elements."""
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


@dataclass(frozen=True)
class DDIMCoefficients:
    """Per-sample DDIM scalars for one step, shape ``[b]`` each, in float64 unless cast with :meth:`to`.

    ``mean = sqrt_alpha_prev * x0_hat + direction * eps_hat`` and ``x_prev = mean + sigma * z``.
    """

    sqrt_alpha: Tensor  # sqrt(a_t)
    sqrt_one_minus_alpha: Tensor  # sqrt(1 - a_t)
    sqrt_alpha_prev: Tensor  # sqrt(a_p)
    direction: Tensor  # sqrt(1 - a_p - sigma^2)
    sigma: Tensor  # eta * sqrt(variance)
    prediction_type: str = "epsilon"
    clip_sample_range: float | None = None  # x0 clamp of schedulers with clip_sample=True

    @property
    def c1(self) -> Tensor:
        """Coefficient of x_t in the mean (valid when ``clip_sample_range`` is None)."""
        if self.prediction_type == "epsilon":
            return self.sqrt_alpha_prev / self.sqrt_alpha
        if self.prediction_type == "v_prediction":
            return self.sqrt_alpha_prev * self.sqrt_alpha + self.direction * self.sqrt_one_minus_alpha
        return self.direction / self.sqrt_one_minus_alpha

    @property
    def c2(self) -> Tensor:
        """Coefficient of the model output in the mean (valid when ``clip_sample_range`` is None)."""
        if self.prediction_type == "epsilon":
            return self.direction - self.sqrt_alpha_prev * self.sqrt_one_minus_alpha / self.sqrt_alpha
        if self.prediction_type == "v_prediction":
            return self.direction * self.sqrt_alpha - self.sqrt_alpha_prev * self.sqrt_one_minus_alpha
        return self.sqrt_alpha_prev - self.direction * self.sqrt_alpha / self.sqrt_one_minus_alpha

    @property
    def is_linear(self) -> bool:
        return self.clip_sample_range is None

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> DDIMCoefficients:
        def cast(t: Tensor) -> Tensor:
            return t.to(device=device if device is not None else t.device, dtype=dtype or t.dtype)

        return DDIMCoefficients(
            cast(self.sqrt_alpha),
            cast(self.sqrt_one_minus_alpha),
            cast(self.sqrt_alpha_prev),
            cast(self.direction),
            cast(self.sigma),
            self.prediction_type,
            self.clip_sample_range,
        )

    def index(self, idx: Tensor) -> DDIMCoefficients:
        """Select samples (e.g. repeat a prompt's coefficients for its k candidates)."""
        return DDIMCoefficients(
            self.sqrt_alpha[idx],
            self.sqrt_one_minus_alpha[idx],
            self.sqrt_alpha_prev[idx],
            self.direction[idx],
            self.sigma[idx],
            self.prediction_type,
            self.clip_sample_range,
        )


def _num_inference_steps(scheduler: Any, num_inference_steps: int | None) -> int:
    n = num_inference_steps if num_inference_steps is not None else getattr(scheduler, "num_inference_steps", None)
    if n is None:
        raise ValueError(
            "num_inference_steps is unknown: call scheduler.set_timesteps(N) first or pass num_inference_steps=N"
        )
    if int(n) < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {n}")
    return int(n)


def previous_timesteps(scheduler: Any, timesteps: Tensor, num_inference_steps: int | None = None) -> Tensor:
    """The official ``t_prev = clamp(t - T_train // N, 0, T_train - 1)``."""
    t_train = int(_cfg(scheduler, "num_train_timesteps", 1000))
    n = _num_inference_steps(scheduler, num_inference_steps)
    return (timesteps.long() - t_train // n).clamp(0, t_train - 1)


def _as_timesteps(timesteps: Tensor | int | list[int], batch: int | None, device: torch.device) -> Tensor:
    t = torch.as_tensor(timesteps, device=device)
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise ValueError("timesteps must be integers (DDIM indexes alphas_cumprod with them)")
        t = t.long()
    t = t.long().reshape(-1)
    if batch is not None and t.numel() == 1 and batch != 1:
        t = t.expand(batch)
    if batch is not None and t.numel() != batch:
        raise ValueError(f"timesteps has {t.numel()} entries but the batch has {batch} samples; pass one per sample")
    return t


def ddim_coefficients(
    scheduler: Any,
    timesteps: Tensor | int | list[int],
    eta: float = 1.0,
    *,
    num_inference_steps: int | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
) -> DDIMCoefficients:
    """DDIM scalars for per-sample ``timesteps`` from a diffusers ``DDIMScheduler`` (or its config + alphas).

    Returned in float64 (computed in the scheduler's precision as the official code does) so callers choose theirs.
    """
    prediction_type = _cfg(scheduler, "prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if not (isinstance(eta, (int, float)) and eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a finite number >= 0 (SPO uses 1.0), got {eta!r}")
    if _cfg(scheduler, "thresholding", False):
        raise ValueError("schedulers with thresholding=True are not supported (SD1.5/SDXL use thresholding=False)")
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise ValueError("scheduler has no alphas_cumprod: pass a diffusers DDIMScheduler")
    t_train = int(_cfg(scheduler, "num_train_timesteps", len(alphas)))
    dev = (
        torch.device(device)
        if device is not None
        else (timesteps.device if isinstance(timesteps, Tensor) else torch.device("cpu"))
    )
    t = _as_timesteps(timesteps, batch_size, dev)
    if t.numel() and bool(((t < 0) | (t >= t_train)).any()):
        raise ValueError(f"timesteps must lie in [0, {t_train - 1}] (num_train_timesteps), got {t.tolist()}")
    t_prev = previous_timesteps(scheduler, t, num_inference_steps)
    # The schedule scalars follow the official op order in the scheduler's own precision (float32): at the last
    # step 1 - a_t / a_p cancels, and sigma carries that rounding in the official code and in every checkpoint
    # trained with it. Reproducing it keeps spo_fast's log-probs equal to the official ones; then widen to float64.
    ac = torch.as_tensor(alphas, device=dev)
    a_t = ac[t]
    a_p = ac[t_prev]
    variance = ((1 - a_p) / (1 - a_t)) * (1 - a_t / a_p)
    sigma = eta * variance**0.5
    # clamp_min: for eta > 1 the official code takes sqrt of a negative number (NaN); keep it finite at 0.
    direction = (1 - a_p - sigma**2).clamp_min(0) ** 0.5
    a_t, a_p, sigma, direction = (v.to(torch.float64) for v in (a_t, a_p, sigma, direction))
    clip = float(_cfg(scheduler, "clip_sample_range", 1.0)) if _cfg(scheduler, "clip_sample", False) else None
    return DDIMCoefficients(a_t.sqrt(), (1 - a_t).sqrt(), a_p.sqrt(), direction, sigma, prediction_type, clip)


def predict_x0_eps(coeffs: DDIMCoefficients, model_output: Tensor, sample: Tensor) -> tuple[Tensor, Tensor]:
    """Recover (x0_hat, eps_hat) from any prediction type, with the scheduler's optional x0 clipping."""
    c = coeffs.to(dtype=sample.dtype, device=sample.device)
    sa, s1a = _expand(c.sqrt_alpha, sample), _expand(c.sqrt_one_minus_alpha, sample)
    if c.prediction_type == "epsilon":
        x0, eps = (sample - s1a * model_output) / sa, model_output
    elif c.prediction_type == "v_prediction":
        x0, eps = sa * sample - s1a * model_output, sa * model_output + s1a * sample
    else:
        x0 = model_output
        eps = (sample - sa * x0) / s1a
    if c.clip_sample_range is not None:
        x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)
        eps = (sample - sa * x0) / s1a
    return x0, eps


def ddim_step_mean(coeffs: DDIMCoefficients, model_output: Tensor, sample: Tensor) -> Tensor:
    """Mean of p(x_{t-1} | x_t) for per-sample coefficients."""
    x0, eps = predict_x0_eps(coeffs, model_output, sample)
    c = coeffs.to(dtype=sample.dtype, device=sample.device)
    return _expand(c.sqrt_alpha_prev, sample) * x0 + _expand(c.direction, sample) * eps


def ddim_step(
    coeffs: DDIMCoefficients,
    model_output: Tensor,
    sample: Tensor,
    num_candidates: int | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """One stochastic DDIM step.

    With ``num_candidates=k`` it draws k candidates from the same mean and returns ``[k, b, ...]`` (the SPO pool);
    otherwise ``[b, ...]``. ``noise`` (same shape as the result) replaces the drawn z, e.g. for CUDA graphs.
    """
    mean = ddim_step_mean(coeffs, model_output, sample)
    shape = mean.shape if num_candidates is None else (num_candidates, *mean.shape)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=mean.device, dtype=mean.dtype)
    elif noise.shape != shape:
        raise ValueError(f"noise must have shape {tuple(shape)}, got {tuple(noise.shape)}")
    sigma = _expand(coeffs.sigma.to(dtype=mean.dtype, device=mean.device), mean)
    return mean + sigma * noise


def ddim_log_prob(mean: Tensor, prev_sample: Tensor, sigma: Tensor) -> Tensor:
    """Gaussian log density of ``prev_sample`` under N(mean, sigma^2 I), averaged over non-batch dims.

    ``prev_sample`` is detached (as in the official code): gradients flow through the mean only.
    """
    s = _expand(sigma.to(dtype=mean.dtype, device=mean.device), mean)
    lp = -((prev_sample.detach() - mean) ** 2) / (2 * s**2) - torch.log(s) - _LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def _check_same(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape")
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; move them to one device")


def ddim_step_log_prob(
    scheduler: Any,
    model_output: Tensor,
    timesteps: Tensor | int | list[int],
    sample: Tensor,
    prev_sample: Tensor,
    eta: float = 1.0,
) -> Tensor:
    """Per-sample log-prob of ``prev_sample``: drop-in for the official ``ddim_step_with_logprob(prev_sample=...)``.

    Returns a ``[b]`` tensor in the dtype of ``sample``.
    """
    _check_same("model_output", model_output, "sample", sample)
    _check_same("prev_sample", prev_sample, "sample", sample)
    if sample.ndim < 2:
        raise ValueError(f"sample must be batched [b, ...], got shape {tuple(sample.shape)}")
    coeffs = ddim_coefficients(scheduler, timesteps, eta, batch_size=sample.shape[0], device=sample.device)
    mean = ddim_step_mean(coeffs, model_output, sample)
    return ddim_log_prob(mean, prev_sample, coeffs.sigma)
