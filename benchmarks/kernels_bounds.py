"""What bounds a 9-16-token decode linear (Qwen3-8B shapes, random weights): the tile the op picks, the same tile
with its word decoding replaced by register moves (wrong values: timing only), and a kernel that only reads the
same bytes.

    python -m benchmarks.kernels_bounds [--ms 12,16]

If the tile without its decoding runs near the read, the decoding's instructions are what is left to cut; if it runs
near the whole tile, they are not (benchmarks/NOTES.md, session 38). The undecoded tile compiles in a child process:
Triton keys a kernel by its callees' source when it first compiles it, so one process does not hold both tiles.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import triton
import triton.language as tl

from adallm_core.ops.triton.nvfp4_gemm import _load_scales
from benchmarks.timing import copy_bandwidth, time_graph

# each word's halves as the eight BF16 outputs; the scale (operand $9) stays an input, so its load and conversion stay
_MOVES_ASM = tl.constexpr("mov.b32 {$0, $1}, $8;\nmov.b32 {$2, $3}, $8;\nmov.b32 {$4, $5}, $8;\n"
                          "mov.b32 {$6, $7}, $8;\nmov.b16 $7, $9;")


@triton.jit
def words_undecoded(w_ptrs, s_ptrs, mask_w, mask_s, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                    KERNEL_ORDER: tl.constexpr = False):
    """nvfp4_gemm._dequant_words with its loads, scale conversion and output shape, without the word decoding."""
    words = tl.load(w_ptrs, mask=mask_w, other=0)
    s = _load_scales(s_ptrs, mask_s) * 2.0**118
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, BLOCK_KW // 2, 2)), (BLOCK_N, BLOCK_KW))
    o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
        _MOVES_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,h", [words, s.to(tl.bfloat16)], dtype=(tl.bfloat16,) * 8,
        is_pure=True, pack=1)
    x0 = tl.join(tl.join(o0, o4), tl.join(o2, o6))
    x1 = tl.join(tl.join(o1, o5), tl.join(o3, o7))
    return tl.reshape(tl.join(x0, x1), (BLOCK_N, 8 * BLOCK_KW))


def time_tiles(ms: list[int], undecoded: bool) -> list[dict]:
    from adallm_core.ops.triton import nvfp4_gemm as lin
    from benchmarks.kernels import LINEARS, copies, random_nvfp4

    if undecoded:
        lin._dequant_words = words_undecoded
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
    p.add_argument("--child", choices=["decoded", "undecoded"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    ms = [int(m) for m in args.ms.split(",")]
    if not torch.cuda.is_available():
        print("benchmarks.kernels_bounds needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.child:
        print(json.dumps(time_tiles(ms, args.child == "undecoded")))
        return 0
    from benchmarks.kernels import LINEARS, copies
    from benchmarks.kernels_launch import time_read

    tiles = {}
    for variant in ("decoded", "undecoded"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.kernels_bounds", "--ms", args.ms, "--child", variant],
                             check=True, capture_output=True, text=True).stdout
        tiles[variant] = {(r["shape"], r["M"]): r for r in json.loads(out.strip().splitlines()[-1])}
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, copy {bw / 1e12:.2f} TB/s; RANDOM weights of Qwen3-8B's shapes")
    print(f"{'shape':8} {'M':>3} {'MB':>6} {'read us':>8} {'tile us':>8} {'undecoded us':>13} {'config'}")
    for name, (n, k) in LINEARS.items():
        nbytes = tiles["decoded"][(name, ms[0])]["nbytes"]
        read = time_read(nbytes, copies(n * k // 2)) * 1e6
        for m in ms:
            full, bare = tiles["decoded"][(name, m)], tiles["undecoded"][(name, m)]
            cfg = {key: full["config"][key] for key in ("BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps")}
            print(f"{name:8} {m:3d} {nbytes / 1e6:6.1f} {read:8.2f} {full['us']:8.2f} {bare['us']:13.2f} {cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
