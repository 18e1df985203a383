"""spo_fast: Step-aware Preference Optimization (SPO) for text-to-image diffusion models, fast.

The public API is importable piece by piece from other training code. Three names are drop-in replacements for
the official SPO implementation: :func:`ddim_step_log_prob`, :func:`select_pairs` and :func:`spo_loss`.
"""

from .ddim import (
    DDIMCoefficients,
    ddim_coefficients,
    ddim_log_prob,
    ddim_step,
    ddim_step_log_prob,
    ddim_step_mean,
    predict_x0_eps,
    previous_timesteps,
)
from .loss import (
    CFGPrediction,
    SPOLoss,
    loss_impl,
    spo_log_ratio,
    spo_log_ratios,
    spo_loss,
    spo_loss_from_log_ratios,
    spo_loss_per_pair,
)
from .selection import pair_margin, select_pairs

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "DDIMCoefficients",
    "ddim_coefficients",
    "ddim_log_prob",
    "ddim_step",
    "ddim_step_log_prob",
    "ddim_step_mean",
    "predict_x0_eps",
    "previous_timesteps",
    "CFGPrediction",
    "SPOLoss",
    "loss_impl",
    "spo_log_ratio",
    "spo_log_ratios",
    "spo_loss",
    "spo_loss_from_log_ratios",
    "spo_loss_per_pair",
    "pair_margin",
    "select_pairs",
]
