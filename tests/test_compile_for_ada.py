"""CI (no GPU): the Triton kernels as the ops launch them for the real models' shapes, compiled for Ada (sm_89), the
product's target, which the lent GPU is not.

benchmarks/compile_report.py takes each launch the ops make on CPU tensors, compiles it for the named GPU (Triton's
pipeline and ptxas, with the launch's own specialization) and skips it; the figures are those a GPU of that
architecture loads. On sm_90 they equal what the H200 reported for the same kernels (benchmarks/NOTES.md).
"""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
import torch  # noqa: E402

from benchmarks.compile_report import GPUS, StepInputs, compiled_for, report  # noqa: E402

ADA = GPUS[89]["RTX 4090"]
SHAPES = ["qwen3-8b", "gemma3-27b", "gemma3-12b", "qwen3-30b-a3b"]  # gemma3-12b: 256-dim heads


@pytest.fixture(autouse=True)
def fp_fusion_off_by_default():
    """Triton's default as 3.10 announces it: no fused multiply-adds. The ops pin fusion on at every launch (what
    the GPU measured and the tests checked), so each compile below must still have it (assert_fit)."""
    from triton import knobs

    with knobs.language.scope():
        knobs.language.default_fp_fusion = False
        yield


def test_every_triton_launch_pins_fp_fusion():
    """The runtime check above sees the kernels a layer's steps launch; this one reads every launch in the ops'
    source (embedding, prefill dequantization, the comparison kernels too): `name_kernel[grid](...)` calls."""
    import ast
    from pathlib import Path

    import adallm_core.ops.triton as package

    launches, unpinned = 0, []
    for path in sorted(Path(package.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("_kernel")):
                continue
            launches += 1
            pinned = [k for k in node.keywords if k.arg == "enable_fp_fusion"]
            if not (pinned and isinstance(pinned[0].value, ast.Constant) and pinned[0].value.value is True):
                unpinned.append(f"{path.name}:{node.lineno} {node.func.value.id}")
    assert launches >= 15 and not unpinned, (launches, unpinned)


@pytest.mark.parametrize("shape", SHAPES)
def test_decode_and_prefill_launches_fit_ada(shape):
    """Every kernel of a layer's decode step (12, 16, 20, 32 sequences: 20 is a count Triton does not specialize
    as a multiple of 16) and prefill chunk (16, 32 tokens) compiles for sm_89 within a block's shared memory there
    (99 KB, against an H100's 227), and the decode kernels keep everything in registers (nvfp4_gemm.register_cap).
    Qwen3-30B-A3B's routing of 32 tokens took 128 KB in one tile: on Ada it ranks the pairs in chunks of 128."""
    records = report(shape, 89, [12, 16, 20, 32], context=192)
    kernels = {r.kernel for r in records}
    assert {"nvfp4_gemm_kernel", "paged_attention_kernel", "qk_norm_rope_cache_kernel", "rms_norm_kernel"} <= kernels
    if shape == "qwen3-30b-a3b":
        assert {"moe_routing_kernel", "moe_gemm_kernel", "sum_pairs_kernel"} <= kernels
        routing = {r.op: r.tiles["CHUNK"] for r in records if r.kernel == "moe_routing_kernel"}
        want = {"decode 12: moe": 0, "decode 16: moe": 0, "decode 20: moe": 128, "decode 32: moe": 128}
        assert routing == want, routing
    assert_fit(records, 89, ADA)


def test_launches_fit_ampere():
    """Ampere (sm_86: RTX 3090, A10) runs the Triton linears at every token count and a BF16 cache; its blocks
    have Ada's 99 KB. Qwen3-30B-A3B covers every kernel the dense models launch, and the MoE's."""
    records = report("qwen3-30b-a3b", 86, [1, 8, 16, 32], context=192)
    assert {"nvfp4_gemm_kernel", "moe_routing_kernel", "moe_gemm_kernel"} <= {r.kernel for r in records}
    assert {r.tiles.get("FP8_CACHE") for r in records if r.kernel == "paged_attention_kernel"} == {False}
    assert_fit(records, 86, GPUS[86]["RTX 3090"])


@pytest.mark.parametrize("arch", [89, 90])
def test_short_bound_decode_attention_fits_wide_heads(arch):
    """The engine's decode attention under the short bound at 128 and 256 dims (Qwen3 / Gemma3-4B and 12B), with
    one and two programs an SM: its default tiles compile without spills and fit a block."""
    from kernel_cases import build_paged_case

    from adallm_core.ops.triton import qk_norm_rope_attention

    sm = next(iter(GPUS[arch].values()))
    with compiled_for(arch) as (records, set_op):
        for d in (128, 256):
            for batch in (16, 32):  # 8 KV heads: 128 and 256 programs
                set_op(f"decode {batch}: attention, {d} dims")
                _, kc, vc, meta = build_paged_case("cpu", [1] * batch, [300] * batch, 16, 8, d, 16, True)
                pos = meta.seq_lens.long() - 1
                slots = meta.block_tables.long()[:, 0] * 16 + pos % 16
                qkv = torch.zeros(batch, 32 * d, dtype=torch.bfloat16)
                w, cos_sin = torch.zeros(d, dtype=torch.bfloat16), torch.zeros(400, d, dtype=torch.bfloat16)
                qk_norm_rope_attention(qkv, w, w, 1e-6, 0.0, pos, cos_sin, kc, vc, slots, 1.0, 1.0, 16, 8, meta,
                                       d**-0.5, None)
    want = {f"decode {b}: attention, {d} dims": n for b, d, n in ((16, 128, 256), (32, 128, 128), (16, 256, 128),
                                                                   (32, 256, 128))}
    tiles = {r.op: r.tiles["BLOCK_N"] for r in records}  # a launch of an already compiled specialization: no record
    assert len(tiles) >= 3 and all(want[op] == n for op, n in tiles.items()), records
    assert_fit(records, arch, sm)


@pytest.mark.parametrize("arch", [89, 86])
def test_wide_head_prefill_attention_fits_in_registers(arch):
    """Gemma3-12B's 256-dim prefill attention on mma.sync GPUs takes paged_attention.WIDE_PREFILL_TILES, which
    compile without spills; the default tiles spilled there."""
    from adallm_core.ops.triton.paged_attention import WIDE_PREFILL_TILES

    records = [r for r in report("gemma3-12b", arch, [32], context=192)
               if r.kernel == "paged_attention_kernel" and r.op.startswith("prefill")]
    assert records, "no prefill attention launch was compiled"
    for r in records:
        assert (r.tiles["BLOCK_N"], r.num_warps, r.num_stages) == tuple(WIDE_PREFILL_TILES.values()), r
        assert r.spilled == 0, r
    assert_fit(records, arch, next(iter(GPUS[arch].values())))


def assert_fit(records, arch: int, sm: dict) -> None:
    for r in records:
        assert r.arch == arch and r.shared <= sm["block_smem"] and r.blocks_per_sm(sm) >= 1, r
        assert r.fp_fusion, f"{r.kernel} launched without enable_fp_fusion=True: {r}"
        if r.op.startswith("decode"):
            assert r.spilled == 0, r


@pytest.mark.parametrize("m", [12, 16])
def test_resident_programs_match_the_compiled_decode_tiles_on_ada(m):
    """nvfp4_gemm.resident_programs, which sizes the 9-16-token splits, against the blocks an Ada SM holds by the
    compiled kernels' own registers and shared memory: 32-row tiles (Qwen3-8B) and 64-row ones (Gemma3-27B's
    gate|up), plain and with the gated epilogue. Shared memory binds there: 3 and 2 blocks an SM."""
    from adallm_core.ops.triton import nvfp4_gemm

    cpu = torch.device("cpu")
    with compiled_for(89) as (records, set_op):
        for name, (n, k) in {"qkv": (6144, 4096), "gate_up": (24576, 4096), "gemma gate_up": (43008, 5376)}.items():
            set_op(name)
            w = StepInputs._linear(n, k)
            x = torch.zeros(m, k, dtype=torch.bfloat16)
            if "gate_up" in name:
                nvfp4_gemm.nvfp4_linear(x, w, activation="silu")
            else:
                nvfp4_gemm.nvfp4_linear(x, w)
        estimates = [nvfp4_gemm.resident_programs(r.tiles["BLOCK_M"], r.tiles["BLOCK_N"], r.tiles["BLOCK_K"],
                                                  r.num_stages, r.num_warps, cpu) for r in records]
    assert [r.tiles["BLOCK_N"] for r in records] == [32, 32, 64]
    assert estimates == [r.blocks_per_sm(ADA) for r in records] == [3, 3, 2], records


def test_routing_shared_memory_estimate_bounds_the_compiled_kernel():
    """moe_routing.chunk_for sizes the routing kernel's shared memory as a [pairs or chunk, experts] int32 tile:
    never below what the compiled kernel takes (sm_90, where every size up to MAX_PAIRS fits whole), equal where
    the tile is large; chunks of 128 and 16 pairs take their share."""
    from adallm_core.ops.triton.moe_routing import route_and_sort

    cases = [(t, e, 0) for e in (8, 128) for t in (1, 4, 16, 32)] + [(32, 128, 128), (32, 128, 16)]
    with compiled_for(89):  # first for another GPU in the same process: each compiles for its own
        route_and_sort(torch.zeros(1, 8, dtype=torch.bfloat16), 8, True, 16)
    with compiled_for(90) as (records, _):
        for t, e, chunk in cases:
            route_and_sort(torch.zeros(t, e, dtype=torch.bfloat16), 8, True, 16, chunk=chunk)
    assert len(records) == len(cases) and {r.arch for r in records} == {90}
    for (t, e, chunk), r in zip(cases, records):
        tile = (chunk or triton.next_power_of_2(t * 8)) * triton.next_power_of_2(e) * 4
        assert r.tiles["CHUNK"] == chunk and r.shared <= tile, (t, e, r)
        if e == 128 and (chunk or t * 8) >= 32:
            assert r.shared == tile, (t, e, r)


def test_ada_ranks_the_pairs_in_chunks_its_block_holds():
    """Whole up to 16 tokens at top 8 of 128 experts, 128 pairs at a time from 17: on Ada, whose block holds no
    more, and on an H100 (the figures off the GPU), where the 128 KB tile was slower than chunks. Fewer experts
    take more pairs whole."""
    from adallm_core.ops.triton.moe_routing import chunk_for, fits

    cpu = torch.device("cpu")
    with compiled_for(89):
        assert [chunk_for(p, 128, cpu) for p in (8, 128, 136, 256)] == [0, 0, 128, 128]
        assert fits(256, 128, cpu) and not fits(264, 128, cpu)
    assert [chunk_for(p, 128, cpu) for p in (8, 128, 136, 256)] == [0, 0, 128, 128] and fits(256, 128, cpu)
    assert [chunk_for(p, 64, cpu) for p in (256, 512)] == [0, 256]


@pytest.mark.parametrize("arch", [89, 90])
def test_prefill_fp8_launches_compile_without_spills(arch):
    """prefill_fp8's two Triton launches (the E4M3 weight slab with its row powers of two, the per-token E4M3
    activations) compile for Ada and Hopper, whose FP8 conversions they use; the GEMM is cuBLAS's."""
    from adallm_core.ops.triton import nvfp4_prefill, quant

    w = StepInputs._linear(6144, 4096)
    with compiled_for(arch) as (records, set_op):
        set_op("prefill_fp8 slab")
        nvfp4_prefill.dequantize_rows(w, 0, 256, torch.empty(256, 4096, dtype=torch.float8_e4m3fn),
                                      row_mul=torch.ones(256))
        set_op("prefill_fp8 activations")
        quant.per_token_fp8(torch.zeros(300, 4096, dtype=torch.bfloat16))
    assert sorted(r.kernel for r in records) == ["dequant_rows_kernel", "per_token_fp8_kernel"]
    assert_fit(records, arch, next(iter(GPUS[arch].values())))
    assert all(r.spilled == 0 for r in records), records
