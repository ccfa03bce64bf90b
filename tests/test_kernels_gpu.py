"""Every Triton kernel against ops.reference on fresh random inputs, on the GPU (skipped without CUDA).

Before each test the CUDA caching allocator is filled with NaN-poisoned blocks, so an output element a kernel
fails to write shows up as NaN (rel_err then returns inf). Tolerances: ||out - ref|| / ||ref|| <= 2e-3 where both
sides compute exactly and round once to bf16; W4A8 is exact w.r.t. its own FP8 activations, and within the E4M3
rounding of the activations (about 2.7% on Gaussian data) of the exact result.
"""
from __future__ import annotations

import kernel_cases as kc
import pytest
import torch

from adallm_core.ops import reference

pytestmark = pytest.mark.gpu
DEV = "cuda"
EXACT = 2e-3
FAST_ACCUM_REL = 1e-2  # prefill_fp8's GEMMs under cuBLAS's fast FP8 accumulation (measured 2.6e-3-3.7e-3)


@pytest.fixture(autouse=True)
def poison_allocator():
    """Fill cached allocator blocks (small and large pools) with NaN, then free them for the kernels to reuse."""
    if not torch.cuda.is_available():
        return
    blocks = [torch.empty(1 << 17, device=DEV) for _ in range(64)]  # small pool (< 1 MB each)
    blocks += [torch.empty(1 << 24, device=DEV) for _ in range(4)]  # large pool
    for b in blocks:
        b.fill_(float("nan"))
    del blocks
    torch.manual_seed(torch.seed() % (1 << 31))  # fresh inputs every run


@pytest.mark.parametrize("kernel_order", [True, False], ids=["kernel_order", "checkpoint_order"])
@pytest.mark.parametrize("m", [1, 3, 16, 37, 64, 65, 300])
@pytest.mark.parametrize("n,k", [(4096, 4096), (96, 3072), (200, 208), (17000, 256)])  # wide N: weights as A
def test_nvfp4_linear(m, n, k, kernel_order):
    assert kc.case_nvfp4_linear(DEV, m, n, k, kernel_order=kernel_order) <= EXACT


def test_a_captured_graph_keeps_its_split_k_workspace(monkeypatch):
    """A graph captured with the split-K workspace keeps writing that buffer after an eager call of more tokens has
    grown the workspace: the old buffer must stay allocated, or the replay writes into the next tensor the
    allocator hands its memory to (here a sentinel of exactly its size)."""
    from adallm_core.ops.triton import nvfp4_gemm

    monkeypatch.setattr(nvfp4_gemm, "_WORKSPACE", {})
    monkeypatch.setattr(nvfp4_gemm, "_RETIRED", [])
    n = k = 4096
    w = kc.random_nvfp4(n, k, DEV)
    x = torch.randn(16, k, device=DEV).to(torch.bfloat16)
    small = dict(nvfp4_gemm.pick_config(16, n, k, x.device), SPLIT_K=2)
    nvfp4_gemm.nvfp4_linear(x, w, small)  # warm-up: compiles, sizes the workspace
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = nvfp4_gemm.nvfp4_linear(x, w, small)
    captured = nvfp4_gemm._WORKSPACE[x.device][0].numel()
    big = dict(nvfp4_gemm.pick_config(64, n, k, x.device), SPLIT_K=8)
    nvfp4_gemm.nvfp4_linear(torch.randn(64, k, device=DEV).to(torch.bfloat16), w, big)
    assert nvfp4_gemm._WORKSPACE[x.device][0].numel() > captured  # grown: the captured buffer was replaced
    sentinel = torch.full((captured,), 7.0, device=DEV)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert bool((sentinel == 7.0).all()), "the replay wrote into memory the workspace no longer owns"
    assert kc.rel_err(out, reference.nvfp4_linear(x, w)) <= EXACT


@pytest.mark.parametrize("m", [1, 3, 12, 16, 37, 64, 65, 300])
@pytest.mark.parametrize("n,k", [(4096, 4096), (96, 3072), (17008, 384), (4096, 12288),  # wide N: weights as A; long K
                                 (5376, 4096), (5376, 21504)])  # Gemma3-27B o, down: 6 splits from 9 tokens, uneven
