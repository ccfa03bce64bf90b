"""Resident weight bytes of a runner's model: every tensor reachable from it, counted once, KV cache excluded."""
from __future__ import annotations

import dataclasses

import torch


def model_weight_bytes(runner) -> int:
    kv = {c.untyped_storage().data_ptr() for c in runner.kv_caches}
    seen: set[int] = set()
    visited: set[int] = set()
    total = 0
    stack = [runner.model]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in seen and ptr not in kv:
                seen.add(ptr)
                total += storage.nbytes()
            continue
        if id(obj) in visited or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.device, torch.dtype)):
            continue
        visited.add(id(obj))
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif dataclasses.is_dataclass(obj):
            stack.extend(getattr(obj, f.name) for f in dataclasses.fields(obj))
        elif hasattr(obj, "__dict__") and not callable(getattr(obj, "__func__", None)):
            stack.extend(vars(obj).values())
        elif hasattr(obj, "__self__"):  # a bound method (the wrapped embed): its object
            stack.append(obj.__self__)
    return total
