"""NeoX-style rotary embedding of q [T, Hq, D] and k [T, Hk, D] at positions, cos_sin [max_pos, D] = cat(cos, sin)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(src_ptr, dst_ptr, t, heads, stride_st, stride_sh, stride_dt, stride_dh, cos, sin,
            HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, HALF)[None, :]
    ok = h < heads
    base = src_ptr + t * stride_st + h * stride_sh + j
    x1 = tl.load(base, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=ok, other=0.0).to(tl.float32)
    out = dst_ptr + t * stride_dt + h * stride_dh + j
    tl.store(out, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=ok)
    tl.store(out + HALF, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=ok)


@triton.jit
def rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cs_ptr, hq, hk, stride_qt, stride_qh, stride_kt, stride_kh,
                stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
                HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    j = tl.arange(0, HALF)[None, :]
    cos = tl.load(cs_ptr + pos * stride_cs + j).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + j).to(tl.float32)
    _rotate(q_ptr, qo_ptr, t, hq, stride_qt, stride_qh, stride_qot, stride_qoh, cos, sin, HALF, BLOCK_HQ)
    _rotate(k_ptr, ko_ptr, t, hk, stride_kt, stride_kh, stride_kot, stride_koh, cos, sin, HALF, BLOCK_HK)


def rope(q, k, positions, cos_sin):
    t, hq, d = q.shape
    if k.shape[0] != t or k.shape[2] != d or cos_sin.shape[1] != d or positions.shape != (t,) or d & (d - 1):
        raise ValueError(f"rope: q {tuple(q.shape)}, k {tuple(k.shape)}, positions {tuple(positions.shape)}, "
                         f"cos_sin {tuple(cos_sin.shape)} do not fit (head_dim a power of two)")
    if q.stride(2) != 1 or k.stride(2) != 1 or cos_sin.stride(1) != 1:
        raise ValueError("rope: q, k and cos_sin need a contiguous last dim")
    hk = k.shape[1]
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if t:
        rope_kernel[(t,)](q, k, q_out, k_out, positions, cos_sin, hq, hk, q.stride(0), q.stride(1), k.stride(0),
                          k.stride(1), q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
                          cos_sin.stride(0), HALF=d // 2, BLOCK_HQ=triton.next_power_of_2(hq),
                          BLOCK_HK=triton.next_power_of_2(hk), num_warps=4, enable_fp_fusion=True)
    return q_out, k_out
