"""NVFP4 linear, exact BF16 compute: y [M, N] = x [M, K] @ W.T with W packed (4-bit E2M1 + E4M3 per-16 scales).

One kernel for decode (small M: memory bound, split-K for parallelism) and large tiles for any M. The packed
weights and scales are read once and turned into BF16 in registers; no BF16 copy of W ever lives in memory. The
op (nvfp4_prefill.nvfp4_linear) sends checkpoint-shaped weights from M = 256 on to the dequantize-once path instead,
which is faster there because this kernel repeats each tile's dequantization for every tile of M rows.

Exactness (shared/KERNELS.md): an E2M1 value times an E4M3 scale has <= 6 significant bits, so it is exact in
BF16. The code's 3 magnitude bits shifted to bit 6 ARE the BF16 bit pattern of v * 2^-126 (m=1 lands on the
subnormal 2^-127 = 0.5 * 2^-126); one BF16 multiply by (scale * 2^118) gives v * scale * 2^-8 exactly, and the
epilogue multiplies by global_scale * 2^8 in fp32.

Packed byte j of a row holds elements 2j (low nibble) and 2j+1 (high nibble), and both sit in scale group j // 8.
So the kernel never interleaves weights: it splits x into even and odd columns and runs two dots.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from adallm_core.ops import pdl
from adallm_core.ops.triton.activation import EPILOGUE_CODES, act_mul
from adallm_core.ops.triton.grid_dependency import wait_for_prior_kernel

# Per-row scale prefactor: bf16(bits) = v * 2^-126, times scale * 2^118 -> v * scale * 2^-8.
_SCALE_PRE = tl.constexpr(2.0**118)
_F16_PRE = tl.constexpr(2.0**6)  # fp16 path: v * 2^-14 times scale * 2^6 -> the same v * scale * 2^-8
_EPI = tl.constexpr(2.0**8)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_PORTABLE = tl.constexpr(INTERPRET)  # the interpreter runs no PTX: the word dequantization in Triton ops, fp32
DEFAULT_MATH = 3


@triton.jit
def _e2m1_bf16(code):
    """4-bit codes (int16, values 0..15) -> BF16 v * 2^-126, bit-exact (sign bit 3 -> 15, magnitude -> bits 6..8)."""
    bits = ((code & 7) << 6) | ((code & 8) << 12)
    return bits.to(tl.bfloat16, bitcast=True)


@triton.jit
def _e2m1_f16(code):
    """4-bit codes (int16) -> FP16 v * 2^-14, bit-exact (m=1 is the FP16 subnormal 2^-15)."""
    bits = ((code & 7) << 9) | ((code & 8) << 12)
    return bits.to(tl.float16, bitcast=True)


@triton.jit
def _load_scales(s_ptrs, mask):
    """E4M3 block scales -> fp32. Through an FP8 pointer the hardware converts (sm_89 and later); a uint8 view of the
    same bytes (GPUs before Ada have no E4M3 type in Triton; the interpreter) decodes by bits: 2^(E-7) (1 + m/8),
    E = 0 the subnormals m 2^-9 (block_scales() picks)."""
    raw = tl.load(s_ptrs, mask=mask, other=0.0)
    if s_ptrs.dtype.element_ty == tl.uint8:
        b = raw.to(tl.int32)
        normal = (((b & 0x7F) << 20) + (120 << 23)).to(tl.float32, bitcast=True)  # exponent E + 120, m on top
        v = tl.where((b & 0x78) == 0, (b & 7).to(tl.float32) * 0.001953125, normal)
        return tl.where((b & 0x80) != 0, -v, v)
    else:
        return raw.to(tl.float32)


@triton.jit
def _dequant_tile(w_ptrs, s_ptrs, mask_w, mask_s, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr,
                  MATH: tl.constexpr):
    """Load packed [BLOCK_N, BLOCK_KH] bytes + their scales -> (even, odd) tiles of v * scale * 2^-8, exact.

    MATH 0: BF16 bits times BF16 (scale * 2^118): one packed multiply per two weights (needs BF16 subnormal
    support, which mul/fma.bf16 have: no .ftz form exists). 1: FP16 bits -> fp32 multiply -> BF16 (same values,
    more conversions). 2: as 1 but stays fp32 (the Triton CPU interpreter has no BF16 arithmetic or BF16 dot).
    """
    b = tl.load(w_ptrs, mask=mask_w, other=0).to(tl.int16)
    s = _load_scales(s_ptrs, mask_s)
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, BLOCK_KH // 8, 8)), (BLOCK_N, BLOCK_KH))
    if MATH == 0:
        s = (s * _SCALE_PRE).to(tl.bfloat16)  # exact: a power-of-two multiple of an E4M3 value
        lo = _e2m1_bf16(b & 15) * s
        hi = _e2m1_bf16(b >> 4) * s
    else:
        s = s * _F16_PRE
        lo = _e2m1_f16(b & 15).to(tl.float32) * s
        hi = _e2m1_f16(b >> 4).to(tl.float32) * s
        if MATH == 1:
            lo = lo.to(tl.bfloat16)
            hi = hi.to(tl.bfloat16)
    return lo, hi

def _dequant_asm(pairs: str, halves: tuple[str, ...]) -> str:
    """One PTX program: `pairs` builds p0..p3 (BF16x2 bit patterns of v * 2^-126) from the word $8, then one
    fma.rn.bf16x2 by (scale * 2^118, twice) with -0 addend scales both halves (fma.bf16 keeps subnormals: there is no
    .ftz form; sm_80+), and p_i's halves go to the outputs named in halves[i]."""
    scale = "".join(f"fma.rn.bf16x2 p{i}, p{i}, s2, z;\n" for i in range(4))
    outputs = "".join(f"mov.b32 {{{h}}}, p{i};\n" for i, h in enumerate(halves))
    return ("\n{\n.reg .b32 s2, z, t, u, p0, p1, p2, p3;\nmov.b32 s2, {$9, $9};\nmov.b32 z, 0x80008000;\n"
            + pairs + scale + outputs + "}\n")


