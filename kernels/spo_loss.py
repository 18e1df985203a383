"""Fused SPO loss: closed-form log-ratios, clipped ratios and the DPO-style loss in one pass, gradient in one more.

SPO (arXiv 2406.04314) trains on pairs (x_t, x_w, x_l, t). With policy / reference predictions eps_theta, eps_ref,
per-sample DDIM scalars c1, c2, sigma (mu = c1 * x_t + c2 * eps) and N elements per sample:

    d      = mu_theta - mu_ref = c2 * (eps_theta - eps_ref)          eps_theta = u + g * (c - u) with CFG halves
    lr_w   = (2 <d, x_w - mu_ref> - <d, d>) / (2 sigma^2 N)          (lr_l likewise with x_l)
    r      = clamp(exp(lr), 1 - eps, 1 + eps)
    loss   = -log sigmoid(beta * (log r_w - log r_l))                per pair

    d loss / d eps_theta = c2 / (sigma^2 N) * (coef_w * (x_w - mu_theta) + coef_l * (x_l - mu_theta))
    coef_w = d loss / d lr_w = -beta * sigmoid(-z) * [r_w not clamped]     z = beta * (log r_w - log r_l)
    coef_l = d loss / d lr_l = +beta * sigmoid(-z) * [r_l not clamped]
    with CFG halves: d/d cond = g * d/d eps_theta, d/d uncond = (1 - g) * d/d eps_theta.

Shapes: every tensor input is ``[B, ...]`` with N = prod(...) elements per sample (any N: the tail block is
masked); c1, c2, sigma are ``[B]``. Outputs are ``[B]`` in the accumulation dtype: fp32 for fp32 / bf16 / fp16
inputs (each input is read in its own dtype), fp64 if any input is fp64.

Kernels: forward = a (pair, block) grid writing per-block partial sums <d, d>, <d, x_w - mu_ref>,
<d, x_l - mu_ref> (a two-stage reduce rather than atomics, so results are deterministic run to run), then one
program per pair reducing them and evaluating the scalar epilogue. Backward = one (pair, block) pass over x_t,
x_w, x_l and the policy prediction writing the gradient (both halves with CFG); the reference prediction is not
read again. Traffic: forward reads 5 (6 with CFG) tensors, backward reads 4 (5) and writes 1 (2).

The ops are registered with ``torch.library.custom_op`` (``spo_fast::spo_loss_fwd`` / ``spo_fast::spo_loss_bwd``)
with fake implementations and ``register_autograd``, so ``torch.compile`` traces through them without a graph
break; the registered autograd plays the role of an ``autograd.Function`` (an ``autograd.Function`` launching
Triton directly would be opaque to the compiler). The backward is itself an op, so compiled backward graphs keep it.

Importing this module under ``TRITON_INTERPRET=1`` makes the kernels run on CPU tensors (Triton decides at
decoration time), which is how the tests exercise them without a GPU.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl
from torch import Tensor

from spo_fast.ddim import DDIMCoefficients
from spo_fast.loss import CFGPrediction, spo_log_ratios, spo_loss_from_log_ratios

__all__ = ["spo_loss_fused", "spo_loss_fused_ref", "INTERPRETED"]

logger = logging.getLogger(__name__)

# Triton picks interpreter or compiler when a kernel is decorated, i.e. when this module is imported.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Caps of the interpreter's block and of the epilogue's chunk over blocks; tests lower them to exercise the
# multi-block, masked-tail and chunked-epilogue paths on small shapes.
_INTERPRETER_MAX_BLOCK = 1 << 16
_MAX_BLOCK_NB = 1024


# ----------------------------------------------------------------------------------------------------------------
# PyTorch reference: the foundation's closed form (spo_fast.loss), shared with the CPU fallback and the tests.
# ----------------------------------------------------------------------------------------------------------------


def spo_loss_fused_ref(
    coeffs: DDIMCoefficients,
    policy_pred: Tensor | CFGPrediction,
    ref_pred: Tensor | CFGPrediction,
    sample: Tensor,
    win_sample: Tensor,
    lose_sample: Tensor,
    beta: float = 10.0,
    eps: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Same contract as :func:`spo_loss_fused`, evaluated by :func:`spo_fast.loss.spo_log_ratios`."""
    lr_w, lr_l = spo_log_ratios(coeffs, policy_pred, ref_pred, sample, win_sample, lose_sample)
    per_pair, ratio_w, ratio_l = spo_loss_from_log_ratios(lr_w, lr_l, beta, eps)
    return per_pair, ratio_w, ratio_l, lr_w, lr_l


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _spo_loss_partial_kernel(
    x_ptr,
    xw_ptr,
    xl_ptr,
    p_ptr,  # policy prediction, or its unconditional half with HAS_CFG
    pc_ptr,  # conditional half (unused without HAS_CFG)
    r_ptr,
    c1_ptr,
    c2_ptr,
    part_ptr,  # [B, NBLK, 3] partial sums
    N,
    NBLK,
    guidance_scale,
    HAS_CFG: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    # int64 row offset: B * N exceeds 2^31 for large batches of SDXL-sized latents.
    base = pid_b.to(tl.int64) * N
    c1 = tl.load(c1_ptr + pid_b).to(ACC)
    c2 = tl.load(c2_ptr + pid_b).to(ACC)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    xw = tl.load(xw_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    xl = tl.load(xl_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    p = tl.load(p_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    if HAS_CFG:
        pc = tl.load(pc_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        p = p + guidance_scale * (pc - p)
    r = tl.load(r_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    # Masked lanes load zeros, so d = 0 there and they add nothing to any of the three sums.
    d = c2 * (p - r)
    mu_ref = c1 * x + c2 * r
    out = part_ptr + (pid_b.to(tl.int64) * NBLK + pid_n) * 3
    tl.store(out, tl.sum(d * d, axis=0))
    tl.store(out + 1, tl.sum(d * (xw - mu_ref), axis=0))
    tl.store(out + 2, tl.sum(d * (xl - mu_ref), axis=0))


@triton.jit
def _log1p_exp_neg(u):
    # log(1 + u) for u = exp(-|z|) in (0, 1]; the series keeps relative accuracy when u is below fp32's epsilon
    # (tl has no log1p that also runs in the interpreter).
    return tl.where(u < 1e-4, u - 0.5 * u * u, tl.log(1.0 + u))


@triton.jit
def _spo_loss_epilogue_kernel(
    part_ptr,
    sigma_ptr,
    loss_ptr,
    lrw_ptr,
    lrl_ptr,
    rw_ptr,
    rl_ptr,
    aux_ptr,  # [4, B]: d loss/d lr_w, d loss/d lr_l, d r_w/d lr_w, d r_l/d lr_l (saved for backward)
    B,
    N,
    NBLK,
    beta,
    eps,
    ACC: tl.constexpr,
    BLOCK_NB: tl.constexpr,
):
    pid_b = tl.program_id(0)
    row = part_ptr + pid_b.to(tl.int64) * NBLK * 3
    dd = tl.zeros((BLOCK_NB,), dtype=ACC)
    sw = tl.zeros((BLOCK_NB,), dtype=ACC)
    sl = tl.zeros((BLOCK_NB,), dtype=ACC)
    for start in range(0, NBLK, BLOCK_NB):
        offs = start + tl.arange(0, BLOCK_NB)
        m = offs < NBLK
        dd += tl.load(row + offs * 3, mask=m, other=0.0)
        sw += tl.load(row + offs * 3 + 1, mask=m, other=0.0)
        sl += tl.load(row + offs * 3 + 2, mask=m, other=0.0)
    dd_s = tl.sum(dd, axis=0)
    sw_s = tl.sum(sw, axis=0)
    sl_s = tl.sum(sl, axis=0)
    sigma = tl.load(sigma_ptr + pid_b).to(ACC)
    scale = 1.0 / (2.0 * sigma * sigma * N)
    # s - s is 0 for finite s and NaN for inf / NaN: a non-finite input gives a NaN log-ratio, as in the
    # reference, instead of an infinite one that the clip would turn into a finite loss with zero gradient.
    lr_w = (2.0 * sw_s - dd_s) * scale + ((dd_s - dd_s) + (sw_s - sw_s))
    lr_l = (2.0 * sl_s - dd_s) * scale + ((dd_s - dd_s) + (sl_s - sl_s))
    lo = 1.0 - eps
    hi = 1.0 + eps
    ew = tl.exp(lr_w)
    el = tl.exp(lr_l)
    # Explicit where (not minimum/maximum) so a NaN stays NaN, as torch.clamp does; the pass-through masks are
    # inclusive at the bounds, as torch.clamp's gradient is.
    r_w = tl.where(ew < lo, lo, tl.where(ew > hi, hi, ew))
    r_l = tl.where(el < lo, lo, tl.where(el > hi, hi, el))
    pass_w = ((ew >= lo) & (ew <= hi)).to(ACC)
    pass_l = ((el >= lo) & (el <= hi)).to(ACC)
    z = beta * (tl.log(r_w) - tl.log(r_l))
    u = tl.exp(-tl.abs(z))
    loss = tl.maximum(-z, 0.0) + _log1p_exp_neg(u)  # softplus(-z) = -log sigmoid(z), overflow-free
    sig_neg = tl.where(z >= 0, u / (1.0 + u), 1.0 / (1.0 + u))  # sigmoid(-z)
    tl.store(loss_ptr + pid_b, loss)
    tl.store(lrw_ptr + pid_b, lr_w)
    tl.store(lrl_ptr + pid_b, lr_l)
    tl.store(rw_ptr + pid_b, r_w)
    tl.store(rl_ptr + pid_b, r_l)
    tl.store(aux_ptr + pid_b, -beta * sig_neg * pass_w)
    tl.store(aux_ptr + B + pid_b, beta * sig_neg * pass_l)
    tl.store(aux_ptr + 2 * B + pid_b, ew * pass_w)
    tl.store(aux_ptr + 3 * B + pid_b, el * pass_l)


@triton.jit
def _spo_loss_backward_kernel(
    x_ptr,
    xw_ptr,
    xl_ptr,
    p_ptr,
    pc_ptr,
    c1_ptr,
    c2_ptr,
    sigma_ptr,
    aux_ptr,  # [4, B] from the forward epilogue
    gout_ptr,  # [5, B] upstream grads of (loss, lr_w, lr_l, r_w, r_l)
    gp_ptr,  # grad of the policy prediction (or of the unconditional half with HAS_CFG)
    gpc_ptr,  # grad of the conditional half
    B,
    N,
    guidance_scale,
    HAS_CFG: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = pid_b.to(tl.int64) * N
    # Per-pair chain rule through the scalar epilogue, recomputed by every block (five scalar loads, no launch).
    g_loss = tl.load(gout_ptr + pid_b).to(ACC)
    coef_w = (
        g_loss * tl.load(aux_ptr + pid_b).to(ACC)
        + tl.load(gout_ptr + B + pid_b).to(ACC)
        + tl.load(gout_ptr + 3 * B + pid_b).to(ACC) * tl.load(aux_ptr + 2 * B + pid_b).to(ACC)
    )
    coef_l = (
        g_loss * tl.load(aux_ptr + B + pid_b).to(ACC)
        + tl.load(gout_ptr + 2 * B + pid_b).to(ACC)
        + tl.load(gout_ptr + 4 * B + pid_b).to(ACC) * tl.load(aux_ptr + 3 * B + pid_b).to(ACC)
    )
    c1 = tl.load(c1_ptr + pid_b).to(ACC)
    c2 = tl.load(c2_ptr + pid_b).to(ACC)
    sigma = tl.load(sigma_ptr + pid_b).to(ACC)
    scale = c2 / (sigma * sigma * N)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    xw = tl.load(xw_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    xl = tl.load(xl_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    p = tl.load(p_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    if HAS_CFG:
        pc = tl.load(pc_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        p = p + guidance_scale * (pc - p)
    mu_theta = c1 * x + c2 * p
    grad = scale * (coef_w * (xw - mu_theta) + coef_l * (xl - mu_theta))
    if HAS_CFG:
        tl.store(gp_ptr + base + offs, ((1.0 - guidance_scale) * grad).to(gp_ptr.dtype.element_ty), mask=mask)
        tl.store(gpc_ptr + base + offs, (guidance_scale * grad).to(gpc_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(gp_ptr + base + offs, grad.to(gp_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _acc_of(*ts: Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _tl_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block(n: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK, num_warps) for the streaming passes."""
    if not on_gpu:
        # The interpreter pays per program, not per element: one large block per sample where possible.
        return min(triton.next_power_of_2(n), _INTERPRETER_MAX_BLOCK), 4
    # 1024 elements x 5-6 input streams per program keeps SD1.5 (N = 16384, B = 10) at 160 programs, above the
    # H100's 132 SMs; larger blocks would leave SMs idle on these small, launch-bound shapes.
    return 1024, 4


def _spo_loss_forward(
    sample: Tensor,
    win_sample: Tensor,
    lose_sample: Tensor,
    policy: Tensor,
    policy_cond: Tensor | None,
    ref: Tensor,
    c1: Tensor,
    c2: Tensor,
    sigma: Tensor,
    guidance_scale: float,
    beta: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    b = sample.shape[0]
    n = sample[0].numel()
    acc = _acc_of(sample, win_sample, lose_sample, policy, policy_cond, ref)
    block, warps = _block(n, sample.is_cuda)
    nblk = triton.cdiv(n, block)
    part = torch.empty((b, nblk, 3), device=sample.device, dtype=acc)
    _spo_loss_partial_kernel[(b, nblk)](
        sample,
        win_sample,
        lose_sample,
        policy,
        policy_cond if policy_cond is not None else policy,
        ref,
        c1,
        c2,
        part,
        n,
        nblk,
        float(guidance_scale),
        HAS_CFG=policy_cond is not None,
        ACC=_tl_dtype(acc),
        BLOCK=block,
        num_warps=warps,
    )
    outs = [torch.empty(b, device=sample.device, dtype=acc) for _ in range(5)]
    aux = torch.empty((4, b), device=sample.device, dtype=acc)
    _spo_loss_epilogue_kernel[(b,)](
        part,
        sigma,
        *outs,
        aux,
        b,
        n,
        nblk,
        float(beta),
        float(eps),
        ACC=_tl_dtype(acc),
        BLOCK_NB=min(triton.next_power_of_2(nblk), _MAX_BLOCK_NB),
        num_warps=1,
    )
    loss, lr_w, lr_l, r_w, r_l = outs
    return loss, lr_w, lr_l, r_w, r_l, aux


def _spo_loss_backward(
    sample: Tensor,
    win_sample: Tensor,
    lose_sample: Tensor,
    policy: Tensor,
    policy_cond: Tensor | None,
    c1: Tensor,
    c2: Tensor,
    sigma: Tensor,
    aux: Tensor,
    grad_outputs: Tensor,
    guidance_scale: float,
) -> list[Tensor]:
    b = sample.shape[0]
    n = sample[0].numel()
    acc = aux.dtype
    block, warps = _block(n, sample.is_cuda)
    grad_p = torch.empty_like(policy)
    grad_pc = torch.empty_like(policy_cond) if policy_cond is not None else grad_p
    _spo_loss_backward_kernel[(b, triton.cdiv(n, block))](
        sample,
        win_sample,
        lose_sample,
        policy,
        policy_cond if policy_cond is not None else policy,
        c1,
        c2,
        sigma,
        aux,
        grad_outputs,
        grad_p,
        grad_pc,
        b,
        n,
        float(guidance_scale),
        HAS_CFG=policy_cond is not None,
        ACC=_tl_dtype(acc),
        BLOCK=block,
        num_warps=warps,
    )
    return [grad_p, grad_pc] if policy_cond is not None else [grad_p]


# ----------------------------------------------------------------------------------------------------------------
# Custom ops with registered autograd (the autograd.Function of this kernel, visible to torch.compile)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("spo_fast::spo_loss_fwd", mutates_args=())
def _spo_loss_fwd_op(
    sample: Tensor,
    win_sample: Tensor,
    lose_sample: Tensor,
    policy: Tensor,
    policy_cond: Tensor | None,
    ref: Tensor,
    c1: Tensor,
    c2: Tensor,
    sigma: Tensor,
    guidance_scale: float,
    beta: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(per_pair_loss, lr_w, lr_l, ratio_w, ratio_l, aux)``; inputs contiguous ``[B, N]``, c1/c2/sigma ``[B]``."""
    return _spo_loss_forward(
        sample, win_sample, lose_sample, policy, policy_cond, ref, c1, c2, sigma, guidance_scale, beta, eps
    )


@_spo_loss_fwd_op.register_fake
def _(sample, win_sample, lose_sample, policy, policy_cond, ref, c1, c2, sigma, guidance_scale, beta, eps):
    acc = _acc_of(sample, win_sample, lose_sample, policy, policy_cond, ref)
    b = sample.shape[0]
    outs = tuple(sample.new_empty(b, dtype=acc) for _ in range(5))
    return (*outs, sample.new_empty((4, b), dtype=acc))


@torch.library.custom_op("spo_fast::spo_loss_bwd", mutates_args=())
def _spo_loss_bwd_op(
    sample: Tensor,
    win_sample: Tensor,
    lose_sample: Tensor,
    policy: Tensor,
    policy_cond: Tensor | None,
    c1: Tensor,
    c2: Tensor,
    sigma: Tensor,
    aux: Tensor,
    grad_outputs: Tensor,
    guidance_scale: float,
) -> list[Tensor]:
    """Gradient of the policy prediction (``[grad]``, or ``[grad_uncond, grad_cond]`` with CFG halves)."""
    return _spo_loss_backward(
        sample, win_sample, lose_sample, policy, policy_cond, c1, c2, sigma, aux, grad_outputs, guidance_scale
    )


@_spo_loss_bwd_op.register_fake
def _(sample, win_sample, lose_sample, policy, policy_cond, c1, c2, sigma, aux, grad_outputs, guidance_scale):
    return [torch.empty_like(policy)] + ([torch.empty_like(policy_cond)] if policy_cond is not None else [])


def _setup_context(ctx, inputs, output) -> None:
    sample, win_sample, lose_sample, policy, policy_cond, _ref, c1, c2, sigma, guidance_scale, _beta, _eps = inputs
    ctx.guidance_scale = guidance_scale
    ctx.has_cfg = policy_cond is not None
    aux = output[5]
    # The reference prediction is not saved: the gradient needs mu_theta only.
    ctx.save_for_backward(sample, win_sample, lose_sample, policy, policy_cond, c1, c2, sigma, aux)


def _backward(ctx, g_loss, g_lrw, g_lrl, g_rw, g_rl, _g_aux):
    sample, win_sample, lose_sample, policy, policy_cond, c1, c2, sigma, aux = ctx.saved_tensors
    # Outputs that did not reach the loss come back as None: they contribute nothing.
    grads = [g if g is not None else torch.zeros_like(aux[0]) for g in (g_loss, g_lrw, g_lrl, g_rw, g_rl)]
    grad_outputs = torch.stack(grads).to(aux.dtype).contiguous()
    gp = _spo_loss_bwd_op(
        sample, win_sample, lose_sample, policy, policy_cond, c1, c2, sigma, aux, grad_outputs, ctx.guidance_scale
    )
    grad_policy = gp[0] if ctx.needs_input_grad[3] else None
    grad_cond = gp[1] if ctx.has_cfg and ctx.needs_input_grad[4] else None
    return None, None, None, grad_policy, grad_cond, None, None, None, None, None, None, None


_spo_loss_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def _flat(name: str, t: Tensor, like: Tensor) -> Tensor:
    if t.shape != like.shape:
        raise ValueError(f"{name} {tuple(t.shape)} and sample {tuple(like.shape)} must have the same shape")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but sample is on {like.device}; move them to one device")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    # The kernels index rows as b * N + i: copy strided inputs once rather than failing.
    return t.reshape(t.shape[0], -1).contiguous()


def spo_loss_fused(
    coeffs: DDIMCoefficients,
    policy_pred: Tensor | CFGPrediction,
    ref_pred: Tensor | CFGPrediction,
    sample: Tensor,
    win_sample: Tensor,
    lose_sample: Tensor,
    beta: float = 10.0,
    eps: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(per_pair_loss, ratio_win, ratio_lose, log_ratio_win, log_ratio_lose)``, each ``[B]``, by the fused kernel.

    ``sample`` (x_t), ``win_sample``, ``lose_sample`` and the predictions are ``[B, ...]`` on one device;
    ``coeffs`` holds linear DDIM coefficients (``clip_sample`` off) for the B samples. ``policy_pred`` may be a
    :class:`~spo_fast.loss.CFGPrediction`, combined in the kernel; both halves then receive gradients. A
    ``CFGPrediction`` reference is combined beforehand (it gets no gradient and is read once). All outputs are
    differentiable with respect to the policy prediction.
    """
    if not coeffs.is_linear:
        raise ValueError("the fused SPO loss needs linear DDIM coefficients (scheduler clip_sample=False)")
    if sample.ndim < 2 or sample.shape[0] == 0:
        raise ValueError(f"sample must be a non-empty batch [b, ...], got shape {tuple(sample.shape)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (the paper uses 10), got {beta}")
    if not 0 < eps < 1:
        raise ValueError(f"eps (the ratio clip) must lie in (0, 1) (the paper uses 0.1), got {eps}")
    if sample.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "the Triton SPO loss got CPU tensors but Triton is not in interpreter mode: set TRITON_INTERPRET=1 "
            "before spo_fast.kernels is imported, or use SPO_FAST_LOSS_IMPL=torch"
        )
    if isinstance(policy_pred, CFGPrediction):
        policy = _flat("policy_pred.uncond", policy_pred.uncond, sample)
        policy_cond: Tensor | None = _flat("policy_pred.cond", policy_pred.cond, sample)
        guidance_scale = float(policy_pred.guidance_scale)
    else:
        policy, policy_cond, guidance_scale = _flat("policy_pred", policy_pred, sample), None, 1.0
    flat_ref = _tensors_ref(ref_pred, sample, policy, policy_cond)
    x = _flat("sample", sample, sample)
    xw = _flat("win_sample", win_sample, sample)
    xl = _flat("lose_sample", lose_sample, sample)
    acc = _acc_of(x, xw, xl, policy, policy_cond, flat_ref)
    c = coeffs.to(dtype=acc, device=sample.device)
    if c.sigma.shape != (sample.shape[0],):
        raise ValueError(f"coeffs hold {tuple(c.sigma.shape)} samples but sample has {sample.shape[0]}")
    loss, lr_w, lr_l, r_w, r_l, _ = torch.ops.spo_fast.spo_loss_fwd(
        x,
        xw,
        xl,
        policy,
        policy_cond,
        flat_ref,
        c.c1.contiguous(),
        c.c2.contiguous(),
        c.sigma.contiguous(),
        guidance_scale,
        float(beta),
        float(eps),
    )
    return loss, r_w, r_l, lr_w, lr_l


def _tensors_ref(
    ref_pred: Tensor | CFGPrediction, sample: Tensor, policy: Tensor, policy_cond: Tensor | None
) -> Tensor:
    if isinstance(ref_pred, CFGPrediction):
        _flat("ref_pred.uncond", ref_pred.uncond, sample)
        _flat("ref_pred.cond", ref_pred.cond, sample)
        with torch.no_grad():
            # Combined in the accumulation dtype, as the reference does, then read once by the kernel.
            acc = _acc_of(sample, policy, policy_cond, ref_pred.uncond, ref_pred.cond)
            return ref_pred.combined(acc).reshape(sample.shape[0], -1).contiguous()
    return _flat("ref_pred", ref_pred, sample).detach()
