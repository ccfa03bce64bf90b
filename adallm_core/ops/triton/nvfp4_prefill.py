"""The nvfp4_linear op, and its large-M (prefill) path: dequantize a slab of weight rows to BF16 once, then one cuBLAS
GEMM per slab. Everything else goes to the tiled kernel (nvfp4_gemm.py).

The tiled kernel (nvfp4_gemm.py) repeats the dequantization of each weight tile for every tile of M rows, which at
M = 2048 costs as much as its MMAs (benchmarks/NOTES.md). Here each weight is dequantized once per call into a
reused slab (at most SLAB_ELEMS weights: 128 MB of BF16, never a copy of the model), and
the GEMM runs at cuBLAS speed. Exact like the tiled kernel: the slab holds v * scale * 2^-8 (exact in BF16) and
the global scale * 2^8 is the GEMM's fp32 alpha, applied before the one rounding to BF16 (cuBLAS may not reduce
split-K partials in BF16 meanwhile, full_precision_reduction). Alpha is one number per
GEMM, so a slab never spans rows with different global scales: checkpoints have one per linear (q|k|v fused: three
runs); a weight with more than MAX_RUNS distinct runs is left to the tiled kernel.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from adallm_core.ops import cuda_gemv, pdl
from adallm_core.ops.triton.activation import GATED_ACTIVATIONS
from adallm_core.ops.triton.nvfp4_gemm import _dequant_words, _tile_major_offsets, block_scales, check_args
from adallm_core.ops.triton.nvfp4_gemm import nvfp4_linear as tiled_linear

SLAB_ELEMS = 1 << 26  # weights per dequantized slab (128 MB of BF16): fewer slabs, less host time (NOTES.md)
MAX_RUNS = 16
MIN_TOKENS = 256  # H100 (benchmarks/NOTES.md): below this the tiled kernel wins
EPI = 2.0**8  # the slab holds v * scale * 2^-8


@triton.jit
def dequant_rows_kernel(w_ptr, s_ptr, out_ptr, row_mul_ptr, N, K, stride_wn, stride_sn, stride_on,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, KERNEL_ORDER: tl.constexpr,
                        TILE_MAJOR: tl.constexpr = False, ROW_MUL: tl.constexpr = False):
    """Rows [N, K] of packed int32 words + scales -> out [N, K] of v * scale * 2^-8 (BF16: exact; fp32 in the
    interpreter), with the decode kernel's word dequantization (nvfp4_gemm._dequant_words). TILE_MAJOR: the rows are
    whole bands of nvfp4.to_tile_major. ROW_MUL: each row times its power of two row_mul[n] (exact) before the store,
    whose cast to E4M3 is then the one rounding (nvfp4_prefill_fp8.py)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    mask_n = offs_n < N
    ks = k0 // 16 + tl.arange(0, BLOCK_K // 16)
    kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    if TILE_MAJOR:
        tw, ts = _tile_major_offsets(offs_n, kw, ks, K)
        w_ptrs, s_ptrs = w_ptr + tw, s_ptr + ts
    else:
        s_ptrs = s_ptr + offs_n[:, None] * stride_sn + ks[None, :]
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + kw[None, :]
    w = _dequant_words(w_ptrs, s_ptrs, mask_n[:, None], mask_n[:, None], BLOCK_N, BLOCK_K // 8, KERNEL_ORDER)
    if ROW_MUL:
        w = w.to(tl.float32) * tl.load(row_mul_ptr + offs_n, mask=mask_n, other=1.0)[:, None]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=mask_n[:, None])


def nvfp4_linear(x: torch.Tensor, w) -> torch.Tensor:
    """The op: this file's path where it applies (BF16 x, M >= MIN_TOKENS, few global-scale runs), the CUDA decode
    kernel for steps of 1-8 tokens on tile-major weights (ops/cuda_gemv.py), the tiled kernel everywhere else."""
    if x.dim() == 2 and cuda_gemv.takes(x, w):
        return cuda_gemv.nvfp4_gemv(x, w)
    if x.dim() == 2 and x.shape[0] >= MIN_TOKENS and x.dtype == torch.bfloat16:
        check_args(x, w)
        # reading the scales to the host (once per weight) would break a CUDA-graph capture
        if "_prefill_runs" in w.__dict__ or not torch.cuda.is_current_stream_capturing():
            runs = global_runs(w)
            if runs is not None:
                return nvfp4_linear_prefill(x, w, runs)
    return tiled_linear(x, w)