# 8 codes of one int32 word (element k+i in bits 4i..4i+3) -> 8 BF16 values v * scale * 2^-8, exact.
# Pair (i, i+4) sits 16 bits apart, as the two halves of a bf16x2: per pair two shifts and masks place the magnitude
# at bits 6..8 and the sign at bit 15 of each half (BF16 bits of v * 2^-126).
_DEQUANT_ASM = tl.constexpr(_dequant_asm("""\
shl.b32 t, $8, 6;  and.b32 t, t, 0x01C001C0; shl.b32 u, $8, 12; and.b32 u, u, 0x80008000; or.b32 p0, t, u;
shl.b32 t, $8, 2;  and.b32 t, t, 0x01C001C0; shl.b32 u, $8, 8;  and.b32 u, u, 0x80008000; or.b32 p1, t, u;
shr.b32 t, $8, 2;  and.b32 t, t, 0x01C001C0; shl.b32 u, $8, 4;  and.b32 u, u, 0x80008000; or.b32 p2, t, u;
shr.b32 t, $8, 6;  and.b32 t, t, 0x01C001C0; and.b32 u, $8, 0x80008000; or.b32 p3, t, u;
""", ("$0, $4", "$1, $5", "$2, $6", "$3, $7")))

# Words in the kernels' order (nvfp4.to_kernel_order): pair p holds elements (2p, 2p + 1), the (k, k + 1) register
# pair of the tensor-core operand; pairs 0-2 need one rotation and one mask each, pair 3 two of each and an OR.
_DEQUANT_ASM_KERNEL_ORDER = tl.constexpr(_dequant_asm("""\
and.b32 p0, $8, 0x81C081C0;
shf.l.wrap.b32 t, $8, $8, 4;  and.b32 p1, t, 0x81C081C0;
shf.l.wrap.b32 t, $8, $8, 10; and.b32 p2, t, 0x81C081C0;
shf.l.wrap.b32 t, $8, $8, 6;  and.b32 t, t, 0x00400040; shf.l.wrap.b32 u, $8, $8, 14; and.b32 u, u, 0x81808180;
or.b32 p3, t, u;
""", ("$0, $1", "$2, $3", "$4, $5", "$6, $7")))


