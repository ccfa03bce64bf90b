"""Per-token FP8 (E4M3) quantization of activations: x [M, K] -> (x_q fp8 [M, K], scale fp32 [M]), x ~= x_q * scale
(the rule of reference.per_token_fp8)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def per_token_fp8_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / _FP8_MAX, 1e-12)
    inv = 1.0 / scale
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        q = tl.clamp(x * inv, -_FP8_MAX, _FP8_MAX)
        tl.store(q_ptr + row * stride_q + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=k0 + offs < K)
    tl.store(s_ptr + row, scale)


def per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"per_token_fp8: x must be a 2-D tensor with a contiguous last dim, got {tuple(x.shape)}")
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        block = min(4096, triton.next_power_of_2(k))
        per_token_fp8_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK=block,
                                   num_warps=8 if block >= 2048 else 4, enable_fp_fusion=True)
    return q, s

