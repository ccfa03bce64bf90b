"""NVFP4 format math in plain torch (any device).

A weight W [N, K] is cut along K into blocks of 16. Each element is an E2M1 code (4 bits: sign << 3 | magnitude
index), each block has an FP8-E4M3 scale, each tensor an FP32 global scale. Two conventions for the global scale:
  ModelOpt (`weight_scale_2`):               W = E2M1 * block_scale * global     (global MULTIPLIES, = amax / 2688)
  compressed-tensors (`weight_global_scale`): W = E2M1 * (block_scale / global)   (global DIVIDES,   = 2688 / amax)
`divides=True` selects the second one wherever a function takes a global scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_SIZE = 16
FP4_MAX = 6.0
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max

# index = 4-bit code = sign << 3 | magnitude index
E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float32
)


def _before(x: float) -> float:
    return torch.nextafter(torch.tensor(x), torch.tensor(0.0)).item()


# Midpoints between neighbouring magnitudes. A tie goes to the even code (mantissa bit 0): down at 0.25, 1.25, 2.5,
# 5.0 and up at 0.75, 1.75, 3.5. bucketize counts boundaries strictly below |x|, so a round-up midpoint is moved one
# float32 ulp down to count when |x| equals it. Everything above 5 saturates to 6 (code 7).
_BOUNDARIES = torch.tensor([0.25, _before(0.75), 1.25, _before(1.75), 2.5, _before(3.5), 5.0], dtype=torch.float32)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round already-scaled values to the nearest E2M1 value (ties to even, saturating at +-6) -> uint8 codes."""
    x = x.float()
    magnitude = torch.bucketize(x.abs(), _BOUNDARIES.to(x.device), out_int32=True).to(torch.uint8)
    return magnitude | (torch.signbit(x).to(torch.uint8) << 3)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] -> uint8 [..., K//2]; element 2i in the low nibble, 2i+1 in the high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dimension, got shape {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K//2] -> uint8 codes [..., K]."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_fp4 needs uint8, got {packed.dtype}")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def check_finite(w: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"tensor {name!r} contains NaN or Inf; cannot quantize it")


def global_scale_from_amax(amax: torch.Tensor, *, divides: bool) -> torch.Tensor:
    """Global scale that maps the tensor's amax onto the top of the E4M3 block-scale range. All-zero tensor -> 1."""
    amax = amax.float()
    ones = torch.ones_like(amax)
    if divides:
        return torch.where(amax > 0, (FP8_MAX * FP4_MAX) / amax, ones)
    return torch.where(amax > 0, _div(amax, FP8_MAX * FP4_MAX), ones)


def _div(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """x / divisor, correctly rounded on every device: CUDA turns division by a Python number into a multiply by its
    reciprocal (one bit off at times), which would make GPU-converted checkpoints differ from CPU ones."""
    return x / torch.full((), divisor, dtype=x.dtype, device=x.device)


def tensor_amax(w: torch.Tensor) -> torch.Tensor:
    """amax over the matrix dims (last two); one value per leading index (e.g. per expert)."""
    return w.detach().abs().amax(dim=(-2, -1)).float()


def _row_global(global_scale: torch.Tensor, w_shape: torch.Size) -> torch.Tensor:
    """Global scale (scalar, per matrix [...], or per row [..., N]) -> broadcastable to [..., N, 1]."""
    g = global_scale.float()
    if g.ndim == len(w_shape) - 1 and g.shape[-1] == w_shape[-2]:
        return g.unsqueeze(-1)
    if g.numel() == 1:
        return g.reshape(())
    if tuple(g.shape) == tuple(w_shape[:-2]):
        return g[..., None, None]
    raise ValueError(f"global scale of shape {tuple(g.shape)} does not fit a weight of shape {tuple(w_shape)}")


def quantize(
    w: torch.Tensor, global_scale: torch.Tensor, *, divides: bool, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., N, K] -> (packed uint8 [..., N, K//2], block_scale float8_e4m3fn [..., N, K//16]).

    The published recipe: block_scale = e4m3(amax(block) / 6 [* or /] global); codes = E2M1(W / effective scale).
    A block whose scale is 0 (all zeros, or far below the tensor's amax) gets codes 0 and scale 0.
    """
    if w.ndim < 2 or w.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"tensor {name!r}: shape {tuple(w.shape)} needs K (last dim) a multiple of {BLOCK_SIZE}")
    g = _row_global(global_scale, w.shape).unsqueeze(-1)  # broadcast over [..., N, K//16, 16]
    blocks = w.float().unflatten(-1, (-1, BLOCK_SIZE))
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    check_finite(block_amax, name)  # amax propagates NaN and Inf: checking the small tensor is enough
    if divides:
        block_scale = (g * _div(block_amax, FP4_MAX)).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
        effective = block_scale.float() / g
    else:
        block_scale = (block_amax / (FP4_MAX * g)).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)  # as ModelOpt: / (6 g)
        effective = block_scale.float() * g
    # x / inf = 0: a zero scale gives zero codes without a full-size select
    codes = e2m1_codes(blocks / torch.where(effective > 0, effective, torch.inf)).flatten(-2)
    return pack_fp4(codes), block_scale.squeeze(-1)


def dequantize(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor,
    *,
    divides: bool,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(packed [..., N, K//2], block_scale [..., N, K//16], global scale) -> W [..., N, K] in dtype."""
    values = E2M1_VALUES.to(packed.device)[unpack_fp4(packed).long()].unflatten(-1, (-1, BLOCK_SIZE))
    if values.shape[:-1] != block_scale.shape:
        raise ValueError(
            f"block scale shape {tuple(block_scale.shape)} does not match packed shape {tuple(packed.shape)}"
        )
    g = _row_global(global_scale, values.shape[:-2] + (values.shape[-2] * BLOCK_SIZE,)).unsqueeze(-1)
    scale = block_scale.float().unsqueeze(-1)
    scale = scale / g if divides else scale * g
    return (values * scale).flatten(-2).to(dtype)


# Kernel word order. The GPU kernels read 32-bit words of 8 codes and turn each into four BF16 pairs, the register
# pairs the tensor cores take (ops/triton/nvfp4_gemm.py). In the checkpoint's order a pair's magnitude and sign bits
# need four shifts; in this order (a permutation of the bits inside each word, applied once at load) pairs 0-2 become
# BF16 bit patterns with one rotation and one mask (`rotl(word, (0, 4, 10)[p]) & 0x81C081C0`), pair 3 with two of
# each and an OR: 9 integer operations a word.
# _KERNEL_BITS[i] = where element i's code bits (magnitude 0, 1, 2, sign) go in the word.
_KERNEL_BITS = (
    (6, 7, 8, 15), (22, 23, 24, 31), (2, 3, 4, 11), (18, 19, 20, 27),
    (28, 29, 30, 5), (12, 13, 14, 21), (0, 25, 26, 1), (16, 9, 10, 17),
)


_WORDS_PER_CHUNK = 1 << 22


def _move_bits(words: torch.Tensor, moves: list[tuple[int, int]]) -> torch.Tensor:
    """Move bits of int64 words, given (source, destination) pairs; bits that move the same distance share a shift."""
    by_shift: dict[int, int] = {}
    for src, dst in moves:
        by_shift[dst - src] = by_shift.get(dst - src, 0) | (1 << src)
    out = torch.zeros_like(words)
    for shift, mask in by_shift.items():
        part = words & mask
        out |= part << shift if shift >= 0 else part >> -shift
    return out


def to_kernel_order(packed: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Packed uint8 [..., K/2] in the checkpoint's order -> the same codes in the kernels' word order (or back)."""
    if packed.dtype != torch.uint8 or packed.shape[-1] % 4:
        raise ValueError(f"kernel word order needs uint8 rows of whole 4-byte words, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    moves = [(4 * i + b, dst) for i, bits in enumerate(_KERNEL_BITS) for b, dst in enumerate(bits)]
    if inverse:
        moves = [(dst, src) for src, dst in moves]
    words = packed.contiguous().view(torch.int32).flatten()
    out = torch.empty_like(words)
    for i in range(0, words.numel(), _WORDS_PER_CHUNK):  # int64 temporaries of a chunk, never of the whole tensor
        chunk = words[i : i + _WORDS_PER_CHUNK].to(torch.int64) & 0xFFFFFFFF
        out[i : i + _WORDS_PER_CHUNK] = _move_bits(chunk, moves).to(torch.int32)
    return out.view(torch.uint8).reshape(packed.shape)


TILE_ROWS, TILE_K = 16, 128  # the tile-major layout's unit: 16 rows x 128 inputs (1 KB of codes, 128 B of scales)


def to_tile_major(rows: torch.Tensor, k: int, inverse: bool = False) -> torch.Tensor:
    """Rows [N, C] of a linear with k inputs (packed codes, C = k/2, or block scales, C = k/16) -> the same bytes with
    each band of 16 rows stored chunk by chunk, [N/16][k/128][16 rows][C / (k/128)] (or back). Whole bytes move, so
    the codes' word order is kept; a band occupies the same bytes in both layouts, so bands slice alike."""
    n, c = rows.shape
    chunks = k // TILE_K
    raw = rows.contiguous().view(torch.uint8)
    shape = (n // TILE_ROWS, chunks, TILE_ROWS, c // chunks) if inverse else (n // TILE_ROWS, TILE_ROWS, chunks,
                                                                                c // chunks)
    return raw.view(shape).transpose(1, 2).contiguous().view(n, c).view(rows.dtype)


@dataclass
class NVFP4Weight:
    """THE in-memory form of a quantized linear [N, K], or a stack of them [E, N, K] (MoE experts).

    W[..., n, k] = E2M1(code[..., n, k]) * block_scale[..., n, k // 16] * global_scale[..., n]
    The global scale is per output row and MULTIPLIES, so linears with different global scales (q/k/v, gate/up)
    concatenate along N exactly, with no rescaling of the FP8 block scales.
    """

    packed: torch.Tensor  # uint8 [..., N, K//2]
    block_scale: torch.Tensor  # float8_e4m3fn [..., N, K//16]
    global_scale: torch.Tensor  # float32 [..., N]
    kernel_order: bool = False  # packed words hold their codes in the kernels' order (to_kernel_order)
    tile_major: bool = False  # codes and scales stored in 16-row x 128-K chunks (to_tile_major): 2-D, kernel order

    def __post_init__(self) -> None:
        p, s, g = self.packed, self.block_scale, self.global_scale
        if p.dtype != torch.uint8 or s.dtype != torch.float8_e4m3fn or g.dtype != torch.float32:
            raise ValueError(
                f"NVFP4Weight dtypes must be uint8/float8_e4m3fn/float32, got {p.dtype}/{s.dtype}/{g.dtype}"
            )
        if p.ndim < 2 or s.shape != p.shape[:-1] + (p.shape[-1] * 2 // BLOCK_SIZE,) or g.shape != p.shape[:-1]:
            raise ValueError(
                f"NVFP4Weight shapes do not agree: packed {tuple(p.shape)}, block_scale {tuple(s.shape)}, "
                f"global_scale {tuple(g.shape)} (want [..., N, K/2], [..., N, K/16], [..., N])"
            )
        if self.tile_major and not (self.fits_tile_major and self.kernel_order):
            raise ValueError(f"tile-major NVFP4 weights are 2-D in the kernels' word order with N % {TILE_ROWS} == 0 "
                             f"and K % {TILE_K} == 0, got packed {tuple(p.shape)}, kernel_order={self.kernel_order}")

    @property
    def out_features(self) -> int:
        return self.packed.shape[-2]

    @property
    def in_features(self) -> int:
        return self.packed.shape[-1] * 2

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def fits_tile_major(self) -> bool:
        return self.packed.ndim == 2 and self.out_features % TILE_ROWS == 0 and self.in_features % TILE_K == 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.block_scale, self.global_scale))

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | None = None) -> torch.Tensor:
        """-> [..., N, K] (or only `rows` of N) in dtype."""
        rows = rows if rows is not None else slice(None)
        packed, block_scale, global_scale = self.packed, self.block_scale, self.global_scale
        if self.tile_major:  # back to rows: only the bands that hold the wanted ones
            start, stop, _ = rows.indices(self.out_features)
            lo, hi = start // TILE_ROWS * TILE_ROWS, -(-stop // TILE_ROWS) * TILE_ROWS
            packed = to_tile_major(packed[lo:hi], self.in_features, inverse=True)
            block_scale = to_tile_major(block_scale[lo:hi], self.in_features, inverse=True)
            global_scale, rows = global_scale[lo:hi], slice(start - lo, stop - lo)
        packed = packed[..., rows, :]
        return dequantize(
            to_kernel_order(packed, inverse=True) if self.kernel_order else packed,
            block_scale[..., rows, :],
            global_scale[..., rows],
            divides=False,
            dtype=dtype,
        )

    def to(self, device: torch.device | str) -> NVFP4Weight:
        return NVFP4Weight(self.packed.to(device), self.block_scale.to(device), self.global_scale.to(device),
                           self.kernel_order, self.tile_major)

    def in_tile_major(self) -> NVFP4Weight:
        """The same weight stored in 16-row x 128-K chunks (to_tile_major), in the kernels' word order: each chunk a
        decode kernel's warp copies is 1 KB of contiguous memory instead of 16 rows x 64 B (benchmarks/NOTES.md)."""
        if self.tile_major:
            return self
        w = self.in_kernel_order()
        k = self.in_features
        return NVFP4Weight(to_tile_major(w.packed, k), to_tile_major(w.block_scale, k), w.global_scale, True, True)

    def in_kernel_order(self) -> NVFP4Weight:
        """The same weight with its codes in the kernels' word order (what the GPU kernels read fastest)."""
        if self.kernel_order:
            return self
        return NVFP4Weight(to_kernel_order(self.packed), self.block_scale, self.global_scale, True, self.tile_major)

    @staticmethod
    def cat(weights: list[NVFP4Weight]) -> NVFP4Weight:
        """Concatenate along N (output features): exact, because each row keeps its own global scale."""
        return NVFP4Weight(
            torch.cat([w.packed for w in weights], dim=-2),
            torch.cat([w.block_scale for w in weights], dim=-2),
            torch.cat([w.global_scale for w in weights], dim=-1),
            _one_order(weights),
            _one_layout(weights),  # tile-major bands are whole: they concatenate as they are
        )

    @staticmethod
    def stack(weights: list[NVFP4Weight]) -> NVFP4Weight:
        """Stack same-shape linears (MoE experts) along a new leading dim -> [E, N, K]."""
        if _one_layout(weights):
            raise ValueError("cannot stack tile-major NVFP4 weights: the layout is 2-D")
        return NVFP4Weight(
            torch.stack([w.packed for w in weights]),
            torch.stack([w.block_scale for w in weights]),
            torch.stack([w.global_scale for w in weights]),
            _one_order(weights),
        )

    @classmethod
    def from_modelopt(cls, weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor):
        """ModelOpt tensors: packed `weight`, `weight_scale`, scalar `weight_scale_2` (multiplies) -> per-row form."""
        g = weight_scale_2.float().reshape(weight.shape[:-2] + (1,)).expand(weight.shape[:-1]).contiguous()
        return cls(weight, weight_scale, g)

    @classmethod
    def from_compressed_tensors(
        cls, weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_global_scale: torch.Tensor
    ):
        """compressed-tensors tensors: the global scale DIVIDES, so the per-row form holds its reciprocal."""
        return cls.from_modelopt(weight_packed, weight_scale, 1.0 / weight_global_scale.float())

    @classmethod
    def quantize(cls, w: torch.Tensor, name: str = "weight") -> NVFP4Weight:
        """Quantize W [..., N, K] with one global scale per matrix (per expert for a stack), ModelOpt recipe."""
        check_finite(w, name)
        g = global_scale_from_amax(tensor_amax(w), divides=False)
        packed, block_scale = quantize(w, g, divides=False, name=name)
        return cls.from_modelopt(packed, block_scale, g)


def _one_order(weights: list[NVFP4Weight]) -> bool:
    orders = {w.kernel_order for w in weights}
    if len(orders) != 1:
        raise ValueError("cannot join NVFP4 weights whose codes are in different word orders")
    return orders.pop()


def _one_layout(weights: list[NVFP4Weight]) -> bool:
    layouts = {w.tile_major for w in weights}
    if len(layouts) != 1:
        raise ValueError("cannot join tile-major and row-major NVFP4 weights")
    return layouts.pop()
