"""MoE routing for decode-sized batches in one launch: softmax -> top-k -> pairs laid out by expert.

The torch version (moe_nvfp4.sort_by_expert after softmax and topk) is about 20 small kernels, ~70 us a layer on the
H100 whatever the batch: more than the expert GEMMs themselves at batch 1 (benchmarks/NOTES.md). Here one program
does it for up to MAX_PAIRS (token, expert) pairs (ranked in chunks where their running count would take more than
TILE_BYTES of shared memory: from 17 tokens at top 8 of 128 experts), with the same output contract: route weights
[T * top_k], sorted_pairs [P] (pair ids grouped by expert, each group padded to BLOCK_M, -1 in the padding) and
block_expert [P / BLOCK_M] (-1 past the used blocks), P the worst-case padded length, so the grid never depends on
the routing.
Top-k is taken on the logits (softmax keeps their order); pairs of one expert keep their token order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from adallm_core.ops import pdl
from adallm_core.ops.triton.grid_dependency import wait_for_prior_kernel
from adallm_core.ops.triton import nvfp4_gemm

MAX_PAIRS = 256
# Largest [pairs, experts] int32 running-count tile ranked at once. H100, 128 experts (benchmarks/NOTES.md): 32 tokens
# whole (128 KB) 30.5 us, in chunks of 128 pairs (64 KB) 22.7; 16 tokens whole (64 KB) 12.1, chunks of 64 13.1.
TILE_BYTES = 64 * 1024


@triton.jit
def moe_routing_kernel(logits_ptr, experts_ptr, weights_ptr, pairs_ptr, block_expert_ptr,
                       T, E, stride_l, num_slots, num_blocks,
                       TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                       T2: tl.constexpr, E2: tl.constexpr, P2: tl.constexpr, S2: tl.constexpr, NB2: tl.constexpr,
                       CHUNK: tl.constexpr = 0, PDL: tl.constexpr = False):
    """CHUNK (a power of two below P2, or 0 for all at once): pairs ranked a chunk at a time (see _rank_in_chunks)."""
    wait_for_prior_kernel(PDL)
    t = tl.arange(0, T2)
    e = tl.arange(0, E2)
    ok_t = t < T
    ok = ok_t[:, None] & (e[None, :] < E)
    logits = tl.load(logits_ptr + t[:, None] * stride_l + e[None, :], mask=ok, other=float("-inf")).to(tl.float32)
    row_max = tl.where(ok_t, tl.max(logits, axis=1), 0.0)
    probs = tl.where(ok, tl.exp(logits - row_max[:, None]), 0.0)
    probs = probs / tl.where(ok_t, tl.sum(probs, axis=1), 1.0)[:, None]

    # top-k: k rounds of argmax on the logits; the first round's sums give the renormalization
    chosen_sum = tl.zeros((T2,), dtype=tl.float32)
    rest = logits
    for j in tl.static_range(TOP_K):
        pick = e[None, :] == tl.argmax(rest, axis=1)[:, None]
        chosen_sum += tl.sum(tl.where(pick, probs, 0.0), axis=1)
        rest = tl.where(pick, float("-inf"), rest)
    scale = 1.0 / chosen_sum if RENORMALIZE else tl.full((T2,), 1.0, tl.float32)
    rest = logits
    for j in tl.static_range(TOP_K):
        idx = tl.argmax(rest, axis=1)
        pick = e[None, :] == idx[:, None]
        tl.store(experts_ptr + t * TOP_K + j, idx, mask=ok_t)
        tl.store(weights_ptr + t * TOP_K + j, tl.sum(tl.where(pick, probs, 0.0), axis=1) * scale, mask=ok_t)
        rest = tl.where(pick, float("-inf"), rest)
    tl.debug_barrier()

    if CHUNK == 0:
        # counting sort of the pairs by expert: rank within the expert from a running count over pair order
        p = tl.arange(0, P2)
        ok_p = p < T * TOP_K
        expert = tl.load(experts_ptr + p, mask=ok_p, other=E2)  # E2 matches no column
        onehot = (expert[:, None] == e[None, :]).to(tl.int32)  # [P2, E2]
        counts = tl.sum(onehot, axis=0)
        rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1
        block_end, pad_start = _expert_blocks(counts, BLOCK_M)
        dest = tl.sum(onehot * pad_start[None, :], axis=1) + rank
        _pad_slots(pairs_ptr, num_slots, S2)
        tl.store(pairs_ptr + dest, p.to(tl.int32), mask=ok_p)
    else:
        block_end = _rank_in_chunks(experts_ptr, pairs_ptr, T * TOP_K, num_slots, e, BLOCK_M, E2, P2, S2, CHUNK)
    b = tl.arange(0, NB2)
    owner = tl.sum((block_end[None, :] <= b[:, None]).to(tl.int32), axis=1)  # experts whose blocks end by b
    tl.store(block_expert_ptr + b, tl.where(owner < E, owner, -1).to(tl.int32), mask=b < num_blocks)


@triton.jit
def _expert_blocks(counts, BLOCK_M: tl.constexpr):
    """Each expert's pairs padded to whole blocks of BLOCK_M, experts in order: (block_end [E2], the index of each
    expert's first block past its last; pad_start [E2], each expert's first slot)."""
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, axis=0)
    return block_end, (block_end - blocks) * BLOCK_M


@triton.jit
def _pad_slots(pairs_ptr, num_slots, S2: tl.constexpr):
    """Every slot -1 (padding), visible to the block before the pairs land on their slots."""
    s = tl.arange(0, S2)
    tl.store(pairs_ptr + s, tl.full((S2,), -1, tl.int32), mask=s < num_slots)
    tl.debug_barrier()


@triton.jit
def _rank_in_chunks(experts_ptr, pairs_ptr, num_pairs, num_slots, e, BLOCK_M: tl.constexpr, E2: tl.constexpr,
                    P2: tl.constexpr, S2: tl.constexpr, CHUNK: tl.constexpr):
    """The counting sort CHUNK pairs at a time, for blocks without room for the [P2, E2] tile: one pass counts each
    expert's pairs, a second ranks each chunk's pairs from the count of earlier chunks and stores them. Returns
    block_end, as the one-tile sort computes it."""
    counts = tl.zeros((E2,), tl.int32)
    for c in tl.static_range(P2 // CHUNK):
        p = c * CHUNK + tl.arange(0, CHUNK)
        expert = tl.load(experts_ptr + p, mask=p < num_pairs, other=E2)  # E2 matches no column
        counts += tl.sum((expert[:, None] == e[None, :]).to(tl.int32), axis=0)
    block_end, pad_start = _expert_blocks(counts, BLOCK_M)
    _pad_slots(pairs_ptr, num_slots, S2)
    earlier = tl.zeros((E2,), tl.int32)  # each expert's pairs in the chunks before this one
    for c in tl.static_range(P2 // CHUNK):
        p = c * CHUNK + tl.arange(0, CHUNK)
        ok_p = p < num_pairs
        onehot = (tl.load(experts_ptr + p, mask=ok_p, other=E2)[:, None] == e[None, :]).to(tl.int32)  # [CHUNK, E2]
        rank = tl.sum((tl.cumsum(onehot, axis=0) + earlier[None, :]) * onehot, axis=1) - 1
        dest = tl.sum(onehot * pad_start[None, :], axis=1) + rank
        tl.store(pairs_ptr + dest, p.to(tl.int32), mask=ok_p)
        earlier += tl.sum(onehot, axis=0)
    return block_end


MIN_CHUNK = 16


def chunk_for(pairs: int, num_experts: int, device) -> int:
    """Pairs the sort ranks at a time: all of them (0) where the [pairs, experts] int32 tile of its running count,
    which Triton lays out in shared memory, takes at most TILE_BYTES and fits one block, else the largest power of
    two that does. 256 pairs of 128 experts take 128 KB: faster in chunks on an H100 (227 KB a block), and more
    than an Ada block has (99 KB; benchmarks/compile_report.py)."""
    p2, e2 = max(2, triton.next_power_of_2(pairs)), triton.next_power_of_2(num_experts)
    limit = min(TILE_BYTES, nvfp4_gemm.sm_figures(device)["block_smem"])
    chunk = p2
    while chunk * e2 * 4 > limit and chunk > MIN_CHUNK:
        chunk //= 2
    return 0 if chunk == p2 else chunk


def fits(pairs: int, num_experts: int, device) -> bool:
    """Whether one routing launch takes `pairs` pairs over `num_experts` experts on `device`: at most MAX_PAIRS, and
    a chunk of MIN_CHUNK pairs within one block's shared memory."""
    return pairs <= MAX_PAIRS and MIN_CHUNK * triton.next_power_of_2(num_experts) * 4 <= \
        nvfp4_gemm.sm_figures(device)["block_smem"]


