"""Launch part of benchmarks.kernels: what one decode linear costs beyond streaming its bytes.

Beside each Qwen3-8B linear at M = 1 it times a kernel that only reads the same bytes (XOR of int32 words), and the
linear again with its weights hot in L2 (one copy replayed). A read costs bytes / bandwidth + ~2 us; the difference
to the linear is the linear's own fixed cost (benchmarks/NOTES.md, 2026-11-28)."""
from __future__ import annotations

import json

import torch
import triton
import triton.language as tl

from benchmarks.timing import time_graph


@triton.jit
def read_kernel(w_ptr, out_ptr, n_words, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    base = pid * BLOCK * ITERS
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(w_ptr + offs, mask=offs < n_words, other=0)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def time_read(nbytes: int, copies: int, block: int = 2048, iters: int = 4, warps: int = 8) -> float:
    words = nbytes // 4
    bufs = [torch.randint(0, 1 << 30, (words,), dtype=torch.int32, device="cuda") for _ in range(copies)]
    grid = triton.cdiv(words, block * iters)
    out = torch.empty(grid, dtype=torch.int32, device="cuda")
    return time_graph(lambda b: read_kernel[(grid,)](b, out, words, BLOCK=block, ITERS=iters, num_warps=warps),
                      [(b,) for b in bufs])


def bench_launch(rows: list, log) -> None:
    from adallm_core.ops.triton import nvfp4_gemm as lin
    from benchmarks.kernels import LINEARS, copies, random_nvfp4

    for name, (n, k) in LINEARS.items():
        ws = [random_nvfp4(n, k).in_tile_major() for _ in range(copies(n * k // 2))]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        row = dict(shape=name, nbytes=ws[0].nbytes, read_us=time_read(ws[0].nbytes, len(ws)) * 1e6,
                   linear_us=time_graph(lambda w: lin.nvfp4_linear(x, w), [(w,) for w in ws]) * 1e6,
                   l2_hot_us=time_graph(lambda w: lin.nvfp4_linear(x, w), [(ws[0],)] * 4) * 1e6)
        log(json.dumps(row))
        rows.append(row)
        del ws
        torch.cuda.empty_cache()


def print_launch(rows: list) -> None:
    print("\nDecode linears at M = 1 beside a kernel that only reads the same bytes (Qwen3-8B shapes)")
    print(f"{'shape':8} {'MB':>6} {'read us':>8} {'linear us':>10} {'L2-hot us':>10} {'read/linear':>12}")
    for r in rows:
        print(f"{r['shape']:8} {r['nbytes'] / 1e6:6.1f} {r['read_us']:8.2f} {r['linear_us']:10.2f} "
              f"{r['l2_hot_us']:10.2f} {100 * r['read_us'] / r['linear_us']:11.0f}%")
