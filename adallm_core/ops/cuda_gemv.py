"""NVFP4 decode linear in CUDA C++ (csrc/nvfp4_gemv.cu), built as a torch extension on first use, cached.

The op (ops/triton/nvfp4_prefill.nvfp4_linear) sends it decode steps of at most DECODE_TOKENS tokens on tile-major
weights (nvfp4.to_tile_major, what the engine holds for linears of whole 16 x 128 chunks); the Triton decode kernel
takes everything else. Measured (benchmarks/NOTES.md; H100 2026-11-28, H200 2026-12-03): with no split-K round trip
and each warp copy 512 contiguous bytes it beats the Triton kernel on every linear of Qwen3-8B and Gemma3-27B at 1-8
tokens (Qwen3-8B batch 8 on the H200: 2,171 -> 2,268 tok/s with the bound moved from 4 to 8 tokens).

Where nvcc or a host compiler is missing, `load()` logs why once and returns None, and the Triton kernel takes
every M (same results: both are exact). ADALLM_DISABLE_CUDA_GEMV=1 turns it off.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path

import torch

from adallm_core.nvfp4 import to_kernel_order
from adallm_core.ops import pdl
from adallm_core.ops.triton.activation import EPILOGUE_CODES

logger = logging.getLogger(__name__)

MAX_M = 8  # the kernel's one MMA token tile (a second one, for 9-16 tokens, lost to the Triton kernel: NOTES.md)
DECODE_TOKENS = 8  # the op's bound: every linear of Qwen3-8B and Gemma3-27B is faster here up to 8 tokens
K_TILE = 128
_PACKAGE = Path(__file__).resolve().parents[1]
# a wheel carries csrc/ inside the package (pyproject.toml); a source checkout or editable install has it beside it
_IN_WHEEL = _PACKAGE / "csrc" / "nvfp4_gemv.cu"
SOURCE = _IN_WHEEL if _IN_WHEEL.exists() else _PACKAGE.parent / "csrc" / "nvfp4_gemv.cu"
ARCHS = "8.9;9.0+PTX"  # Ada (the product), Hopper (the test machine), PTX for GPUs after them
MIN_CAPABILITY = (8, 9)  # before Ada (Ampere) the Triton kernel runs every M
EXTENSION = "adallm_nvfp4_gemv_v6"
STALE_LOCK_S = 900  # a build takes about a minute on 16 cores, a few on 2
VARIANTS = 4  # 0 = the default; csrc names the rest
FOUR_ROW_TILES = 3  # 64 rows a block, 8 warps
WIDE_FOUR_FROM = 4  # tokens from which wide linears take four row tiles too (pick_variant)

_BINDING = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
extern "C" int adallm_nvfp4_gemv_init();
extern "C" int adallm_nvfp4_gemv_fits(int M, int variant);
extern "C" int adallm_nvfp4_gemv(const void* x, const void* w, const void* s, const float* g, void* out, int M,
                                 int N, int K, long stride_xm, long stride_om, int variant, int act, int pdl,
                                 cudaStream_t stream);
int64_t init() { return adallm_nvfp4_gemv_init(); }
bool fits(int64_t m, int64_t variant) { return adallm_nvfp4_gemv_fits(m, variant); }
int64_t nvfp4_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor s, torch::Tensor g, torch::Tensor out,
                   int64_t variant, int64_t act, bool pdl) {
  return adallm_nvfp4_gemv(x.data_ptr(), w.data_ptr(), s.data_ptr(), g.data_ptr<float>(), out.data_ptr(),
                           x.size(0), g.size(0), x.size(1), x.stride(0), out.stride(0),
                           static_cast<int>(variant), static_cast<int>(act), pdl, at::cuda::getCurrentCUDAStream());
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("init", &init);
  m.def("fits", &fits);
  m.def("nvfp4_gemv", &nvfp4_gemv);
}
"""

_module = None
_error: str | None = None
_device: int | None = None  # the GPU the kernels were set up and smoke-tested on


