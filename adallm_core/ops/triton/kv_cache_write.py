"""kv_write: store this step's k/v [T, Hk, D] into the paged caches [num_blocks, block_size, Hk, D] at slot_mapping."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_FP8_MAX = tl.constexpr(448.0)


@triton.jit
def kv_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, inv_k, inv_v, stride_kt, stride_vt, stride_cs,
                    ROW: tl.constexpr, BLOCK: tl.constexpr, FP8: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK)
    ok = offs < ROW  # one token's Hk * D values are contiguous in both k and the cache slot
    k = tl.load(k_ptr + t * stride_kt + offs, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + t * stride_vt + offs, mask=ok, other=0.0).to(tl.float32)
    if FP8:  # saturate: a plain cast would turn overflow into NaN
        k = tl.clamp(k * inv_k, -_FP8_MAX, _FP8_MAX)
        v = tl.clamp(v * inv_v, -_FP8_MAX, _FP8_MAX)
    dst = slot.to(tl.int64) * stride_cs + offs
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=ok)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=ok)


def kv_write(k, v, k_cache, v_cache, slot_mapping, k_scale: float, v_scale: float) -> None:
    t, hk, d = k.shape
    if k_cache.shape[2:] != (hk, d) or v_cache.shape != k_cache.shape or slot_mapping.shape != (t,):
        raise ValueError(f"kv_write: k {tuple(k.shape)} / slots {tuple(slot_mapping.shape)} do not fit cache "
                         f"{tuple(k_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k.stride(1) != d or v.stride(1) != d:
        raise ValueError("kv_write: caches must be contiguous and k/v contiguous per token")
    if t == 0:
        return
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    kv_write_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping, 1.0 / k_scale, 1.0 / v_scale,
                          k.stride(0), v.stride(0), k_cache.stride(1), ROW=hk * d,
                          BLOCK=triton.next_power_of_2(hk * d), FP8=fp8, num_warps=4, enable_fp_fusion=True)
