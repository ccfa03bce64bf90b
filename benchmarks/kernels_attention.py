"""Attention part of benchmarks.kernels: paged FP8 decode/prefill kernels beside torch SDPA (BF16, contiguous)."""
from __future__ import annotations

import itertools
import json

import torch
import torch.nn.functional as F

from benchmarks.timing import time_graph

HQ, HK, D, BLOCK = 32, 8, 128, 16  # Qwen3-8B


def _paged(batch: int, ctx: int, q_len: int, dev="cuda", max_seq_len: int | None = None):
    from adallm_core.ops.metadata import AttentionMetadata

    blocks_per_seq = -(-ctx // BLOCK)
    nb = batch * blocks_per_seq
    k_cache = torch.randn(nb, BLOCK, HK, D, device=dev).to(torch.float8_e4m3fn)
    v_cache = torch.randn(nb, BLOCK, HK, D, device=dev).to(torch.float8_e4m3fn)
    tables = torch.randperm(nb, device=dev).int().view(batch, blocks_per_seq)
    qsl = torch.arange(batch + 1, device=dev, dtype=torch.int32) * q_len
    meta = AttentionMetadata(qsl, torch.full((batch,), ctx, dtype=torch.int32, device=dev), tables, q_len,
                             max_seq_len or ctx)
    q = torch.randn(batch * q_len, HQ, D, device=dev, dtype=torch.bfloat16)
    return q, k_cache, v_cache, meta


def _fused_decode(batch: int, ctx: int, bound: int, dev="cuda"):
    """The engine's decode launch (qk_norm_rope_attention) for `batch` sequences of `ctx` keys under `bound`: a
    closure over random q|k|v rows, norm weights and rotary table that stores each sequence's newest k/v."""
    from adallm_core.ops.triton import qk_norm_rope_attention

    _, kc, vc, meta = _paged(batch, ctx, 1, dev, max_seq_len=bound)
    pos = meta.seq_lens.long() - 1
    slots = meta.block_tables.long().gather(1, (pos // BLOCK)[:, None])[:, 0] * BLOCK + pos % BLOCK
    qkv = torch.randn(batch, (HQ + 2 * HK) * D, device=dev, dtype=torch.bfloat16)
    wq, wk = (torch.randn(D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    freqs = torch.arange(ctx, device=dev, dtype=torch.float32)[:, None] * torch.rand(D // 2, device=dev)[None, :]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(torch.bfloat16)
    return lambda config=None, num_splits=None: qk_norm_rope_attention(
        qkv, wq, wk, 1e-6, 0.0, pos, cos_sin, kc, vc, slots, 1.0, 1.0, HQ, HK, meta, D**-0.5, None,
        num_splits=num_splits, config=config)


def _engine_tiles(batch: int, bound: int) -> dict:
    """The tiles the engine's decode launch takes for `batch` sequences under `bound` (paged_attention.tiles_for)."""
    from adallm_core.ops.triton.paged_attention import tiles_for

    _, _, _, meta = _paged(batch, 1, 1, max_seq_len=bound)
    return tiles_for(meta, HK, D, meta.seq_lens.device)


def _sweep_tiles(run, block_ns, log):
    """Yields (config, seconds) for run(config) timed in a graph over key tiles x warps x stages; configs that fail
    to compile or launch (shared memory) are logged and skipped."""
    for bn, warps, stages in itertools.product(block_ns, (2, 4, 8), (1, 2)):
        cfg = dict(BLOCK_N=bn, num_warps=warps, num_stages=stages)
        try:
            t = time_graph(lambda: run(cfg), [()])
        except Exception as exc:
            log(f"attention config {cfg} failed: {type(exc).__name__}")
            continue
        yield cfg, t


def bench_attention(rows: list, log) -> None:
    from adallm_core.ops.triton.paged_attention import attention, num_splits_for

    for batch, ctx in ((1, 8192), (16, 8192), (16, 1024), (64, 2048)):
        q, kc, vc, meta = _paged(batch, ctx, 1)
        kv_bytes = 2 * batch * ctx * HK * D  # fp8
        t = time_graph(lambda: attention(q, kc, vc, meta, D**-0.5, None, 1.0, 1.0), [()])
        kb = torch.randn(batch, HK, ctx, D, device="cuda", dtype=torch.bfloat16)
        vb = torch.randn_like(kb)
        qb = q.view(batch, 1, HQ, D).transpose(1, 2)
        ts = time_graph(lambda: F.scaled_dot_product_attention(qb, kb, vb, enable_gqa=True), [()])
        row = dict(kind="decode", batch=batch, ctx=ctx, splits=num_splits_for(meta, HK, q.device), us=t * 1e6,
                   kv_TBps=kv_bytes / t / 1e12, sdpa_bf16_us=ts * 1e6, sdpa_kv_TBps=2 * kv_bytes / ts / 1e12)
        log(json.dumps(row))
        rows.append(row)
        del kc, vc, kb, vb
    # decode CUDA graphs pass max_seq_len = max_model_len (an upper bound): short real contexts, long bounds
    for batch, ctx, bound in ((1, 192, 8192), (16, 192, 8192), (1, 1024, 8192), (16, 8192, 8192)):
        q, kc, vc, meta = _paged(batch, ctx, 1, max_seq_len=bound)
        kv_bytes = 2 * batch * ctx * HK * D
        auto = num_splits_for(meta, HK, q.device)
        for splits in sorted({1, 2, 4, 8, 16, auto}):
            t = time_graph(lambda: attention(q, kc, vc, meta, D**-0.5, None, 1.0, 1.0, num_splits=splits), [()])
            row = dict(kind="decode", batch=batch, ctx=ctx, bound=bound, splits=splits, auto=splits == auto,
                       us=t * 1e6, kv_TBps=kv_bytes / t / 1e12, sdpa_bf16_us=float("nan"), sdpa_kv_TBps=float("nan"))
            log(json.dumps(row))
            rows.append(row)
    # decode tile sweep at the automatic split count
    for batch, ctx, bound in ((1, 192, 8192), (16, 192, 8192), (16, 8192, 8192)):
        q, kc, vc, meta = _paged(batch, ctx, 1, max_seq_len=bound)
        def run(cfg, q=q, kc=kc, vc=vc, meta=meta):
            return attention(q, kc, vc, meta, D**-0.5, None, 1.0, 1.0, config=cfg)

        engine = _engine_tiles(batch, bound)
        for cfg, t in _sweep_tiles(run, (32, 64, 128), log):
            log(json.dumps(dict(kind="decode_sweep", batch=batch, ctx=ctx, bound=bound, us=t * 1e6, **cfg)))
            rows.append(dict(kind="decode_sweep", batch=batch, ctx=ctx, us=t * 1e6, cfg=cfg, engine=cfg == engine))
    # the engine's fused decode launch: where one part stops beating the serving bound's parts (cuda_graphs.
    # SHORT_CONTEXT), then tiles under the short bound
    from adallm_core.cuda_graphs import SHORT_CONTEXT

    for batch, ctx in itertools.product((16, 32), (128, 192, 256, 320, 384, 512, 768, 1000)):
        step = _fused_decode(batch, ctx, 8192)
        for splits in (1, 2, 4):
            t = time_graph(lambda: step(num_splits=splits), [()])
            row = dict(kind="fused_decode_parts", batch=batch, ctx=ctx, splits=splits, us=t * 1e6)
            log(json.dumps(row))
            rows.append(row)
    for batch, ctx in ((8, 192), (16, 192), (16, SHORT_CONTEXT), (32, 384)):
        step, engine = _fused_decode(batch, ctx, SHORT_CONTEXT), _engine_tiles(batch, SHORT_CONTEXT)
        for cfg, t in _sweep_tiles(step, (32, 64, 128, 256), log):  # 256: half the short bound in one tile
            log(json.dumps(dict(kind="fused_decode_sweep", batch=batch, ctx=ctx, bound=SHORT_CONTEXT, us=t * 1e6,
                                **cfg)))
            rows.append(dict(kind="decode_sweep", batch=batch, ctx=ctx, us=t * 1e6, cfg=cfg, fused=True,
                             engine=cfg == engine))
    for ctx in (2048, 8192):  # one prefill of ctx tokens, causal
        q, kc, vc, meta = _paged(1, ctx, ctx)
        t = time_graph(lambda: attention(q, kc, vc, meta, D**-0.5, None, 1.0, 1.0), [()], reps=5)
        kb = torch.randn(1, HK, ctx, D, device="cuda", dtype=torch.bfloat16)
        vb = torch.randn_like(kb)
        qb = q.view(1, ctx, HQ, D).transpose(1, 2)
        ts = time_graph(lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True), [()],
                        reps=5)
        flops = 4 * ctx * ctx * HQ * D / 2  # causal
        row = dict(kind="prefill", batch=1, ctx=ctx, us=t * 1e6, TFLOPs=flops / t / 1e12, sdpa_bf16_us=ts * 1e6,
                   sdpa_TFLOPs=flops / ts / 1e12)
        log(json.dumps(row))
        rows.append(row)


def print_attention(rows: list, bw: float) -> None:
    print(f"\nAttention, Qwen3-8B heads (32 q / 8 kv x 128), FP8 paged cache (block {BLOCK}) vs torch SDPA on BF16")
    sweeps = {}
    for r in rows:
        if r["kind"] == "decode_sweep":
            sweeps.setdefault((r.get("fused", False), r["batch"], r["ctx"]), []).append(r)
    for (fused, batch, ctx), tried in sweeps.items():
        tried.sort(key=lambda r: r["us"])
        what = "fused decode (short bound)" if fused else "decode"
        engine = next((f"{r['us']:.1f} us" for r in tried if r.get("engine")), "not swept")
        print(f"{what} sweep batch {batch:3d} ctx {ctx:5d}: best {tried[0]['us']:.1f} us {tried[0]['cfg']}, "
              f"the engine's tiles {engine}")
    parts = {}
    for r in rows:
        if r["kind"] == "fused_decode_parts":
            parts.setdefault((r["batch"], r["ctx"]), {})[r["splits"]] = r["us"]
    for (batch, ctx), us in parts.items():
        print(f"fused decode batch {batch:3d} ctx {ctx:5d}, us by parts: "
              + ", ".join(f"{n}: {t:.1f}" for n, t in sorted(us.items())))
    for r in rows:
        if r["kind"] in ("decode_sweep", "fused_decode_parts"):
            continue
        if r["kind"] == "decode":
            bound = f" bound {r['bound']}" + (" (auto)" if r["auto"] else "") if "bound" in r else ""
            print(f"decode  batch {r['batch']:3d} ctx {r['ctx']:5d}{bound} splits {r['splits']:2d}: {r['us']:8.1f} us "
                  f"{r['kv_TBps']:.2f} TB/s ({100 * r['kv_TBps'] * 1e12 / bw:.0f}% of copy) | SDPA bf16 "
                  f"{r['sdpa_bf16_us']:.1f} us {r['sdpa_kv_TBps']:.2f} TB/s")
        else:
            print(f"prefill batch   1 ctx {r['ctx']:5d}: {r['us']:8.1f} us {r['TFLOPs']:.0f} TFLOP/s | SDPA bf16 "
                  f"{r['sdpa_bf16_us']:.1f} us {r['sdpa_TFLOPs']:.0f} TFLOP/s")
