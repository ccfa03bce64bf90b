"""NVFP4 math: E2M1 rounding, packing, block scales and the NVFP4Weight form, against independent formulas."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adallm_core import nvfp4
from adallm_core.nvfp4 import E2M1_VALUES, NVFP4Weight

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def reference_round(x: float) -> float:
    """Nearest E2M1 value by brute force; a tie picks the even magnitude index; beyond 6 saturates."""
    a = min(abs(x), 6.0)
    best = min(range(8), key=lambda i: (abs(GRID[i] - a), i % 2))
    return GRID[best] if x >= 0 else -GRID[best]


def reference_quantize(w: torch.Tensor, g: float, divides: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized weight and E4M3 block scales by the published recipe, written out element by element."""
    n, k = w.shape
    out = torch.zeros(n, k)
    scales = torch.zeros(n, k // 16)
    for r in range(n):
        for b in range(k // 16):
            block = w[r, b * 16 : (b + 1) * 16].float()
            amax = block.abs().max()
            # ModelOpt divides by (6 * global) in one step; (amax / 6) / global rounds differently now and then
            s = (amax / 6.0 * g if divides else amax / (6.0 * g)).clamp(max=448).to(torch.float8_e4m3fn).float()
            eff = s / g if divides else s * g
            scales[r, b] = s
            if eff > 0:
                out[r, b * 16 : (b + 1) * 16] = torch.tensor([reference_round(v) for v in (block / eff).tolist()]) * eff
    return out, scales


def test_every_code_round_trips():
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(nvfp4.e2m1_codes(E2M1_VALUES), codes)
    all_bytes = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(nvfp4.pack_fp4(nvfp4.unpack_fp4(all_bytes)), all_bytes)
    # element 2i in the low nibble
    assert nvfp4.pack_fp4(torch.tensor([0x3, 0xA], dtype=torch.uint8)).item() == 0xA3
    assert nvfp4.unpack_fp4(torch.tensor([0xA3], dtype=torch.uint8)).tolist() == [0x3, 0xA]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda c: len(c) % 2 == 0))
def test_pack_unpack_round_trip(codes):
    t = torch.tensor(codes, dtype=torch.uint8).reshape(2, -1) if len(codes) % 4 == 0 else torch.tensor(
        codes, dtype=torch.uint8
    )
    assert torch.equal(nvfp4.unpack_fp4(nvfp4.pack_fp4(t)), t)


@settings(max_examples=150, deadline=None)
@given(st.floats(-10, 10, allow_nan=False, width=32))
def test_rounding_matches_brute_force(x):
    got = E2M1_VALUES[nvfp4.e2m1_codes(torch.tensor([x])).long()].item()
    assert got == reference_round(x)


def test_rounding_ties_go_to_even():
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    got = E2M1_VALUES[nvfp4.e2m1_codes(torch.tensor(mids)).long()].tolist()
    assert got == want
    assert E2M1_VALUES[nvfp4.e2m1_codes(torch.tensor([-1e30, 1e30, -6.01])).long()].tolist() == [-6.0, 6.0, -6.0]


