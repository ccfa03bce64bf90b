"""Token embedding lookup: out[t] = table[ids[t]], the table on the GPU or in pinned host memory.

A pinned host table is read in place over PCIe (unified virtual addressing): a decode step needs a few rows, so the
table (1.25 GB for Qwen3-8B) need not take GPU memory, and the read works inside CUDA graphs too.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def embedding_kernel(ids_ptr, table_ptr, out_ptr, H, stride_t, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < H
    token = tl.load(ids_ptr + row).to(tl.int64)
    tl.store(out_ptr + row * stride_o + offs, tl.load(table_ptr + token * stride_t + offs, mask=ok), mask=ok)


def embedding(input_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """ids [T] (on the GPU) -> [T, H] rows of table [V, H] (GPU or pinned host memory), on the ids' device."""
    if input_ids.dim() != 1 or table.dim() != 2 or table.stride(1) != 1:
        raise ValueError(f"embedding: ids must be [T] and table [V, H] contiguous in H; got {tuple(input_ids.shape)}, "
                         f"{tuple(table.shape)}")
    if table.device.type == "cpu" and not table.is_pinned() and input_ids.device.type == "cuda":
        raise ValueError("embedding: a host table must be in pinned memory for the GPU to read it")
    t, h = input_ids.shape[0], table.shape[1]
    out = torch.empty(t, h, dtype=table.dtype, device=input_ids.device)
    if t:
        block = min(1024, triton.next_power_of_2(h))
        embedding_kernel[(t, triton.cdiv(h, block))](input_ids, table, out, h, table.stride(0), out.stride(0),
                                                      BLOCK=block, num_warps=4, enable_fp_fusion=True)
    return out