def test_nvfp4_linear_tile_major(m, n, k):
    """Linears of whole 16 x 128 chunks as the engine holds them (nvfp4.to_tile_major): the Triton kernel at every M."""
    assert kc.case_nvfp4_linear(DEV, m, n, k, tile_major=True) <= EXACT


@pytest.mark.parametrize("slab", [None, 1 << 24], ids=["engine_slabs", "small_slabs"])
@pytest.mark.parametrize("m", [256, 300, 2048])
@pytest.mark.parametrize("parts,k", [([4096, 1024, 1024], 4096), ([200, 8], 208), ([12288, 12288], 4096),
                                     ([100, 100], 1024)])
def test_nvfp4_linear_prefill_path(m, parts, k, slab, monkeypatch):
    """M >= MIN_TOKENS with one global scale per part (as checkpoints have): the op dequantizes once per slab and
    runs cuBLAS (nvfp4_prefill.py); slabs split at the parts and at SLAB_ELEMS (the engine's, and one small enough
    to split each 12288-row part). 200 x 1024 is a shape cuBLAS splits along K: 0.4% off with its partial sums in
    BF16 (nvfp4_prefill.full_precision_reduction)."""
    from adallm_core.ops.triton import nvfp4_linear, nvfp4_prefill, prepare_nvfp4_weight

    if slab is not None:
        monkeypatch.setattr(nvfp4_prefill, "SLAB_ELEMS", slab)

    w = kc.runs_nvfp4(parts, k, DEV)
    op_w = prepare_nvfp4_weight(w)  # as the engine holds it: tile-major where the shape allows
    assert op_w.tile_major == (k % 128 == 0 and sum(parts) % 16 == 0)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    out = nvfp4_linear(x, op_w)
    runs = op_w.__dict__["_prefill_runs"]
    assert runs is not None, "the prefill path was not taken"
    assert len(runs) >= len(parts) + (slab is not None and parts[0] * k > slab)
    assert kc.rel_err(out, reference.nvfp4_linear(x, w)) <= EXACT