@triton.jit
def _rotl(w, r: tl.constexpr):
    return (w << r) | (w >> (32 - r))


@triton.jit
def _bf16_pairs(words, KERNEL_ORDER: tl.constexpr):
    """The PTX's first half in Triton ops: int32 words -> four uint32 BF16x2 bit patterns of v * 2^-126."""
    w = words.to(tl.uint32, bitcast=True)
    mag = tl.full((), 0x01C001C0, tl.uint32)
    sign = tl.full((), 0x80008000, tl.uint32)
    if KERNEL_ORDER:
        both = mag | sign
        p0 = w & both
        p1 = _rotl(w, 4) & both
        p2 = _rotl(w, 10) & both
        p3 = (_rotl(w, 6) & tl.full((), 0x00400040, tl.uint32)) | (_rotl(w, 14) & tl.full((), 0x81808180, tl.uint32))
    else:
        p0 = ((w << 6) & mag) | ((w << 12) & sign)
        p1 = ((w << 2) & mag) | ((w << 8) & sign)
        p2 = ((w >> 2) & mag) | ((w << 4) & sign)
        p3 = ((w >> 6) & mag) | (w & sign)
    return p0, p1, p2, p3


@triton.jit
def _scaled_half(bits, s):
    """A BF16 bit pattern of v * 2^-126 (in a uint32) times s = scale * 2^118, in fp32: v * scale * 2^-8, exact."""
    return (bits << 16).to(tl.float32, bitcast=True) * s


@triton.jit
def _dequant_words(w_ptrs, s_ptrs, mask_w, mask_s, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                   KERNEL_ORDER: tl.constexpr = False):
    """Packed int32 words [BLOCK_N, BLOCK_KW] + scales -> [BLOCK_N, 8 * BLOCK_KW] in natural K order: BF16 on the
    GPU; fp32 under the interpreter, from the same bit logic. KERNEL_ORDER: words in nvfp4.to_kernel_order."""
    words = tl.load(w_ptrs, mask=mask_w, other=0)
    s = _load_scales(s_ptrs, mask_s) * _SCALE_PRE
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, BLOCK_KW // 2, 2)), (BLOCK_N, BLOCK_KW))
    if _PORTABLE:
        p0, p1, p2, p3 = _bf16_pairs(words, KERNEL_ORDER)
        low, high = tl.full((), 0xFFFF, tl.uint32), 16
        if KERNEL_ORDER:  # pair p = elements (2p, 2p + 1)
            o0, o1 = _scaled_half(p0 & low, s), _scaled_half(p0 >> high, s)
            o2, o3 = _scaled_half(p1 & low, s), _scaled_half(p1 >> high, s)
            o4, o5 = _scaled_half(p2 & low, s), _scaled_half(p2 >> high, s)
            o6, o7 = _scaled_half(p3 & low, s), _scaled_half(p3 >> high, s)
        else:  # pair p = elements (p, p + 4)
            o0, o4 = _scaled_half(p0 & low, s), _scaled_half(p0 >> high, s)
            o1, o5 = _scaled_half(p1 & low, s), _scaled_half(p1 >> high, s)
            o2, o6 = _scaled_half(p2 & low, s), _scaled_half(p2 >> high, s)
            o3, o7 = _scaled_half(p3 & low, s), _scaled_half(p3 >> high, s)
    else:
        o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
            _DEQUANT_ASM_KERNEL_ORDER if KERNEL_ORDER else _DEQUANT_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,h",
            [words, s.to(tl.bfloat16)], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
    # joins nest so that the flat index is 4a + 2b + c for o_{4a+2b+c} (see reshape's row-major order)
    x0 = tl.join(tl.join(o0, o4), tl.join(o2, o6))
    x1 = tl.join(tl.join(o1, o5), tl.join(o3, o7))
    return tl.reshape(tl.join(x0, x1), (BLOCK_N, 8 * BLOCK_KW))


