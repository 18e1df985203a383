"""Fused scoring tail of the noisy-latent preference head: pyramid average pooling, projection, L2 normalisation,
cosine with the cached text feature and the logit scale, in one launch.

For a feature map ``F [n, C, H, W]``, the pooling matrix ``A [cells, H*W]`` (:func:`spo_fast.head.pyramid_pool_matrix`:
the 1x1, 2x2, 4x4 ... grids), ``weight [D, cells*C]`` (column ``cell * C + c``), ``bias [D]``, text features
``T [m, D]`` and ``text_index [n]``::

    p[n, cell, c] = sum_hw F[n, c, hw] * A[cell, hw]
    y[n]          = weight @ p[n] + bias                                      [D]
    score[n]      = exp(logit_scale) * <y, t> / (max(|y|, eps) * max(|t|, eps)),   t = T[text_index[n]]

One program per candidate streams its feature map once (``BLOCK_C`` channels at a time); the pooled vector is never
written: each channel block's pooled values are folded into ``y`` right away, cell by cell. The kernel also writes
``y`` ([n, D], tiny) so that the backward needs no second pass over the pooling. Backward (PyTorch, from the closed
form of the cosine's gradient): d score / d y, d / d T (scattered to the text rows), d / d logit_scale, then
d weight = dy^T p, d bias = sum dy, d F = (dy weight) pooled back through A^T. Accumulates in fp32; outputs fp32.

The ops are registered with ``torch.library.custom_op`` (``spo_fast::head_score_fwd``) with a fake implementation
and ``register_autograd``. The reference is :func:`spo_fast.head.score_tail_ref`; tests run the kernel on CPU under
``TRITON_INTERPRET=1`` (Triton decides interpreter or compiler when this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from spo_fast.head import score_tail_ref

__all__ = ["head_score_fused", "head_score_fused_ref", "INTERPRETED"]

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)
EPS = 1e-6
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

head_score_fused_ref = score_tail_ref


@triton.jit
def _head_score_fwd_kernel(
    f_ptr,  # [n, C, HW]
    pool_ptr,  # [NCELL, HW]
    w_ptr,  # [D, NCELL * C]
    b_ptr,  # [D]
    t_ptr,  # [m, D]
    tidx_ptr,  # [n] int64
    ls_ptr,  # [1] logit scale (log)
    out_ptr,  # [n] fp32
    y_ptr,  # [n, D] fp32 (saved for backward)
    C,
    HW,
    D,
    NCELL,
    eps,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < D
    offs_hw = tl.arange(0, BLOCK_HW)
    mhw = offs_hw < HW
    y = tl.load(b_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
    base = row.to(tl.int64) * C * HW
    K = NCELL * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = offs_c < C
        # The feature block is read once and reused by every cell (pooling is a [cells, HW] matrix product).
        f = tl.load(
            f_ptr + base + offs_c[:, None] * HW + offs_hw[None, :], mask=mc[:, None] & mhw[None, :], other=0.0
        ).to(tl.float32)
        for cell in range(0, NCELL):
            a = tl.load(pool_ptr + cell * HW + offs_hw, mask=mhw, other=0.0).to(tl.float32)
            p = tl.sum(f * a[None, :], axis=1)
            w = tl.load(
                w_ptr + offs_d[:, None] * K + cell * C + offs_c[None, :], mask=md[:, None] & mc[None, :], other=0.0
            ).to(tl.float32)
            y += tl.sum(w * p[None, :], axis=1)
    ti = tl.load(tidx_ptr + row)
    t = tl.load(t_ptr + ti * D + offs_d, mask=md, other=0.0).to(tl.float32)
    ny = tl.sqrt(tl.sum(y * y, axis=0))
    nt = tl.sqrt(tl.sum(t * t, axis=0))
    cos = tl.sum(y * t, axis=0) / (tl.maximum(ny, eps) * tl.maximum(nt, eps))
    ls = tl.load(ls_ptr).to(tl.float32)
    tl.store(out_ptr + row, tl.exp(ls) * cos)
    tl.store(y_ptr + row.to(tl.int64) * D + offs_d, y, mask=md)


def _blocks(c: int, hw: int, d: int) -> tuple[int, int, int]:
    block_hw = triton.next_power_of_2(hw)
    # Keep the [BLOCK_C, BLOCK_HW] feature tile and the [BLOCK_D, BLOCK_C] weight tile near 8k elements each.
    block_c = max(1, min(triton.next_power_of_2(c), 8192 // block_hw, 8192 // triton.next_power_of_2(d)))
    return block_c, block_hw, triton.next_power_of_2(d)


_BLOCK_C_OVERRIDE: int | None = None  # tests lower it to exercise several channel blocks on tiny maps


@torch.library.custom_op("spo_fast::head_score_fwd", mutates_args=())
def _head_score_fwd_op(
    features: Tensor, pool: Tensor, weight: Tensor, bias: Tensor, text: Tensor, text_index: Tensor, logit_scale: Tensor
) -> tuple[Tensor, Tensor]:
    """``(score [n], y [n, D])``; ``features [n, C, HW]`` contiguous."""
    n, c, hw = features.shape
    d = weight.shape[0]
    out = torch.empty(n, device=features.device, dtype=torch.float32)
    y = torch.empty((n, d), device=features.device, dtype=torch.float32)
    if n == 0:
        return out, y
    block_c, block_hw, block_d = _blocks(c, hw, d)
    if _BLOCK_C_OVERRIDE:
        block_c = _BLOCK_C_OVERRIDE
    _head_score_fwd_kernel[(n,)](
        features, pool, weight, bias, text, text_index, logit_scale, out, y,
        c, hw, d, pool.shape[0], EPS,
        BLOCK_C=block_c, BLOCK_HW=block_hw, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return out, y


@_head_score_fwd_op.register_fake
def _(features, pool, weight, bias, text, text_index, logit_scale):
    n = features.shape[0]
    return features.new_empty(n, dtype=torch.float32), features.new_empty((n, weight.shape[0]), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    features, pool, weight, bias, text, text_index, logit_scale = inputs
    ctx.save_for_backward(features, pool, weight, text, text_index, logit_scale, output[0], output[1])
    ctx.dtypes = (features.dtype, weight.dtype, bias.dtype, text.dtype, logit_scale.dtype)


def _backward(ctx, g_score, _g_y):
    features, pool, weight, text, text_index, logit_scale, score, y = ctx.saved_tensors
    n, c, hw = features.shape
    g = g_score.float() if g_score is not None else torch.zeros_like(score)
    t = text.float()[text_index]
    ny, nt = y.norm(dim=-1, keepdim=True), t.norm(dim=-1, keepdim=True)
    nyc, ntc = ny.clamp_min(EPS), nt.clamp_min(EPS)
    scale = logit_scale.float().exp()
    cos = (score / scale)[:, None]
    # d cos / d y and d cos / d t; a norm below eps is clamped (constant), so its own term drops, as with clamp_min.
    dy = t / (nyc * ntc) - cos * y / nyc**2 * (ny > EPS)
    dt = y / (nyc * ntc) - cos * t / ntc**2 * (nt > EPS)
    gs = (g * scale)[:, None]
    gy = gs * dy
    gt = torch.zeros(text.shape, dtype=torch.float32, device=text.device).index_add_(0, text_index, gs * dt)
    g_ls = (g * score).sum()
    f = features.float()
    pooled = torch.einsum("nch,kh->nkc", f, pool.float()).reshape(n, -1)
    gw = gy.t() @ pooled
    gb = gy.sum(0)
    gp = (gy @ weight.float()).view(n, pool.shape[0], c)
    gf = torch.einsum("nkc,kh->nch", gp, pool.float())
    fd, wd, bd, td, ld = ctx.dtypes
    return gf.to(fd), None, gw.to(wd), gb.to(bd), gt.to(td), None, g_ls.to(ld).reshape(logit_scale.shape)


_head_score_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def head_score_fused(
    features: Tensor,
    pool: Tensor,
    weight: Tensor,
    bias: Tensor,
    text: Tensor,
    text_index: Tensor,
    logit_scale: Tensor,
) -> Tensor:
    """Scores ``[n]`` (fp32) of :func:`spo_fast.head.score_tail_ref` in one launch; differentiable with respect to
    features, weight, bias, text and logit_scale."""
    if features.ndim != 4:
        raise ValueError(f"features must be [n, C, H, W], got {tuple(features.shape)}")
    n, c, h, w = features.shape
    if pool.shape[1] != h * w:
        raise ValueError(f"pool has {pool.shape[1]} columns but the feature map has {h * w} pixels")
    if weight.shape[1] != pool.shape[0] * c:
        raise ValueError(f"weight has {weight.shape[1]} columns, expected cells * C = {pool.shape[0] * c}")
    if text.shape[1] != weight.shape[0]:
        raise ValueError(f"text features have width {text.shape[1]}, the projection {weight.shape[0]}")
    for name, t in (("features", features), ("weight", weight), ("text", text)):
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.device != features.device:
            raise ValueError(f"{name} is on {t.device} but features are on {features.device}")
    if features.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "the Triton head tail got CPU tensors but Triton is not in interpreter mode: set TRITON_INTERPRET=1 "
            "before spo_fast.kernels is imported, or use SPO_FAST_HEAD_IMPL=torch"
        )
    score, _ = torch.ops.spo_fast.head_score_fwd(
        features.reshape(n, c, h * w).contiguous(),
        pool.float().contiguous(),
        weight.contiguous(),
        bias.contiguous(),
        text.contiguous(),
        text_index.to(torch.int64).contiguous(),
        logit_scale.reshape(1).contiguous(),
    )
    return score