def padded_pairs(pairs: int, num_experts: int, block_m: int) -> int:
    """Worst-case length of the expert-grouped layout: each used expert's group padded to block_m, and at most
    min(experts, pairs) experts are used (one token at batch 1 needs top_k blocks, not one per expert)."""
    return triton.cdiv(pairs + min(num_experts, pairs) * (block_m - 1), block_m) * block_m


def route_and_sort(router_logits: torch.Tensor, top_k: int, renormalize: bool, block_m: int,
                   chunk: int | None = None):
    """router_logits [T, E] -> (route weights [T * top_k] fp32, sorted_pairs [P] int32, block_expert [P / block_m]).
    chunk: pairs the sort ranks at a time (a power of two, 0 all), else chunk_for's choice (tests force chunks)."""
    t, num_experts = router_logits.shape
    dev = router_logits.device
    if top_k > num_experts or not fits(t * top_k, num_experts, dev):
        raise ValueError(f"moe routing: {t} tokens x top_k {top_k} over {num_experts} experts is out of range for "
                         f"one launch on {dev} (at most {MAX_PAIRS} pairs, and a [{MIN_CHUNK}, experts] int32 tile "
                         "within a block's shared memory)")
    p2 = max(2, triton.next_power_of_2(t * top_k))
    chunk = chunk_for(t * top_k, num_experts, dev) if chunk is None else chunk
    if chunk and (chunk & (chunk - 1) or chunk >= p2):
        raise ValueError(f"moe routing: chunk must be 0 or a power of two below {p2} pairs, got {chunk}")
    slots = padded_pairs(t * top_k, num_experts, block_m)
    # H100, 128 experts, top 8 (benchmarks/NOTES.md): 1 token 10.8 us with 4 warps (14.4 with 8), 16 tokens 15.7 with
    # 8, 32 tokens 36.1 with 16 (45.9 with 8)
    num_warps = 4 if t * top_k <= 16 else (8 if t * top_k <= 128 else 16)
    experts = torch.empty(t * top_k, dtype=torch.int32, device=dev)
    weights = torch.empty(t * top_k, dtype=torch.float32, device=dev)
    pairs = torch.empty(slots, dtype=torch.int32, device=dev)
    block_expert = torch.empty(slots // block_m, dtype=torch.int32, device=dev)
    moe_routing_kernel[(1,)](
        router_logits, experts, weights, pairs, block_expert, t, num_experts, router_logits.stride(0), slots,
        slots // block_m, TOP_K=top_k, RENORMALIZE=renormalize, BLOCK_M=block_m,
        T2=max(2, triton.next_power_of_2(t)), E2=triton.next_power_of_2(num_experts),
        P2=p2, S2=triton.next_power_of_2(slots), NB2=max(2, triton.next_power_of_2(slots // block_m)), CHUNK=chunk,
        num_warps=num_warps, enable_fp_fusion=True,
        **pdl.triton_args(dev, t, pdl.MOE_MAX_TOKENS),
    )
    return weights, pairs, block_expert