@triton.jit
def dot_xw(acc, x, w, SWAP_AB: tl.constexpr):
    """acc + x @ w.T for x [M, K] and a dequantized weight tile w [N, K]; SWAP_AB: acc is [N, M] and gets w @ x.T,
    with the weights as the MMA's A operand."""
    if SWAP_AB:
        return tl.dot(w, tl.trans(x.to(w.dtype)), acc)
    else:
        return tl.dot(x.to(w.dtype), tl.trans(w), acc)


@triton.jit
def _tile_major_offsets(offs_n, kw, ks, K):
    """Word and scale-byte offsets of rows offs_n, words kw and scale groups ks in nvfp4.to_tile_major's layout:
    bands of 16 rows stored in 128-K chunks of 16 words (and 8 scale bytes) a row."""
    band = offs_n // 16 * (K // 128)
    words = (band * 256 + offs_n % 16 * 16)[:, None] + (kw // 16 * 256 + kw % 16)[None, :]
    scales = (band * 128 + offs_n % 16 * 8)[:, None] + (ks // 8 * 128 + ks % 8)[None, :]
    return words, scales


@triton.jit
def nvfp4_gemm_kernel(
    x_ptr, w_ptr, s_ptr, g_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    MATH: tl.constexpr, EVEN_K: tl.constexpr, SWAP_AB: tl.constexpr, KERNEL_ORDER: tl.constexpr,
    TILE_MAJOR: tl.constexpr = False, PDL: tl.constexpr = False, GATED: tl.constexpr = 0,
):
    # grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K); each split covers a contiguous range of K.
    # GATED (1 SiLU, 2 GELU-tanh): W is a fused gate|up [N = 2I, K] and out [M, I] = act(x @ gate.T) * (x @ up.T); a
    # program's rows are BLOCK_N / 2 gate rows and the same up rows, so the activation runs in its epilogue.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    OUT_N: tl.constexpr = BLOCK_N // 2 if GATED else BLOCK_N  # output columns a program
    num_n = tl.cdiv(N // 2 if GATED else N, OUT_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    BLOCK_KH: tl.constexpr = BLOCK_K // 2
    BLOCK_KS: tl.constexpr = BLOCK_K // 16
    BLOCK_KW: tl.constexpr = BLOCK_K // 8
    W_PER_TILE: tl.constexpr = BLOCK_KW if MATH == 3 else BLOCK_KH  # w_ptr elements per K tile

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_kx = tl.arange(0, BLOCK_K)
    offs_ks = tl.arange(0, BLOCK_KS)
    mask_m = offs_m < M
    if GATED:  # rows j < BLOCK_N / 2: gate rows of the program's output columns; the rest: their up rows
        j = tl.arange(0, BLOCK_N)
        cols = pid_n * OUT_N + j % OUT_N
        offs_n = cols + (j >= OUT_N).to(tl.int32) * (N // 2)
        mask_n = cols < N // 2
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N

    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_start = pid_k * tiles_per_split
    t_stop = tl.minimum(k_tiles, t_start + tiles_per_split)

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_kx[None, :]
    offs_w = tl.arange(0, W_PER_TILE)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_w[None, :]
    s_ptrs = s_ptr + offs_n[:, None] * stride_sn + offs_ks[None, :]
    if TILE_MAJOR and BLOCK_KW % 16 == 0:  # whole 128-K chunks a tile: offsets stepped per tile (the K loop)
        tw0, ts0 = _tile_major_offsets(offs_n, offs_w, offs_ks, K)
        w_tm, s_tm = w_ptr + tw0, s_ptr + ts0
    wait_for_prior_kernel(PDL)  # nothing before it reads or writes what a kernel writes (ops/pdl.py)
    # SWAP_AB computes out.T = W @ x.T: the dequantized weight tile is then the A operand, which the MMA takes
    # straight from registers; as the B operand (x @ W.T) it must first go through shared memory, and x's fragments
    # need register moves.
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_start, t_stop):
        # EVEN_K: K is a multiple of BLOCK_K, so only rows are masked and loads stay 16 bytes wide
        if EVEN_K:
            x = tl.load(x_ptrs + t * BLOCK_K, mask=mask_m[:, None], other=0.0)
            mask_w = mask_n[:, None]
            mask_s = mask_n[:, None]
        else:
            kx = t * BLOCK_K + offs_kx
            x = tl.load(x_ptrs + t * BLOCK_K, mask=mask_m[:, None] & (kx[None, :] < K), other=0.0)
            mask_w = mask_n[:, None] & ((t * W_PER_TILE + offs_w)[None, :] < K * W_PER_TILE // BLOCK_K)
            mask_s = mask_n[:, None] & ((t * BLOCK_KS + offs_ks)[None, :] < K // 16)
        if MATH == 3:  # w_ptr holds int32 words: 8 codes each
            if TILE_MAJOR and BLOCK_KW % 16 == 0:
                # whole 128-K chunks a tile: tile t is tile 0's offsets plus t chunks, a step the compiler sees as a
                # multiple of 16 words (a step it cannot see loses the loads' 16-byte alignment: 2.7x slower from 16
                # tokens on the H100, benchmarks/NOTES.md)
                w = _dequant_words(w_tm + t * (BLOCK_KW * 16), s_tm + t * (BLOCK_KS * 16), mask_w, mask_s, BLOCK_N,
                                   BLOCK_KW, KERNEL_ORDER)
            elif TILE_MAJOR:
                tw, ts = _tile_major_offsets(offs_n, t * BLOCK_KW + offs_w, t * BLOCK_KS + offs_ks, K)
                w = _dequant_words(w_ptr + tw, s_ptr + ts, mask_w, mask_s, BLOCK_N, BLOCK_KW, KERNEL_ORDER)
            else:
                w = _dequant_words(w_ptrs + t * BLOCK_KW, s_ptrs + t * BLOCK_KS, mask_w, mask_s, BLOCK_N, BLOCK_KW,
                                   KERNEL_ORDER)
            acc = dot_xw(acc, x, w, SWAP_AB)
        else:
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_KH, 2)))
            lo, hi = _dequant_tile(w_ptrs + t * BLOCK_KH, s_ptrs + t * BLOCK_KS, mask_w, mask_s, BLOCK_N, BLOCK_KH,
                                   MATH)
            acc = dot_xw(acc, x_even, lo, SWAP_AB)
            acc = dot_xw(acc, x_odd, hi, SWAP_AB)
    if SWAP_AB:
        acc = tl.trans(acc)

    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0) * _EPI
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        _store_out(out_ptr, acc * g[None, :], offs_m, mask_m, pid_n, N, stride_om, BLOCK_M, BLOCK_N, GATED)
    else:
        # Each split writes fp32 partials; the last one to finish (atomic ticket) sums them and resets the ticket,
        # so one launch does the whole job and the lock array stays zero between calls (CUDA-graph safe).
        tile = pid_m * num_n + pid_n
        p_ptrs = part_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :]
        tl.store(p_ptrs, acc, mask=out_mask)
        ticket = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for i in range(SPLIT_K):
                q_ptrs = part_ptr + (i * M + offs_m[:, None]) * N + offs_n[None, :]
                total += tl.load(q_ptrs, mask=out_mask, other=0.0, cache_modifier=".cg")
            _store_out(out_ptr, total * g[None, :], offs_m, mask_m, pid_n, N, stride_om, BLOCK_M, BLOCK_N, GATED)
            # relaxed: no fence before the reset, which only the next launch reads, after this grid has completed
            # (stream order, or griddepcontrol.wait under PDL); acq_rel put a fence at every merging program's end
            tl.atomic_xchg(lock_ptr + tile, 0, sem="relaxed")


