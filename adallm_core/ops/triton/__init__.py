"""The 'triton' kernel backend: ops.select_ops('triton', device) takes the ops named in ops.OP_NAMES from here.

Each op is a thin wrapper that checks shapes and dtypes, then launches the kernel of one file:
  nvfp4_linear               nvfp4_prefill.py    M >= 256: weights dequantized once per slab, cuBLAS GEMM (exact)
                             nvfp4_gemm.py       exact BF16 compute; decode split-K stream, tiles up to M = 255
                             ../cuda_gemv.py     CUDA C++ (csrc/nvfp4_gemv.cu): decode steps of 1-8 tokens
  nvfp4_gated_linear         nvfp4_prefill.py    fused gate|up; the decode kernels apply SiLU/GELU in their epilogue
  nvfp4_linear_fp8, nvfp4_gated_linear_fp8        the two above under prefill_fp8 (select_ops):
                             nvfp4_prefill_fp8.py  M >= 256: E4M3 weight slabs and activations, FP8 GEMM (lossy)
  attention                  paged_attention.py  paged FP8/BF16 KV, GQA rows per KV head, split-K for long decode
  qk_norm_rope_attention     paged_attention.py  decode steps: q/k norm, RoPE, k/v store and attention, one launch
  kv_write                   kv_cache_write.py
  qk_norm_rope_cache         qk_norm_rope.py     per-head q/k norm + RoPE + k/v cache store, one launch
  rms_norm, add_rms_norm     rmsnorm.py
  rope                       rotary.py
  silu_and_mul, gelu_tanh_and_mul   activation.py
  moe                        moe_nvfp4.py        tokens sorted by expert, one grouped launch per GEMM
                             moe_routing.py      softmax + top-k + the sort in one launch (decode batches)
  embedding                  embedding.py        row gather; the table may sit in pinned host memory
  prepare_nvfp4_weight       nvfp4_gemm.py       at load: kernels' word order, tile-major (nvfp4.to_tile_major)
Not in the op table, for comparison: w4a8_gemm.py (FP8 tensor cores, per-token FP8 activations) and quant.py.
The decode kernels start with grid_dependency.wait_for_prior_kernel: on sm_90+ steps of up to 8 tokens launch with
programmatic dependent launch (../pdl.py).
Every launch passes enable_fp_fusion=True: fused multiply-adds are what the GPU measured and the tests checked, and
Triton 3.10 turns them off by default (3.9 warns of it at the first compile of a launch that leaves it unset).
"""
from __future__ import annotations

import torch

from adallm_core.ops import cuda_gemv
from adallm_core.ops.triton.activation import gelu_tanh_and_mul, silu_and_mul
from adallm_core.ops.triton.embedding import embedding
from adallm_core.ops.triton.kv_cache_write import kv_write
from adallm_core.ops.triton.moe_nvfp4 import moe
from adallm_core.ops.triton.nvfp4_gemm import prepare_nvfp4_weight
from adallm_core.ops.triton.nvfp4_prefill import nvfp4_gated_linear, nvfp4_linear
from adallm_core.ops.triton.nvfp4_prefill_fp8 import nvfp4_gated_linear_fp8, nvfp4_linear_fp8
from adallm_core.ops.triton.paged_attention import attention, qk_norm_rope_attention
from adallm_core.ops.triton.qk_norm_rope import qk_norm_rope_cache
from adallm_core.ops.triton.rmsnorm import add_rms_norm, rms_norm
from adallm_core.ops.triton.rotary import rope

MIN_CAPABILITY = (8, 0)  # Ampere: BF16 tensor cores. FP8 (the KV cache, hardware scale conversion) needs Ada, 8.9


def check_device(device) -> None:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"kernel_backend 'triton' needs a CUDA device, got {device}")
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        raise ValueError(
            f"kernel_backend 'triton' needs compute capability >= 8.0 (Ampere, Ada, Hopper) for BF16 tensor cores, "
            f"got {cap[0]}.{cap[1]} on {torch.cuda.get_device_name(device)}; use kernel_backend='reference'"
        )
    cuda_gemv.load()  # built (or found missing, and logged) at start-up, never inside a CUDA-graph capture


__all__ = [
    "nvfp4_linear", "nvfp4_gated_linear", "nvfp4_linear_fp8", "nvfp4_gated_linear_fp8", "attention", "kv_write",
    "qk_norm_rope_cache", "rms_norm", "add_rms_norm", "rope", "silu_and_mul", "gelu_tanh_and_mul", "moe", "embedding",
    "prepare_nvfp4_weight", "check_device",
]
