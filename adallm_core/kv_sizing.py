"""How many KV blocks each group gets: an explicit count, else a byte budget split between the groups."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def kv_budget_bytes(device: torch.device, gpu_memory_utilization: float, cpu_kv_cache_gb: float) -> int:
    """CUDA: that share of the device memory still free after the weights loaded (the engine takes the largest
    step's own memory from it: memory_profile). CPU: cpu_kv_cache_gb."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * gpu_memory_utilization)
    return int(cpu_kv_cache_gb * 2**30)


def blocks_per_group(budget_bytes: int, block_bytes: Sequence[int], windows: Sequence[Optional[int]],
                     block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                     num_blocks_override: Optional[int] = None) -> list[int]:
    """Block counts per KV group (each count includes the null block).

    Full-attention groups share one count. A sliding group never needs more blocks than the full one, nor more
    than ceil((window + chunk) / block_size) + 1 per running sequence, so it gets min(full count, that cap)
    and the bytes it does not need go to the full group.
    """
    if num_blocks_override is not None:
        return [num_blocks_override] * len(block_bytes)
    full = sum(b for b, w in zip(block_bytes, windows) if w is None)
    sliding = sum(b for b, w in zip(block_bytes, windows) if w is not None)
    if not sliding:
        return [budget_bytes // full] * len(block_bytes)
    window = max(w for w in windows if w is not None)
    cap = max_num_seqs * (math.ceil((window + max_num_batched_tokens) / block_size) + 1) + 1
    if not full:
        return [min(budget_bytes // sliding, cap)] * len(block_bytes)
    n_full = n_sliding = budget_bytes // (full + sliding)
    if n_sliding > cap:
        n_sliding = cap
        n_full = (budget_bytes - cap * sliding) // full
    return [n_full if w is None else n_sliding for w in windows]


def check_fits(counts: Sequence[int], windows: Sequence[Optional[int]], block_size: int, max_model_len: int,
               max_num_batched_tokens: int) -> None:
    """Refuse to start when one sequence of max_model_len tokens could never be scheduled."""
    for n, w in zip(counts, windows):
        need = math.ceil(max_model_len / block_size)
        if w is not None:
            need = min(need, math.ceil((w + max_num_batched_tokens) / block_size) + 1)
        if n - 1 < need:
            raise ValueError(
                f"KV cache too small: a KV group has {n - 1} usable blocks of {block_size} tokens, one sequence of "
                f"max_model_len={max_model_len} needs {need}; raise gpu_memory_utilization / cpu_kv_cache_gb / "
                f"num_gpu_blocks_override, or lower max_model_len (on a GPU also max_num_batched_tokens: the budget "
                f"leaves room for a step of that many tokens)"
            )
