"""Programmatic dependent launch (PDL) for the decode kernels on Hopper and later GPUs.

A kernel launched with PDL may start while the kernel before it in the stream is still running: its blocks are
scheduled as the earlier kernel's blocks finish, set up, and wait in `griddepcontrol.wait` until that kernel has
completed and its writes are visible. That hides the launch and ramp-up every decode kernel otherwise pays
(benchmarks/NOTES.md: a fixed ~4.5 us a linear beyond its bytes), and the CUDA decode linear streams its first
weight chunks (constants, never written by a kernel) before it waits.

The rule every PDL kernel here keeps: every program executes the wait before it reads anything an earlier kernel
may write and before it writes anything. (The CUDA linear's early weight reads rely on weights being written once,
at load, long before any decode kernel runs.) Then each kernel completes only after its predecessor has, so completion
stays in stream order and a kernel launched without PDL (cuBLAS, torch) sees everything before it as usual.

Only steps of at most MAX_TOKENS tokens launch so. Measured on the H200 (benchmarks/NOTES.md, decode ms a step,
without -> with PDL on every kernel): Qwen3-8B batch 1 2.72 -> 2.51, batch 4 2.83 -> 2.65, batch 32 4.65 -> 4.95;
Gemma3-27B batch 1 7.94 -> 7.38. Steps of 5-8 tokens lost on Gemma3-27B (8.98 -> 9.54 ms at batch 8) until the CUDA
linear's one-wave grids took one block an SM under PDL (csrc/nvfp4_gemv.cu): a grid placed while the kernel before
it still runs had piled two or three blocks onto the SMs that freed first. Steps of 9-16 tokens run the Triton
linear, whose blocks cannot be spread so; they gain once its grids fill the SMs' resident limit, leaving no room to
pile up (ops/triton/nvfp4_gemm.pick_config): batch 16, Qwen3-8B 3.12 -> 2.99 ms, Gemma3-27B 9.20 -> 8.74 (where
PDL alone had taken Gemma3-27B 9.31 -> 9.61, its down piling up after gate|up, +7.4 us a layer).

The MoE's grouped kernels keep PDL to MOE_MAX_TOKENS: above it they lost (Qwen3-30B-A3B batch 16 7.62 -> 7.80 ms
with them, 7.65 without). In steps of at most 8 tokens the gate|up linear fuses its activation only on the CUDA
kernel (ops/triton/nvfp4_prefill.py nvfp4_gated_linear; the MoE keeps its activation kernel): down, a Triton
kernel of two waves right after a Triton gate|up, would pile up as above.

Ada (sm_89), the product's target, has no PDL: there the same kernels compile without the wait and launch as
before. ADALLM_DISABLE_PDL=1 turns it off everywhere (A/B runs, debugging).
"""
from __future__ import annotations

import functools
import os

import torch

MIN_CAPABILITY = (9, 0)
MAX_TOKENS = 16
MOE_MAX_TOKENS = 8


def supports(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability can launch with PDL here: 9.0 or later, and a Triton that has the
    grid-dependency ops."""
    return capability >= MIN_CAPABILITY and _triton_supports()


@functools.cache
def _device_supports(index: int) -> bool:
    return supports(torch.cuda.get_device_capability(index))


@functools.cache
def _triton_supports() -> bool:
    """Triton's grid-dependency ops and `launch_pdl` (Triton 3.4 and later)."""
    try:
        from triton.language.extra import cuda
    except ImportError:
        return False
    return hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents")


def enabled(device: torch.device, tokens: int = 1, max_tokens: int = MAX_TOKENS) -> bool:
    """Whether a kernel over `tokens` tokens on `device` launches with PDL: at most `max_tokens` of them, a CUDA
    device of compute capability >= 9.0, a Triton that has the grid-dependency ops, the Triton interpreter off, and
    ADALLM_DISABLE_PDL not set to 1."""
    if device.type != "cuda" or not allowed(tokens, max_tokens):
        return False
    return _device_supports(device.index if device.index is not None else torch.cuda.current_device())


def allowed(tokens: int, max_tokens: int = MAX_TOKENS) -> bool:
    """The rules that do not depend on the GPU: at most `max_tokens` tokens, the Triton interpreter off and
    ADALLM_DISABLE_PDL not set to 1."""
    return (tokens <= max_tokens and os.environ.get("TRITON_INTERPRET") != "1"
            and os.environ.get("ADALLM_DISABLE_PDL") != "1")


def triton_args(device: torch.device, tokens: int, max_tokens: int = MAX_TOKENS) -> dict:
    """Keyword arguments for a Triton launch, over `tokens` tokens, of a kernel with a `PDL: tl.constexpr`."""
    if enabled(device, tokens, max_tokens):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