def nvfp4_gated_linear(x: torch.Tensor, w, activation: str) -> torch.Tensor:
    """act(x @ gate.T) * (x @ up.T) [M, I] for a fused gate|up W [2I, K]. Decode steps run the activation in the
    linear's epilogue (CUDA or tiled kernel), one launch fewer a layer; the prefill path runs the linear, then the
    activation. In steps of 1-8 tokens that launch with programmatic dependent launch (pdl.py) only the CUDA kernel
    fuses: its grids of one wave take one block an SM there (csrc/nvfp4_gemv.cu), while a Triton down placed during
    gate|up's last blocks piles onto the SMs that free first, and the activation kernel between them pays
    (benchmarks/NOTES.md). From 9 tokens down's splits fill the SMs (nvfp4_gemm.pick_config) and the Triton
    gate|up fuses again."""
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"nvfp4_gated_linear: activation must be one of {sorted(GATED_ACTIVATIONS)}, "
                         f"got {activation!r}")
    if x.dim() == 2 and x.shape[0] < MIN_TOKENS:
        if cuda_gemv.takes(x, w, gated=True):
            return cuda_gemv.nvfp4_gemv(x, w, activation=activation)
        if not pdl.enabled(x.device, x.shape[0]) or x.shape[0] > cuda_gemv.DECODE_TOKENS:
            return tiled_linear(x, w, activation=activation)
    return GATED_ACTIVATIONS[activation](nvfp4_linear(x, w))


def global_runs(w) -> list[tuple[int, int, float]] | None:
    """(start, stop, global scale) per run of equal global scales, slabs of at most SLAB_ELEMS weights; None if the
    rows have more than MAX_RUNS distinct runs. Read from the GPU once per weight and cached on it."""
    if "_prefill_runs" in w.__dict__:
        return w.__dict__["_prefill_runs"]
    g = w.global_scale.tolist()
    starts = [0] + [i for i in range(1, len(g)) if g[i] != g[i - 1]]
    runs = None
    if len(starts) <= MAX_RUNS:
        runs = []
        for a, b in zip(starts, starts[1:] + [len(g)]):
            runs += [(start, stop, g[a]) for start, stop in equal_slabs(a, b, w.in_features, SLAB_ELEMS)]
        if w.tile_major and any(start % 16 for start, _, _ in runs):
            runs = None  # a slab of a tile-major weight is whole bands of 16 rows
    w.__dict__["_prefill_runs"] = runs
    return runs


def equal_slabs(start: int, stop: int, k: int, slab_elems: int) -> list[tuple[int, int]]:
    """Rows [start, stop) in equal slabs of whole 256-row tiles, at most slab_elems weights each: cuBLAS slows down
    badly on ragged N and unaligned output columns."""
    rows = triton.cdiv(triton.cdiv(stop - start, triton.cdiv((stop - start) * k, slab_elems)), 256) * 256
    return [(i, min(stop, i + rows)) for i in range(start, stop, rows)]


def dequantize_rows(w, start: int, stop: int, out: torch.Tensor, row_mul: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [start, stop) of W as v * scale * 2^-8 into out [stop - start, K] (the global scale left out), each row
    times row_mul [stop - start] where given."""
    n, k = stop - start, w.in_features
    packed = w.packed[start:stop].view(torch.int32)  # 8 codes a word (K is a multiple of 16)
    block_k = min(256, k & -k)  # a power of two dividing K
    grid = (triton.cdiv(n, 32), triton.cdiv(k, block_k))
    dequant_rows_kernel[grid](packed, block_scales(w, out.device)[start:stop], out, row_mul, n, k, packed.stride(0),
                              w.block_scale.stride(0), out.stride(0), BLOCK_N=32, BLOCK_K=block_k,
                              KERNEL_ORDER=w.kernel_order, TILE_MAJOR=w.tile_major, ROW_MUL=row_mul is not None,
                              num_warps=4, enable_fp_fusion=True)
    return out


@contextlib.contextmanager
def full_precision_reduction():
    """cuBLAS's split-K GEMMs (small M x N, long K) may add their partial sums in BF16/FP16, torch's default: up to
    0.4% error with the tests' random weights where the path promises one rounding (H100, NOTES.md session 46).
    Turned off for the GEMMs within; the flags are read when a GEMM launches (or is captured)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction = before


def nvfp4_linear_prefill(x: torch.Tensor, w, runs) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] in x.dtype, one dequantized slab and one GEMM per run."""
    out = torch.empty(x.shape[0], w.out_features, dtype=x.dtype, device=x.device)
    k = w.in_features
    buffer = torch.empty(max(stop - start for start, stop, _ in runs) * k, dtype=x.dtype, device=x.device)
    with full_precision_reduction():
        for start, stop, g in runs:  # one buffer for every slab: the stream orders each GEMM before the next fill
            slab = dequantize_rows(w, start, stop, buffer[: (stop - start) * k].view(stop - start, k))
            part = out[:, start:stop]
            torch.addmm(part, x, slab.t(), beta=0, alpha=g * EPI, out=part)
    return out