@pytest.mark.parametrize("slab", [None, 1 << 22], ids=["engine_slabs", "small_slabs"])
@pytest.mark.parametrize("m", [256, 300, 2048])
@pytest.mark.parametrize("parts,k", [([4096, 1024, 1024], 4096), ([200, 8], 208), ([12288, 12288], 4096)])
def test_nvfp4_linear_fp8_prefill(m, parts, k, slab, monkeypatch):
    """prefill_fp8's op (nvfp4_prefill_fp8.py) on the engine's weight layout vs reference.nvfp4_linear_fp8, which
    rounds the same operands to E4M3 and sums in fp32 (as the op does with FAST_ACCUM off); slabs of the engine's
    size and small enough to split every weight."""
    from adallm_core.ops.triton import nvfp4_linear_fp8, nvfp4_prefill_fp8, prepare_nvfp4_weight

    if slab is not None:
        monkeypatch.setattr(nvfp4_prefill_fp8, "SLAB_ELEMS", slab)
    w = kc.runs_nvfp4(parts, k, DEV)
    op_w = prepare_nvfp4_weight(w)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    out = nvfp4_linear_fp8(x, op_w)
    assert "_fp8_rows" in op_w.__dict__, "the FP8 path was not taken"
    want = reference.nvfp4_linear_fp8(x, w)
    assert kc.rel_err(out, want) <= FAST_ACCUM_REL
    assert kc.rel_err(out, reference.nvfp4_linear(x, w)) <= 4e-2
    monkeypatch.setattr(nvfp4_prefill_fp8, "FAST_ACCUM", False)  # fp32 sums: the operands' roundings alone
    assert kc.rel_err(nvfp4_linear_fp8(x, op_w), want) <= EXACT


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("m,n", [(8, 4096), (300, 4096), (300, 200)])  # decode; FP8; N not a multiple of 16: exact
def test_nvfp4_gated_linear_fp8_prefill(m, n, activation):
    from adallm_core.ops.triton import nvfp4_gated_linear_fp8, prepare_nvfp4_weight

    w = kc.runs_nvfp4([n // 2, n // 2], 1024, DEV)
    op_w = prepare_nvfp4_weight(w)
    x = torch.randn(m, 1024, device=DEV, dtype=torch.bfloat16)
    out = nvfp4_gated_linear_fp8(x, op_w, activation)
    fp8 = m >= reference.FP8_PREFILL_MIN_TOKENS and n % 16 == 0
    assert ("_fp8_rows" in op_w.__dict__) == fp8
    assert kc.rel_err(out, reference.nvfp4_gated_linear_fp8(x, w, activation)) <= (FAST_ACCUM_REL if fp8 else EXACT)


@pytest.mark.parametrize("fp8", [True, False], ids=["e4m3_scales", "byte_scales"])
@pytest.mark.parametrize("tile_major", [False, True])
def test_every_e4m3_scale(fp8, tile_major, monkeypatch):
    """Every finite E4M3 block scale decodes exactly: in hardware (Ada and later), and from its bytes, the path of GPUs
    before Ada (nvfp4_gemm.block_scales), forced here."""
    from adallm_core.ops.triton import nvfp4_gemm

    if not fp8:
        monkeypatch.setattr(nvfp4_gemm, "fp8_scales", lambda device: False)
    assert kc.case_every_e4m3_scale(DEV, tile_major=tile_major, k=128) <= 1e-6


def test_byte_scales_in_every_kernel(monkeypatch):
    """The kernels that read block scales (linear, prefill dequantization, MoE), with the scales as bytes as GPUs before
    Ada read them: exact against the reference on random weights."""
    from adallm_core.ops.triton import nvfp4_gemm

    monkeypatch.setattr(nvfp4_gemm, "fp8_scales", lambda device: False)
    assert kc.case_nvfp4_linear(DEV, 3, 256, 384, kernel_order=True, tile_major=True) <= EXACT
    assert kc.case_nvfp4_linear(DEV, 37, 208, 256, kernel_order=True) <= EXACT
    assert kc.case_nvfp4_prefill(DEV, 300, [128, 64], 256, kernel_order=True, tile_major=True) <= EXACT
    assert kc.case_moe(DEV, 7, 256, 128, 16, 4, kernel_order=True) <= EXACT


@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("n,k", [(4096, 4096), (208, 384), (16, 12288), (48, 128)])
def test_cuda_decode_kernel(m, n, k):
    """csrc/nvfp4_gemv.cu: builds here, exact in every variant (row tiles past N, one 16-row tile, one 128-K chunk,
    1..8 tokens), on tile-major weights in the kernels' word order; refuses what it cannot read."""
    from adallm_core.ops import cuda_gemv

    module = cuda_gemv.load()
    assert module is not None, "the CUDA decode kernel did not build (see the log)"
    w = kc.random_nvfp4(n, k, DEV).in_tile_major()
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    assert cuda_gemv.supports(x, w)
    ref = reference.nvfp4_linear(x, w)
    for variant in range(cuda_gemv.VARIANTS):
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)  # poisoned: every entry written
        try:
            assert cuda_gemv.nvfp4_gemv(x, w, module, variant, out=out) is out
        except RuntimeError as exc:  # four row tiles of 7-8 tokens need ~106 KB a block: refused on Ada (99 KB)
            assert "code 3" in str(exc) and not module.fits(m, variant), exc
            assert torch.cuda.get_device_properties(DEV).shared_memory_per_block_optin < 106_000
            continue
        assert kc.rel_err(out, ref) <= EXACT, variant
    assert not cuda_gemv.supports(x, kc.random_nvfp4(n, k, DEV))  # checkpoint order: the Triton kernel's
    assert not cuda_gemv.supports(x, kc.random_nvfp4(n, k, DEV).in_kernel_order())  # row-major
    unaligned = torch.empty(m, k + 8, device=DEV, dtype=torch.bfloat16)[:, 1 : k + 1]
    assert not cuda_gemv.supports(unaligned, w)  # rows cp.async cannot copy in 16-byte pieces
    with pytest.raises(RuntimeError, match=f"variant {cuda_gemv.VARIANTS}"):
        cuda_gemv.nvfp4_gemv(x, w, module, cuda_gemv.VARIANTS)
    assert not module.fits(cuda_gemv.MAX_M + 1, 0) and not module.fits(m, cuda_gemv.VARIANTS)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("inter,k", [(12288, 512), (208, 384), (16, 128)])
def test_cuda_decode_kernel_gated(m, inter, k, activation):
    """A fused gate|up with the activation in the CUDA kernel's epilogue: exact against the linear and then the
    activation op in every variant that pairs gate and up tiles (an even number of row tiles); the rest refuse."""
    from adallm_core.ops import cuda_gemv

    module = cuda_gemv.load()
    assert module is not None, "the CUDA decode kernel did not build (see the log)"
    w = kc.random_nvfp4(2 * inter, k, DEV).in_tile_major()
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    assert cuda_gemv.supports(x, w, gated=True)
    ref = reference.nvfp4_gated_linear(x, w, activation)
    for variant in (0, 2, cuda_gemv.FOUR_ROW_TILES):
        if not module.fits(m, variant):
            continue
        out = torch.full((m, inter), float("nan"), dtype=torch.bfloat16, device=DEV)
        assert cuda_gemv.nvfp4_gemv(x, w, module, variant, out=out, activation=activation) is out
        assert kc.rel_err(out, ref) <= EXACT, variant
    with pytest.raises(RuntimeError, match="code 1"):  # one row tile a block: no up rows beside the gate rows
        cuda_gemv.nvfp4_gemv(x, w, module, 1, activation=activation)
    assert not cuda_gemv.supports(x, kc.random_nvfp4(2 * inter + 16, k, DEV).in_tile_major(), gated=True)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("m", [1, 5, 8, 9, 16, 37, 300])
def test_gated_linear_op(m, activation):
    """ops.nvfp4_gated_linear as the engine calls it: the CUDA kernel (1-8 tokens, gate and up of whole 16-row
    tiles), the Triton kernel's epilogue (more tokens, or 8-row halves), the prefill path's linear + activation."""
    from adallm_core.ops import cuda_gemv
    from adallm_core.ops.triton import nvfp4_gated_linear, prepare_nvfp4_weight

    for inter, k, cuda in [(1024, 2048, True), (12288, 512, True), (200, 256, False)]:
        w = kc.random_nvfp4(2 * inter, k, DEV)
        op_w = prepare_nvfp4_weight(w)
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        assert cuda_gemv.takes(x, op_w, gated=True) == (m <= cuda_gemv.DECODE_TOKENS and cuda), (inter, k)
        out = nvfp4_gated_linear(x, op_w, activation)
        assert kc.rel_err(out, reference.nvfp4_gated_linear(x, w, activation)) <= EXACT, (inter, k)
    with pytest.raises(ValueError, match="activation must be one of"):
        nvfp4_gated_linear(x, op_w, "relu")


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("m", [9, 12, 16, 64])
@pytest.mark.parametrize("tile_major", [False, True])
def test_nvfp4_linear_gated_epilogue(m, activation, tile_major):
    """The Triton kernel with the activation in its epilogue, split and unsplit: Qwen3-8B's gate|up; K of 21 chunks;
    Gemma3-27B's gate|up (64-row tiles from 9 tokens, pick_config)."""
    for inter, k in [(12288, 4096), (5376, 2688), (21504, 5376)]:
        assert kc.case_nvfp4_gated(DEV, m, inter, k, activation, tile_major=tile_major) <= EXACT, (inter, k)


@pytest.mark.parametrize("n,k,gated", [(5376, 4096, False), (43008, 5376, True)])  # 32-row, 64-row tiles
def test_resident_programs_match_the_compiled_kernel(n, k, gated):
    """pick_config splits 9-16-token linears until their programs fill what the SMs hold at once, counted from an
    estimate of a program's shared memory and registers: it must agree with the compiled kernel's own figures, by
    the occupancy arithmetic (registers allocated 256 a warp, 1 KB of shared memory reserved a block)."""
    from adallm_core.ops.triton import nvfp4_gemm

    kernels = nvfp4_gemm.nvfp4_gemm_kernel.device_caches[torch.cuda.current_device()][0]
    earlier = dict(kernels)
    kernels.clear()  # this launch's kernel alone (Triton's disk cache makes it quick)
    try:
        cfg = nvfp4_gemm.pick_config(16, n, k, torch.device(DEV))
        err = (kc.case_nvfp4_gated(DEV, 16, n // 2, k, "silu", tile_major=True) if gated else
               kc.case_nvfp4_linear(DEV, 16, n, k, kernel_order=True, tile_major=True))
        compiled = list(kernels.values())
    finally:
        kernels.update(earlier)
    assert err <= EXACT and len(compiled) == 1, (err, len(compiled))
    kernel, props = compiled[0], torch.cuda.get_device_properties(DEV)
    warps = kernel.metadata.num_warps
    by_smem = props.shared_memory_per_multiprocessor // (kernel.metadata.shared + 1024)
    by_regs = 65536 // (-(-kernel.n_regs * 32 // 256) * 256) // warps
    by_threads = props.max_threads_per_multi_processor // (32 * warps)
    expected = min(by_smem, by_regs, by_threads)
    estimate = nvfp4_gemm.resident_programs(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_stages"], warps,
                                            torch.device(DEV))
    assert estimate == expected, (estimate, kernel.n_regs, kernel.metadata.shared, by_smem, by_regs, by_threads)


@pytest.mark.parametrize("m", [1, 3, 4, 5, 8, 9])
def test_op_decode_path(m):
    """The op sends 1..DECODE_TOKENS tokens on tile-major weights to the CUDA kernel (four row tiles a block where
    two would leave SMs unevenly loaded, or on wide linears from WIDE_FOUR_FROM tokens), more tokens and row-major
    weights to the Triton kernel: exact either way."""
    from adallm_core.ops import cuda_gemv
    from adallm_core.ops.triton.nvfp4_prefill import nvfp4_linear

    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    uneven = (sms + 1) * 32  # sms + 1 blocks of two row tiles
    wide = (2 * sms + 1) * 32
    for n, k, cuda in [(1024, 2048, True), (uneven, 256, True), (24576, 512, True),
                       (1000, 2048, False)]:  # 1000 rows: not whole bands, row-major
        w = kc.random_nvfp4(n, k, DEV).in_kernel_order()
        w = w.in_tile_major() if w.fits_tile_major else w
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        assert cuda_gemv.takes(x, w) == (m <= cuda_gemv.DECODE_TOKENS and cuda), (n, k)
        assert kc.rel_err(nvfp4_linear(x, w), reference.nvfp4_linear(x, w)) <= EXACT
        with pytest.raises(ValueError, match=r"x must be \["):  # a wrong K is named, never read past the weight
            nvfp4_linear(torch.randn(m, k + 128, device=DEV, dtype=torch.bfloat16), w)
    device = torch.device(DEV).index or 0
    four = cuda_gemv.FOUR_ROW_TILES if cuda_gemv.fits(m, cuda_gemv.FOUR_ROW_TILES) else 0  # 7-8 tokens on Ada: 0
    assert cuda_gemv.pick_variant(m, uneven, device) == four
    assert cuda_gemv.pick_variant(m, wide, device) == (four if m >= cuda_gemv.WIDE_FOUR_FROM else 0)
    assert cuda_gemv.pick_variant(m, sms * 32, device) == 0


@pytest.mark.parametrize("t,hq,hk,d", [(1, 32, 8, 128), (37, 16, 8, 256), (5, 6, 3, 64)])
@pytest.mark.parametrize("cache", ["fp8", "bf16"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_qk_norm_rope_cache(t, hq, hk, d, cache, offset):
    dtype = torch.float8_e4m3fn if cache == "fp8" else torch.bfloat16
    assert kc.case_qk_norm_rope_cache(DEV, t, hq, hk, d, dtype, offset) <= EXACT


@pytest.mark.parametrize("math,swap", [(0, False), (1, False), (3, True), (3, False), (0, True)])
@pytest.mark.parametrize("split", [1, 3, 8])
@pytest.mark.parametrize("block_k", [128, 512])
def test_nvfp4_linear_variants(math, swap, split, block_k):
    """Every decode variant (BF16 or fp32 multiply on checkpoint-ordered bytes, or the word dequantization on the
    kernels' word order; weights as the A or the B operand; split-K with the last-program reduction) gives the same
    result; repeated calls check that the split-K tickets reset themselves."""
    cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=block_k, SPLIT_K=split, num_warps=4, num_stages=3, MATH=math,
               SWAP_AB=swap)
    for _ in range(3):
        assert kc.case_nvfp4_linear(DEV, 5, 512, 2048, cfg, kernel_order=math == 3) <= EXACT


def test_nvfp4_linear_is_exact_in_fp32():
    """fp32 activations that are BF16 values: BF16 products are exact, only the fp32 summation order differs."""
    assert kc.case_nvfp4_linear(DEV, 16, 256, 1024, dtype=torch.float32) <= 1e-5


@pytest.mark.parametrize("m,k", [(1, 4096), (7, 12288), (130, 96)])
def test_per_token_fp8(m, k):
    from adallm_core.ops.reference import per_token_fp8 as per_token_fp8_reference
    from adallm_core.ops.triton.quant import per_token_fp8

    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16) * torch.rand(m, 1, device=DEV, dtype=torch.bfloat16) * 10
    q, s = per_token_fp8(x)
    q_ref, s_ref = per_token_fp8_reference(x)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    assert kc.rel_err(q.float() * s[:, None], q_ref.float() * s_ref[:, None]) <= 1e-3


@pytest.mark.parametrize("m", [16, 100, 2048])
def test_w4a8_linear(m):
    from adallm_core.ops.reference import per_token_fp8 as per_token_fp8_reference
    from adallm_core.ops.triton.w4a8_gemm import w4a8_linear

    w = kc.random_nvfp4(384, 1024, DEV)
    x = torch.randn(m, 1024, device=DEV, dtype=torch.bfloat16)
    out = w4a8_linear(x, w)
    q, s = per_token_fp8_reference(x)
    assert kc.rel_err(out, reference.nvfp4_linear(q.float() * s[:, None], w)) <= EXACT
    assert kc.rel_err(out, reference.nvfp4_linear(x, w)) <= 4e-2


@pytest.mark.parametrize("t,h", [(1, 4096), (5, 5376), (33, 100)])
@pytest.mark.parametrize("add,offset", [(False, 0.0), (True, 0.0), (True, 1.0)])
def test_rms_norm(t, h, add, offset):
    assert kc.case_rms_norm(DEV, t, h, offset=offset, add=add) <= EXACT


@pytest.mark.parametrize("t,hq,hk,d", [(1, 32, 8, 128), (37, 32, 16, 128), (5, 4, 1, 64)])
def test_rope(t, hq, hk, d):
    assert kc.case_rope(DEV, t, hq, hk, d) <= EXACT


@pytest.mark.parametrize("t,inter", [(1, 12288), (19, 1000)])
@pytest.mark.parametrize("gelu", [False, True])
def test_gated_activation(t, inter, gelu):
    assert kc.case_act(DEV, t, inter, gelu) <= EXACT


@pytest.mark.parametrize("t,vocab,h", [(1, 151936, 4096), (37, 1000, 5376), (5, 17, 100)])
@pytest.mark.parametrize("on_host", [False, True])
def test_embedding(t, vocab, h, on_host):
    assert kc.case_embedding(DEV, t, vocab, h, on_host) == 0.0


def test_embedding_from_host_inside_a_cuda_graph():
    """The decode graphs replay the lookup with new ids each step: the pinned table is read at replay time."""
    from adallm_core.ops.triton import embedding

    table = torch.randn(5000, 256).bfloat16().pin_memory()
    ids = torch.zeros(8, dtype=torch.long, device=DEV)
    embedding(ids, table)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = embedding(ids, table)
    for _ in range(3):
        new = torch.randint(0, 5000, (8,))
        ids.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), table[new])