def load():
    """The compiled extension, or None (reason logged once) when it cannot be built, set up or run here."""
    global _module, _error, _device
    if _module is not None or _error is not None:
        return _module
    if os.environ.get("ADALLM_DISABLE_CUDA_GEMV") == "1":
        _error = "ADALLM_DISABLE_CUDA_GEMV=1"
    elif torch.cuda.is_available() and (cap := torch.cuda.get_device_capability()) < MIN_CAPABILITY:
        _error = f"built for sm_89 and sm_90, this GPU is sm_{cap[0]}{cap[1]}"
    else:
        try:
            module = _build()
            rc = module.init()  # shared-memory limits raised now, before any CUDA-graph capture
            if rc:
                raise RuntimeError(f"setting the kernels' shared-memory limit failed (code {rc})")
            _smoke_test(module)
            _module, _device = module, torch.cuda.current_device()
        except Exception as exc:  # no nvcc / compiler / CUDA headers / kernel image for this GPU: say why
            _error = f"{type(exc).__name__}: {str(exc)[-500:]}"
    if _error is not None:
        logger.warning("CUDA NVFP4 decode kernel unavailable, the Triton one runs every M: %s", _error)
    return _module


def build_directory() -> Path:
    """Torch's extension cache (TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions), one folder per torch and Python."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / f"adallm_torch{torch.__version__}_py{sys.version_info[0]}{sys.version_info[1]}" / EXTENSION


def clear_stale_lock(folder: Path) -> None:
    """Torch serializes builds with a lock file and waits for it forever: a build killed midway (Ctrl-C during the
    first start) would hang every later start. A lock older than any build is removed; a fresh one is named."""
    lock = folder / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        logger.warning("removing %s, left %.0f s ago by a CUDA kernel build that did not finish", lock, age)
        lock.unlink(missing_ok=True)
    else:
        logger.warning("waiting for another process's build of the CUDA decode kernel (lock %s; if no build is "
                       "running, delete it)", lock)


def _build():
    from torch.utils.cpp_extension import load_inline

    folder = build_directory()
    folder.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(folder)
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = ARCHS  # this kernel's targets, whatever the process asked for
    try:
        return load_inline(name=EXTENSION, cpp_sources=_BINDING, cuda_sources=SOURCE.read_text(),
                           extra_cuda_cflags=["-O3", "-std=c++17"], build_directory=str(folder), verbose=False)
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def _smoke_test(module) -> None:
    """One launch on this GPU: a build without a kernel image for it fails here, not in the first decode step."""
    dev = torch.device("cuda", torch.cuda.current_device())
    x = torch.ones(1, K_TILE, dtype=torch.bfloat16, device=dev)
    ones = torch.full((16, K_TILE // 2), 0x22, dtype=torch.uint8)  # two E2M1 1.0 codes a byte; one tile
    words = to_kernel_order(ones).to(dev).view(torch.int32)
    scales = torch.full((16, K_TILE // 16), 0x38, dtype=torch.uint8, device=dev)  # E4M3 1.0
    out = torch.zeros(1, 16, dtype=torch.bfloat16, device=dev)
    rc = module.nvfp4_gemv(x, words, scales, torch.ones(16, device=dev), out, 0, 0, pdl.enabled(dev))
    torch.cuda.synchronize(dev)
    if rc or not torch.equal(out, torch.full_like(out, K_TILE)):
        raise RuntimeError(f"smoke test on {torch.cuda.get_device_name(dev)} failed (code {rc}, out {out[0, :4]})")


def supports(x: torch.Tensor, w, gated: bool = False) -> bool:
    """What the kernel can read: BF16 x of 1..8 rows of the weight's K, weights tile-major in the kernels' word
    order (nvfp4.to_tile_major: N % 16 == 0, K % 128 == 0), and 16-byte aligned rows for its cp.async copies;
    gated (a fused gate|up with its activation), whole 16-row tiles of gate and of up rows (N % 32 == 0).
    Anything else (a wrong K included) goes to the Triton kernel, whose argument checks name the problem."""
    return (w.tile_major and (not gated or w.out_features % 32 == 0)
            and x.is_cuda and x.dtype == torch.bfloat16 and 1 <= x.shape[0] <= MAX_M
            and x.shape[1] == w.in_features and x.shape[1] % K_TILE == 0
            and x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0
            and w.packed.is_contiguous() and w.packed.data_ptr() % 16 == 0
            and w.block_scale.is_contiguous() and w.block_scale.data_ptr() % 8 == 0
            and w.global_scale.dtype == torch.float32 and w.global_scale.is_contiguous())


def takes(x: torch.Tensor, w, gated: bool = False) -> bool:
    """The op's choice: this kernel for decode steps of few tokens on the GPU it was set up on (its shared-memory
    limits are raised per device)."""
    if not (x.shape[0] <= DECODE_TOKENS and supports(x, w, gated)):
        return False
    if _module is None and _error is None and torch.cuda.is_current_stream_capturing():
        return False  # set up (smoke launch, synchronize) only outside a capture: the engine does it at start-up
    return load() is not None and x.device.index == _device


@functools.cache
def fits(m: int, variant: int) -> bool:
    """Whether `variant`'s shared-memory stages for m tokens fit a block of this process's GPU (four row tiles of
    7-8 tokens need ~106 KB: not on Ada, 99 KB)."""
    return bool(load().fits(m, variant))


@functools.cache
def _sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pick_variant(m: int, n: int, device_index: int) -> int:
    """Two row tiles (32 rows) a block, unless that gives some SMs two blocks and others one (sms < blocks <= 2 sms),
    or the linear is wide (blocks > 2 sms) and the step has WIDE_FOUR_FROM tokens or more: then four, where their
    stages fit the GPU's shared memory. Measured on the H100 (NOTES.md): Gemma3-27B's down (168 blocks of 32 rows)
    35.7 -> 33.4 us at one token and 39.5 -> 35.4 at four; Qwen3-8B's qkv (192) 12.7 -> 11.8 at four tokens, 10.7 ->
    11.1 at one. H200, 8 tokens: Gemma3-27B's qkv 14.9 -> 13.0, o 11.8 -> 10.1, down 38.9 -> 36.0. Wide gate_up on
    the H200: four row tiles from 4 tokens (8 tokens: Qwen3-8B 28.8 -> 25.7 us, Gemma3-27B 59.2 -> 51.3), two below
    (Gemma3-27B at 3 tokens 45.4 vs 48.0)."""
    blocks, sms = -(-n // 32), _sms(device_index)
    uneven = sms < blocks <= 2 * sms
    wide = blocks > 2 * sms and m >= WIDE_FOUR_FROM
    return FOUR_ROW_TILES if (uneven or wide) and fits(m, FOUR_ROW_TILES) else 0


def nvfp4_gemv(x: torch.Tensor, w, module=None, variant: int | None = None, out: torch.Tensor | None = None,
               activation: str | None = None) -> torch.Tensor:
    """x [M <= 8, K] bf16 @ W.T -> [M, N] bf16 (caller checked supports()). variant: see csrc; None = pick_variant.
    out: a contiguous [M, N] bf16 tensor to write (tests poison it), else a new one. activation ('silu' |
    'gelu_tanh'): W is a fused gate|up and the result act(x @ gate.T) * (x @ up.T) [M, N / 2] (even-ROWS variants)."""
    module = module or load()
    if variant is None:
        variant = pick_variant(x.shape[0], w.out_features, x.device.index)
    act = EPILOGUE_CODES[activation]
    if out is None:
        out = torch.empty(x.shape[0], w.out_features // 2 if act else w.out_features, dtype=x.dtype, device=x.device)
    rc = module.nvfp4_gemv(x, w.packed.view(torch.int32), w.block_scale.view(torch.uint8), w.global_scale, out,
                           variant, act, pdl.enabled(x.device, x.shape[0]))
    if rc:
        raise RuntimeError(f"adallm nvfp4_gemv: launch failed (code {rc}: 1 bad arguments, 2 CUDA error, 3 more "
                           f"shared memory than this GPU allows a block) for x {tuple(x.shape)}, "
                           f"W [{w.out_features}, {w.in_features}], variant {variant}, activation {activation})")
    return out
