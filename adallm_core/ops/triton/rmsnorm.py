"""RMSNorm and residual-add + RMSNorm, one row per program, fp32 math (Gemma: weight_offset=1 multiplies by 1 + w)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from adallm_core.ops import pdl
from adallm_core.ops.triton.grid_dependency import wait_for_prior_kernel


@triton.jit
def rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, H, eps, offset, stride_x, stride_r, stride_o, stride_s,
                    BLOCK: tl.constexpr, ADD: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_prior_kernel(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    if ADD:  # the sum is rounded to the activation dtype first, as the unfused x + residual would be
        x = x + tl.load(r_ptr + row * stride_r + offs, mask=ok, other=0.0)
        tl.store(sum_ptr + row * stride_s + offs, x, mask=ok)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32) + offset
    tl.store(out_ptr + row * stride_o + offs, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=ok)


def _launch(x, residual, weight, eps, weight_offset):
    if x.dim() != 2 or x.stride(1) != 1 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm: x must be [T, H] contiguous in H with weight [H]; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    t, h = x.shape
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else out
    if t:
        block = triton.next_power_of_2(h)
        r = residual if residual is not None else x
        rms_norm_kernel[(t,)](x, r, weight, out, summed, h, float(eps), float(weight_offset), x.stride(0),
                              r.stride(0), out.stride(0), summed.stride(0), BLOCK=block, ADD=residual is not None,
                              num_warps=min(16, max(1, block // 512)), **pdl.triton_args(x.device, t),
                              enable_fp_fusion=True)
    return out, summed


def rms_norm(x, weight, eps: float, weight_offset: float = 0.0):
    return _launch(x, None, weight, eps, weight_offset)[0]


def add_rms_norm(x, residual, weight, eps: float, weight_offset: float = 0.0):
    if residual.shape != x.shape or residual.stride(1) != 1 or residual.dtype != x.dtype:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")
    return _launch(x, residual, weight, eps, weight_offset)
