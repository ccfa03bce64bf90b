"""Gated activations: gate_up [T, 2I] (gate half, then up half) -> act(gate) * up [T, I], fp32 math."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from adallm_core.ops import pdl
from adallm_core.ops.triton.grid_dependency import wait_for_prior_kernel


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def act_mul(g, u, GELU: tl.constexpr):
    """act(gate) * up in fp32 (the fused gate|up linear's epilogue calls it too: nvfp4_gemm.py)."""
    if GELU:  # tanh approximation, as gelu_pytorch_tanh
        a = 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    else:
        a = g / (1.0 + tl.exp(-g))
    return a * u


@triton.jit
def act_and_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr, GELU: tl.constexpr,
                       PDL: tl.constexpr = False):
    wait_for_prior_kernel(PDL)
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < inter
    g = tl.load(x_ptr + t * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + t * stride_x + inter + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + offs, act_mul(g, u, GELU).to(out_ptr.dtype.element_ty), mask=ok)


def _act_and_mul(gate_up: torch.Tensor, gelu: bool) -> torch.Tensor:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"act_and_mul: gate_up must be [T, 2I] contiguous in the last dim, got {tuple(gate_up.shape)}")
    t, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty(t, inter, dtype=gate_up.dtype, device=gate_up.device)
    if t:
        block = min(1024, triton.next_power_of_2(inter))
        act_and_mul_kernel[(t, triton.cdiv(inter, block))](gate_up, out, inter, gate_up.stride(0), out.stride(0),
                                                           BLOCK=block, GELU=gelu, num_warps=4, enable_fp_fusion=True,
                                                           **pdl.triton_args(gate_up.device, t))
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return _act_and_mul(gate_up, gelu=False)


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return _act_and_mul(gate_up, gelu=True)


GATED_ACTIVATIONS = {"silu": silu_and_mul, "gelu_tanh": gelu_tanh_and_mul}
# the code a linear's epilogue takes for each (Triton GATED, csrc act; both use act_mul's formulas)
EPILOGUE_CODES = {None: 0, "silu": 1, "gelu_tanh": 2}
