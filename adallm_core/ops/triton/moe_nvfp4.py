"""Sparse SwiGLU MoE over NVFP4 experts: route, sort (token, expert) pairs by expert, two grouped GEMM launches.

Routing: one launch for decode-sized batches (moe_routing.py, up to MAX_PAIRS pairs), torch ops beyond (prefill).

Layout after sorting, each expert's pairs padded to a multiple of BLOCK_M (graph-safe: all index math on the GPU,
no host sync; the grid is sized for the worst case and blocks past the end exit):
    sorted_pairs [P]  pair id (token * top_k + k) or -1 for padding;  block_expert [P / BLOCK_M]  expert or -1
One launch computes x[token] @ w13[e].T for every pair (rows gathered, weights dequantized in registers exactly as in
nvfp4_gemm, with its PTX word dequantization on the GPU) with SiLU-and-mul in its epilogue (a program's rows are
gate rows and the same up rows, as nvfp4_gemm's GATED; a separate launch in steps with PDL, where it pays), then
one launch of h @ w2[e].T scaled by the pair's routing weight, then one launch that sums each token's top_k rows.
(SiLU-and-mul computed in the second GEMM's loads instead lost: the activation lands on the operand's path in every
N tile, benchmarks/NOTES.md.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from adallm_core.ops import pdl
from adallm_core.ops.triton.activation import silu_and_mul
from adallm_core.ops.triton.grid_dependency import wait_for_prior_kernel
from adallm_core.ops.triton.moe_routing import fits, padded_pairs, route_and_sort
from adallm_core.ops.triton.nvfp4_gemm import (DEFAULT_MATH, _EPI, _dequant_tile, _dequant_words, _store_out,
                                               block_scales, dot_xw)


@triton.jit
def moe_gemm_kernel(
    x_ptr, w_ptr, s_ptr, g_ptr, out_ptr, pairs_ptr, block_expert_ptr, route_w_ptr,
    N, K, top_k,
    stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_ge, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATHER: tl.constexpr,
    WEIGHTED: tl.constexpr, MATH: tl.constexpr, KERNEL_ORDER: tl.constexpr, PDL: tl.constexpr = False,
    GATED: tl.constexpr = 0, SWAP_AB: tl.constexpr = False,
):
    wait_for_prior_kernel(PDL)  # before the early return: see ops/pdl.py
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    BLOCK_KH: tl.constexpr = BLOCK_K // 2
    BLOCK_KS: tl.constexpr = BLOCK_K // 16
    pair = tl.load(pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    ok_m = pair >= 0
    pair = tl.maximum(pair, 0)
    # GATHER: the first GEMM reads token rows of x; the second reads the pair's own row of h
    row = pair // top_k if GATHER else pair
    if GATED:  # w13 rows of the program: gate rows of its output columns, then their up rows (nvfp4_gemm.py)
        j = tl.arange(0, BLOCK_N)
        cols = pid_n * (BLOCK_N // 2) + j % (BLOCK_N // 2)
        offs_n = cols + (j >= BLOCK_N // 2).to(tl.int32) * (N // 2)
        ok_n = cols < N // 2
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ok_n = offs_n < N
    offs_kx = tl.arange(0, BLOCK_K)
    W_PER_TILE: tl.constexpr = BLOCK_K // 8 if MATH == 3 else BLOCK_KH  # int32 words (MATH 3) or bytes
    offs_w = tl.arange(0, W_PER_TILE)
    offs_ks = tl.arange(0, BLOCK_KS)
    e64 = e.to(tl.int64)
    x_ptrs = x_ptr + row.to(tl.int64)[:, None] * stride_xm + offs_kx[None, :]
    w_ptrs = w_ptr + e64 * stride_we + offs_n[:, None] * stride_wn + offs_w[None, :]
    s_ptrs = s_ptr + e64 * stride_se + offs_n[:, None] * stride_sn + offs_ks[None, :]
    # SWAP_AB: the dequantized weights as the A operand, as nvfp4_gemm's decode tiles
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, K // BLOCK_K):  # the wrapper guarantees BLOCK_K divides K
        x = tl.load(x_ptrs + t * BLOCK_K, mask=ok_m[:, None], other=0.0)
        if MATH == 3:  # the decode kernel's word dequantization, one dot in natural K order
            w = _dequant_words(w_ptrs + t * W_PER_TILE, s_ptrs + t * BLOCK_KS, ok_n[:, None], ok_n[:, None],
                               BLOCK_N, W_PER_TILE, KERNEL_ORDER)
            acc = dot_xw(acc, x, w, SWAP_AB)
        else:
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_KH, 2)))
            lo, hi = _dequant_tile(w_ptrs + t * BLOCK_KH, s_ptrs + t * BLOCK_KS, ok_n[:, None], ok_n[:, None],
                                   BLOCK_N, BLOCK_KH, MATH)
            acc = dot_xw(acc, x_even, lo, SWAP_AB)
            acc = dot_xw(acc, x_odd, hi, SWAP_AB)
    if SWAP_AB:
        acc = tl.trans(acc)
    g = tl.load(g_ptr + e64 * stride_ge + offs_n, mask=ok_n, other=0.0) * _EPI
    y = acc * g[None, :]
    if WEIGHTED:  # round like the unfused path (bf16 linear output), then weight in fp32
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32) * tl.load(route_w_ptr + pair, mask=ok_m, other=0.0)[:, None]
    if GATED:
        _store_out(out_ptr, y, pair, ok_m, pid_n, N, stride_om, BLOCK_M, BLOCK_N, GATED)
    else:
        tl.store(out_ptr + pair[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=ok_m[:, None] & ok_n[None, :])


def sort_by_expert(experts: torch.Tensor, num_experts: int, block_m: int):
    """experts [T, k] -> (sorted_pairs [P] int32, block_expert [P / block_m] int32), P the worst-case padded length."""
    flat = experts.flatten()
    pairs = flat.numel()
    padded = padded_pairs(pairs, num_experts, block_m)
    dev = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    blocks = (counts + block_m - 1) // block_m
    pad_start = torch.cumsum(blocks, 0) * block_m - blocks * block_m  # first padded row of each expert
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    rank = torch.arange(pairs, device=dev) - start[flat[order]]
    sorted_pairs = torch.full((padded,), -1, dtype=torch.int32, device=dev)
    sorted_pairs[pad_start[flat[order]] + rank] = order.to(torch.int32)
    block_ids = torch.arange(padded // block_m, device=dev)
    block_end = torch.cumsum(blocks, 0)  # expert e owns blocks [block_end[e] - blocks[e], block_end[e])
    block_expert = torch.searchsorted(block_end, block_ids, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert


DEFAULT_TILES = dict(BLOCK_N=64, num_warps=4, num_stages=3)  # config= overrides (sweeps)
# decode-sized tiles (BLOCK_M 16): weights as the A operand on two warps, as nvfp4_gemm.pick_config (H200, Qwen3-30B-A3B
# shapes: 27.1 -> 25.9 us a layer at one token, 126.0 -> 123.2 at 16)
DECODE_TILES = dict(BLOCK_N=32, num_warps=2, num_stages=3, SWAP_AB=True)


def _grouped(x, w, pairs, block_expert, route_w, top_k, out, gather, weighted, block_m, config, gated=0):
    e, n, kh = w.packed.shape
    k = kh * 2
    block_k = 256
    while k % block_k:
        block_k //= 2
    if block_k < 32:
        raise ValueError(f"moe: expert in_features {k} must be a multiple of 32")
    math = (config or {}).get("MATH", DEFAULT_MATH)
    tiles = dict(config or (DECODE_TILES if block_m == 16 and math == 3 else DEFAULT_TILES))
    tiles.pop("MATH", None)
    grid = (block_expert.numel(), triton.cdiv(out.shape[1], tiles["BLOCK_N"] // 2 if gated else tiles["BLOCK_N"]))
    if w.kernel_order and math != 3:
        raise ValueError(f"moe: MATH {math} reads checkpoint-ordered bytes; these experts are in the kernels' word order")
    packed = w.packed.view(torch.int32) if math == 3 else w.packed  # 8 codes a word (K % 32 == 0)
    tokens = x.shape[0] if gather else x.shape[0] // top_k  # the step's, for ops/pdl.py
    moe_gemm_kernel[grid](
        x, packed, block_scales(w, x.device), w.global_scale, out, pairs, block_expert, route_w,
        n, k, top_k, x.stride(0), packed.stride(0), packed.stride(1), w.block_scale.stride(0),
        w.block_scale.stride(1), w.global_scale.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_K=block_k, GATHER=gather, WEIGHTED=weighted, MATH=math,
        KERNEL_ORDER=w.kernel_order, GATED=gated, **tiles, enable_fp_fusion=True,
        **pdl.triton_args(x.device, tokens, pdl.MOE_MAX_TOKENS),
    )


def moe(x, router_logits, w13, w2, top_k: int, renormalize: bool, config: dict | None = None) -> torch.Tensor:
    """x [T, H], router_logits [T, E], w13 NVFP4 [E, 2I, H], w2 NVFP4 [E, H, I] -> [T, H] in x.dtype."""
    t, hidden = x.shape
    num_experts, two_i, _ = w13.packed.shape
    if router_logits.shape != (t, num_experts) or w13.in_features != hidden or w2.packed.shape[:2] != (num_experts, hidden):
        raise ValueError(f"moe: x {tuple(x.shape)}, router {tuple(router_logits.shape)}, w13 {tuple(w13.packed.shape)}, "
                         f"w2 {tuple(w2.packed.shape)} do not fit")
    if t == 0:
        return torch.empty_like(x)
    block_m = 16 if t * top_k <= 4 * num_experts * 16 else 64
    if fits(t * top_k, num_experts, x.device):  # decode: one routing launch (moe_routing.py)
        route_w, pairs, block_expert = route_and_sort(router_logits, top_k, renormalize, block_m)
    else:
        probs = torch.softmax(router_logits.float(), dim=-1)
        weights, experts = torch.topk(probs, top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        pairs, block_expert = sort_by_expert(experts, num_experts, block_m)
        route_w = weights.flatten().contiguous()
    if two_i % 2:
        raise ValueError(f"moe: w13 stacks gate and up rows, so its {two_i} rows must be even")
    # as nvfp4_gated_linear at 1-8 tokens: with PDL the activation kernel between the GEMMs pays
    if pdl.enabled(x.device, t, pdl.MOE_MAX_TOKENS):
        gate_up = torch.empty(t * top_k, two_i, dtype=x.dtype, device=x.device)
        _grouped(x, w13, pairs, block_expert, route_w, top_k, gate_up, True, False, block_m, config)
        h = silu_and_mul(gate_up)
    else:  # SiLU(gate) * up in the GEMM's epilogue
        h = torch.empty(t * top_k, two_i // 2, dtype=x.dtype, device=x.device)
        _grouped(x, w13, pairs, block_expert, route_w, top_k, h, True, False, block_m, config, gated=1)
    y = torch.empty(t * top_k, hidden, dtype=torch.float32, device=x.device)
    _grouped(h, w2, pairs, block_expert, route_w, top_k, y, False, True, block_m, config)
    return sum_pairs(y, t, top_k, x.dtype)


@triton.jit
def sum_pairs_kernel(y_ptr, out_ptr, hidden, TOP_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_prior_kernel(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < hidden
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (t * TOP_K + k) * hidden + offs, mask=ok, other=0.0)
    tl.store(out_ptr + t * hidden + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def sum_pairs(y: torch.Tensor, t: int, top_k: int, dtype) -> torch.Tensor:
    """y [T * top_k, H] fp32 (a token's rows adjacent) -> [T, H] in dtype: summed in fp32 in k order, rounded once;
    one launch where torch's sum and cast take two."""
    hidden = y.shape[1]
    out = torch.empty(t, hidden, dtype=dtype, device=y.device)
    block = min(256, triton.next_power_of_2(hidden))
    sum_pairs_kernel[(t, triton.cdiv(hidden, block))](y, out, hidden, TOP_K=top_k, BLOCK=block, num_warps=2,
                                                      **pdl.triton_args(y.device, t, pdl.MOE_MAX_TOKENS),
                                                      enable_fp_fusion=True)
    return out
