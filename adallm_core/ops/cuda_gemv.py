"""NVFP4 decode linear in CUDA C++ (csrc/nvfp4_gemv.cu), built as a torch extension on first use, cached.

Not in the op table: measured on the H100 beside the Triton decode kernel (benchmarks/NOTES.md), it is faster only
on Qwen3-8B's o (8.4 vs 10.1 us at M=1), even on qkv and down, slower on gate_up (37.4 vs 33.0) and at 9..16 tokens:
1.3% of a decode step does not pay for a second implementation and a compiler at first use. It stays, tested on the
GPU and timed by `python -m benchmarks.kernels --sections cuda_variants`, as the base of the next step (a cp.async
pipeline).

It takes x [M <= 16, K] (K a multiple of 128) on the checkpoint's own packed layout, with no repacking: the kernel
pairs x's columns the way its dequantization pairs the codes.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MAX_M = 16
K_TILE = 128
SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "nvfp4_gemv.cu"
ARCHS = "8.9;9.0"  # Ada (the product) and Hopper (the test machine)

_BINDING = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
extern "C" int adallm_nvfp4_gemv(const void* x, const void* w, const void* s, const float* g, void* out, int M,
                                 int N, int K, long stride_xm, long stride_om, int variant, cudaStream_t stream);
void nvfp4_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor s, torch::Tensor g, torch::Tensor out,
                int64_t variant) {
  const int rc = adallm_nvfp4_gemv(x.data_ptr(), w.data_ptr(), s.data_ptr(), g.data_ptr<float>(), out.data_ptr(),
                                   x.size(0), out.size(1), x.size(1), x.stride(0), out.stride(0),
                                   static_cast<int>(variant), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(rc == 0, "adallm nvfp4_gemv: launch failed (code ", rc, ")");
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("nvfp4_gemv", &nvfp4_gemv); }
"""

_module = None
_error: str | None = None


def load():
    """The compiled extension, or None (reason logged once) when it cannot be built here."""
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    if os.environ.get("ADALLM_DISABLE_CUDA_GEMV") == "1":
        _error = "ADALLM_DISABLE_CUDA_GEMV=1"
    else:
        try:
            from torch.utils.cpp_extension import load_inline

            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ARCHS)
            _module = load_inline(
                name="adallm_nvfp4_gemv", cpp_sources=_BINDING, cuda_sources=SOURCE.read_text(),
                extra_cuda_cflags=["-O3", "-std=c++17"], verbose=False)
        except Exception as exc:  # no nvcc / compiler / CUDA headers: say why
            _error = f"{type(exc).__name__}: {str(exc)[-500:]}"
    if _error is not None:
        logger.warning("CUDA NVFP4 decode kernel unavailable: %s", _error)
    return _module


def supports(x: torch.Tensor, w) -> bool:
    return (not w.kernel_order and x.is_cuda and x.dtype == torch.bfloat16 and 1 <= x.shape[0] <= MAX_M and x.shape[1] % K_TILE == 0
            and x.stride(1) == 1 and w.packed.is_contiguous() and w.block_scale.is_contiguous()
            and w.global_scale.dtype == torch.float32 and w.global_scale.is_contiguous())


def nvfp4_gemv(x: torch.Tensor, w, module=None, variant: int = 0) -> torch.Tensor:
    """x [M <= 16, K] bf16 @ W.T -> [M, N] bf16 (caller checked supports()). variant: see csrc (sweeps only)."""
    module = module or load()
    out = torch.empty(x.shape[0], w.out_features, dtype=x.dtype, device=x.device)
    module.nvfp4_gemv(x, w.packed.view(torch.int32), w.block_scale.view(torch.uint8), w.global_scale, out, variant)
    return out
