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
def norm_rope_rows(heads_ptr, ok, w_ptr, eps, offset, cs_row, HALF: tl.constexpr):
    """Heads at heads_ptr ([R, 1] pointers to rows of 2 * HALF contiguous values) -> per-head RMSNorm (rounded to
    the source dtype, as the unfused op stores it) and NeoX RoPE with the position's cos | sin row, in fp32."""
    D: tl.constexpr = 2 * HALF
    d = tl.arange(0, D)[None, :]
    partner = (d + HALF) % D  # the other half's element that rotates with d
    x = tl.load(heads_ptr + d, mask=ok, other=0.0)
    dt = x.dtype
    x = x.to(tl.float32)
    xp = tl.load(heads_ptr + partner, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
    a = (x * rstd * (tl.load(w_ptr + d).to(tl.float32) + offset)).to(dt).to(tl.float32)
    ap = (xp * rstd * (tl.load(w_ptr + partner).to(tl.float32) + offset)).to(dt).to(tl.float32)
    cos = tl.load(cs_row + d % HALF).to(tl.float32)
    sin = tl.load(cs_row + HALF + d % HALF).to(tl.float32)
    return a * cos + tl.where(d < HALF, -ap, ap) * sin


@triton.jit
def store_kv_rows(row, kv_heads, ok, hq, hk, kw_ptr, eps, offset, cs_row, slot, kc_ptr, vc_ptr, stride_slot,
                  inv_k, inv_v, HALF: tl.constexpr, FP8: tl.constexpr):
    """One token's k (normed, rotated) and v of the KV heads kv_heads ([R, 1]) from its qkv row into cache slot
    `slot`; k rounded to the activation dtype first, FP8 caches scaled by 1/scale and saturated (a plain cast
    would turn overflow into NaN)."""
    D: tl.constexpr = 2 * HALF
    d = tl.arange(0, D)[None, :]
    k = norm_rope_rows(row + (hq + kv_heads) * D, ok, kw_ptr, eps, offset, cs_row, HALF)
    k = k.to(row.dtype.element_ty).to(tl.float32)
    v = tl.load(row + (hq + hk + kv_heads) * D + d, mask=ok, other=0.0).to(tl.float32)
    if FP8:
        k = tl.clamp(k * inv_k, -_FP8_MAX, _FP8_MAX)
        v = tl.clamp(v * inv_v, -_FP8_MAX, _FP8_MAX)
    dst = slot.to(tl.int64) * stride_slot + kv_heads * D + d
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=ok)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=ok)


@triton.jit
def qk_norm_rope_cache_kernel(
    qkv_ptr, qw_ptr, kw_ptr, pos_ptr, cs_ptr, q_out_ptr, kc_ptr, vc_ptr, slot_ptr,
    hq, hk, eps, offset, inv_k, inv_v, stride_t, stride_cs, stride_qo, stride_slot,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, FP8: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_prior_kernel(PDL)
    t = tl.program_id(0)
    cs_row = cs_ptr + tl.load(pos_ptr + t) * stride_cs
    row = qkv_ptr + t * stride_t
    D: tl.constexpr = 2 * HALF
    d = tl.arange(0, D)[None, :]

    heads = tl.arange(0, BLOCK_HQ)[:, None]
    q = norm_rope_rows(row + heads * D, heads < hq, qw_ptr, eps, offset, cs_row, HALF)
    tl.store(q_out_ptr + t * stride_qo + heads * D + d, q.to(q_out_ptr.dtype.element_ty), mask=heads < hq)

    slot = tl.load(slot_ptr + t * stride_slot)
    if slot >= 0:  # -1: a padding row of a CUDA graph, nothing to store
        kv_heads = tl.arange(0, BLOCK_HK)[:, None]
        store_kv_rows(row, kv_heads, kv_heads < hk, hq, hk, kw_ptr, eps, offset, cs_row, slot, kc_ptr, vc_ptr,
                      hk * D, inv_k, inv_v, HALF, FP8)


def check_args(qkv, positions, cos_sin, k_cache, v_cache, slot_mapping, num_heads: int, num_kv_heads: int) -> None:
    t, d = qkv.shape[0], k_cache.shape[-1]
    hq, hk = num_heads, num_kv_heads
    if (qkv.dim() != 2 or qkv.shape[1] != (hq + 2 * hk) * d or qkv.stride(1) != 1 or k_cache.shape[2:] != (hk, d)
            or v_cache.shape != k_cache.shape or slot_mapping.shape != (t,) or positions.shape != (t,)
            or cos_sin.shape[1] != d or d & (d - 1)):
        raise ValueError(f"qk_norm_rope_cache: qkv {tuple(qkv.shape)} ({hq} + 2 x {hk} heads), cache "
                         f"{tuple(k_cache.shape)}, slots {tuple(slot_mapping.shape)}, positions "
                         f"{tuple(positions.shape)}, cos_sin {tuple(cos_sin.shape)} do not fit")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and cos_sin.stride(1) == 1):
        raise ValueError("qk_norm_rope_cache: caches and cos_sin must be contiguous")


def qk_norm_rope_cache(qkv, q_weight, k_weight, eps: float, weight_offset: float, positions, cos_sin, k_cache,
                       v_cache, slot_mapping, k_scale: float, v_scale: float, num_heads: int,
                       num_kv_heads: int) -> torch.Tensor:
    """See ops.reference.qk_norm_rope_cache: q [T, Hq, D] out; this step's k/v stored in the caches."""
    check_args(qkv, positions, cos_sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads)
    t, d = qkv.shape[0], k_cache.shape[-1]
    hq, hk = num_heads, num_kv_heads
    q = torch.empty(t, hq, d, dtype=qkv.dtype, device=qkv.device)
    if t:
        qk_norm_rope_cache_kernel[(t,)](
            qkv, q_weight, k_weight, positions, cos_sin, q, k_cache, v_cache, slot_mapping,
            hq, hk, float(eps), float(weight_offset), 1.0 / k_scale, 1.0 / v_scale, qkv.stride(0),
            cos_sin.stride(0), q.stride(0), slot_mapping.stride(0),
            HALF=d // 2, BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
            FP8=k_cache.dtype == torch.float8_e4m3fn, num_warps=4, **pdl.triton_args(qkv.device, t),
            enable_fp_fusion=True)
    return q
