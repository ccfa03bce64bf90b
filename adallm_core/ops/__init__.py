"""THE dispatch point for hot ops. `select_ops` picks one implementation per op ONCE at start-up and logs it.

Backends:
  reference  adallm_core.ops.reference: plain torch, any device, the definition of correct.
  triton     adallm_core.ops.triton: CUDA kernels. That package exports the ops it implements under the names in
             OP_NAMES (the rest are taken from reference, by declaration, and the log says which op runs where), and
             may define `check_device(device)` raising ValueError when it cannot run there.
  auto       triton on CUDA, reference elsewhere.
There is no runtime fallback: a backend that cannot run on the device raises here, before any weight loads.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.torch_version import TorchVersion

from adallm_core.ops import reference
from adallm_core.ops.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

OP_NAMES = (
    "nvfp4_linear",
    "nvfp4_gated_linear",
    "rms_norm",
    "add_rms_norm",
    "rope",
    "silu_and_mul",
    "gelu_tanh_and_mul",
    "kv_write",
    "qk_norm_rope_cache",
    "attention",
    "qk_norm_rope_attention",
    "moe",
    "embedding",
    "prepare_nvfp4_weight",
)
BACKENDS = ("auto", "reference", "triton")


@dataclass(frozen=True)
class Ops:
    """The op table the models call: ops.nvfp4_linear(x, w), ops.attention(...), ..."""

    name: str  # backend asked for after resolving 'auto'
    nvfp4_linear: Callable
    nvfp4_gated_linear: Callable  # fused gate|up -> act(gate) * up; the backend may fuse the activation in
    rms_norm: Callable
    add_rms_norm: Callable
    rope: Callable
    silu_and_mul: Callable
    gelu_tanh_and_mul: Callable
    kv_write: Callable
    qk_norm_rope_cache: Callable
    attention: Callable
    qk_norm_rope_attention: Callable  # qk_norm_rope_cache then attention; the backend may fuse them
    moe: Callable
    embedding: Callable
    prepare_nvfp4_weight: Callable  # once at load: NVFP4Weight -> the same weight in the layout the backend reads
    sources: dict = field(default_factory=dict)  # op name -> module that implements it

    def gated_activation(self, name: str) -> Callable:
        """The act-and-mul op for a gated MLP's activation name ('silu' | 'gelu_tanh')."""
        if name == "silu":
            return self.silu_and_mul
        if name == "gelu_tanh":
            return self.gelu_tanh_and_mul
        raise ValueError(f"gated MLP activation must be 'silu' or 'gelu_tanh', got {name!r}")


def select_ops(backend: str, device, prefill_fp8: bool = False) -> Ops:
    """prefill_fp8: the NVFP4 linears of steps with many tokens run on FP8 tensor cores (reference.nvfp4_linear_fp8,
    lossy); the backend's nvfp4_linear_fp8 and nvfp4_gated_linear_fp8 take the linear ops' places."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"kernel_backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "reference"
    if backend == "reference":
        module = reference
    else:
        module = _load_triton(device)
    if prefill_fp8:
        _check_fp8(device)
    impls = {name: _impl(module, name, prefill_fp8) for name in OP_NAMES}
    sources = {name: impls[name].__module__ for name in OP_NAMES}
    ops = Ops(name=backend, sources=sources, **impls)
    logger.info("kernel backend %r on %s%s: %s", backend, device, ", prefill on FP8" if prefill_fp8 else "",
                ", ".join(f"{k}={v}" for k, v in sources.items()))
    return ops


def _impl(module, name: str, prefill_fp8: bool) -> Callable:
    if prefill_fp8 and name in ("nvfp4_linear", "nvfp4_gated_linear"):
        name += "_fp8"
    return getattr(module, name, None) or getattr(reference, name)


def _check_fp8(device: torch.device) -> None:
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ValueError(f"prefill_fp8 needs FP8 tensor cores (compute capability 8.9: Ada, Hopper), got "
                         f"{torch.cuda.get_device_name(device)}; leave prefill_fp8 off")
    if capability < (9, 0) and TorchVersion(torch.__version__) < "2.7":  # sm_89's row-wise scaled FP8 GEMM came in 2.7
        raise ValueError(f"prefill_fp8 on {torch.cuda.get_device_name(device)} needs torch 2.7 or newer (row-wise "
                         f"scaled FP8 GEMMs on Ada), got torch {torch.__version__}; upgrade or leave prefill_fp8 off")


def _load_triton(device: torch.device):
    if device.type != "cuda":
        raise ValueError(
            f"kernel_backend 'triton' needs a CUDA device, got {device}; use kernel_backend='reference' on CPU"
        )
    try:
        module = importlib.import_module("adallm_core.ops.triton")
    except ImportError as exc:  # not a fallback: we refuse to start and say what is missing
        raise ValueError(f"kernel_backend 'triton' cannot run: {exc}; install triton or use 'reference'") from exc
    check = getattr(module, "check_device", None)
    if check is not None:
        check(device)
    return module


__all__ = ["Ops", "select_ops", "AttentionMetadata", "OP_NAMES"]
