"""Fused scoring tail of the direction head: centre each pool's candidates and project them on the pool's direction.

For ``candidates x [k, b, C, h, w]`` (k candidates of each of b pools) and ``direction g [b, C, h, w]``, with the
latent flattened to N = C*h*w elements::

    m[j]        = (1/k) sum_i x[i, j]                                       [N]   (pool mean)
    score[i, j] = < x[i, j] - m[j], g[j] >                                   [k, b] fp32

which is :func:`spo_fast.head.direction_scores_ref`. The reference materialises ``x - m`` (k*b*N) before a batched dot
product; here each program streams BLOCK_N elements of one pool at a time: it loads the pool's k candidate blocks as
one ``[K_PAD, BLOCK_N]`` tile (K_PAD = next power of two >= k, padded rows masked to zero), takes the mean over the
rows in registers, subtracts it, multiplies by the direction block and adds the row sums to a ``[K_PAD]`` fp32
accumulator. Candidates and direction are read once; nothing of size k*b*N is written. Centring before the dot (not
``<x_i, g> - <m, g>``) keeps the precision when the candidates share a large common part, as they do late in
sampling, where they differ only by sigma_t times noise.

Layout: the latent of one (candidate, pool) must be contiguous (N elements, stride 1); the k and b strides are free,
so ``latents.transpose(0, 1)`` (the sampler's ``[b, k, ...]`` layout seen as ``[k, b, ...]``) is read without a
copy. Grid: ``(b, S)``; program ``(j, s)`` covers a contiguous range of N. With S = 1 (the interpreter, or pools
large enough to fill the GPU) it writes ``score[:, j]`` directly; with S > 1 (few pools: the SD1.5 / SDXL shapes
give only 4-10 of them) each program writes its partial sums to ``partial[s, :, j]`` and a deterministic
``partial.sum(0)`` finishes (no atomics, so results do not change from run to run).

Backward, from the closed form, with upstream ``G [k, b]`` and ``Gc = G - mean_i G`` (per pool)::

    d g[j]       = sum_i G[i, j] (x[i, j] - m[j])        ( = sum_i Gc[i, j] x[i, j] )
    d x[i, j]    = Gc[i, j] g[j]

one Triton pass too (grid ``(b, N / BLOCK_N)``): it writes each gradient that autograd asks for (constexpr
switches; an unneeded one is an empty tensor) in the dtype of its input, reading x only for d g and g only for d x.
Inputs are fp32, bf16 or fp16 (candidates and direction may differ); everything accumulates in fp32.

The ops are registered with ``torch.library.custom_op`` (``spo_fast::direction_score_fwd``,
``spo_fast::direction_score_bwd``) with fake implementations and ``register_autograd``. Tests run the kernels on CPU
under ``TRITON_INTERPRET=1`` (Triton decides interpreter or compiler when this module is imported).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from spo_fast.head import direction_scores_ref

__all__ = ["direction_score_fused", "direction_score_fused_ref", "INTERPRETED"]

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

direction_score_fused_ref = direction_scores_ref

# Tests lower these to exercise several blocks per program and several split programs per pool on tiny latents.
_BLOCK_OVERRIDE: int | None = None
_SPLIT_OVERRIDE: int | None = None
# The interpreter pays per program and per op, not per element: one big tile (K_PAD * BLOCK_N elements at most).
_INTERPRETER_MAX_TILE = 1 << 16
# GPU: tile of ~4k fp32 elements per program (16 per thread at 4 warps); enough programs to fill the SMs.
_GPU_TILE = 4096
_PROGRAMS_PER_SM = 4


@triton.jit
def _direction_score_fwd_kernel(
    x_ptr,  # candidates, element (i, j, n) at i * stride_xk + j * stride_xb + n
    g_ptr,  # direction, element (j, n) at j * stride_gb + n
    out_ptr,  # fp32 [S, k, b] contiguous (S = 1: the scores)
    k,
    b,
    N,
    inv_k,  # 1 / k (a float argument: Triton would fold k == 1 to a constant)
    stride_xk,
    stride_xb,
    stride_gb,
    blocks_per_split,
    K_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    j = tl.program_id(0)
    s = tl.program_id(1)
    offs_k = tl.arange(0, K_PAD)
    mk = offs_k < k
    x_rows = x_ptr + offs_k.to(tl.int64)[:, None] * stride_xk + j.to(tl.int64) * stride_xb
    g_row = g_ptr + j.to(tl.int64) * stride_gb
    acc = tl.zeros([K_PAD], dtype=tl.float32)
    start = s * blocks_per_split * BLOCK_N
    for t in range(0, blocks_per_split):
        offs_n = start + t * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        x = tl.load(x_rows + offs_n[None, :], mask=mk[:, None] & mn[None, :], other=0.0).to(tl.float32)
        g = tl.load(g_row + offs_n, mask=mn, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) * inv_k  # padded rows are zero: the sum is over the k candidates
        xc = tl.where(mk[:, None], x - mean[None, :], 0.0)
        acc += tl.sum(xc * g[None, :], axis=1)
    tl.store(out_ptr + (s * k + offs_k) * b + j, acc, mask=mk)


@triton.jit
def _direction_score_bwd_kernel(
    gout_ptr,  # fp32 [k, b] contiguous upstream gradient
    x_ptr,  # candidates (strides as in the forward)
    g_ptr,  # direction
    dx_ptr,  # [k, b, N] contiguous, candidates' dtype (unused unless NEED_DX)
    dg_ptr,  # [b, N] contiguous, direction's dtype (unused unless NEED_DG)
    k,
    b,
    N,
    inv_k,
    stride_xk,
    stride_xb,
    stride_gb,
    K_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_DG: tl.constexpr,
):
    j = tl.program_id(0)
    blk = tl.program_id(1)
    offs_k = tl.arange(0, K_PAD)
    mk = offs_k < k
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    gup = tl.load(gout_ptr + offs_k * b + j, mask=mk, other=0.0)
    jl = j.to(tl.int64)
    if NEED_DG:
        x_rows = x_ptr + offs_k.to(tl.int64)[:, None] * stride_xk + jl * stride_xb
        x = tl.load(x_rows + offs_n[None, :], mask=mk[:, None] & mn[None, :], other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) * inv_k
        xc = tl.where(mk[:, None], x - mean[None, :], 0.0)
        dg = tl.sum(gup[:, None] * xc, axis=0)
        tl.store(dg_ptr + jl * N + offs_n, dg.to(dg_ptr.dtype.element_ty), mask=mn)
    if NEED_DX:
        g = tl.load(g_ptr + jl * stride_gb + offs_n, mask=mn, other=0.0).to(tl.float32)
        gc = tl.where(mk, gup - tl.sum(gup, axis=0) * inv_k, 0.0)
        dx = gc[:, None] * g[None, :]
        dx_rows = dx_ptr + (offs_k.to(tl.int64)[:, None] * b + jl) * N
        tl.store(dx_rows + offs_n[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mk[:, None] & mn[None, :])


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _block(k: int, n: int, on_gpu: bool) -> int:
    """BLOCK_N: a ``[K_PAD, BLOCK_N]`` tile of about ``_GPU_TILE`` elements on GPUs, as large as allowed otherwise."""
    cap = _GPU_TILE if on_gpu else _INTERPRETER_MAX_TILE
    return _BLOCK_OVERRIDE or max(16, min(triton.next_power_of_2(n), cap // triton.next_power_of_2(k)))


def _fwd_grid(k: int, b: int, n: int, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_N, splits, blocks_per_split)``: on GPUs, enough split programs per pool to fill the SMs."""
    block = _block(k, n, device.type == "cuda")
    nblk = triton.cdiv(n, block)
    splits = 1
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        splits = min(nblk, max(1, triton.cdiv(_PROGRAMS_PER_SM * _num_sms(index), b)))
    if _SPLIT_OVERRIDE:
        splits = min(nblk, _SPLIT_OVERRIDE)
    per = triton.cdiv(nblk, splits)
    return block, triton.cdiv(nblk, per), per


