"""Mixed-precision helpers: low-precision frozen weights and forwards, fp32 LoRA parameters and optimizer state.

The recipe (what the official SPO runs do with fp16, in bf16 here because bf16 needs no loss scaling):

- frozen weights (UNet base, VAE, text encoders, preference model) in bf16: half the memory and bandwidth;
- forwards under ``torch.autocast(bf16)``, so the fp32 LoRA branches also run in bf16;
- LoRA parameters, their gradients and the AdamW state in fp32 (``spo_fast.pipeline.add_lora`` keeps them fp32);
- TF32 for whatever still runs in fp32 (the loss, the VAE decode when kept in fp32);
- optionally channels_last for the convolutions (cuDNN's NHWC kernels are faster on tensor cores).

:func:`resolve_dtype` maps a requested dtype to one the device runs: bf16 on a GPU without bf16 support (before
Ampere) falls back to fp32 with one log line (fp16 would need a gradient scaler for the LoRA training).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

__all__ = [
    "PRECISIONS",
    "resolve_dtype",
    "autocast",
    "cast_frozen",
    "enable_tf32",
    "to_channels_last",
    "bf16_supported",
]

logger = logging.getLogger(__name__)

PRECISIONS = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "no": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
_LOGGED: set[str] = set()


def _log_once(msg: str, *args: object) -> None:
    key = msg % args
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.warning(msg, *args)


def bf16_supported(device: torch.device | str) -> bool:
    """bf16 compute on ``device``: CUDA asks the driver (compute capability >= 8.0); CPU autocast always has it."""
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            return bool(torch.cuda.is_bf16_supported())
        except (RuntimeError, AssertionError):  # no driver / no device
            return False
    return dev.type == "cpu"


def resolve_dtype(requested: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype to run in: ``requested`` (``fp32 | bf16 | fp16 | no`` or a torch dtype), or fp32 with one log line
    when the device cannot run it (bf16 without hardware support; fp16 on CPU, where it is emulated and slow)."""
    if isinstance(requested, torch.dtype):
        dtype = requested
    else:
        key = str(requested).strip().lower()
        if key not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(set(PRECISIONS))}, got {requested!r}")
        dtype = PRECISIONS[key]
    dev = torch.device(device)
    if dtype == torch.bfloat16 and not bf16_supported(dev):
        name = dev
        if dev.type == "cuda":
            try:
                name = f"{torch.cuda.get_device_name(dev)} (compute capability {torch.cuda.get_device_capability(dev)})"
            except (RuntimeError, AssertionError):
                pass
        _log_once("bf16 is not supported on %s: falling back to fp32 (bf16 needs compute capability >= 8.0)", name)
        return torch.float32
    if dtype == torch.float16 and dev.type == "cpu":
        _log_once("fp16 on CPU is emulated and slow: falling back to fp32 on %s", dev)
        return torch.float32
    return dtype


def autocast(device: torch.device | str, dtype: torch.dtype) -> AbstractContextManager:
    """``torch.autocast`` for low-precision dtypes, a no-op context for fp32/fp64."""
    dev = torch.device(device)
    if dtype in (torch.float32, torch.float64):
        return nullcontext()
    return torch.autocast(dev.type, dtype=dtype)


def cast_frozen(modules: nn.Module | Iterable[nn.Module], dtype: torch.dtype) -> int:
    """Casts the frozen (``requires_grad=False``) parameters and floating buffers of ``modules`` to ``dtype``; trainable
    parameters (LoRA) stay as they are, so their gradients and optimizer state remain fp32. Returns the number of
    tensors cast."""
    mods = [modules] if isinstance(modules, nn.Module) else list(modules)
    n = 0
    for m in mods:
        for p in m.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                n += 1
        for b in m.buffers():
            if b.is_floating_point() and b.dtype != dtype:
                b.data = b.data.to(dtype)
                n += 1
    return n


def enable_tf32(enabled: bool = True) -> None:
    """TF32 tensor-core matmuls and convolutions for fp32 work (no effect on CPU or before Ampere)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.set_float32_matmul_precision("high" if enabled else "highest")


def to_channels_last(module: nn.Module) -> nn.Module:
    """NHWC memory format for the 4-d conv weights (cuDNN's tensor-core kernels prefer it); returns ``module``."""
    return module.to(memory_format=torch.channels_last)