def test_embedding_rejects_a_pageable_host_table():
    from adallm_core.ops.triton import embedding

    with pytest.raises(ValueError, match="pinned"):
        embedding(torch.zeros(2, dtype=torch.long, device=DEV), torch.randn(10, 8))


@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("t,hk,d", [(5, 8, 128), (17, 2, 64)])
def test_kv_write(t, hk, d, fp8):
    assert kc.case_kv_write(DEV, t, hk, d, fp8) == 0.0


ATTN_CASES = [
    # q_lens, ctx_lens, hq, hk, block_size, window, splits
    ([1] * 16, [100, 5, 0, 77] * 4, 32, 8, 16, None, None),  # decode, ragged contexts (the short bound's tiles)
    ([1] * 40, [100, 5, 0, 300, 77] * 8, 32, 8, 16, None, None),  # more programs than SMs: the narrower short tiles
    ([1, 1, 1], [3000, 17, 1500], 32, 8, 16, None, 4),  # long decode, split along the sequence
    ([1, 1], [2500, 40], 32, 16, 16, 1024, 8),  # Gemma-like: sliding window with splits
    ([1] * 16, [3, 150, 0, 1000] * 4, 32, 8, 16, None, 16),  # parts sized from real lengths: 1 to 16 used
    ([1] * 40, [3, 700, 0, 1500, 200] * 8, 32, 8, 16, None, 4),  # many programs, parts from the real lengths
    ([1] * 40, [3, 700, 0, 1500, 200] * 8, 32, 8, 16, 600, 8),  # the same with a window
    ([7, 130, 1, 64], [0, 20, 9, 100], 32, 8, 16, None, None),  # prefill chunks mixed with a decode
    ([200, 33], [0, 60], 32, 16, 16, 48, None),  # prefill with a short sliding window
    ([600, 300, 1], [0, 1000, 50], 32, 8, 16, None, None),  # long prefills: most key tiles whole (no mask)
    ([5, 1], [3, 8], 4, 4, 4, None, None),  # no GQA, tiny blocks
]


