"""Reference ops: plain vectorized torch on any device. THE definition of correct; kernels are tested against it.

Numerics: every op computes in float32 and returns the input's dtype. FP8 KV caches store value / scale in
float8_e4m3fn (saturated to +-448: a plain cast would turn overflow into NaN); bf16/fp32 caches store values as is
and ignore the scales.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from adallm_core.ops.metadata import AttentionMetadata

if TYPE_CHECKING:
    from adallm_core.nvfp4 import NVFP4Weight

FP8_MAX = 448.0
# nvfp4_linear dequantizes at most this many weight elements at a time (16 MB of fp32).
DEQUANT_TILE_ELEMS = 1 << 22
# attention materializes at most this many scores at a time; longer prefills are split into query chunks.
ATTN_SCORE_ELEMS = 1 << 26


def nvfp4_linear(x: torch.Tensor, w: "NVFP4Weight") -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] in x.dtype; W is dequantized one tile of rows at a time, never whole."""
    if x.dim() != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"nvfp4_linear: x must be [M, {w.in_features}], got {tuple(x.shape)}")
    n = w.out_features
    rows = max(1, DEQUANT_TILE_ELEMS // w.in_features)
    x32 = x.float()
    out = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    for start in range(0, n, rows):
        tile = w.dequantize(torch.float32, rows=slice(start, min(start + rows, n)))
        torch.matmul(x32, tile.t(), out=out[:, start : start + tile.shape[0]])
    return out.to(x.dtype)


def prepare_nvfp4_weight(w: "NVFP4Weight") -> "NVFP4Weight":
    """Weights stay as loaded (dequantize() reads either word order)."""
    return w


def embedding(input_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """ids [T] -> [T, H] rows of table [V, H], on the ids' device (the table may live on the host)."""
    return F.embedding(input_ids.to(table.device), table).to(input_ids.device)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * (weight + weight_offset); Gemma stores w and multiplies by (1 + w)."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (weight.float() + weight_offset)).to(x.dtype)


def add_rms_norm(x, residual, weight, eps: float, weight_offset: float = 0.0):
    """(rms_norm(x + residual), x + residual): the residual add fused in front of the next norm."""
    summed = x + residual
    return rms_norm(summed, weight, eps, weight_offset), summed


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor):
    """NeoX-style rotary embedding. cos_sin [max_pos, D] = cat(cos, sin) of the D/2 frequencies."""
    cs = cos_sin[positions].float()
    half = cs.shape[-1] // 2
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x1, x2 = x32[..., :half], x32[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.gelu(gate, approximate="tanh") * up).to(gate_up.dtype)


GATED_ACTIVATIONS = {"silu": silu_and_mul, "gelu_tanh": gelu_tanh_and_mul}


def nvfp4_gated_linear(x: torch.Tensor, w: "NVFP4Weight", activation: str) -> torch.Tensor:
    """x [M, K] and a fused gate|up W [2I, K] -> act(x @ gate.T) * (x @ up.T) [M, I]: the linear, then the activation
    op on its rounded output (a backend may fuse them, with these roundings)."""
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"nvfp4_gated_linear: activation must be one of {sorted(GATED_ACTIVATIONS)}, "
                         f"got {activation!r}")
    return GATED_ACTIVATIONS[activation](nvfp4_linear(x, w))


# prefill_fp8 (EngineArgs): steps of at least this many tokens run their NVFP4 linears on FP8 operands
FP8_PREFILL_MIN_TOKENS = 256


