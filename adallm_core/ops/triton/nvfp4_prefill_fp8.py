"""The prefill_fp8 linears (EngineArgs.prefill_fp8, off by default): prompt steps on FP8 tensor cores, lossy.

Every exact NVFP4 scheme runs BF16-rate MMAs (benchmarks/NOTES.md), so the exact prefill path (nvfp4_prefill.py)
cannot pass torch's BF16 GEMM; FP8 MMAs run at twice that rate on Ada and Hopper. Steps of
reference.FP8_PREFILL_MIN_TOKENS or more tokens: the activations go to E4M3 per token (quant.py), the weights are
dequantized once per slab to E4M3 with a power of two per row (reference.fp8_row_exponents), and one FP8 GEMM per
slab (torch._scaled_mm) applies the per-token scales and each row's global scale * 2^e in its epilogue. The cost is
two roundings the exact path does not make: the activations to E4M3, and the weights whose block scale (4
significant bits) times E2M1 value (2) needs more than E4M3's 4. reference.nvfp4_linear_fp8 is the definition;
the GEMMs here also take cuBLAS's fast FP8 accumulation (FAST_ACCUM), a third, smaller rounding.
Fewer tokens, or N not a multiple of 16 (which FP8 GEMMs need): the exact op.
"""
from __future__ import annotations

import torch

from adallm_core.ops import reference
from adallm_core.ops.triton import nvfp4_prefill
from adallm_core.ops.triton.activation import GATED_ACTIVATIONS
from adallm_core.ops.triton.nvfp4_gemm import check_args
from adallm_core.ops.triton.quant import per_token_fp8

SLAB_ELEMS = 1 << 27  # weights a slab (128 MB of E4M3, the exact path's slab bytes): every Qwen3-8B linear in one
# cuBLAS's FP8 fast accumulation (Hopper promotes the MMAs' partial sums to fp32 less often): a Qwen3-8B layer at
# 2048 tokens 796 -> 728 us on the H100, at 0.26-0.37% relative error against fp32 sums (0.09% without), small beside
# the path's E4M3 roundings (~3.4%); NOTES.md, session 47
FAST_ACCUM = True


def nvfp4_linear_fp8(x: torch.Tensor, w) -> torch.Tensor:
    if x.dim() == 2 and takes(x, w):
        check_args(x, w)
        # the row scales are computed once per weight, never inside a CUDA-graph capture (they would hold nothing
        # until the graph's first replay)
        if "_fp8_rows" in w.__dict__ or not torch.cuda.is_current_stream_capturing():
            return fp8_gemm(x, w)
    return nvfp4_prefill.nvfp4_linear(x, w)


def nvfp4_gated_linear_fp8(x: torch.Tensor, w, activation: str) -> torch.Tensor:
    if x.dim() == 2 and takes(x, w) and activation in GATED_ACTIVATIONS:
        return GATED_ACTIVATIONS[activation](nvfp4_linear_fp8(x, w))
    return nvfp4_prefill.nvfp4_gated_linear(x, w, activation)


def takes(x: torch.Tensor, w) -> bool:
    return x.shape[0] >= reference.FP8_PREFILL_MIN_TOKENS and w.out_features % 16 == 0


def row_scales(w) -> tuple[torch.Tensor, torch.Tensor]:
    """(2^(8 - e), global scale * 2^e) per row: what the slab's rows are multiplied by (its values arrive as
    v * scale * 2^-8) and what the GEMM scales them back by. Computed on the GPU once per weight, cached on it."""
    if "_fp8_rows" not in w.__dict__:
        e = reference.fp8_row_exponents(w)
        w.__dict__["_fp8_rows"] = (torch.exp2(8.0 - e), w.global_scale * torch.exp2(e))
    return w.__dict__["_fp8_rows"]


def fp8_gemm(x: torch.Tensor, w) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] in x.dtype as reference.nvfp4_linear_fp8 defines it, one GEMM per slab (BF16 out:
    what row-wise scaled FP8 GEMMs give)."""
    row_mul, col_scale = row_scales(w)
    xq, xs = per_token_fp8(x)
    n, k = w.out_features, w.in_features
    slabs = nvfp4_prefill.equal_slabs(0, n, k, SLAB_ELEMS)
    buffer = torch.empty(max(stop - start for start, stop in slabs) * k, dtype=torch.float8_e4m3fn, device=x.device)
    parts = []
    for start, stop in slabs:  # one buffer for every slab: the stream orders each GEMM before the next fill
        slab = nvfp4_prefill.dequantize_rows(w, start, stop, buffer[: (stop - start) * k].view(stop - start, k),
                                             row_mul=row_mul[start:stop])
        parts.append(torch._scaled_mm(xq, slab.t(), scale_a=xs[:, None], scale_b=col_scale[None, start:stop],
                                      out_dtype=torch.bfloat16, use_fast_accum=FAST_ACCUM))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return out if x.dtype == torch.bfloat16 else out.to(x.dtype)