@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("q_lens,ctx_lens,hq,hk,bs,window,splits", ATTN_CASES)
def test_attention(q_lens, ctx_lens, hq, hk, bs, window, splits, fp8):
    err = kc.case_attention(DEV, q_lens, ctx_lens, hq=hq, hk=hk, d=128, block_size=bs, fp8=fp8, window=window,
                            num_splits=splits, calls=2)
    assert err <= EXACT


QK_ATTN_CASES = [
    # ctx_lens (sequence 0 is a padding row), hq, hk, head_dim, window, splits
    ([100, 5, 0, 77] * 4, 32, 8, 128, None, None),  # Qwen3-8B heads, the default parts (the short bound's tiles)
    ([100, 5, 0, 300, 77] * 8, 32, 8, 128, None, None),  # more programs than SMs: the narrower short tiles
    ([100, 5, 0, 300] * 4, 16, 8, 256, None, None),  # Gemma3-4B/12B's 256-dim heads: 128-key short tiles
    ([3000, 17, 1500, 0], 32, 8, 128, None, 8),  # long: the newest key in the last used part
    ([2500, 40, 600], 32, 16, 128, 1024, 4),  # Gemma3-27B heads, sliding window with parts
    ([3, 700, 0, 1500, 200] * 8, 32, 8, 128, None, 4),  # many programs, 1 to 4 parts used
    ([9, 3, 31], 6, 3, 64, None, None),  # three query heads a KV head, head_dim 64
]


