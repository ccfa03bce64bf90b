"""What bounds a 9-16-token decode linear (Qwen3-8B shapes, random weights): the tile the op picks, the same tile
with its word decoding replaced by register moves (wrong values: timing only), and a kernel that only reads the same
bytes.

    python -m benchmarks.kernels_bounds [--ms 12,16]

If the tile without its decoding runs near the read, the decoding's instructions are what is left to cut; if it runs
near the whole tile, they are not (benchmarks/NOTES.md, sessions 38-39). Each tile compiles in a child process of
its own, with its word decoding swapped in for the kernel's before the first launch.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import triton.language as tl

from benchmarks.timing import copy_bandwidth, time_graph

# each word's halves as the eight BF16 outputs; the scale stays an input ($9), so its load and conversion stay
_MOVES_ASM = tl.constexpr("mov.b32 {$0, $1}, $8;\nmov.b32 {$2, $3}, $8;\nmov.b32 {$4, $5}, $8;\n"
                          "mov.b32 {$6, $7}, $8;\nmov.b16 $7, $9;")


# each variant is the PTX program that decodes a word in the kernels' order (nvfp4_gemm._DEQUANT_ASM_KERNEL_ORDER)
VARIANTS = {"decoded": None, "undecoded": _MOVES_ASM}


def time_tiles(ms: list[int], variant: str) -> list[dict]:
    from adallm_core.ops.triton import nvfp4_gemm as lin
    from benchmarks.kernels import LINEARS, copies, random_nvfp4

    if VARIANTS[variant] is not None:
        lin._DEQUANT_ASM_KERNEL_ORDER = VARIANTS[variant]
    rows = []
    for name, (n, k) in LINEARS.items():
        ws = [lin.prepare_nvfp4_weight(random_nvfp4(n, k)) for _ in range(copies(n * k // 2))]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t = time_graph(lambda w: lin.nvfp4_linear(x, w), [(w,) for w in ws])
            config = lin.pick_config(m, n, k, x.device)
            rows.append(dict(shape=name, M=m, nbytes=ws[0].nbytes, us=t * 1e6, config=config))
        del ws
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ms", default="12,16", help="token counts (9-16: the Triton decode tiles)")
    p.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    ms = [int(m) for m in args.ms.split(",")]
    if not torch.cuda.is_available():
        print("benchmarks.kernels_bounds needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.child:
        print(json.dumps(time_tiles(ms, args.child)))
        return 0
    from benchmarks.kernels import LINEARS, copies
    from benchmarks.kernels_launch import time_read

    tiles = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, "-m", "benchmarks.kernels_bounds", "--ms", args.ms, "--child", variant],
                             check=True, capture_output=True, text=True).stdout
        tiles[variant] = {(r["shape"], r["M"]): r for r in json.loads(out.strip().splitlines()[-1])}
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, copy {bw / 1e12:.2f} TB/s; RANDOM weights of Qwen3-8B's shapes")
    print(f"{'shape':8} {'M':>3} {'MB':>6} {'read us':>8} {'tile us':>8} {'undecoded us':>13} config")
    for name, (n, k) in LINEARS.items():
        nbytes = tiles["decoded"][(name, ms[0])]["nbytes"]
        read = time_read(nbytes, copies(n * k // 2)) * 1e6
        for m in ms:
            full, bare = (tiles[v][(name, m)] for v in VARIANTS)
            cfg = {key: full["config"][key] for key in ("BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps")}
            print(f"{name:8} {m:3d} {nbytes / 1e6:6.1f} {read:8.2f} {full['us']:8.2f} {bare['us']:13.2f} {cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