@triton.jit
def _store_out(out_ptr, y, offs_m, mask_m, pid_n, N, stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               GATED: tl.constexpr):
    """y [BLOCK_M, BLOCK_N] fp32 -> out. GATED: y's columns are gate rows then up rows (the kernel's GATED); each is
    rounded to out's dtype first, as the linear's own output would be, then act(gate) * up is rounded once."""
    dt = out_ptr.dtype.element_ty
    if GATED:
        half: tl.constexpr = BLOCK_N // 2
        gate, up = tl.split(tl.permute(tl.reshape(y.to(dt).to(tl.float32), (BLOCK_M, 2, half)), (0, 2, 1)))
        cols = pid_n * half + tl.arange(0, half)
        tl.store(out_ptr + offs_m[:, None] * stride_om + cols[None, :], act_mul(gate, up, GATED == 2).to(dt),
                 mask=mask_m[:, None] & (cols < N // 2)[None, :])
    else:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(out_ptr + offs_m[:, None] * stride_om + cols[None, :], y.to(dt),
                 mask=mask_m[:, None] & (cols < N)[None, :])


_WORKSPACE: dict = {}
# Workspaces replaced by larger ones. A CUDA graph captured with one keeps writing its address, so it must never be
# freed: an eager step of more tokens after the capture (65-255 tokens run split-K tiles too) grows the workspace,
# and the freed buffer would go to whatever the allocator hands it to next.
_RETIRED: list = []


def _workspace(device, split_k: int, m: int, n: int, tiles: int):
    """Per-device fp32 partials and zeroed tickets, grown on demand (allocate at warm-up, before graph capture)."""
    key = device
    part, lock = _WORKSPACE.get(key, (None, None))
    if part is None or part.numel() < split_k * m * n:
        if part is not None:
            _RETIRED.append(part)
        part = torch.empty(max(split_k * m * n, 1 << 20), dtype=torch.float32, device=device)
    if lock is None or lock.numel() < tiles:
        if lock is not None:
            _RETIRED.append(lock)
        lock = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
    _WORKSPACE[key] = (part, lock)
    return part, lock


def _num_sms(device) -> int:
    return sm_figures(device)["sms"]


FP8_CAPABILITY = (8, 9)  # Ada: Triton's E4M3 type and conversions


# ptxas for sm_89, left to choose, squeezes the 17-32-token tiles (~130-145 registers) to 128 and spills a few
# bytes (gate|up at 20 tokens: 16; qkv and o at 32 tokens since the word order of session 39: 8); under an
# explicit cap it keeps them in registers, 118-168 (benchmarks/NOTES.md, session 39). Elsewhere ptxas chooses, as
# the H100 measured.
ADA_REGISTER_CAP = 168


def register_cap(device) -> dict:
    """The launch options of the 17-32-token decode tiles on `device`: maxnreg on Ada, none elsewhere."""
    if device.type != "cuda" or INTERPRET:
        return {}
    return register_cap_for(_capability(_cuda_index(device)))


def register_cap_for(capability: tuple[int, int]) -> dict:
    return dict(maxnreg=ADA_REGISTER_CAP) if capability == FP8_CAPABILITY else {}


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _cuda_index(device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def fp8_scales(device) -> bool:
    """Whether the kernels read block scales as E4M3 on `device` (converted in hardware), or as their bytes."""
    return device.type == "cuda" and not INTERPRET and _capability(_cuda_index(device)) >= FP8_CAPABILITY


def block_scales(w, device) -> torch.Tensor:
    """The scale tensor a kernel gets: E4M3 where the GPU converts it, else the same bytes as uint8 (_load_scales)."""
    return w.block_scale if fp8_scales(device) else w.block_scale.view(torch.uint8)


def pick_config(m: int, n: int, k: int, device) -> dict:
    """Tile choice by shape (from the H100 sweeps in benchmarks/NOTES.md): small M is a memory-bound stream over W,
    split along K until the programs fill the SMs; large M is a tensor-core GEMM with wide M tiles."""
    sms = _num_sms(device)
    options, warps = {}, 4
    if m <= 8:
        # 1-8 tokens run here only before Ada (the CUDA kernel takes them after), unmeasured with swapped tiles
        block_m, block_n, block_k, stages, waves = 16, 64, 256, 3, 2
    elif m <= 16:
        # weights as the A operand of mma.sync (no moves to build x's fragments) on two warps: 64 rows on four make
        # Hopper's Triton pick wgmma, which takes the weight tile through shared memory. 64 rows a program where
        # they still make 4 waves (Gemma3-27B's gate|up), else 32 (H200 at 16 tokens, benchmarks/NOTES.md)
        block_m, block_k, stages, waves = 16, 256, 3, 4
        block_n = 64 if triton.cdiv(n, 64) >= waves * sms else 32
        options, warps = dict(SWAP_AB=True), 2
    elif m < 256:  # more rows reuse each dequantized tile; wider N where there are enough tiles
        block_m, block_k, stages, waves = (32 if m <= 32 else 64), 128, 4, 1
        block_n = 128 if triton.cdiv(n, 128) >= sms else 64
        if m <= 32:
            options = register_cap(device)
        if triton.cdiv(n, 128) >= sms:  # wide N (gate_up): weights as the A operand, no split (swept: -20%)
            return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=3,
                        MATH=DEFAULT_MATH, SWAP_AB=True, **options)
    else:
        return dict(BLOCK_M=256 if m >= 1024 else 128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, num_warps=8,
                    num_stages=3, MATH=DEFAULT_MATH)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split_k = 1
    if 8 < m <= 16:
        # split until the programs fill what the SMs hold at once (two K tiles a split at least): a grid with room
        # left piles onto the SMs that free first when it launches with PDL (ops/pdl.py). H200, batch 16, without
        # PDL: Gemma3-27B o and down 4 -> 6 splits, 9.19 -> 9.00 ms a step; Qwen3-8B's grids already filled
        k_tiles = max(1, k // block_k)
        split_k = max(1, min(k_tiles // 2, resident_programs(block_m, block_n, block_k, stages, warps, device) * sms
                             // tiles))
        split_k = triton.cdiv(k_tiles, triton.cdiv(k_tiles, split_k))  # no split left without a K tile
    while tiles * split_k < waves * sms and k // (block_k * split_k * 2) >= 2:
        split_k *= 2
    # long K loops: twice as long tiles, half the splits (swept at M = 1: gate_up 29.7 -> 27.2 us, down 18.0 -> 17.3);
    # not from 9 tokens (H200, 16 tokens: Gemma3-27B down 37.2 -> 48.9 us halved, Qwen3-8B gate|up 25.6 -> 32.8)
    if m <= 8 and k // (block_k * split_k) >= 6:
        block_k, split_k = 512, max(1, split_k // 2)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=warps,
                num_stages=stages, MATH=DEFAULT_MATH, **options)


# the 9-16-token swapped tiles of 32 rows compile to 94-96 registers at 16 tokens and 108-114 at 9-15, on sm_90
# and sm_89 alike (benchmarks/compile_report.py); shared memory binds before registers on both either way
REGS_PER_THREAD = 96


def resident_programs(block_m, block_n, block_k, stages, warps, device) -> int:
    """Programs of a decode tile that one SM holds at once: by shared memory (stages - 1 buffers of x, the packed
    weights and their scales, plus the 1 KB reserved a block), by registers (REGS_PER_THREAD) and by threads. The
    H200 holds 8 of the 9-16-token tiles of 32 rows and 6 of 64, as the compiled kernels' own figures give
    (tests/test_kernels_gpu.py)."""
    props = sm_figures(device)
    smem = (stages - 1) * (block_m * block_k * 2 + block_n * block_k // 2 + block_n * block_k // 16) + 1024
    threads = 32 * warps
    return max(1, min(props["smem"] // smem, props["regs"] // (REGS_PER_THREAD * threads),
                      props["threads"] // threads))


# the tiles' figures off the GPU (CPU, interpreter); block_smem: the most shared memory one block may take
_H100_SM = dict(sms=132, smem=233472, regs=65536, threads=2048, block_smem=232448)


@functools.cache
def _cuda_sm_figures(index: int) -> dict:
    p = torch.cuda.get_device_properties(index)
    smem = p.shared_memory_per_multiprocessor
    return dict(sms=p.multi_processor_count, smem=smem, regs=getattr(p, "regs_per_multiprocessor", 65536),
                threads=p.max_threads_per_multi_processor,
                block_smem=getattr(p, "shared_memory_per_block_optin", smem - 1024))


def sm_figures(device) -> dict:
    """The SM count, what one SM holds (shared memory, registers, threads) and the shared memory a block may take."""
    if device.type != "cuda":
        return _H100_SM
    return _cuda_sm_figures(_cuda_index(device))


def prepare_nvfp4_weight(w):
    """Once at load: the codes in the kernels' word order, which decodes with fewer instructions and no register
    shuffles before the tensor-core dot, and linears of whole 16 x 128 chunks tile-major (nvfp4.to_tile_major),
    which the decode kernels stream faster (benchmarks/NOTES.md); every kernel here reads all three layouts."""
    w = w.in_kernel_order()
    return w.in_tile_major() if w.fits_tile_major else w


def check_args(x: torch.Tensor, w) -> None:
    if x.dim() != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"nvfp4_linear: x must be [M, {w.in_features}], got {tuple(x.shape)}")
    if w.packed.dim() != 2:
        raise ValueError(f"nvfp4_linear: weight must be 2-D [N, K/2], got packed {tuple(w.packed.shape)}")
    if x.shape[1] % 16:
        raise ValueError(f"nvfp4_linear: K={x.shape[1]} must be a multiple of 16")
    if x.stride(1) != 1 or w.packed.stride(1) != 1 or w.block_scale.stride(1) != 1:
        raise ValueError("nvfp4_linear: x, packed and block_scale need a contiguous last dim")


def nvfp4_linear(x: torch.Tensor, w, config: dict | None = None, activation: str | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) @ W.T -> [M, N] in x.dtype, exact BF16 products, fp32 accumulation.
    activation ('silu' | 'gelu_tanh'): W is a fused gate|up [2I, K] and the result act(x @ gate.T) * (x @ up.T)
    [M, I], computed in the epilogue with the roundings of the linear followed by the activation op."""
    check_args(x, w)
    if activation not in EPILOGUE_CODES:
        raise ValueError(f"nvfp4_linear: activation must be one of {sorted(a for a in EPILOGUE_CODES if a)}, "
                         f"got {activation!r}")
    m, k = x.shape
    n = w.out_features
    gated = EPILOGUE_CODES[activation]
    if gated and n % 2:
        raise ValueError(f"nvfp4_linear: a fused gate|up weight has an even number of rows, got {n}")
    out = torch.empty(m, n // 2 if gated else n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    cfg = dict(config or pick_config(m, n, k, x.device))
    cfg["GATED"] = gated
    cfg.setdefault("MATH", DEFAULT_MATH)
    cfg.setdefault("SWAP_AB", False)
    while cfg["BLOCK_K"] > 32 and k % cfg["BLOCK_K"]:
        cfg["BLOCK_K"] //= 2
    cfg["EVEN_K"] = k % cfg["BLOCK_K"] == 0
    cfg["KERNEL_ORDER"] = w.kernel_order
    cfg["TILE_MAJOR"] = w.tile_major
    cfg.update(pdl.triton_args(x.device, m))
    if w.kernel_order and cfg["MATH"] != 3:
        raise ValueError(f"nvfp4_linear: MATH {cfg['MATH']} reads checkpoint-ordered bytes; this weight is in the "
                         "kernels' word order (MATH 3 only)")
    out_n = cfg["BLOCK_N"] // 2 if gated else cfg["BLOCK_N"]  # output columns a program
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(out.shape[1], out_n)
    part, lock = _workspace(x.device, cfg["SPLIT_K"], m, n, tiles) if cfg["SPLIT_K"] > 1 else (out, out)
    grid = (tiles, cfg["SPLIT_K"])
    packed, stride_wn = w.packed, w.packed.stride(0)
    if cfg["MATH"] == 3:  # 8 codes per int32 word (K is a multiple of 16, so rows stay word-aligned)
        packed, stride_wn = packed.view(torch.int32), stride_wn // 4
    nvfp4_gemm_kernel[grid](
        x, packed, block_scales(w, x.device), w.global_scale, out, part, lock,
        m, n, k, x.stride(0), stride_wn, w.block_scale.stride(0), out.stride(0),
        **cfg, enable_fp_fusion=True,
    )
    return out
