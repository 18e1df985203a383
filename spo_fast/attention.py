"""Attention backend of the diffusion UNet: xformers memory-efficient attention or PyTorch SDPA.

``configure_attention(unet, "auto" | "sdpa" | "xformers") -> "sdpa" | "xformers"``:

- ``auto``: xformers when it imports *and* a tiny attention call runs on the UNet's device and dtype (probed once per
  device/dtype), otherwise PyTorch SDPA (``F.scaled_dot_product_attention``, which picks the flash or
  memory-efficient kernel itself on CUDA);
- ``sdpa``: diffusers' ``AttnProcessor2_0`` everywhere;
- ``xformers``: xformers, or SDPA with one clear log line when xformers is missing, broken, or the UNet is not on a
  CUDA device (xformers' kernels are CUDA-only).

The choice is logged once per (backend, reason). On recent torch the SDPA flash kernel is as fast as xformers for
SD shapes, so ``auto`` only matters for old torch builds; the fallbacks keep every configuration runnable.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

__all__ = ["ATTENTION_BACKENDS", "configure_attention", "is_xformers_available", "xformers_usable"]

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "sdpa", "xformers")

_PROBES: dict[tuple[str, torch.dtype], tuple[bool, str]] = {}
_LOGGED: set[tuple[str, str]] = set()


def is_xformers_available() -> bool:
    """True when ``xformers.ops`` imports (says nothing about whether its kernels run here)."""
    return _import_xformers()[0] is not None


def _import_xformers() -> tuple[Any, str]:
    try:
        import xformers.ops as xops
    except Exception as exc:  # noqa: BLE001 - a broken install can raise anything at import
        if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] == "xformers":
            return None, "xformers is not installed (pip install xformers)"
        return None, f"xformers does not import ({type(exc).__name__}: {exc})"
    return xops, ""


def xformers_usable(device: torch.device | str, dtype: torch.dtype = torch.float16) -> tuple[bool, str]:
    """``(ok, reason)``: does a tiny ``memory_efficient_attention`` call run on ``device`` in ``dtype``?

    Probed once per (device type, dtype). A wheel built for another torch/CUDA imports fine and fails here, which
    is the case ``auto`` must catch.
    """
    dev = torch.device(device)
    key = (str(dev), dtype)
    if key in _PROBES:
        return _PROBES[key]
    if dev.type != "cuda":
        result = (False, f"xformers attention needs a CUDA device, the UNet is on {dev}")
    else:
        xops, reason = _import_xformers()
        if xops is None:
            result = (False, reason)
        else:
            try:
                q = torch.randn(1, 8, 2, 16, device=dev, dtype=dtype)
                out = xops.memory_efficient_attention(q, q, q)
                if out.shape != q.shape or not bool(torch.isfinite(out).all()):
                    raise RuntimeError("the probe returned a wrong shape or non-finite values")
                result = (True, "")
            except Exception as exc:  # noqa: BLE001 - any failure means: not usable here
                result = (False, f"xformers is installed but its attention fails here ({type(exc).__name__}: {exc})")
    _PROBES[key] = result
    return result


def _log_once(level: int, backend: str, reason: str, msg: str, *args: Any) -> None:
    if (backend, reason) not in _LOGGED:
        _LOGGED.add((backend, reason))
        logger.log(level, msg, *args)


def _module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters(), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    # LoRA parameters are fp32 while the frozen weights may be bf16: attention runs in the frozen weights' dtype.
    dtypes = [q.dtype for q in module.parameters() if not q.requires_grad] or [p.dtype]
    return p.device, max(set(dtypes), key=dtypes.count)


def configure_attention(unet: nn.Module, backend: str = "auto") -> str:
    """Sets the attention processors of a diffusers model (``UNet2DConditionModel``, also a VAE) and returns the
    backend in use, ``"sdpa"`` or ``"xformers"``. Call it after moving the model to its device and dtype."""
    backend = (backend or "auto").strip().lower()
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if not hasattr(unet, "set_attn_processor"):
        raise TypeError(f"{type(unet).__name__} has no set_attn_processor: pass a diffusers model such as the UNet")
    device, dtype = _module_device_dtype(unet)
    chosen = "sdpa"
    if backend in ("auto", "xformers"):
        ok, reason = xformers_usable(device, dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16)
        if ok:
            try:
                unet.enable_xformers_memory_efficient_attention()
                chosen = "xformers"
            except Exception as exc:  # noqa: BLE001 - diffusers runs its own checks; any failure falls back
                reason = f"diffusers could not enable xformers ({type(exc).__name__}: {exc})"
        if chosen == "sdpa":
            level = logging.WARNING if backend == "xformers" else logging.INFO
            what = "xformers attention was requested but" if backend == "xformers" else "attention auto:"
            _log_once(level, backend, reason, "%s %s; using PyTorch SDPA", what, reason)
    if chosen == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
        if backend == "sdpa":
            _log_once(logging.INFO, "sdpa", "", "attention: PyTorch SDPA (AttnProcessor2_0)")
    else:
        _log_once(logging.INFO, "xformers", str(device), "attention: xformers memory-efficient attention on %s", device)
    return chosen
