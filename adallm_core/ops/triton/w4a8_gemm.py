"""NVFP4 linear on FP8 tensor cores (W4A8): y = (x_q * s_x) @ W.T with exact per-16-group weight scales.

Activations: per-token E4M3 (quant.per_token_fp8). Weights: the 4-bit code becomes the E4M3 byte of v * 2^-6 in
registers ((m << 2) | sign << 7; m=1 lands on the E4M3 subnormal 2^-7): exact. The E4M3 block scale is NOT folded
into the FP8 operand (v * scale is exact in E4M3 for only 73% of pairs); instead every 16-wide K group gets its own
fp32 partial dot, scaled by its block scale in fp32. An FP8 MMA spans K = 32 (two groups), so each 32-chunk runs two
dots, each with the other group's half zeroed: twice the MMA work of a dense FP8 GEMM, by construction.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from adallm_core.ops.triton.nvfp4_gemm import INTERPRET, check_args
from adallm_core.ops.triton.quant import per_token_fp8

_EPI = tl.constexpr(2.0**6)  # weights enter as v * 2^-6


@triton.jit
def w4a8_gemm_kernel(
    xq_ptr, xs_ptr, w_ptr, s_ptr, g_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, F32_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    # group programs along M so that neighbours share weight tiles in L2
    pid_m = pid % tl.cdiv(M, BLOCK_M)
    pid_n = pid // tl.cdiv(M, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, 32)
    offs_b = tl.arange(0, 16)
    first_half = (offs_k < 16)[:, None]  # [32, 1] along K of the B operand

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, 32):
        x = tl.load(xq_ptr + offs_m[:, None] * stride_xm + k0 + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        b = tl.load(w_ptr + offs_n[:, None] * stride_wn + k0 // 2 + offs_b[None, :], mask=mask_n[:, None], other=0)
        b = b.to(tl.int16)
        lo = ((b & 7) << 2) | ((b & 8) << 4)
        hi = (((b >> 4) & 7) << 2) | ((b & 0x80) >> 0)
        codes = tl.reshape(tl.join(lo, hi), (BLOCK_N, 32)).to(tl.uint8)  # element 2j low, 2j+1 high
        w = tl.trans(codes.to(tl.float8e4nv, bitcast=True))  # [32, BLOCK_N]
        s0 = tl.load(s_ptr + offs_n * stride_sn + k0 // 16, mask=mask_n, other=0.0).to(tl.float32)
        s1 = tl.load(s_ptr + offs_n * stride_sn + k0 // 16 + 1, mask=mask_n, other=0.0).to(tl.float32)
        zero = tl.zeros_like(w)
        w0 = tl.where(first_half, w, zero)
        w1 = tl.where(first_half, zero, w)
        if F32_DOT:  # the CPU interpreter has no FP8 dot
            x = x.to(tl.float32)
            w0 = w0.to(tl.float32)
            w1 = w1.to(tl.float32)
        d0 = tl.dot(x, w0)
        d1 = tl.dot(x, w1)
        acc += d0 * s0[None, :] + d1 * s1[None, :]

    xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0) * _EPI
    out = acc * xs[:, None] * g[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def w4a8_linear(x: torch.Tensor, w, config: dict | None = None) -> torch.Tensor:
    """x [M, K] -> per-token FP8 -> [M, N] in x.dtype. Lossy in the activations only (E4M3 has 3 mantissa bits)."""
    check_args(x, w)
    if x.shape[1] % 32:
        raise ValueError(f"w4a8_linear: K={x.shape[1]} must be a multiple of 32 (one FP8 MMA step)")
    if w.kernel_order:
        raise ValueError("w4a8_linear reads checkpoint-ordered codes; this weight is in the kernels' word order")
    m, k = x.shape
    n = w.out_features
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    xq, xs = per_token_fp8(x)
    cfg = dict(config or dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4))
    cfg.setdefault("F32_DOT", INTERPRET)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    w4a8_gemm_kernel[grid](
        xq, xs, w.packed, w.block_scale, w.global_scale, out,
        m, n, k, xq.stride(0), w.packed.stride(0), w.block_scale.stride(0), out.stride(0),
        **cfg, enable_fp_fusion=True,
    )
    return out