@pytest.mark.parametrize("cache", ["fp8", "bf16"])
@pytest.mark.parametrize("ctx_lens,hq,hk,d,window,splits", QK_ATTN_CASES)
def test_qk_norm_rope_attention(ctx_lens, hq, hk, d, window, splits, cache):
    """A decode step's attention from the qkv row in one launch: output and both caches against the reference ops."""
    offset = 1.0 if window else 0.0  # Gemma3 norms weigh 1 + w
    err = kc.case_qk_norm_rope_attention(DEV, ctx_lens, hq, hk, d, cache == "fp8", window=window, num_splits=splits,
                                         offset=offset, block_size=16)
    assert err <= EXACT


@pytest.mark.parametrize("t,experts,top_k", [(1, 128, 8), (16, 128, 8), (32, 128, 8), (7, 60, 4), (3, 8, 2)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_routing(t, experts, top_k, renormalize):
    assert kc.case_moe_routing(DEV, t, experts, top_k, renormalize) <= 1e-5


@pytest.mark.parametrize("t,chunk", [(32, 128), (32, 16), (9, 16)])
def test_moe_routing_in_chunks(t, chunk):
    """The chunked sort Ada runs from 17 tokens (a block too small for the whole tile), forced here."""
    assert kc.case_moe_routing(DEV, t, 128, 8, True, chunk=chunk) <= 1e-5


@pytest.mark.parametrize("kernel_order", [True, False], ids=["kernel_order", "checkpoint_order"])
@pytest.mark.parametrize("t", [1, 7, 64, 300])  # 300 x 4 pairs: the torch routing path
def test_moe(t, kernel_order):
    assert kc.case_moe(DEV, t, 256, 128, 16, 4, kernel_order=kernel_order) <= EXACT
