"""Kernel benchmark on Qwen3-8B shapes: NVFP4 linears beside torch BF16 and FP8, attention beside torch SDPA.

    python -m benchmarks.kernels [--sections linear,attention,launch] [--sweep] [--json out.json]

Weights are random (real shapes, random values); each timing rotates through enough weight copies that L2 does not
serve the reads, and kernels are timed inside a CUDA graph (launch gaps excluded), median of 20.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from benchmarks.timing import copy_bandwidth, time_graph

# Qwen3-8B: hidden 4096, 32 q heads + 8 kv heads of 128, MLP 12288
LINEARS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}
GEMMA3_27B_LINEARS = {"qkv": (8192, 5376), "o": (5376, 4096), "gate_up": (43008, 5376), "down": (5376, 21504)}
MS = (1, 16, 64, 128, 256, 512, 2048)
ROTATE_BYTES = 256 << 20


def random_nvfp4(n: int, k: int, device="cuda"):
    from adallm_core.nvfp4 import NVFP4Weight

    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
    scale = torch.empty(n, k // 16, device=device).uniform_(-4, 4).exp2().to(torch.float8_e4m3fn)
    return NVFP4Weight(packed, scale, torch.full((n,), 3e-3, device=device))  # one global scale, as checkpoints


def copies(nbytes_one: int) -> int:
    return max(2, min(32, ROTATE_BYTES // max(1, nbytes_one)))


CUDA_VARIANTS = "(row tiles, warps, stages): v0 (2, 8, 2) v1 (1, 8, 4) v2 (2, 16, 2) v3 (4, 8, 2)"


def sweep_cuda_variants(log, ms=(1, 2, 4, 6, 8)) -> list[dict]:
    """csrc/nvfp4_gemv.cu's variants beside the Triton decode kernel on Qwen3-8B's and Gemma3-27B's linears; `op` is
    what the op picks (ops/cuda_gemv.py: takes, pick_variant). A variant whose stages do not fit this GPU at M (four
    row tiles of 7-8 tokens on Ada) shows as '-'."""
    from adallm_core.ops import cuda_gemv
    from adallm_core.ops.triton import nvfp4_gemm as lin
    from adallm_core.ops.triton.nvfp4_prefill import nvfp4_linear as op_linear

    module, out = cuda_gemv.load(), []
    variants = range(cuda_gemv.VARIANTS)
    for model, linears in (("qwen3-8b", LINEARS), ("gemma3-27b", GEMMA3_27B_LINEARS)):
        for name, (n, k) in linears.items():
            ws = [random_nvfp4(n, k).in_tile_major() for _ in range(copies(n * k // 2))]
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                cfg = lin.pick_config(m, n, k, x.device)
                row = dict(model=model, shape=name, M=m, TB=ws[0].nbytes / 1e12,
                           triton=time_graph(lambda w: lin.nvfp4_linear(x, w, cfg), [(w,) for w in ws]) * 1e6,
                           op=time_graph(lambda w: op_linear(x, w), [(w,) for w in ws]) * 1e6)
                for v in variants:
                    row[f"v{v}"] = (time_graph(lambda w: cuda_gemv.nvfp4_gemv(x, w, module, v),
                                               [(w,) for w in ws]) * 1e6 if module.fits(m, v) else None)
                log(json.dumps(row))
                out.append(row)
            del ws

    def us(t):
        return f"{t:6.2f}" if t is not None else f"{'-':>6}"

    print(f"\nCUDA decode kernel variants: {CUDA_VARIANTS}; us")
    for r in out:
        best = min(r[f"v{v}"] for v in variants if r[f"v{v}"] is not None)
        print(f"{r['model']:10} {r['shape']:8} M={r['M']:2d} triton {r['triton']:6.2f} op {r['op']:6.2f} | "
              + " ".join(f"v{v} {us(r[f'v{v}'])}" for v in variants)
              + f" | best {best:.2f} us = {r['TB'] / best * 1e6:.2f} TB/s")
    for model in ("qwen3-8b", "gemma3-27b"):
        for m in sorted({r["M"] for r in out}):
            sel = [r for r in out if r["M"] == m and r["model"] == model]
            layer = {v: (sum(r[f"v{v}"] for r in sel) if all(r[f"v{v}"] is not None for r in sel) else None)
                     for v in variants}
            print(f"{model:10} layer    M={m:2d} triton {sum(r['triton'] for r in sel):6.1f} "
                  f"op {sum(r['op'] for r in sel):6.1f} | " + " ".join(f"v{v} {us(layer[v])}" for v in variants))
    return out


def bench_linear(sweep: bool, rows: list, log, w4a8: bool = True, ms=MS, sweep_ms=(1, 16, 64), only=None) -> None:
    from adallm_core.ops.triton import nvfp4_gemm as lin
    from adallm_core.ops.triton.nvfp4_prefill import global_runs, nvfp4_linear_prefill
    from adallm_core.ops.triton.nvfp4_prefill import nvfp4_linear as op_linear
    from adallm_core.ops.triton.nvfp4_prefill_fp8 import fp8_gemm
    from adallm_core.ops.triton.w4a8_gemm import w4a8_linear

    for name, (n, k) in LINEARS.items():
        # as the engine holds them (ops.prepare_nvfp4_weight: tile-major, word order); W4A8 reads the checkpoint's
        checkpoint_ws = [random_nvfp4(n, k) for _ in range(copies(n * k // 2))]
        ws = [w.in_tile_major() for w in checkpoint_ws]
        wbytes = ws[0].nbytes
        nb = copies(n * k * 2)
        bf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(nb)]
        f8 = [b.to(torch.float8_e4m3fn) for b in bf]
        one = torch.ones((), device="cuda")
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"shape": name, "N": n, "K": k, "M": m, "nvfp4_bytes": wbytes}
            t = time_graph(lambda w: op_linear(x, w), [(w,) for w in ws])  # the path the op picks
            row["nvfp4_us"] = t * 1e6
            row["nvfp4_TBps"] = wbytes / t / 1e12
            row["nvfp4_cfg"] = lin.pick_config(m, n, k, x.device)
            if m >= 128:  # both large-M paths, whichever the op picks (dequantize-once from MIN_TOKENS on)
                cfg = row["nvfp4_cfg"]
                row["tiled_us"] = time_graph(lambda w: lin.nvfp4_linear(x, w, cfg), [(w,) for w in ws]) * 1e6
                row["dequant_us"] = time_graph(lambda w: nvfp4_linear_prefill(x, w, global_runs(w)),
                                               [(w,) for w in ws]) * 1e6
                # prefill_fp8's path (lossy: E4M3 activations and weight slabs, FP8 GEMM)
                row["prefill_fp8_us"] = time_graph(lambda w: fp8_gemm(x, w), [(w,) for w in ws]) * 1e6
            if sweep and m in sweep_ms:
                best = (t, row["nvfp4_cfg"])
                for cfg in sweep_configs(m, only):
                    try:
                        tc = time_graph(lambda w: lin.nvfp4_linear(x, w, cfg), [(w,) for w in ws], reps=10)
                    except Exception as exc:  # a config the compiler rejects (shared memory): skip it, log it
                        log(f"config {cfg} failed: {type(exc).__name__}: {str(exc)[:200]}")
                        continue
                    log(f"{name} M={m} {cfg} {tc * 1e6:.1f} us")
                    if tc < best[0]:
                        best = (tc, cfg)
                row["best_us"], row["best_cfg"] = best[0] * 1e6, best[1]
                row["best_TBps"] = wbytes / best[0] / 1e12
            if w4a8 and m >= 16:
                row["w4a8_us"] = time_graph(lambda w: w4a8_linear(x, w), [(w,) for w in checkpoint_ws]) * 1e6
            row["bf16_us"] = time_graph(lambda b: torch.matmul(x, b.t()), [(b,) for b in bf]) * 1e6
            if m >= 16:
                xf = x.to(torch.float8_e4m3fn)
                row["fp8_us"] = time_graph(
                    lambda b: torch._scaled_mm(xf, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                    [(b,) for b in f8],
                ) * 1e6
            log(json.dumps(row, default=str))
            rows.append(row)
        del ws, checkpoint_ws, bf, f8
        torch.cuda.empty_cache()


SWEEP_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")


def parse_only(parser, spec: str) -> dict:
    """--sweep-only 'BLOCK_N=64,num_warps=2' -> {'BLOCK_N': 64, 'num_warps': 2}; a misspelt key would leave the
    sweep empty, so it is refused."""
    only = {}
    for item in filter(None, spec.split(",")):
        key, _, value = (part.strip() for part in item.partition("="))
        if key not in SWEEP_KEYS or not value.lstrip("-").isdigit():
            parser.error(f"--sweep-only takes KEY=INTEGER pairs separated by commas, KEY one of {SWEEP_KEYS}; "
                         f"got {item!r}")
        only[key] = int(value)
    return only


def sweep_configs(m: int, only: dict | None = None) -> list[dict]:
    """The tile configs --sweep tries at m tokens; `only`: just those with these values."""
    return [c for c in _sweep_configs(m) if all(c[key] == value for key, value in (only or {}).items())]


def _sweep_configs(m: int) -> list[dict]:
    if m >= 256:  # tensor-core tiles
        return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, num_warps=w, num_stages=st, MATH=3)
                for bm, bn, bk, w, st in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3),
                                          (64, 128, 128, 4, 3), (128, 64, 128, 4, 4), (256, 128, 64, 8, 3))]
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    out = []
    if m <= 16:  # narrow N tiles over the whole K: no split-K reduction (its round trips dominate small linears)
        for bn, bk, warps, stages, split in itertools.product((16, 32), (256, 512), (2, 4), (3, 5), (1, 2)):
            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=stages,
                            MATH=3))
    # weights as the MMA's A operand (SWAP_AB, straight from registers); the B-operand grid was swept before
    # (benchmarks/NOTES.md), its best configs are the default table. Two warps keep Hopper on mma.sync (the 9-16-token
    # default); four put 64+ rows on wgmma there. 64 rows on two warps with K tiles of 128 read x once per 64 rows
    # (half the L2 traffic of 32) in 110-128 registers, with deeper rings for the bytes in flight (session 40)
    for bn, bk, warps, stages in ((32, 256, 2, 3), (32, 512, 2, 3), (64, 256, 2, 3), (64, 256, 4, 3), (64, 128, 4, 4),
                                  (128, 128, 4, 3), (128, 256, 8, 3), (64, 128, 2, 4), (64, 128, 2, 5), (64, 128, 2, 6),
                                  (32, 128, 2, 5)):
        for split in (1, 2, 4, 8, 16):
            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=stages,
                            MATH=3, SWAP_AB=True))
    return out


def print_linear(rows: list, bw: float) -> None:
    print(f"\nNVFP4 linears, Qwen3-8B shapes (copy bandwidth {bw / 1e12:.2f} TB/s; TB/s counts packed weights + scales)")
    hdr = (f"{'shape':8} {'M':>5} {'nvfp4 us':>9} {'TB/s':>6} {'%copy':>6} {'best us':>8} {'tiled us':>8} "
           f"{'deq us':>8} {'pfp8 us':>8} {'w4a8 us':>8} {'bf16 us':>8} {'fp8 us':>8}")
    print(hdr)
    for r in rows:
        best = f"{r['best_us']:8.1f}" if "best_us" in r else f"{'':8}"
        tiled = " ".join(f"{r[k]:8.1f}" if k in r else f"{'':8}" for k in ("tiled_us", "dequant_us", "prefill_fp8_us"))
        w4 = f"{r['w4a8_us']:8.1f}" if "w4a8_us" in r else f"{'':8}"
        f8 = f"{r['fp8_us']:8.1f}" if "fp8_us" in r else f"{'':8}"
        print(f"{r['shape']:8} {r['M']:5d} {r['nvfp4_us']:9.1f} {r['nvfp4_TBps']:6.2f} {100 * r['nvfp4_TBps'] * 1e12 / bw:5.0f}% "
              f"{best} {tiled} {w4} {r['bf16_us']:8.1f} {f8}")
    for m in MS:  # one layer's four linears, as KERNELS.md quotes them
        sel = [r for r in rows if r["M"] == m]
        if len(sel) == len(LINEARS):
            keys = ("nvfp4_us", "tiled_us", "dequant_us", "prefill_fp8_us", "w4a8_us", "bf16_us", "fp8_us")
            tot = {k: sum(r.get(k, float("nan")) for r in sel) for k in keys}
            print(f"layer    {m:5d} nvfp4 {tot['nvfp4_us']:.1f} us (tiled {tot['tiled_us']:.1f}, dequantize-once "
                  f"{tot['dequant_us']:.1f}, prefill_fp8 {tot['prefill_fp8_us']:.1f}), w4a8 "
                  f"{tot['w4a8_us']:.1f}, bf16 {tot['bf16_us']:.1f}, fp8 {tot['fp8_us']:.1f}, bf16/nvfp4 "
                  f"{tot['bf16_us'] / tot['nvfp4_us']:.2f}x, bf16/prefill_fp8 "
                  f"{tot['bf16_us'] / tot['prefill_fp8_us']:.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="linear,attention",
                   help="any of linear, attention, launch (a linear's fixed cost beside a pure read), cuda_variants")
    p.add_argument("--sweep", action="store_true", help="also try a grid of decode tile configs")
    p.add_argument("--json", default=None, help="write every row here")
    p.add_argument("--skip-w4a8", action="store_true", help="leave out the (slow) W4A8 comparison")
    p.add_argument("--log", default=None, help="append progress lines here")
    p.add_argument("--ms", default=",".join(map(str, MS)), help="token counts M of the linear section")
    p.add_argument("--sweep-ms", default="1,16,64", help="the M values --sweep tries configs at")
    p.add_argument("--sweep-only", default="", help="keep the --sweep configs that match, e.g. BLOCK_N=64,num_warps=2")
    p.add_argument("--cuda-ms", default="1,2,4,6,8", help="the M values (at most 8) of the cuda_variants section")
    args = p.parse_args(argv)
    sweep_only = parse_only(p, args.sweep_only)
    cuda_ms = [int(m) for m in args.cuda_ms.split(",")]
    if not all(1 <= m <= 8 for m in cuda_ms):
        p.error(f"--cuda-ms takes token counts of 1-8 (the CUDA kernel's one token tile), got {args.cuda_ms}")
    if not torch.cuda.is_available():
        print("benchmarks.kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    logf = open(args.log, "a") if args.log else None

    def log(line: str) -> None:
        if logf:
            logf.write(line + "\n")
            logf.flush()

    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; random weights of the real shapes")
    results = {"copy_TBps": bw / 1e12, "linear": [], "attention": [], "launch": []}
    sections = args.sections.split(",")
    if "linear" in sections:
        bench_linear(args.sweep, results["linear"], log, not args.skip_w4a8, [int(m) for m in args.ms.split(",")],
                     [int(m) for m in args.sweep_ms.split(",")], sweep_only)
    if "attention" in sections:
        from benchmarks.kernels_attention import bench_attention, print_attention

        bench_attention(results["attention"], log)
    if "launch" in sections:
        from benchmarks.kernels_launch import bench_launch

        bench_launch(results["launch"], log)
    if "cuda_variants" in sections:
        results["cuda_variants"] = sweep_cuda_variants(log, cuda_ms)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    if "linear" in sections:
        print_linear(results["linear"], bw)
    if "attention" in sections:
        print_attention(results["attention"], bw)
    if "launch" in sections:
        from benchmarks.kernels_launch import print_launch

        print_launch(results["launch"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
