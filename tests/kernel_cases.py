"""Kernel-vs-reference cases shared by the GPU tests and the Triton-interpreter CI tests.

Each case draws fresh random inputs on `dev`, runs one Triton op (outputs poisoned where the op takes an out
buffer: the wrappers allocate with torch.empty, and the GPU test poisons the allocator via a NaN-filled cache),
runs ops.reference on the same inputs, and returns ||out - ref|| / ||ref||.
"""
from __future__ import annotations

import dataclasses

import torch

from adallm_core.nvfp4 import NVFP4Weight
from adallm_core.ops import reference
from adallm_core.ops.metadata import AttentionMetadata


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    out, ref = out.float(), ref.float()
    assert ref.norm() > 0, "an all-zero reference checks nothing"
    if not torch.isfinite(out).all():
        return float("inf")  # unwritten (poisoned) or broken output
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def random_nvfp4(n: int, k: int, dev, experts: int | None = None, scale_exp=(-9.0, 8.0)) -> NVFP4Weight:
    lead = () if experts is None else (experts,)
    packed = torch.randint(0, 256, lead + (n, k // 2), dtype=torch.uint8, device=dev)
    # block scales over E4M3's range, subnormals included
    scale = torch.empty(lead + (n, k // 16), device=dev).uniform_(*scale_exp).exp2().to(torch.float8_e4m3fn)
    return NVFP4Weight(packed, scale, torch.rand(lead + (n,), device=dev) * 1e-2 + 1e-3)


def _order(w: NVFP4Weight, kernel_order: bool, tile_major: bool = False) -> NVFP4Weight:
    """The weight the kernel gets: kernel_order moves its codes into the kernels' word order, tile_major also stores
    them in 16 x 128 chunks (nvfp4.to_tile_major), while the reference keeps reading the checkpoint's order and
    layout, so a wrong permutation, layout or decode shows up as a wrong result."""
    if tile_major:
        return w.in_tile_major()
    return w.in_kernel_order() if kernel_order else w


def case_nvfp4_linear(dev, m, n, k, config=None, dtype=torch.bfloat16, kernel_order=False, tile_major=False) -> float:
    from adallm_core.ops.triton.nvfp4_gemm import nvfp4_linear

    w = random_nvfp4(n, k, dev)
    x = torch.randn(m, k, device=dev).to(torch.bfloat16).to(dtype)  # BF16 values: the kernel's dot is BF16
    return rel_err(nvfp4_linear(x, _order(w, kernel_order, tile_major), config), reference.nvfp4_linear(x, w))


def case_nvfp4_gated(dev, m, inter, k, activation: str, config=None, dtype=torch.bfloat16, tile_major=False) -> float:
    """The fused gate|up linear with its activation in the epilogue, against the linear and then the activation op."""
    from adallm_core.ops.triton.nvfp4_gemm import nvfp4_linear

    w = random_nvfp4(2 * inter, k, dev)
    x = torch.randn(m, k, device=dev).to(torch.bfloat16).to(dtype)
    act = {"silu": reference.silu_and_mul, "gelu_tanh": reference.gelu_tanh_and_mul}[activation]
    out = nvfp4_linear(x, _order(w, True, tile_major), config, activation=activation)
    return rel_err(out, act(reference.nvfp4_linear(x, w)))


def case_every_e4m3_scale(dev, config=None, dtype=torch.bfloat16, tile_major=False, k=32) -> float:
    """One row per finite E4M3 block scale (both signs, zero, the subnormals), every weight 1.0: row r of the output is
    k * scale_r, so a wrong decoding of any scale byte shows. Returns the largest error of a row relative to it."""
    from adallm_core.ops.triton.nvfp4_gemm import nvfp4_linear

    finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)  # 254 values
    scales = torch.cat([finite, torch.zeros(2, dtype=torch.uint8)]).view(256, 1).expand(256, k // 16).contiguous()
    w = NVFP4Weight(torch.full((256, k // 2), 0x22, dtype=torch.uint8), scales.view(torch.float8_e4m3fn),
                    torch.ones(256)).to(dev)
    x = torch.ones(1, k, device=dev, dtype=dtype)
    out, ref = nvfp4_linear(x, _order(w, True, tile_major), config).float(), reference.nvfp4_linear(x, w).float()
    assert ref.abs().max() > 0 and torch.isfinite(ref).all()
    return ((out - ref).abs() / ref.abs().clamp(min=1e-30)).max().item()


def case_rms_norm(dev, t, h, offset=0.0, add=False, dtype=torch.bfloat16) -> float:
    from adallm_core.ops.triton import add_rms_norm, rms_norm

    x = torch.randn(t, h, device=dev).to(dtype) * 3
    w = torch.randn(h, device=dev).to(dtype)
    if not add:
        return rel_err(rms_norm(x, w, 1e-6, offset), reference.rms_norm(x, w, 1e-6, offset))
    r = torch.randn(t, h, device=dev).to(dtype)
    out, summed = add_rms_norm(x, r, w, 1e-6, offset)
    ref_out, ref_sum = reference.add_rms_norm(x, r, w, 1e-6, offset)
    return max(rel_err(out, ref_out), rel_err(summed, ref_sum))


def case_embedding(dev, t, vocab, h, on_host=False, dtype=torch.bfloat16) -> float:
    """Row gather; on_host puts the table in pinned host memory, which the GPU kernel reads in place."""
    from adallm_core.ops.triton import embedding

    table = torch.randn(vocab, h).to(dtype)
    table = table.pin_memory() if on_host else table.to(dev)
    ids = torch.randint(0, vocab, (t,), device=dev)
    ids[0] = vocab - 1  # the last row: an off-by-one in the row stride would read past it
    return rel_err(embedding(ids, table), torch.nn.functional.embedding(ids.cpu(), table.cpu()).to(dev))


def case_rope(dev, t, hq, hk, d, dtype=torch.bfloat16) -> float:
    from adallm_core.ops.triton import rope

    q = torch.randn(t, hq, d, device=dev).to(dtype)
    k = torch.randn(t, hk, d, device=dev).to(dtype)
    pos = torch.randint(0, 100, (t,), device=dev)
    freqs = torch.outer(torch.arange(100, device=dev).float(), 1.0 / 10000 ** (torch.arange(0, d, 2, device=dev) / d))
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    qo, ko = rope(q, k, pos, cos_sin)
    qr, kr = reference.rope(q, k, pos, cos_sin)
    return max(rel_err(qo, qr), rel_err(ko, kr))


def case_act(dev, t, inter, gelu: bool, dtype=torch.bfloat16) -> float:
    from adallm_core.ops.triton import gelu_tanh_and_mul, silu_and_mul

    x = torch.randn(t, 2 * inter, device=dev).to(dtype) * 2
    if gelu:
        return rel_err(gelu_tanh_and_mul(x), reference.gelu_tanh_and_mul(x))
    return rel_err(silu_and_mul(x), reference.silu_and_mul(x))


def case_kv_write(dev, t, hk, d, fp8: bool) -> float:
    from adallm_core.ops.triton import kv_write

    blocks, bs = 6, 4
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    caches = [torch.randn(blocks, bs, hk, d, device=dev).to(dtype) for _ in range(2)]
    caches += [c.clone() for c in caches]
    k = torch.randn(t, hk, d, device=dev).to(torch.bfloat16) * 4
    v = torch.randn(t, hk, d, device=dev).to(torch.bfloat16) * 4
    slots = torch.randperm(blocks * bs, device=dev)[:t]
    slots[0] = -1
    kv_write(k, v, caches[0], caches[1], slots, 0.05, 0.5)  # 0.05: values past 448 saturate
    reference.kv_write(k, v, caches[2], caches[3], slots, 0.05, 0.5)
    return max(rel_err(caches[0], caches[2]), rel_err(caches[1], caches[3]))


def case_qk_norm_rope_cache(dev, t, hq, hk, d, cache_dtype, offset=0.0, dtype=torch.bfloat16) -> float:
    """The fused attention-input op against the reference ops in sequence: q, both caches (slot -1 skipped)."""
    from adallm_core.ops.triton import qk_norm_rope_cache

    bs = 4
    blocks = t // bs + 3
    caches = [torch.randn(blocks, bs, hk, d, device=dev).to(cache_dtype) for _ in range(2)]
    caches += [c.clone() for c in caches]
    qkv = (torch.randn(t, (hq + 2 * hk) * d, device=dev) * 3).to(dtype)
    wq, wk = (torch.randn(d, device=dev).to(dtype) for _ in range(2))
    pos = torch.randint(0, 50, (t,), device=dev)
    freqs = torch.arange(64, device=dev, dtype=torch.float32)[:, None] * torch.rand(d // 2, device=dev)[None, :]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    slots = torch.randperm(blocks * bs, device=dev)[:t]
    slots[0] = -1
    args = (wq, wk, 1e-6, offset, pos, cos_sin)
    q = qk_norm_rope_cache(qkv, *args, caches[0], caches[1], slots, 0.05, 0.5, hq, hk)
    q_ref = reference.qk_norm_rope_cache(qkv, *args, caches[2], caches[3], slots, 0.05, 0.5, hq, hk)
    return max(rel_err(q, q_ref), rel_err(caches[0], caches[2]), rel_err(caches[1], caches[3]))


def build_paged_case(dev, q_lens, ctx_lens, hq, hk, d, block_size, fp8, num_blocks=None, dtype=torch.bfloat16):
    """Random paged caches and metadata: sequence b has ctx_lens[b] cached tokens plus q_lens[b] new ones."""
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = num_blocks or sum(per_seq) + 3
    perm = torch.randperm(num_blocks, device=dev)
    max_blocks = max(per_seq)
    tables = torch.full((len(q_lens), max_blocks), -1, dtype=torch.int32, device=dev)
    used = 0
    for b, nb in enumerate(per_seq):
        tables[b, :nb] = perm[used : used + nb].int()
        used += nb
    cdtype = torch.float8_e4m3fn if fp8 else dtype
    k_cache = (torch.randn(num_blocks, block_size, hk, d, device=dev) * 2).to(cdtype)
    v_cache = (torch.randn(num_blocks, block_size, hk, d, device=dev) * 2).to(cdtype)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device=dev)
    meta = AttentionMetadata(qsl, torch.tensor(seq_lens, dtype=torch.int32, device=dev), tables,
                             max(q_lens), max(seq_lens))
    q = torch.randn(sum(q_lens), hq, d, device=dev).to(dtype)
    return q, k_cache, v_cache, meta


def case_attention(dev, q_lens, ctx_lens, hq=4, hk=2, d=32, block_size=4, fp8=True, window=None,
                   num_splits=None, dtype=torch.bfloat16, config=None, calls=1, rule_splits=None) -> float:
    """Worst error over `calls` calls in a row (no state may leak from one call into the next). rule_splits: the
    part count the default rule must pick for this case (num_splits None)."""
    from adallm_core.ops.triton.paged_attention import attention, num_splits_for

    q, kc, vc, meta = build_paged_case(dev, q_lens, ctx_lens, hq, hk, d, block_size, fp8, dtype=dtype)
    if rule_splits is not None:
        assert num_splits_for(meta, hk, q.device) == rule_splits, num_splits_for(meta, hk, q.device)
    args = (q, kc, vc, meta, d**-0.5, window, 0.7, 1.3)
    ref = reference.attention(*args)
    return max(rel_err(attention(*args, num_splits=num_splits, config=config), ref) for _ in range(calls))


def case_qk_norm_rope_attention(dev, ctx_lens, hq, hk, d, fp8, window=None, num_splits=None, dtype=torch.bfloat16,
                                offset=0.0, block_size=4, config=None) -> float:
    """A decode step from the qkv projection's output (one launch on the GPU) against the reference ops in sequence:
    the output and both caches. Sequence 0 is a CUDA-graph padding row (slot -1: nothing stored)."""
    from adallm_core.ops.triton import qk_norm_rope_attention

    q_lens = [1] * len(ctx_lens)
    _, k_cache, v_cache, meta = build_paged_case(dev, q_lens, ctx_lens, hq, hk, d, block_size, fp8, dtype=dtype)
    pos = meta.seq_lens.long() - 1
    tables = meta.block_tables.long().clamp(min=0)
    slots = tables.gather(1, (pos // block_size)[:, None])[:, 0] * block_size + pos % block_size
    slots[0] = -1
    qkv = (torch.randn(len(ctx_lens), (hq + 2 * hk) * d, device=dev) * 3).to(dtype)
    wq, wk = (torch.randn(d, device=dev).to(dtype) for _ in range(2))
    freqs = torch.arange(int(pos.max()) + 1, device=dev, dtype=torch.float32)[:, None] * \
        torch.rand(d // 2, device=dev)[None, :] * 0.1
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)
    ref_caches = k_cache.clone(), v_cache.clone()
    args = (wq, wk, 1e-6, offset, pos, cos_sin)
    tail = (0.05, 0.5, hq, hk, meta, d**-0.5, window)
    out = qk_norm_rope_attention(qkv, *args, k_cache, v_cache, slots, *tail, num_splits=num_splits, config=config)
    ref = reference.qk_norm_rope_attention(qkv, *args, *ref_caches, slots, *tail)
    return max(rel_err(out, ref), rel_err(k_cache.float(), ref_caches[0].float()),
               rel_err(v_cache.float(), ref_caches[1].float()))


def case_moe(dev, t, hidden, inter, experts, top_k, dtype=torch.bfloat16, kernel_order=False) -> float:
    from adallm_core.ops.triton import moe

    w13 = random_nvfp4(2 * inter, hidden, dev, experts, scale_exp=(-4.0, 0.0))
    w2 = random_nvfp4(hidden, inter, dev, experts, scale_exp=(-4.0, 0.0))
    x = torch.randn(t, hidden, device=dev).to(dtype)
    logits = torch.randn(t, experts, device=dev)
    out = moe(x, logits, _order(w13, kernel_order), _order(w2, kernel_order), top_k, True)
    return rel_err(out, reference.moe(x, logits, w13, w2, top_k, True))


def runs_nvfp4(parts: list[int], k: int, dev) -> "NVFP4Weight":
    """A fused linear as checkpoints give it: one global scale per part (q|k|v, gate|up)."""
    ws = [random_nvfp4(n, k, dev) for n in parts]
    for w in ws:
        w.global_scale.fill_(float(w.global_scale[0]))
    return NVFP4Weight.cat(ws)


def case_nvfp4_prefill(dev, m, parts, k, dtype=torch.bfloat16, kernel_order=False, tile_major=False) -> float:
    """The dequantize-once path (nvfp4_prefill.py) called directly, so the interpreter runs it at any M."""
    from adallm_core.ops.triton.nvfp4_prefill import global_runs, nvfp4_linear_prefill

    w = runs_nvfp4(parts, k, dev)
    op_w = _order(w, kernel_order, tile_major)
    runs = global_runs(op_w)
    assert runs is not None and len(runs) >= len(parts)
    x = torch.randn(m, k, device=dev).to(torch.bfloat16).to(dtype)
    return rel_err(nvfp4_linear_prefill(x, op_w, runs), reference.nvfp4_linear(x, w))


def case_fp8_slab(dev, n, k, tile_major=False) -> float:
    """The prefill_fp8 slab (nvfp4_prefill.dequantize_rows with row_mul) into fp32, where the interpreter's E4M3 cast
    cannot round it: the rows' shifted values, exactly as reference.nvfp4_linear_fp8 rounds them."""
    from adallm_core.ops.triton.nvfp4_prefill import dequantize_rows
    from adallm_core.ops.triton.nvfp4_prefill_fp8 import row_scales

    w = random_nvfp4(n, k, dev)
    op_w = _order(w, True, tile_major)
    row_mul, _ = row_scales(op_w)
    out = torch.full((n, k), float("nan"), device=dev)
    dequantize_rows(op_w, 0, n, out, row_mul=row_mul)
    shifted = dataclasses.replace(w, global_scale=torch.exp2(-reference.fp8_row_exponents(w)))
    return rel_err(out, shifted.dequantize(torch.float32))


def case_moe_routing(dev, t, experts, top_k, renormalize, block_m=16, chunk=None) -> float:
    """One-launch routing vs torch softmax + topk: every pair once, in a block of its expert, groups in expert order
    and in token order inside; returns the route weights' error. chunk: pairs ranked at a time (None: the GPU's)."""
    from adallm_core.ops.triton.moe_routing import route_and_sort

    logits = torch.randn(t, experts, device=dev)
    weights, pairs, block_expert = route_and_sort(logits, top_k, renormalize, block_m, chunk=chunk)
    ref_w, ref_e = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
    if renormalize:
        ref_w = ref_w / ref_w.sum(dim=-1, keepdim=True)
    pairs, block_expert, ref_e = pairs.cpu().long(), block_expert.cpu().long(), ref_e.flatten().cpu()
    slots = (pairs >= 0).nonzero().flatten()
    assert sorted(pairs[slots].tolist()) == list(range(t * top_k)), "a pair is missing or repeated"
    assert torch.equal(block_expert[slots // block_m], ref_e[pairs[slots]]), "a pair sits in another expert's block"
    used = int((block_expert >= 0).sum())
    assert (block_expert[used:] == -1).all() and (block_expert[:used].diff() >= 0).all()
    assert (pairs[slots].diff()[block_expert[slots // block_m].diff() == 0] > 0).all(), "token order broken"
    return rel_err(weights, ref_w.flatten())