def per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (E4M3 [M, K], fp32 scale [M]) with x ~= q * scale: scale = amax / 448 per row, saturating cast."""
    x32 = x.float()
    s = (x32.abs().amax(dim=-1) / FP8_MAX).clamp(min=1e-12)
    return (x32 / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s


def fp8_row_exponents(w: "NVFP4Weight") -> torch.Tensor:
    """e [N] (whole numbers, fp32): row n of W / global scale, times 2^-e, lies within E4M3's +-448 (6 = E2M1's
    largest value; a row of zero scales gets E4M3's smallest)."""
    from adallm_core.nvfp4 import to_tile_major

    scales = to_tile_major(w.block_scale, w.in_features, inverse=True) if w.tile_major else w.block_scale
    largest = scales.float().amax(dim=-1).clamp(min=2.0**-9) * 6.0
    return torch.ceil(torch.log2(largest / FP8_MAX))


def nvfp4_linear_fp8(x: torch.Tensor, w: "NVFP4Weight") -> torch.Tensor:
    """The prefill_fp8 linear: steps of FP8_PREFILL_MIN_TOKENS or more compute x_q @ W_q.T, with x_q per-token E4M3
    (per_token_fp8) and W_q = E4M3(v * block scale * 2^-e) per row (fp8_row_exponents; one rounding, as the
    block scale's 4 significant bits times E2M1's 2 may need 6), scaled back by global scale * 2^e. Fewer tokens,
    or N not a multiple of 16 (FP8 GEMMs want it): nvfp4_linear, exact."""
    if x.dim() != 2 or x.shape[0] < FP8_PREFILL_MIN_TOKENS or w.out_features % 16:
        return nvfp4_linear(x, w)
    if x.shape[1] != w.in_features:
        raise ValueError(f"nvfp4_linear: x must be [M, {w.in_features}], got {tuple(x.shape)}")
    e = fp8_row_exponents(w)
    shifted, back = dataclasses.replace(w, global_scale=torch.exp2(-e)), w.global_scale * torch.exp2(e)
    xq, xs = per_token_fp8(x)
    x32 = xq.float() * xs[:, None]
    n, step = w.out_features, max(1, DEQUANT_TILE_ELEMS // w.in_features)
    out = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    for start in range(0, n, step):  # one tile of rows at a time, as nvfp4_linear
        rows = slice(start, min(start + step, n))
        wq = shifted.dequantize(torch.float32, rows=rows).to(torch.float8_e4m3fn)
        torch.matmul(x32, (wq.float() * back[rows, None]).t(), out=out[:, rows])
    return out.to(x.dtype)


def nvfp4_gated_linear_fp8(x: torch.Tensor, w: "NVFP4Weight", activation: str) -> torch.Tensor:
    """nvfp4_gated_linear with the prefill_fp8 linear (which is itself exact where FP8 does not apply)."""
    if activation not in GATED_ACTIVATIONS:
        return nvfp4_gated_linear(x, w, activation)  # its error names the activations
    return GATED_ACTIVATIONS[activation](nvfp4_linear_fp8(x, w))


def _is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.float8_e4m3fn


def kv_write(k, v, k_cache, v_cache, slot_mapping, k_scale: float, v_scale: float) -> None:
    """Store this step's k/v [T, Hk, D] into the paged caches [num_blocks, block_size, Hk, D] at slot_mapping (-1 skips)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    for src, cache, scale in ((k[keep], k_cache, k_scale), (v[keep], v_cache, v_scale)):
        flat = cache.view(-1, *cache.shape[2:])
        if _is_fp8(cache):
            q = (src.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            # index_copy_ has no fp8 kernel on every device: copy the bytes instead.
            flat.view(torch.uint8).index_copy_(0, slots, q.view(torch.uint8))
        else:
            flat.index_copy_(0, slots, src.to(cache.dtype))


def qk_norm_rope_cache(qkv, q_weight, k_weight, eps: float, weight_offset: float, positions, cos_sin, k_cache,
                       v_cache, slot_mapping, k_scale: float, v_scale: float, num_heads: int,
                       num_kv_heads: int) -> torch.Tensor:
    """Qwen3/Gemma3 attention input: split the fused qkv [T, (Hq + 2 Hk) * D] into heads, RMSNorm q and k per head,
    RoPE them, store k/v in the paged caches (kv_write); returns q [T, Hq, D]. Defined as those ops in sequence."""
    t, d = qkv.shape[0], k_cache.shape[-1]
    q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    q = rms_norm(q.reshape(t, num_heads, d), q_weight, eps, weight_offset)
    k = rms_norm(k.reshape(t, num_kv_heads, d), k_weight, eps, weight_offset)
    q, k = rope(q, k, positions, cos_sin)
    kv_write(k, v.reshape(t, num_kv_heads, d), k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q


def _gather_keys(cache, slots, valid, scale: float) -> torch.Tensor:
    """cache rows at slots [B, S] -> float32 [B, S, Hk, D]; invalid slots read as 0 (a freed block may hold NaN)."""
    flat = cache.view(-1, *cache.shape[2:])
    out = flat[slots.clamp(min=0)].float()
    if _is_fp8(cache) and scale != 1.0:
        out = out * scale
    return out.masked_fill(~valid[..., None, None], 0.0)


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: Optional[int],
    k_scale: float,
    v_scale: float,
) -> torch.Tensor:
    """Causal (optionally sliding-window) GQA attention of q [T, Hq, D] over the paged cache -> [T, Hq, D].

    Serves prefill chunks and decodes in one batch. A query at position p sees keys at positions j with
    j <= p and, with a window W, j > p - W (the W most recent tokens, itself included, as in HF).
    A mixed batch runs as two groups, decodes and prefill chunks, so decodes are not padded to the longest chunk.
    """
    q_lens, seq_lens = meta.query_lens, meta.seq_lens.long()
    args = (k_cache, v_cache, scale, sliding_window, k_scale, v_scale)
    decode = q_lens == 1
    if meta.max_query_len == 1 or not bool(decode.any()):
        return _attend(q, meta.block_tables, seq_lens, q_lens, meta.token_to_seq, meta.token_index_in_seq,
                       meta.max_query_len, meta.max_seq_len, *args)
    out = torch.empty_like(q)
    for chosen in (decode, ~decode):
        seqs = chosen.nonzero().squeeze(1)
        tokens = chosen[meta.token_to_seq]
        local_seq = (torch.cumsum(chosen, 0) - 1)[meta.token_to_seq[tokens]]  # index among the chosen sequences
        out[tokens] = _attend(q[tokens], meta.block_tables[seqs], seq_lens[seqs], q_lens[seqs], local_seq,
                              meta.token_index_in_seq[tokens], int(q_lens[seqs].max()), int(seq_lens[seqs].max()), *args)
    return out


def qk_norm_rope_attention(qkv, q_weight, k_weight, eps: float, weight_offset: float, positions, cos_sin, k_cache,
                           v_cache, slot_mapping, k_scale: float, v_scale: float, num_heads: int, num_kv_heads: int,
                           meta: AttentionMetadata, scale: float, sliding_window: Optional[int]) -> torch.Tensor:
    """A layer's attention from its fused qkv projection: qk_norm_rope_cache, then attention -> [T, Hq, D]."""
    q = qk_norm_rope_cache(qkv, q_weight, k_weight, eps, weight_offset, positions, cos_sin, k_cache, v_cache,
                           slot_mapping, k_scale, v_scale, num_heads, num_kv_heads)
    return attention(q, k_cache, v_cache, meta, scale, sliding_window, k_scale, v_scale)


def _attend(q, block_tables, seq_lens, q_lens, token_to_seq, token_index, qmax: int, s: int,
            k_cache, v_cache, scale, sliding_window, k_scale, v_scale) -> torch.Tensor:
    """attention() for B sequences whose queries are padded to qmax and contexts to s."""
    num_tokens, hq, d = q.shape
    block_size, hk = k_cache.shape[1], k_cache.shape[2]
    groups = hq // hk
    bsz, dev = seq_lens.shape[0], q.device

    # Keys: [B, S] slot of every context position, padded to the longest context.
    kpos = torch.arange(s, device=dev)
    blocks = block_tables.long()[:, kpos // block_size]
    slots = blocks * block_size + kpos % block_size
    kvalid = (kpos[None, :] < seq_lens[:, None]) & (blocks >= 0)
    if sliding_window is not None:  # nothing before the earliest query's window is needed
        kvalid &= kpos[None, :] > (seq_lens - q_lens - sliding_window)[:, None]
    keys = _gather_keys(k_cache, slots, kvalid, k_scale).permute(0, 2, 1, 3)[:, :, None]  # [B, Hk, 1, S, D]
    vals = _gather_keys(v_cache, slots, kvalid, v_scale).permute(0, 2, 1, 3)[:, :, None]

    # Queries padded to [B, Hk, G, Qmax, D]; row i of sequence b is at position seq_len - q_len + i.
    decode_only = qmax == 1 and num_tokens == bsz  # one query per sequence: no padding needed
    if decode_only:
        qpad = q.float().view(bsz, 1, hq, d)
    else:
        qpad = torch.zeros(bsz, qmax, hq, d, dtype=torch.float32, device=dev)
        qpad[token_to_seq, token_index] = q.float()
    qpad = qpad.view(bsz, qmax, hk, groups, d).permute(0, 2, 3, 1, 4)
    out = torch.empty_like(qpad)
    qpos_all = (seq_lens - q_lens)[:, None] + torch.arange(qmax, device=dev)[None, :]  # [B, Qmax]

    chunk = max(1, ATTN_SCORE_ELEMS // max(1, bsz * hq * s))
    for start in range(0, qmax, chunk):
        stop = min(start + chunk, qmax)
        qpos = qpos_all[:, start:stop, None]  # [B, q, 1]
        mask = kvalid[:, None, :] & (kpos[None, None, :] <= qpos)
        if sliding_window is not None:
            mask &= kpos[None, None, :] > qpos - sliding_window
        scores = torch.matmul(qpad[..., start:stop, :], keys.transpose(-1, -2)) * scale  # [B, Hk, G, q, S]
        scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # padded rows may see no key at all
        out[..., start:stop, :] = torch.matmul(probs, vals)

    out = out.permute(0, 3, 1, 2, 4).reshape(bsz, qmax, hq, d)
    if decode_only:
        return out.view(num_tokens, hq, d).to(q.dtype)
    return out[token_to_seq, token_index].to(q.dtype)


def expert(w: "NVFP4Weight", e: int) -> "NVFP4Weight":
    """Expert e of a stacked [E, N, K//2] NVFP4 weight, as a plain [N, K//2] one (views, no copy)."""
    return dataclasses.replace(w, packed=w.packed[e], block_scale=w.block_scale[e], global_scale=w.global_scale[e])


def moe(x, router_logits, w13: "NVFP4Weight", w2: "NVFP4Weight", top_k: int, renormalize: bool) -> torch.Tensor:
    """Sparse SwiGLU MoE: softmax router -> top-k -> (renormalize) -> sum_k weight_k * expert_k(x).

    w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I]. Tokens are sorted by expert so each expert runs one
    batched matmul on the tokens routed to it.
    """
    num_tokens = x.shape[0]
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    flat_experts = experts.flatten()
    order = torch.argsort(flat_experts, stable=True)
    tokens = order // top_k  # token of each (token, k) pair, grouped by expert
    pair_weights = weights.flatten()[order]
    counts = torch.bincount(flat_experts, minlength=w13.packed.shape[0]).tolist()
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        idx = tokens[start : start + count]
        h = silu_and_mul(nvfp4_linear(x[idx], expert(w13, e)))
        y = nvfp4_linear(h, expert(w2, e)).float() * pair_weights[start : start + count, None]
        out.index_add_(0, idx, y)
        start += count
    return out.to(x.dtype)
