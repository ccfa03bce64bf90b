"""qk_norm_rope_cache: from the fused qkv projection's output, per-head RMSNorm of q and k, NeoX RoPE, and the k/v
store into the paged cache, in one launch per step instead of six (two strided copies, two norms, rope, kv_write).

One program per token. Rounding follows the unfused ops exactly: the normed q/k are rounded to the activation
dtype before RoPE, the rotated k before its cache store (see ops.reference.qk_norm_rope_cache).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from adallm_core.ops import pdl
from adallm_core.ops.triton.grid_dependency import wait_for_prior_kernel

_FP8_MAX = tl.constexpr(448.0)


@triton.jit
def _norm_rope(x_ptr, w_ptr, heads, eps, offset, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Heads [BLOCK_H, 2 * HALF] at x_ptr (contiguous) -> rotated halves (fp32, rounded like the unfused ops)."""
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, HALF)[None, :]
    ok = h < heads
    x1 = tl.load(x_ptr + h * (2 * HALF) + j, mask=ok, other=0.0)
    x2 = tl.load(x_ptr + h * (2 * HALF) + HALF + j, mask=ok, other=0.0)
    dt = x1.dtype
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / (2 * HALF) + eps)
    w1 = tl.load(w_ptr + j).to(tl.float32) + offset
    w2 = tl.load(w_ptr + HALF + j).to(tl.float32) + offset
    a = (a * rstd[:, None] * w1).to(dt).to(tl.float32)
    b = (b * rstd[:, None] * w2).to(dt).to(tl.float32)
    return a * cos - b * sin, b * cos + a * sin


@triton.jit
def qk_norm_rope_cache_kernel(
    qkv_ptr, qw_ptr, kw_ptr, pos_ptr, cs_ptr, q_out_ptr, kc_ptr, vc_ptr, slot_ptr,
    hq, hk, eps, offset, inv_k, inv_v, stride_t, stride_cs, stride_qo, stride_slot,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, FP8: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_prior_kernel(PDL)
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    j = tl.arange(0, HALF)[None, :]
    cos = tl.load(cs_ptr + pos * stride_cs + j).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + j).to(tl.float32)
    row = qkv_ptr + t * stride_t
    D: tl.constexpr = 2 * HALF

    q1, q2 = _norm_rope(row, qw_ptr, hq, eps, offset, cos, sin, HALF, BLOCK_HQ)
    hq_i = tl.arange(0, BLOCK_HQ)[:, None]
    q_dst = q_out_ptr + t * stride_qo + hq_i * D + j
    tl.store(q_dst, q1.to(q_out_ptr.dtype.element_ty), mask=hq_i < hq)
    tl.store(q_dst + HALF, q2.to(q_out_ptr.dtype.element_ty), mask=hq_i < hq)

    slot = tl.load(slot_ptr + t * stride_slot)
    if slot >= 0:  # -1: a padding row of a CUDA graph, nothing to store
        k1, k2 = _norm_rope(row + hq * D, kw_ptr, hk, eps, offset, cos, sin, HALF, BLOCK_HK)
        hk_i = tl.arange(0, BLOCK_HK)[:, None]
        ok = hk_i < hk
        v_src = row + (hq + hk) * D + hk_i * D + j
        v1 = tl.load(v_src, mask=ok, other=0.0).to(tl.float32)
        v2 = tl.load(v_src + HALF, mask=ok, other=0.0).to(tl.float32)
        dt = q_out_ptr.dtype.element_ty
        k1, k2 = k1.to(dt).to(tl.float32), k2.to(dt).to(tl.float32)
        if FP8:  # saturate: a plain cast would turn overflow into NaN
            k1 = tl.clamp(k1 * inv_k, -_FP8_MAX, _FP8_MAX)
            k2 = tl.clamp(k2 * inv_k, -_FP8_MAX, _FP8_MAX)
            v1 = tl.clamp(v1 * inv_v, -_FP8_MAX, _FP8_MAX)
            v2 = tl.clamp(v2 * inv_v, -_FP8_MAX, _FP8_MAX)
        dst = slot.to(tl.int64) * (hk * D) + hk_i * D + j
        tl.store(kc_ptr + dst, k1.to(kc_ptr.dtype.element_ty), mask=ok)
        tl.store(kc_ptr + dst + HALF, k2.to(kc_ptr.dtype.element_ty), mask=ok)
        tl.store(vc_ptr + dst, v1.to(vc_ptr.dtype.element_ty), mask=ok)
        tl.store(vc_ptr + dst + HALF, v2.to(vc_ptr.dtype.element_ty), mask=ok)


def qk_norm_rope_cache(qkv, q_weight, k_weight, eps: float, weight_offset: float, positions, cos_sin, k_cache,
                       v_cache, slot_mapping, k_scale: float, v_scale: float, num_heads: int,
                       num_kv_heads: int) -> torch.Tensor:
    """See ops.reference.qk_norm_rope_cache: q [T, Hq, D] out; this step's k/v stored in the caches."""
    t = qkv.shape[0]
    d = k_cache.shape[-1]
    hq, hk = num_heads, num_kv_heads
    if (qkv.dim() != 2 or qkv.shape[1] != (hq + 2 * hk) * d or qkv.stride(1) != 1 or k_cache.shape[2:] != (hk, d)
            or v_cache.shape != k_cache.shape or slot_mapping.shape != (t,) or positions.shape != (t,)
            or cos_sin.shape[1] != d or d & (d - 1)):
        raise ValueError(f"qk_norm_rope_cache: qkv {tuple(qkv.shape)} ({hq} + 2 x {hk} heads), cache "
                         f"{tuple(k_cache.shape)}, slots {tuple(slot_mapping.shape)}, positions "
                         f"{tuple(positions.shape)}, cos_sin {tuple(cos_sin.shape)} do not fit")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and cos_sin.stride(1) == 1):
        raise ValueError("qk_norm_rope_cache: caches and cos_sin must be contiguous")
    q = torch.empty(t, hq, d, dtype=qkv.dtype, device=qkv.device)
    if t:
        qk_norm_rope_cache_kernel[(t,)](
            qkv, q_weight, k_weight, positions, cos_sin, q, k_cache, v_cache, slot_mapping,
            hq, hk, float(eps), float(weight_offset), 1.0 / k_scale, 1.0 / v_scale, qkv.stride(0),
            cos_sin.stride(0), q.stride(0), slot_mapping.stride(0),
            HALF=d // 2, BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
            FP8=k_cache.dtype == torch.float8_e4m3fn, num_warps=4, **pdl.triton_args(qkv.device, t))
    return q
