"""The reference ops against naive formulas, transformers' own modules and torch SDPA on unpaged tensors."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

from adallm_core.nvfp4 import NVFP4Weight
from adallm_core.ops import AttentionMetadata, reference as ref, select_ops

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def naive_dequant(w: NVFP4Weight) -> torch.Tensor:
    """Written from NVFP4.md, independent of nvfp4.py: low nibble = even element."""
    lo, hi = w.packed & 0xF, w.packed >> 4
    codes = torch.stack([lo, hi], dim=-1).flatten(-2).long()
    vals = torch.tensor(E2M1)[codes]
    scales = w.block_scale.float().repeat_interleave(16, dim=-1)
    return vals * scales * w.global_scale[..., None]


def test_nvfp4_linear_dequantizes_row_tiles_only(monkeypatch):
    torch.manual_seed(0)
    w = NVFP4Weight.quantize(torch.randn(50, 64))
    x = torch.randn(7, 64)
    monkeypatch.setattr(ref, "DEQUANT_TILE_ELEMS", 64 * 16)  # 16 rows a tile: 4 tiles, the last one short
    tiles = []
    real = NVFP4Weight.dequantize

    def spy(self, dtype=torch.float32, rows=None):
        tiles.append(rows)
        return real(self, dtype, rows)

    monkeypatch.setattr(NVFP4Weight, "dequantize", spy)
    out = ref.nvfp4_linear(x, w)
    assert [(r.start, r.stop) for r in tiles] == [(0, 16), (16, 32), (32, 48), (48, 50)]
    torch.testing.assert_close(out, x @ naive_dequant(w).t(), rtol=1e-5, atol=1e-5)
    assert ref.nvfp4_linear(x.bfloat16(), w).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="x must be"):
        ref.nvfp4_linear(torch.randn(3, 32), w)


@pytest.mark.parametrize("offset,hf_cls", [(0.0, Qwen3RMSNorm), (1.0, Gemma3RMSNorm)])
def test_rms_norm_matches_transformers(offset, hf_cls):
    torch.manual_seed(1)
    x, res, w = torch.randn(5, 32), torch.randn(5, 32), torch.randn(32)
    hf = hf_cls(32, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(w)
        torch.testing.assert_close(ref.rms_norm(x, w, 1e-6, offset), hf(x))
        normed, summed = ref.add_rms_norm(x, res, w, 1e-6, offset)
        torch.testing.assert_close(summed, x + res)
        torch.testing.assert_close(normed, hf(x + res))


def test_rope_matches_transformers():
    torch.manual_seed(2)
    d, base = 16, 10_000.0
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.arange(64).float()[:, None] * inv_freq
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    q, k, pos = torch.randn(6, 4, d), torch.randn(6, 2, d), torch.tensor([0, 1, 7, 30, 31, 63])
    emb = torch.cat([freqs, freqs], -1)[pos]
    hq, hk = apply_rotary_pos_emb(q, k, emb.cos(), emb.sin(), unsqueeze_dim=1)  # [T, H, D] layout
    oq, ok = ref.rope(q, k, pos, cos_sin)
    torch.testing.assert_close(oq, hq)
    torch.testing.assert_close(ok, hk)


def test_gated_activations():
    g, u = torch.randn(4, 8), torch.randn(4, 8)
    x = torch.cat([g, u], -1)
    torch.testing.assert_close(ref.silu_and_mul(x), g * torch.sigmoid(g) * u)
    gelu = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
    torch.testing.assert_close(ref.gelu_tanh_and_mul(x), gelu * u)


def test_kv_write_fp8_scales_saturates_and_skips():
    k_cache = torch.zeros(3, 4, 1, 2, dtype=torch.float8_e4m3fn)
    v_cache = torch.zeros_like(k_cache)
    k = torch.tensor([[[1.0, -2.0]], [[1e4, 3.0]], [[5.0, 5.0]]])
    ref.kv_write(k, k * 2, k_cache, v_cache, torch.tensor([5, 0, -1]), k_scale=2.0, v_scale=4.0)
    flat_k, flat_v = k_cache.float().view(-1, 2), v_cache.float().view(-1, 2)
    assert flat_k[5].tolist() == [0.5, -1.0]  # stored as k / k_scale
    assert flat_k[0].tolist() == [448.0, 1.5]  # saturated, not NaN
    assert flat_v[5].tolist() == [0.5, -1.0]
    assert flat_k.count_nonzero() == 4  # slot -1 wrote nothing


# (start_pos, q_len) per sequence: a first prefill, a later prefill chunk, two decodes
SEQS = [(0, 7), (5, 6), (12, 1), (3, 1)]


def _paged_case(cache_dtype, seed=3, hq=4, hk=2, d=16, bs=4, seqs=SEQS):
    g = torch.Generator().manual_seed(seed)
    ctx = [s + q for s, q in seqs]
    nblocks = [math.ceil(c / bs) for c in ctx]
    perm = torch.randperm(sum(nblocks) + 1, generator=g).tolist()
    perm.remove(0)  # block 0 is the engine's null block; leave it unused
    tables, i = [], 0
    for n in nblocks:
        tables.append(perm[i : i + n])
        i += n
    width = max(nblocks)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    k_cache = torch.zeros(len(perm) + 1, bs, hk, d, dtype=cache_dtype)
    v_cache = torch.zeros_like(k_cache)
    keys = [torch.randn(c, hk, d, generator=g) * 3 for c in ctx]
    vals = [torch.randn(c, hk, d, generator=g) for c in ctx]
    qs = [torch.randn(q, hq, d, generator=g) for _, q in seqs]
    q_lens = torch.tensor([q for _, q in seqs])
    meta = AttentionMetadata(
        query_start_loc=torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)]).int(),
        seq_lens=torch.tensor(ctx, dtype=torch.int32),
        block_tables=bt,
        max_query_len=int(q_lens.max()),
        max_seq_len=max(ctx),
    )
    return meta, tables, k_cache, v_cache, keys, vals, qs


def _write_all(tables, k_cache, v_cache, keys, vals, k_scale, v_scale, bs=4):
    for t, k, v in zip(tables, keys, vals):
        pos = torch.arange(k.shape[0])
        slots = torch.tensor(t)[pos // bs] * bs + pos % bs
        ref.kv_write(k, v, k_cache, v_cache, slots, k_scale, v_scale)


def _sdpa(qs, keys, vals, scale, window, seqs=SEQS):
    outs = []
    for (start, q_len), q, k, v in zip(seqs, qs, keys, vals):
        qpos = torch.arange(start, start + q_len)[:, None]
        kpos = torch.arange(k.shape[0])[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        rep = q.shape[1] // k.shape[1]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.repeat_interleave(rep, 1).transpose(0, 1), v.repeat_interleave(rep, 1).transpose(0, 1),
            attn_mask=mask, scale=scale,
        )
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_matches_sdpa(window):
    meta, tables, kc, vc, keys, vals, qs = _paged_case(torch.float32)
    _write_all(tables, kc, vc, keys, vals, 1.0, 1.0)
    out = ref.attention(torch.cat(qs), kc, vc, meta, 0.3, window, 1.0, 1.0)
    torch.testing.assert_close(out, _sdpa(qs, keys, vals, 0.3, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 3])
def test_paged_attention_decode_only_batch(window):
    seqs = [(12, 1), (3, 1), (7, 1)]
    meta, tables, kc, vc, keys, vals, qs = _paged_case(torch.float32, seqs=seqs)
    _write_all(tables, kc, vc, keys, vals, 1.0, 1.0)
    out = ref.attention(torch.cat(qs), kc, vc, meta, 0.3, window, 1.0, 1.0)
    torch.testing.assert_close(out, _sdpa(qs, keys, vals, 0.3, window, seqs), rtol=1e-5, atol=1e-5)


def test_paged_attention_sliding_window_ignores_dropped_blocks():
    """Blocks wholly outside the window may be handed back (null block 0, holding anything, even NaN)."""
    meta, tables, kc, vc, keys, vals, qs = _paged_case(torch.float32)
    _write_all(tables, kc, vc, keys, vals, 1.0, 1.0)
    kc[0], vc[0] = float("nan"), float("nan")
    bt = meta.block_tables.clone()
    bt[1, 0] = 0  # seq 1: first query at 5, window 2 sees positions >= 4: block 0 (positions 0-3) dropped
    bt[2, :2] = 0  # seq 2: query at 12 sees 11..12: blocks 0 and 1 dropped
    dropped = AttentionMetadata(meta.query_start_loc, meta.seq_lens, bt, meta.max_query_len, meta.max_seq_len)
    out = ref.attention(torch.cat(qs), kc, vc, dropped, 0.3, 2, 1.0, 1.0)
    torch.testing.assert_close(out, _sdpa(qs, keys, vals, 0.3, 2), rtol=1e-5, atol=1e-5)


def test_paged_attention_fp8_cache():
    meta, tables, kc, vc, keys, vals, qs = _paged_case(torch.float8_e4m3fn)
    k_scale, v_scale = 0.05, 0.02
    _write_all(tables, kc, vc, keys, vals, k_scale, v_scale)
    out = ref.attention(torch.cat(qs), kc, vc, meta, 0.3, None, k_scale, v_scale)
    # exact against SDPA on the e4m3-rounded keys/values ...
    rk = [(k / k_scale).to(torch.float8_e4m3fn).float() * k_scale for k in keys]
    rv = [(v / v_scale).to(torch.float8_e4m3fn).float() * v_scale for v in vals]
    torch.testing.assert_close(out, _sdpa(qs, rk, rv, 0.3, None), rtol=1e-5, atol=1e-5)
    # ... and within e4m3's 3 mantissa bits of the unquantized result
    torch.testing.assert_close(out, _sdpa(qs, keys, vals, 0.3, None), rtol=0, atol=0.3)


def test_attention_splits_long_prefills_into_query_chunks(monkeypatch):
    meta, tables, kc, vc, keys, vals, qs = _paged_case(torch.float32)
    _write_all(tables, kc, vc, keys, vals, 1.0, 1.0)
    whole = ref.attention(torch.cat(qs), kc, vc, meta, 0.3, 5, 1.0, 1.0)
    monkeypatch.setattr(ref, "ATTN_SCORE_ELEMS", 100)  # prefill group (2 seqs, 4 heads, 11 keys): 1 query row a chunk
    torch.testing.assert_close(ref.attention(torch.cat(qs), kc, vc, meta, 0.3, 5, 1.0, 1.0), whole)


def test_metadata_token_layout():
    meta = _paged_case(torch.float32)[0]
    assert meta.token_to_seq.tolist() == [0] * 7 + [1] * 6 + [2, 3]
    assert meta.token_index_in_seq.tolist() == list(range(7)) + list(range(6)) + [0, 0]


@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_matches_per_token_loop(renormalize):
    torch.manual_seed(4)
    e, h, inter, top_k = 6, 32, 16, 2
    w13 = NVFP4Weight.stack([NVFP4Weight.quantize(torch.randn(2 * inter, h)) for _ in range(e)])
    w2 = NVFP4Weight.stack([NVFP4Weight.quantize(torch.randn(h, inter)) for _ in range(e)])
    x, logits = torch.randn(9, h), torch.randn(9, e)
    d13, d2 = naive_dequant(w13), naive_dequant(w2)
    expected = torch.zeros(9, h)
    for t in range(9):
        p = torch.softmax(logits[t], -1)
        top = torch.topk(p, top_k)
        weights = top.values / top.values.sum() if renormalize else top.values
        for wgt, ex in zip(weights, top.indices):
            gate, up = (d13[ex] @ x[t]).chunk(2)
            expected[t] += wgt * (d2[ex] @ (F.silu(gate) * up))
    torch.testing.assert_close(ref.moe(x, logits, w13, w2, top_k, renormalize), expected, rtol=1e-4, atol=1e-4)


def test_select_ops_refuses_what_cannot_run():
    ops = select_ops("auto", "cpu")
    assert ops.name == "reference" and ops.attention is ref.attention
    assert set(ops.sources.values()) == {"adallm_core.ops.reference"}
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_ops("triton", "cpu")
    with pytest.raises(ValueError, match="kernel_backend must be one of"):
        select_ops("cuda-magic", "cpu")


def test_nvfp4_linear_fp8_rounds_each_weight_once_to_e4m3():
    """Hand-made: E2M1 1.5 times block scale 1.125 is 1.6875, 5 significant bits; E4M3 keeps 4 and rounds the tie
    to even, 1.75, at any row exponent (row 1's scale is 8x smaller). One-hot rows of x are exact in E4M3."""
    n, k, m = 16, 32, ref.FP8_PREFILL_MIN_TOKENS
    packed = torch.full((n, k // 2), 0x33, dtype=torch.uint8)  # code 3 = +1.5 in both nibbles
    scale = torch.full((n, k // 16), 1.125)
    scale[1::2] /= 8
    w = NVFP4Weight(packed, scale.to(torch.float8_e4m3fn), torch.full((n,), 3.0))
    x = torch.zeros(m, k)
    x[torch.arange(m), torch.arange(m) % k] = 1.0
    row = torch.tensor([1.0, 0.125] * (n // 2))
    torch.testing.assert_close(ref.nvfp4_linear(x, w), (1.6875 * 3 * row).expand(m, n), rtol=0, atol=0)
    torch.testing.assert_close(ref.nvfp4_linear_fp8(x, w), (1.75 * 3 * row).expand(m, n), rtol=1e-6, atol=0)


def test_nvfp4_linear_fp8_is_close_to_exact_and_exact_below_its_threshold():
    torch.manual_seed(0)
    w = NVFP4Weight.quantize(torch.randn(256, 512))
    x = torch.randn(ref.FP8_PREFILL_MIN_TOKENS, 512, dtype=torch.bfloat16)
    exact = ref.nvfp4_linear(x, w).float()
    err = ((ref.nvfp4_linear_fp8(x, w).float() - exact).norm() / exact.norm()).item()
    assert 5e-3 < err < 4e-2  # E4M3 activations alone are 2.65% on Gaussian data (benchmarks/NOTES.md)
    fewer = x[:-1]
    assert torch.equal(ref.nvfp4_linear_fp8(fewer, w), ref.nvfp4_linear(fewer, w))
    gated = ref.nvfp4_gated_linear_fp8(x, w, "silu")
    assert torch.equal(gated, ref.silu_and_mul(ref.nvfp4_linear_fp8(x, w)))


def test_nvfp4_linear_fp8_reads_tile_major_scales_by_row():
    torch.manual_seed(0)
    w = NVFP4Weight.quantize(torch.randn(32, 256) * torch.logspace(-3, 3, 32)[:, None])  # rows far apart in scale
    x = torch.randn(ref.FP8_PREFILL_MIN_TOKENS, 256)
    tiled = w.in_tile_major()
    assert torch.equal(ref.fp8_row_exponents(tiled), ref.fp8_row_exponents(w))
    assert torch.equal(ref.nvfp4_linear_fp8(x, tiled), ref.nvfp4_linear_fp8(x, w))


def test_select_ops_prefill_fp8_takes_the_fp8_linears():
    ops = select_ops("reference", "cpu", prefill_fp8=True)
    assert ops.nvfp4_linear is ref.nvfp4_linear_fp8 and ops.nvfp4_gated_linear is ref.nvfp4_gated_linear_fp8
    assert ops.attention is ref.attention
