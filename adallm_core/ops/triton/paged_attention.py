"""Causal (optionally sliding-window) GQA attention over the paged FP8/BF16 KV cache: prefill chunks and decodes.

One program owns one KV head of one sequence and a tile of BLOCK_M rows, each row a (query token, query head of
that KV head's group) pair, so every KV block is read once for all the query heads that share it. Keys are walked
in tiles of BLOCK_N positions through the block table with an online softmax in fp32. Decode steps may cut the key
range into up to NUM_SPLITS parts (grid axis 2) whose partial results (normalized output + log-sum-exp) a second
small kernel merges. The parts are sized from the real lengths at run time (decode CUDA graphs know only a bound):
parts past a short context's end return at once, and the merge reads only the used ones. FP8 caches are upcast to
BF16 in registers; k_scale folds into the softmax scale and v_scale into the output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from adallm_core.ops import pdl
from adallm_core.ops.metadata import AttentionMetadata
from adallm_core.ops.triton.grid_dependency import wait_for_prior_kernel
from adallm_core.ops.triton.nvfp4_gemm import INTERPRET, _capability, _cuda_index, _num_sms
from adallm_core.ops.triton.qk_norm_rope import check_args as check_qk_args
from adallm_core.ops.triton.qk_norm_rope import norm_rope_rows, qk_norm_rope_cache, store_kv_rows

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    qsl_ptr, seq_lens_ptr, bt_ptr,
    sm_scale, k_scale, v_scale, window,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt, stride_ot, stride_oh,
    num_tokens, q_blocks,
    qw_ptr, kw_ptr, pos_ptr, cs_ptr, slot_ptr, eps, norm_offset, inv_k, inv_v, stride_cs,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    USE_WINDOW: tl.constexpr, F32_DOT: tl.constexpr, FP8_CACHE: tl.constexpr, QK_NORM: tl.constexpr = False,
    PDL: tl.constexpr = False, FULL_TILES: tl.constexpr = False,
):
    """QK_NORM (decode steps only): q_ptr is the qkv projection's output and q/k/v rows are raw; q is normed and
    rotated here, and the program whose part ends at the newest key stores this step's k/v before reading the
    cache (qk_norm_rope.py's helpers, the same rounding as qk_norm_rope_cache): one launch instead of two."""
    wait_for_prior_kernel(PDL)  # before the early return: see ops/pdl.py
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid // q_blocks
    qb = pid % q_blocks
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if qb * BLOCK_M >= q_len * G:
        return
    seq_len = tl.load(seq_lens_ptr + b)

    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len * G
    tok = rows // G  # query index within the sequence
    head = kvh * G + rows % G
    qpos = seq_len - q_len + tok
    d = tl.arange(0, HEAD_DIM)
    q_rows = q_ptr + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh
    if QK_NORM:
        cs_row = cs_ptr + tl.load(pos_ptr + q_start) * stride_cs
        q = norm_rope_rows(q_rows, row_ok[:, None], qw_ptr, eps, norm_offset, cs_row, HEAD_DIM // 2)
        q = q.to(q_ptr.dtype.element_ty)
    else:
        q = tl.load(q_rows + d[None, :], mask=row_ok[:, None], other=0.0)

    # keys this tile of rows can see: [lo, hi)
    hi = tl.minimum(seq_len, seq_len - q_len + (qb * BLOCK_M + BLOCK_M - 1) // G + 1)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(0, seq_len - q_len + (qb * BLOCK_M) // G - window + 1)
    span, parts = _parts(hi - lo, NUM_SPLITS, BLOCK_N)
    if split >= parts:
        return
    k_lo = lo + split * span
    k_hi = tl.minimum(hi, k_lo + span)
    if QK_NORM:
        new_slot = tl.load(slot_ptr + q_start)
        if (split == parts - 1) & (new_slot >= 0):  # -1: a padding row of a CUDA graph
            hk = tl.num_programs(1)
            kv_head = kvh + tl.zeros((1, 1), tl.int32)
            store_kv_rows(q_ptr + q_start * stride_qt, kv_head, kv_head < hk, hk * G, hk, kw_ptr, eps, norm_offset,
                          cs_row, new_slot, k_ptr, v_ptr, stride_ks, inv_k, inv_v, HEAD_DIM // 2, FP8_CACHE)
            tl.debug_barrier()  # the block's stores are visible to its loads below

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    qk_scale = sm_scale * k_scale * _LOG2E
    if F32_DOT:
        q = q.to(tl.float32)
    else:
        q = q.to(tl.bfloat16)
    k_masked = k_lo
    if FULL_TILES:  # prefill: key tiles that every row of this tile sees whole need no mask (FlashAttention's split)
        first_row_pos = seq_len - q_len + (qb * BLOCK_M) // G
        k_masked = k_lo + tl.maximum(tl.minimum(k_hi, first_row_pos + 1) - k_lo, 0) // BLOCK_N * BLOCK_N
        for start in range(k_lo, k_masked, BLOCK_N):
            acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, start, k_hi, qpos, window, k_ptr, v_ptr, bt_ptr, b,
                                         stride_bt, stride_kb, stride_ks, kvh, stride_kh, qk_scale, d, BLOCK_SIZE,
                                         BLOCK_N, False, USE_WINDOW, F32_DOT, FP8_CACHE)
    for start in range(k_masked, k_hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, start, k_hi, qpos, window, k_ptr, v_ptr, bt_ptr, b, stride_bt,
                                     stride_kb, stride_ks, kvh, stride_kh, qk_scale, d, BLOCK_SIZE, BLOCK_N, True,
                                     USE_WINDOW, F32_DOT, FP8_CACHE)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None] * v_scale
    t = q_start + tok
    out_dst = out_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    # stores chosen by NUM_SPLITS alone: a store that also depended on the run-time part count (a sequence's one part
    # writing `out` itself) made the whole loop 45% slower at batch 16 over 8k keys (benchmarks/NOTES.md)
    if NUM_SPLITS == 1:
        tl.store(out_dst, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        hq = tl.num_programs(1) * G
        base = (split * num_tokens + t) * hq + head
        tl.store(part_o_ptr + base[:, None] * HEAD_DIM + d[None, :], out, mask=row_ok[:, None])
        tl.store(part_lse_ptr + base, lse, mask=row_ok)


@triton.jit
def _attend_tile(q, acc, m_i, l_i, start, k_hi, qpos, window, k_ptr, v_ptr, bt_ptr, b, stride_bt, stride_kb,
                 stride_ks, kvh, stride_kh, qk_scale, d, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, USE_WINDOW: tl.constexpr, F32_DOT: tl.constexpr, FP8_CACHE: tl.constexpr):
    """One tile of BLOCK_N keys from `start` into the online softmax. MASKED: keys past k_hi or a row's own
    position (and outside its window) are masked; unmasked tiles are whole and visible to every row."""
    kpos = start + tl.arange(0, BLOCK_N)
    k_ok = kpos < k_hi
    if MASKED:
        page = tl.load(bt_ptr + b * stride_bt + kpos // BLOCK_SIZE, mask=k_ok, other=0)
    else:
        page = tl.load(bt_ptr + b * stride_bt + kpos // BLOCK_SIZE)
    page = tl.maximum(page, 0)  # -1 marks blocks nobody needs; masked below
    slot = page.to(tl.int64) * stride_kb + (kpos % BLOCK_SIZE) * stride_ks + kvh * stride_kh
    if MASKED:
        k = tl.load(k_ptr + slot[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)
        v = tl.load(v_ptr + slot[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + slot[:, None] + d[None, :])
        v = tl.load(v_ptr + slot[:, None] + d[None, :])
    if F32_DOT:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    elif FP8_CACHE:  # E4M3 values are exact in FP16, whose 11-bit mantissa keeps the probabilities sharper
        k = k.to(tl.bfloat16)
        v = v.to(tl.float16)
    else:  # BF16 cache: probabilities in TF32 (11 bits, like FP16) against exact BF16 values
        k = k.to(tl.bfloat16)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        ok = k_ok[None, :] & (kpos[None, :] <= qpos[:, None])
        if USE_WINDOW:
            ok = ok & (kpos[None, :] > qpos[:, None] - window)
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _parts(keys, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """A decode range of `keys` keys -> (keys a part, parts used): whole key tiles, at least one part (an empty
    range's part writes zeros)."""
    span = tl.cdiv(tl.maximum(tl.cdiv(keys, NUM_SPLITS), BLOCK_N), BLOCK_N) * BLOCK_N
    return span, tl.maximum(tl.cdiv(keys, span), 1)


@triton.jit
def combine_splits_kernel(part_o_ptr, part_lse_ptr, out_ptr, qsl_ptr, seq_lens_ptr, window, num_tokens, hq,
                          stride_ot, stride_oh, NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr,
                          PDL: tl.constexpr = False):
    """Decode steps (one query token a sequence): merges the parts one sequence used."""
    wait_for_prior_kernel(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    t = tl.load(qsl_ptr + b)
    seq_len = tl.load(seq_lens_ptr + b)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(0, seq_len - window)
    _, parts = _parts(seq_len - lo, NUM_SPLITS, BLOCK_N)
    if tl.load(qsl_ptr + b + 1) == t:  # no query token
        return
    sp = tl.arange(0, NUM_SPLITS)
    used = sp < parts
    d = tl.arange(0, HEAD_DIM)
    base = (sp * num_tokens + t) * hq + h
    lse = tl.load(part_lse_ptr + base, mask=used, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # empty and unused parts: exp2(-inf) = 0
    o = tl.load(part_o_ptr + base[:, None] * HEAD_DIM + d[None, :], mask=used[:, None], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.maximum(tl.sum(w, axis=0), 1e-30)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def _few_programs(meta: AttentionMetadata, kv_heads: int, device) -> bool:
    """Whether a step's (sequence, KV head) programs fill at most half the SMs (batch 1-8 of 8 KV heads on 132)."""
    return meta.num_seqs * kv_heads * 2 <= _num_sms(device)


def num_splits_for(meta: AttentionMetadata, kv_heads: int, device, block_n: int = 64) -> int:
    """Decode steps whose (sequence, KV head) programs can't fill the GPU get up to 16 parts. With few programs
    (_few_programs) parts pay off even over a short bound, no more parts than the bound has key tiles; otherwise
    only over bounds above 1024 keys, each part >= 512 of them (NOTES.md)."""
    if meta.max_query_len > 1:
        return 1
    programs, sms = meta.num_seqs * kv_heads, _num_sms(device)
    few = _few_programs(meta, kv_heads, device)
    if not few and meta.max_seq_len <= 1024:
        return 1
    splits = 1
    while splits < 16 and programs * splits < 2 * sms:
        if (few and splits * block_n >= meta.max_seq_len) or (not few and meta.max_seq_len // (splits * 2) < 512):
            break
        splits *= 2
    return splits


DEFAULT_TILES = dict(BLOCK_N=64, num_warps=4, num_stages=2)  # prefill and decode; config= overrides (sweeps)
# Decode under a bound of at most SHORT_BOUND keys (cuda_graphs.SHORT_CONTEXT) whose programs fill the GPU: one part
# in tiles of 256 keys x 128 dims, so a program waits on one or two block-table and K/V round trips, not one a 64-key
# tile. Past one program an SM, tiles of half the keys won (batch 32). Few programs keep the 64-key tiles, a part per
# tile: batch 1 lost 2% in two 256-key parts (NOTES.md, session 43). Wider heads (Gemma3-4B/12B: 256 dims) take
# 128 keys a tile: 256 x 256 spilled registers, and 64 x 256 at 8 warps spilled on sm_89.
SHORT_BOUND = 512
SHORT_TILE_ELEMENTS = 256 * 128


# Prefill on GPUs where Triton emits mma.sync (Ada, Ampere) at 256-dim heads (Gemma3-4B/12B): the default tiles
# spill there (328-568 B a thread on sm_89), 8 warps of one stage do not, and on the H100 running Ada's code
# (DISABLE_MMA_V3=1) they took a 2048-token prefill 9% faster (410.6 -> 372.6 us; NOTES.md, session 46).
WIDE_PREFILL_TILES = dict(BLOCK_N=64, num_warps=8, num_stages=1)


def mma_sync_only(device) -> bool:
    """Whether Triton's tensor-core code on this device is mma.sync (before Hopper's wgmma)."""
    return device.type == "cuda" and _capability(_cuda_index(device)) < (9, 0)


def tiles_for(meta: AttentionMetadata, kv_heads: int, head_dim: int, device) -> dict:
    """The tiles a launch takes unless config= names others."""
    if meta.max_query_len > 1:
        return WIDE_PREFILL_TILES if head_dim > 128 and mma_sync_only(device) else DEFAULT_TILES
    if meta.max_seq_len > SHORT_BOUND or _few_programs(meta, kv_heads, device):
        return DEFAULT_TILES
    elements = SHORT_TILE_ELEMENTS if meta.num_seqs * kv_heads <= _num_sms(device) else SHORT_TILE_ELEMENTS // 2
    return dict(BLOCK_N=max(128, min(256, elements // head_dim)), num_warps=8, num_stages=1)


def attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, sliding_window, k_scale: float,
              v_scale: float, num_splits: int | None = None, config: dict | None = None) -> torch.Tensor:
    """q [T, Hq, D] over caches [num_blocks, block_size, Hk, D] -> [T, Hq, D] (q.dtype); see ops.reference."""
    return _attention(q, k_cache, v_cache, meta, scale, sliding_window, k_scale, v_scale, num_splits, config)


def qk_norm_rope_attention(qkv, q_weight, k_weight, eps: float, weight_offset: float, positions, cos_sin, k_cache,
                           v_cache, slot_mapping, k_scale: float, v_scale: float, num_heads: int, num_kv_heads: int,
                           meta: AttentionMetadata, scale: float, sliding_window, num_splits: int | None = None,
                           config: dict | None = None) -> torch.Tensor:
    """qk_norm_rope_cache, then attention (see ops.reference): one launch for decode steps (the attention kernel
    norms and rotates q itself, and stores the step's k/v before it reads them), the two kernels otherwise."""
    if meta.max_query_len > 1:
        q = qk_norm_rope_cache(qkv, q_weight, k_weight, eps, weight_offset, positions, cos_sin, k_cache, v_cache,
                               slot_mapping, k_scale, v_scale, num_heads, num_kv_heads)
        return attention(q, k_cache, v_cache, meta, scale, sliding_window, k_scale, v_scale, num_splits, config)
    check_qk_args(qkv, positions, cos_sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads)
    if slot_mapping.stride(0) != 1 or positions.stride(0) != 1:
        raise ValueError("qk_norm_rope_attention: slot_mapping and positions must be contiguous")
    t, d = qkv.shape[0], k_cache.shape[-1]
    fused = dict(qw_ptr=q_weight, kw_ptr=k_weight, pos_ptr=positions, cs_ptr=cos_sin, slot_ptr=slot_mapping,
                 eps=float(eps), norm_offset=float(weight_offset), inv_k=1.0 / k_scale, inv_v=1.0 / v_scale,
                 stride_cs=cos_sin.stride(0), QK_NORM=True)
    return _attention(qkv[:, : num_heads * d].view(t, num_heads, d), k_cache, v_cache, meta, scale, sliding_window,
                      k_scale, v_scale, num_splits, config, fused)


_UNFUSED = dict(qw_ptr=None, kw_ptr=None, pos_ptr=None, cs_ptr=None, slot_ptr=None, eps=0.0, norm_offset=0.0,
                inv_k=1.0, inv_v=1.0, stride_cs=0)


def _attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, sliding_window, k_scale: float,
               v_scale: float, num_splits: int | None, config: dict | None, fused: dict = _UNFUSED) -> torch.Tensor:
    t, hq, dim = q.shape
    _, block_size, hk, dk = k_cache.shape
    if dk != dim or hq % hk or v_cache.shape != k_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"attention: q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)}")
    if dim & (dim - 1) or q.stride(2) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("attention: head_dim must be a power of two and q, caches contiguous in the last dim")
    g = hq // hk
    out = torch.empty(t, hq, dim, dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    tiles = dict(config or tiles_for(meta, hk, dim, q.device))
    block_m = tiles.pop("BLOCK_M", None)  # rows a program: prefill's tiles may set it (64 otherwise)
    # prefill: the key tiles below a row tile's diagonal skip the mask (not under a window, whose lower edge masks)
    full_tiles = tiles.pop("FULL_TILES", True) and meta.max_query_len > 1 and sliding_window is None
    splits = num_splits or num_splits_for(meta, hk, q.device, tiles["BLOCK_N"])
    if splits & (splits - 1):
        raise ValueError(f"attention: num_splits must be a power of two, got {splits}")
    if splits > 1 and meta.max_query_len > 1:
        raise ValueError(f"attention: num_splits {splits} is for decode steps (one query token a sequence), "
                         f"this step has up to {meta.max_query_len}")
    if meta.max_query_len <= 1:
        block_m = max(16, triton.next_power_of_2(g))
    else:
        block_m = min(block_m or 64, max(16, triton.next_power_of_2(meta.max_query_len * g)))
    q_blocks = triton.cdiv(meta.max_query_len * g, block_m)
    if splits > 1:
        part_o = torch.empty(splits, t, hq, dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(splits, t, hq, dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out
    grid = (meta.num_seqs * q_blocks, hk, splits)
    paged_attention_kernel[grid](
        q, k_cache, v_cache, out, part_o, part_lse,
        meta.query_start_loc, meta.seq_lens, meta.block_tables,
        float(scale), float(k_scale) if k_cache.dtype == torch.float8_e4m3fn else 1.0,
        float(v_scale) if v_cache.dtype == torch.float8_e4m3fn else 1.0, int(sliding_window or 0),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        meta.block_tables.stride(0), out.stride(0), out.stride(1),
        t, q_blocks, **fused,
        G=g, HEAD_DIM=dim, BLOCK_SIZE=block_size, BLOCK_M=block_m, NUM_SPLITS=splits,
        USE_WINDOW=sliding_window is not None, F32_DOT=INTERPRET,
        FP8_CACHE=v_cache.dtype == torch.float8_e4m3fn, FULL_TILES=full_tiles,
        **tiles, **pdl.triton_args(q.device, t), enable_fp_fusion=True,
    )
    if splits > 1:
        combine_splits_kernel[(meta.num_seqs, hq)](
            part_o, part_lse, out, meta.query_start_loc, meta.seq_lens, int(sliding_window or 0), t, hq,
            out.stride(0), out.stride(1), NUM_SPLITS=splits, HEAD_DIM=dim, BLOCK_N=tiles["BLOCK_N"],
            USE_WINDOW=sliding_window is not None, **pdl.triton_args(q.device, t), enable_fp_fusion=True)
    return out