@torch.library.custom_op("spo_fast::direction_score_fwd", mutates_args=())
def _direction_score_fwd_op(candidates: Tensor, direction: Tensor) -> Tensor:
    """Scores ``[k, b]`` fp32; ``candidates [k, b, N]`` and ``direction [b, N]`` with stride 1 along N."""
    k, b, n = candidates.shape
    if k == 0 or b == 0 or n == 0:
        return torch.zeros((k, b), device=candidates.device, dtype=torch.float32)
    block, splits, per = _fwd_grid(k, b, n, candidates.device)
    part = torch.empty((splits, k, b), device=candidates.device, dtype=torch.float32)
    _direction_score_fwd_kernel[(b, splits)](
        candidates, direction, part, k, b, n, 1.0 / k,
        candidates.stride(0), candidates.stride(1), direction.stride(0), per,
        K_PAD=triton.next_power_of_2(k), BLOCK_N=block, num_warps=4,
    )  # fmt: skip
    return part[0] if splits == 1 else part.sum(0)


@_direction_score_fwd_op.register_fake
def _(candidates, direction):
    return candidates.new_empty(candidates.shape[:2], dtype=torch.float32)


@torch.library.custom_op("spo_fast::direction_score_bwd", mutates_args=())
def _direction_score_bwd_op(
    grad: Tensor, candidates: Tensor, direction: Tensor, need_candidates: bool, need_direction: bool
) -> tuple[Tensor, Tensor]:
    """``(d candidates [k, b, N] or [0], d direction [b, N] or [0])`` in the inputs' dtypes; ``grad [k, b]`` fp32
    contiguous. A gradient not asked for is an empty tensor."""
    k, b, n = candidates.shape
    dx = torch.empty((k, b, n) if need_candidates else (0,), device=candidates.device, dtype=candidates.dtype)
    dg = torch.empty((b, n) if need_direction else (0,), device=direction.device, dtype=direction.dtype)
    if not (need_candidates or need_direction) or b == 0 or n == 0:
        return dx, dg
    if k == 0:
        return dx, dg.zero_()
    block = _block(k, n, candidates.is_cuda)
    _direction_score_bwd_kernel[(b, triton.cdiv(n, block))](
        grad, candidates, direction, dx, dg, k, b, n, 1.0 / k,
        candidates.stride(0), candidates.stride(1), direction.stride(0),
        K_PAD=triton.next_power_of_2(k), BLOCK_N=block, NEED_DX=need_candidates, NEED_DG=need_direction,
        num_warps=4,
    )  # fmt: skip
    return dx, dg


