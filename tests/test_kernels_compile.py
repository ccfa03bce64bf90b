"""CI (no GPU): the Triton kernels compile ahead of time for GPUs this machine does not have.

Ampere (sm_80, sm_86) runs the exact BF16-compute path with a BF16 KV cache: Triton has no E4M3 type there, so the
kernels read the block scales as bytes (nvfp4_gemm.block_scales) and the scale pointer is uint8. triton.compile
with a GPU target runs Triton's whole pipeline and ptxas without a device; a kernel that still needed FP8 on these
GPUs would fail here, as the last test shows for an FP8 scale pointer.
"""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

FLOATS = {"sm_scale", "k_scale", "v_scale", "eps", "offset", "norm_offset", "inv_k", "inv_v"}


def compile_for(fn, capability: int, pointers: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 2):
    """fn's arguments: `pointers` by name ('*bf16', ...), `constexprs` by value, FLOATS fp32, everything else i32."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = pointers.get(name, "fp32" if name in FLOATS else "i32")
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True))


def linear_case(scale_type: str, **tiles):
    from adallm_core.ops.triton.nvfp4_gemm import nvfp4_gemm_kernel

    pointers = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr=scale_type, g_ptr="*fp32", out_ptr="*bf16", part_ptr="*fp32",
                    lock_ptr="*i32")
    constexprs = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=512, SPLIT_K=2, MATH=3, EVEN_K=True, SWAP_AB=False,
                      KERNEL_ORDER=True, TILE_MAJOR=True, PDL=False, GATED=0)
    constexprs.update(tiles)
    return nvfp4_gemm_kernel, pointers, constexprs


def moe_case():
    from adallm_core.ops.triton.moe_nvfp4 import moe_gemm_kernel

    pointers = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*u8", g_ptr="*fp32", out_ptr="*bf16", pairs_ptr="*i32",
                    block_expert_ptr="*i32", route_w_ptr="*fp32")
    constexprs = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GATHER=True, WEIGHTED=False, MATH=3, KERNEL_ORDER=True,
                      PDL=False, GATED=1, SWAP_AB=True)
    return moe_gemm_kernel, pointers, constexprs


def dequant_rows_case():
    from adallm_core.ops.triton.nvfp4_prefill import dequant_rows_kernel

    return (dequant_rows_kernel, dict(w_ptr="*i32", s_ptr="*u8", out_ptr="*bf16", row_mul_ptr="*fp32"),
            dict(BLOCK_N=32, BLOCK_K=256, KERNEL_ORDER=True, TILE_MAJOR=True, ROW_MUL=False))  # E4M3 slabs: Ada on


def attention_case(qk_norm: bool = False):
    from adallm_core.ops.triton.paged_attention import paged_attention_kernel

    pointers = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", out_ptr="*bf16", part_o_ptr="*fp32",
                    part_lse_ptr="*fp32", qsl_ptr="*i32", seq_lens_ptr="*i32", bt_ptr="*i32", qw_ptr="*bf16",
                    kw_ptr="*bf16", pos_ptr="*i64", cs_ptr="*fp32", slot_ptr="*i64")
    constexprs = dict(G=4, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_M=16, BLOCK_N=64, NUM_SPLITS=4,
                      USE_WINDOW=True, F32_DOT=False, FP8_CACHE=False, QK_NORM=qk_norm, PDL=False)
    return paged_attention_kernel, pointers, constexprs


def qk_norm_rope_case():
    from adallm_core.ops.triton.qk_norm_rope import qk_norm_rope_cache_kernel

    pointers = dict(qkv_ptr="*bf16", qw_ptr="*bf16", kw_ptr="*bf16", pos_ptr="*i64", cs_ptr="*fp32",
                    q_out_ptr="*bf16", kc_ptr="*bf16", vc_ptr="*bf16", slot_ptr="*i64")
    return qk_norm_rope_cache_kernel, pointers, dict(HALF=64, BLOCK_HQ=32, BLOCK_HK=8, FP8=False, PDL=False)


def small_ops_cases():
    from adallm_core.ops.triton.activation import act_and_mul_kernel
    from adallm_core.ops.triton.moe_routing import moe_routing_kernel
    from adallm_core.ops.triton.rmsnorm import rms_norm_kernel

    yield rms_norm_kernel, dict(x_ptr="*bf16", r_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", sum_ptr="*bf16"), dict(
        BLOCK=4096, ADD=True, PDL=False)
    yield act_and_mul_kernel, dict(x_ptr="*bf16", out_ptr="*bf16"), dict(BLOCK=1024, GELU=True, PDL=False)
    routing_pointers = dict(logits_ptr="*bf16", experts_ptr="*i32", weights_ptr="*fp32", pairs_ptr="*i32",
                            block_expert_ptr="*i32")
    for chunk in (0, 4):  # the whole tile; chunks, as where a block has too little shared memory (sm_86 as Ada)
        yield moe_routing_kernel, routing_pointers, dict(TOP_K=8, RENORMALIZE=True, BLOCK_M=16, T2=2, E2=128, P2=8,
                                                         S2=128, NB2=8, CHUNK=chunk, PDL=False)


CASES = {
    "linear_decode": lambda: linear_case("*u8"),  # split-K
    "linear_decode_swap_ab": lambda: linear_case("*u8", SWAP_AB=True),  # 1-16 tokens (pick_config)
    "linear_tiles": lambda: linear_case("*u8", BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, SWAP_AB=True),
    "linear_decode_gated": lambda: linear_case("*u8", GATED=1),  # SiLU in the epilogue
    "linear_tiles_gated": lambda: linear_case("*u8", BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, SWAP_AB=True,
                                              GATED=2),
    "linear_checkpoint_order": lambda: linear_case("*u8", MATH=0, KERNEL_ORDER=False, TILE_MAJOR=False, BLOCK_K=256),
    "moe": moe_case,
    "prefill_dequant": dequant_rows_case,
    "attention_bf16_cache": attention_case,
    "qk_norm_rope_attention_bf16_cache": lambda: attention_case(qk_norm=True),
    "qk_norm_rope_bf16_cache": qk_norm_rope_case,
}


@pytest.mark.parametrize("capability", [80, 86])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_compiles_for_ampere(case, capability):
    fn, pointers, constexprs = CASES[case]()
    kernel = compile_for(fn, capability, pointers, constexprs)
    assert kernel.asm["cubin"], case


def test_small_ops_compile_for_ampere():
    """RMSNorm + residual, gated activation and MoE routing: nothing in them needs Ada."""
    for fn, pointers, constexprs in small_ops_cases():
        assert compile_for(fn, 86, pointers, constexprs).asm["cubin"], fn.__name__


def test_pdl_forms_compile_for_hopper():
    """Every decode kernel's programmatic-dependent-launch form (PDL=True: Hopper only, ops/pdl.py), with the grid
    dependency wait in it: the interpreter and Ada never run those lines, so this is where a broken one shows
    without a GPU."""
    forms = [form for form in (CASES[name]() for name in sorted(CASES)) if "PDL" in form[2]] + list(small_ops_cases())
    assert len(forms) >= 12
    for fn, pointers, constexprs in forms:
        kernel = compile_for(fn, 90, pointers, dict(constexprs, PDL=True))
        assert "griddepcontrol.wait" in kernel.asm["ptx"], fn.__name__


def _sass(cubin: bytes, tmp_path) -> str:
    """Triton's own nvdisasm (bundled with its wheel) on a cubin."""
    import subprocess
    from pathlib import Path

    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    return subprocess.run([str(nvdisasm), "-c", str(path)], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("n, k", [(24576, 4096), (43008, 5376)])  # Qwen3-8B's and Gemma3-27B's gate|up: 32, 64 rows
def test_decode_tiles_stay_on_mma_sync_on_hopper(gated, n, k, tmp_path):
    """The 9-16-token tiles pick_config gives (the swapped ones: weights as the MMA's A operand) must compile to
    mma.sync on Hopper, as on Ada: as 64 rows on four warps Triton lowers that dot to wgmma, which sends the
    dequantized tile through shared memory (1.6x slower at 16 tokens, benchmarks/NOTES.md session 25)."""
    import torch

    from adallm_core.ops.triton.nvfp4_gemm import pick_config

    cfg = pick_config(16, n, k, torch.device("cpu"))
    assert cfg.get("SWAP_AB"), cfg
    tiles = {name: cfg[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K")}
    fn, pointers, constexprs = linear_case("*fp8e4nv", SWAP_AB=True, GATED=int(gated), **tiles)
    kernel = compile_for(fn, 90, pointers, constexprs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    sass = _sass(kernel.asm["cubin"], tmp_path)
    assert "HMMA" in sass and "HGMMA" not in sass, cfg


# (N, K) of Qwen3-8B's, Gemma3-27B's and Qwen3-30B-A3B's decode linears, and K shorter than one K tile
DECODE_SHAPES = [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288), (8192, 5376), (5376, 4096),
                 (43008, 5376), (5376, 21504), (5120, 2048), (2048, 4096), (32, 208)]


@pytest.mark.parametrize("m", [9, 12, 16])
def test_decode_splits_fill_the_sms_without_empty_splits(m):
    """From 9 tokens pick_config splits K until the programs fill what the SMs hold at once (on an H100's figures
    off the GPU): never past that, no split without a K tile. Gemma3-27B's o and down get 6 splits, 1,008 programs
    of the 1,056 the SMs hold (4 made 672, which piled up under PDL: benchmarks/NOTES.md, session 27)."""
    import torch

    from adallm_core.ops.triton.nvfp4_gemm import pick_config, resident_programs

    cpu = torch.device("cpu")
    for n, k in DECODE_SHAPES:
        cfg = pick_config(m, n, k, cpu)
        split, k_tiles = cfg["SPLIT_K"], max(1, k // cfg["BLOCK_K"])
        programs = triton.cdiv(n, cfg["BLOCK_N"]) * split
        held = resident_programs(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_stages"], cfg["num_warps"],
                                 cpu) * 132
        assert programs <= held and triton.cdiv(k_tiles, split) * (split - 1) < k_tiles, (n, k, cfg)
    for n, k in [(5376, 4096), (5376, 21504)]:
        assert pick_config(m, n, k, cpu)["SPLIT_K"] == 6


@pytest.mark.parametrize("m", [17, 32, 64, 255])
def test_splits_from_17_tokens_keep_the_one_wave_rule(m):
    """The filling rule is for the 9-16-token tiles only (measured there): from 17 tokens K splits double until the
    programs make one wave of the SMs, or a split would have fewer than two K tiles."""
    import torch

    from adallm_core.ops.triton.nvfp4_gemm import pick_config

    for n, k in DECODE_SHAPES:
        cfg = pick_config(m, n, k, torch.device("cpu"))
        split, tiles = cfg["SPLIT_K"], triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(m, cfg["BLOCK_M"])
        assert split & (split - 1) == 0, (n, k, cfg)
        assert split == 1 or tiles * split // 2 < 132, (n, k, cfg)  # one doubling fewer was short of a wave
        assert tiles * split >= 132 or k // (cfg["BLOCK_K"] * split * 2) < 2, (n, k, cfg)


def test_fp8_scales_need_ada():
    """What the byte view avoids: an E4M3 scale pointer does not compile for sm_86, and does for sm_89."""
    fn, pointers, constexprs = linear_case("*fp8e4nv")
    with pytest.raises(Exception, match="fp8e4nv"):
        compile_for(fn, 86, pointers, constexprs)
    assert compile_for(fn, 89, pointers, constexprs).asm["cubin"]


def test_what_a_gpu_before_ada_gets(monkeypatch):
    """On an sm_86 card (faked: no such GPU here) the Triton backend starts, the kernels get the scales as bytes, the
    CUDA decode kernel stays out with its reason, and an FP8 KV cache is refused by name; Ada gets FP8 scales."""
    import torch

    from adallm_core import runner
    from adallm_core.nvfp4 import NVFP4Weight
    from adallm_core.ops import cuda_gemv
    from adallm_core.ops.triton import check_device, nvfp4_gemm

    capability = [(8, 6)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    monkeypatch.setattr(nvfp4_gemm, "_capability", nvfp4_gemm._capability.__wrapped__)  # no cached answers
    monkeypatch.setattr(cuda_gemv, "_module", None)
    monkeypatch.setattr(cuda_gemv, "_error", None)
    gpu = torch.device("cuda", 0)
    check_device(gpu)  # the kernels' own minimum is Ampere
    assert cuda_gemv.load() is None and "built for sm_89 and sm_90, this GPU is sm_86" in cuda_gemv._error
    w = NVFP4Weight(torch.zeros(16, 64, dtype=torch.uint8), torch.zeros(16, 8).to(torch.float8_e4m3fn), torch.ones(16))
    assert nvfp4_gemm.block_scales(w, gpu).dtype == torch.uint8
    assert nvfp4_gemm.register_cap(gpu) == {}  # ptxas chooses, as everywhere but Ada
    with pytest.raises(ValueError, match=r"kv_cache_dtype 'fp8' needs compute capability >= 8.9.*RTX 3090 is 8\.6.*"
                                         r"--kv-cache-dtype bf16"):
        runner._check_fp8_kv(gpu)
    capability[0] = (8, 9)
    runner._check_fp8_kv(gpu)
    assert nvfp4_gemm.block_scales(w, gpu).dtype == torch.float8_e4m3fn
    assert nvfp4_gemm.register_cap(gpu) == {"maxnreg": nvfp4_gemm.ADA_REGISTER_CAP}
    capability[0] = (7, 5)
    with pytest.raises(ValueError, match="needs compute capability >= 8.0"):
        check_device(gpu)