@st.composite
def weights(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    n = draw(st.integers(1, 4))
    k = 16 * draw(st.integers(1, 4))
    scale = 10.0 ** draw(st.integers(-6, 4))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * scale
    # blocks far below the tensor's amax (subnormal E4M3 scales) and all-zero blocks
    w = w.unflatten(-1, (-1, 16)) * torch.where(torch.rand(n, k // 16, 1, generator=gen) < 0.3, 1e-4, 1.0)
    w = w * (torch.rand(n, k // 16, 1, generator=gen) > 0.25)
    return w.flatten(-2).to(draw(st.sampled_from([torch.float32, torch.bfloat16])))


@pytest.mark.parametrize("divides", [False, True])
@settings(max_examples=40, deadline=None)
@given(w=weights())
def test_quantize_matches_recipe_and_error_bound(divides, w):
    g = nvfp4.global_scale_from_amax(nvfp4.tensor_amax(w), divides=divides)
    packed, block_scale = nvfp4.quantize(w, g, divides=divides)
    deq = nvfp4.dequantize(packed, block_scale, g, divides=divides)
    want, want_scales = reference_quantize(w, g.item(), divides)
    assert torch.equal(block_scale.float(), want_scales)
    torch.testing.assert_close(deq, want, rtol=1e-6, atol=0)
    # format bound per block: E4M3 rounds the scale by at most 2^-4 relative (normal range) or 2^-10 absolute
    # (subnormal), and the E2M1 grid's widest half-gap is 1 (between 4 and 6) in units of the scale
    gmul = 1 / g.item() if divides else g.item()
    block_amax = w.float().unflatten(-1, (-1, 16)).abs().amax(-1, keepdim=True)
    bound = block_amax / 6 * (1 + 2**-4) + 6 * 2**-10 * gmul
    err = (deq - w.float()).unflatten(-1, (-1, 16)).abs()
    assert bool((err <= bound * (1 + 1e-6)).all())
    zero_blocks = block_amax.squeeze(-1) == 0
    assert bool((block_scale.float()[zero_blocks] == 0).all())
    assert bool((deq.unflatten(-1, (-1, 16))[zero_blocks] == 0).all())


def test_all_zero_tensor():
    w = torch.zeros(2, 32)
    q = NVFP4Weight.quantize(w)
    assert torch.equal(q.global_scale, torch.ones(2))
    assert torch.equal(q.dequantize(), w)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_is_an_error_naming_the_tensor(bad):
    w = torch.randn(2, 32)
    w[1, 5] = bad
    with pytest.raises(ValueError, match="model.layers.3.mlp.up_proj.weight"):
        NVFP4Weight.quantize(w, name="model.layers.3.mlp.up_proj.weight")


def test_k_not_multiple_of_16_is_an_error():
    with pytest.raises(ValueError, match="multiple of 16"):
        NVFP4Weight.quantize(torch.randn(4, 24), name="w")


def test_weight_cat_is_exact_with_different_global_scales():
    gen = torch.Generator().manual_seed(0)
    parts = [NVFP4Weight.quantize(torch.randn(n, 64, generator=gen) * s) for n, s in [(8, 1.0), (4, 30.0), (4, 1e-3)]]
    fused = NVFP4Weight.cat(parts)
    assert (fused.out_features, fused.in_features) == (16, 64)
    assert len(set(fused.global_scale.tolist())) == 3
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    assert torch.equal(fused.dequantize(torch.bfloat16, rows=slice(6, 10)), fused.dequantize()[6:10].bfloat16())


def test_stacked_experts_have_one_global_scale_each():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(3, 8, 32, generator=gen) * torch.tensor([1.0, 10.0, 0.1])[:, None, None]
    stacked = NVFP4Weight.quantize(w)
    assert stacked.global_scale.shape == (3, 8)
    for e in range(3):
        one = NVFP4Weight.quantize(w[e])
        assert torch.equal(stacked.dequantize()[e], one.dequantize())
        assert stacked.global_scale[e, 0].item() == pytest.approx(w[e].abs().max().item() / 2688, rel=1e-6)
    assert torch.equal(NVFP4Weight.stack([NVFP4Weight.quantize(w[e]) for e in range(3)]).packed, stacked.packed)
    assert stacked.nbytes == 3 * 8 * 16 + 3 * 8 * 2 + 3 * 8 * 4
    assert stacked.to("cpu").device.type == "cpu"


# --- the kernels' word order ------------------------------------------------------------------------------------
def _bf16_pattern(code: torch.Tensor) -> torch.Tensor:
    """The 16-bit pattern the GPU decode builds for a code: magnitude index at bits 6..8, sign at bit 15."""
    return ((code & 7) << 6) | ((code & 8) << 12)


def test_kernel_order_round_trips_and_decodes_with_the_kernels_rotations():
    """The PTX decode (nvfp4_gemm._DEQUANT_ASM_KERNEL_ORDER) reads pair p = elements (2p, 2p + 1) of a word as
    `rotl(word, (0, 4, 10)[p]) & 0x81C081C0` for p < 3 and two masked rotations for p = 3; here the same formulas
    in torch against the codes unpacked from the checkpoint's order, and the pattern against the E2M1 table."""
    packed = torch.randint(0, 256, (6, 32), dtype=torch.uint8)
    moved = nvfp4.to_kernel_order(packed)
    assert not torch.equal(moved, packed)
    assert torch.equal(nvfp4.to_kernel_order(moved, inverse=True), packed)
    word = moved.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    mask = 0x81C081C0

    def rotl(r):
        return ((word << r) | (word >> (32 - r))) & 0xFFFFFFFF

    pairs = [word & mask, rotl(4) & mask, rotl(10) & mask, (rotl(6) & 0x00400040) | (rotl(14) & 0x81808180)]
    codes = nvfp4.unpack_fp4(packed).to(torch.int64).view(6, 8, 8)  # [row, word, element]
    for p, got in enumerate(pairs):
        want = _bf16_pattern(codes[..., 2 * p]) | (_bf16_pattern(codes[..., 2 * p + 1]) << 16)
        assert torch.equal(got & 0xFFFFFFFF, want), f"pair {p}"
    # the pattern is the BF16 bit pattern of v * 2^-126
    all_codes = torch.arange(16)
    values = (_bf16_pattern(all_codes).to(torch.int32) << 16).view(torch.float32) * 2.0**126
    assert torch.equal(values, E2M1_VALUES)


def test_weights_in_kernel_order_dequantize_the_same_and_join_only_alike():
    w = NVFP4Weight.quantize(torch.randn(2, 48, 64))
    k = w.in_kernel_order()
    assert k.kernel_order and k.in_kernel_order() is k
    assert torch.equal(k.dequantize(), w.dequantize())
    assert torch.equal(k.dequantize(rows=slice(5, 9)), w.dequantize(rows=slice(5, 9)))
    assert NVFP4Weight.cat([k, k]).kernel_order and NVFP4Weight.stack([k, k]).kernel_order
    with pytest.raises(ValueError, match="word orders"):
        NVFP4Weight.cat([w, k])
    with pytest.raises(ValueError, match="whole 4-byte words"):
        nvfp4.to_kernel_order(torch.zeros(3, 6, dtype=torch.uint8))


def test_tile_major_weights_store_chunks_contiguously_and_dequantize_the_same():
    w = NVFP4Weight.quantize(torch.randn(48, 384))
    t = w.in_tile_major()
    assert t.tile_major and t.kernel_order and t.in_tile_major() is t and t.in_kernel_order() is t
    kernel = w.in_kernel_order()
    chunks = 384 // 128
    flat_codes, flat_scales = t.packed.flatten(), t.block_scale.view(torch.uint8).flatten()
    scales = w.block_scale.view(torch.uint8)
    for row, chunk in [(0, 0), (17, 2), (47, 1)]:  # 16 rows x 64 code bytes, then 16 rows x 8 scale bytes
        at = (row // 16 * chunks + chunk) * 16 + row % 16
        assert torch.equal(flat_codes[at * 64 : at * 64 + 64], kernel.packed[row, chunk * 64 : chunk * 64 + 64])
        assert torch.equal(flat_scales[at * 8 : at * 8 + 8], scales[row, chunk * 8 : chunk * 8 + 8])
    assert torch.equal(nvfp4.to_tile_major(t.packed, 384, inverse=True), kernel.packed)
    ref = w.dequantize()
    assert torch.equal(t.dequantize(), ref)
    for rows in [slice(5, 37), slice(16, 32), slice(40, 48), slice(None)]:
        assert torch.equal(t.dequantize(rows=rows), ref[rows]), rows
    assert torch.equal(NVFP4Weight.cat([t, t]).dequantize(), torch.cat([ref, ref]))  # whole bands join as they are
    with pytest.raises(ValueError, match="tile-major and row-major"):
        NVFP4Weight.cat([t, kernel])
    with pytest.raises(ValueError, match="cannot stack tile-major"):
        NVFP4Weight.stack([t, t])
    assert not NVFP4Weight.quantize(torch.randn(40, 128)).fits_tile_major  # 40 rows: not whole bands
    assert not NVFP4Weight.quantize(torch.randn(48, 64)).fits_tile_major  # K = 64: not a whole chunk
    with pytest.raises(ValueError, match="tile-major NVFP4 weights are 2-D"):
        NVFP4Weight(kernel.packed[:40], kernel.block_scale[:40], kernel.global_scale[:40], True, True)


def test_prefill_slabs_of_a_tile_major_weight_are_whole_bands():
    """The dequantize-once path slices rows at global-scale runs; a tile-major weight whose runs start inside a band of
    16 rows is left to the tiled kernel (no runs), a row-major one is not."""
    from kernel_cases import runs_nvfp4

    from adallm_core.ops.triton.nvfp4_prefill import global_runs

    assert global_runs(runs_nvfp4([24, 8], 128, "cpu").in_kernel_order()) is not None
    assert global_runs(runs_nvfp4([24, 8], 128, "cpu").in_tile_major()) is None
    assert [r[:2] for r in global_runs(runs_nvfp4([32, 16], 128, "cpu").in_tile_major())] == [(0, 32), (32, 48)]


def test_conventions_are_reciprocal():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(8, 64, generator=gen)
    g_div = nvfp4.global_scale_from_amax(nvfp4.tensor_amax(w), divides=True)
    packed, scale = nvfp4.quantize(w, g_div, divides=True)
    ct = NVFP4Weight.from_compressed_tensors(packed, scale, g_div.reshape(1))
    torch.testing.assert_close(ct.dequantize(), nvfp4.dequantize(packed, scale, g_div, divides=True), rtol=1e-6, atol=0)
    mo = NVFP4Weight.from_modelopt(packed, scale, 1 / g_div)
    assert torch.equal(mo.dequantize(), ct.dequantize())


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="shapes do not agree"):
        NVFP4Weight(torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(4, 2).to(torch.float8_e4m3fn), torch.ones(4))
    with pytest.raises(ValueError, match="dtypes"):
        NVFP4Weight(torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(4, 1), torch.ones(4))


@pytest.mark.gpu
def test_cuda_gives_the_same_bits_as_cpu():
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(3, 64, 256, generator=gen) * torch.tensor([1e-3, 1.0, 40.0])[:, None, None]).bfloat16()
    w[1, 2, :16] = 0
    for divides in (False, True):
        g = nvfp4.global_scale_from_amax(nvfp4.tensor_amax(w), divides=divides)
        cpu = nvfp4.quantize(w, g, divides=divides)
        gpu = nvfp4.quantize(w.cuda(), g.cuda(), divides=divides)
        assert torch.equal(cpu[0], gpu[0].cpu())
        assert torch.equal(cpu[1].view(torch.uint8), gpu[1].cpu().view(torch.uint8))
    q = NVFP4Weight.quantize(w)
    on_gpu = q.to("cuda")
    assert on_gpu.device.type == "cuda"
    rows = slice(3, 40)
    assert torch.equal(on_gpu.dequantize(torch.bfloat16, rows=rows).cpu(), q.dequantize(torch.bfloat16, rows=rows))