@_direction_score_bwd_op.register_fake
def _(grad, candidates, direction, need_candidates, need_direction):
    dx = candidates.new_empty(candidates.shape if need_candidates else (0,))
    dg = direction.new_empty(direction.shape if need_direction else (0,))
    return dx, dg


def _setup_context(ctx, inputs, output) -> None:
    candidates, direction = inputs
    ctx.save_for_backward(candidates, direction)


def _backward(ctx, grad):
    candidates, direction = ctx.saved_tensors
    need_x, need_g = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dg = torch.ops.spo_fast.direction_score_bwd(
        grad.float().contiguous(), candidates, direction, bool(need_x), bool(need_g)
    )
    return (dx if need_x else None), (dg if need_g else None)


_direction_score_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def direction_score_fused(candidates: Tensor, direction: Tensor) -> Tensor:
    """Scores ``[k, b]`` (fp32) of :func:`spo_fast.head.direction_scores_ref`: ``<x_ij - mean_i x_ij, g_j>`` for
    ``candidates [k, b, C, h, w]`` and ``direction [b, C, h, w]``, in one launch (two for few, large pools);
    differentiable with respect to both inputs (gradients in the inputs' dtypes)."""
    if candidates.ndim != 5:
        raise ValueError(f"candidates must be [k, b, C, h, w], got shape {tuple(candidates.shape)}")
    if direction.ndim != 4 or tuple(direction.shape) != tuple(candidates.shape[1:]):
        raise ValueError(
            f"direction must be [b, C, h, w] = {tuple(candidates.shape[1:])} to match candidates "
            f"{tuple(candidates.shape)}, got {tuple(direction.shape)}"
        )
    for name, t in (("candidates", candidates), ("direction", direction)):
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if direction.device != candidates.device:
        raise ValueError(f"direction is on {direction.device} but candidates are on {candidates.device}")
    if candidates.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "the Triton direction tail got CPU tensors but Triton is not in interpreter mode: set TRITON_INTERPRET=1 "
            "before spo_fast.kernels is imported, or use spo_fast.head.direction_scores_ref (SPO_FAST_HEAD_IMPL=torch)"
        )
    k, b, c, h, w = candidates.shape
    n = c * h * w
    # Views where possible: one latent must be contiguous, the k and b strides are free (the kernel takes them).
    x = candidates.reshape(k, b, n)
    if n > 1 and x.stride(2) != 1:
        x = x.contiguous()
    g = direction.reshape(b, n)
    if n > 1 and g.stride(1) != 1:
        g = g.contiguous()
    return torch.ops.spo_fast.direction_score_fwd(x, g)
