"""EngineArgs: every engine knob, one place. The CLI, the Serve config and the bulk job map onto it."""
from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, fields
from typing import Any, Optional

KV_CACHE_DTYPES = ("fp8", "bf16")
DTYPES = ("bfloat16", "float16", "float32", "auto")
KERNEL_BACKENDS = ("auto", "reference", "triton")
EXECUTOR_BACKENDS = ("mp", "ray")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class EngineArgs:
    """Engine arguments, named as in vLLM where vLLM has the knob.

    `model` is a local checkpoint folder, a hub id (fetched with huggingface_hub), or None for the
    built-in tiny demo model.
    """

    model: Optional[str] = None
    tokenizer: Optional[str] = None
    chat_template: Optional[str] = None  # a Jinja template, or a file holding one, in place of the tokenizer's
    max_model_len: Optional[int] = None  # None: the model's context length (with its RoPE scaling), capped at 8192
    max_num_seqs: int = 64
    max_num_batched_tokens: Optional[int] = None  # None: max(2048, max_model_len) capped at 8192, >= max_num_seqs
    gpu_memory_utilization: float = 0.90
    num_gpu_blocks_override: Optional[int] = None  # explicit KV block count (tests, small machines)
    block_size: int = 16
    kv_cache_dtype: str = "fp8"
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    seed: int = 0
    dtype: str = "auto"  # dtype of unquantized parts (embeddings, norms, lm_head); auto: bf16 on GPU, fp32 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    kernel_backend: str = "auto"  # auto: triton on CUDA, reference on CPU. Chosen once, logged, never silently changed.
    tensor_parallel_size: int = 1
    distributed_executor_backend: str = "mp"  # tensor_parallel_size > 1: 'mp' local processes | 'ray' Ray actors
    cpu_kv_cache_gb: float = 1.0  # KV budget on the CPU (no gpu_memory_utilization there)
    # CUDA: the input embedding table stays in pinned host memory when the lm_head does not share it (untied, or
    # quantized): a step reads only its tokens' rows, over PCIe. Saves vocab x hidden x 2 bytes of GPU memory.
    embedding_on_host: bool = True
    quantize_lm_head: bool = False  # quantize a BF16 lm_head to NVFP4 at load: faster decode, lossy like any weight
    # Steps of 256 tokens or more (prompts) run the NVFP4 linears on FP8 tensor cores: activations and weights
    # rounded to E4M3, faster prefill, lossy. Needs Ada or newer. Decode steps and MoE experts stay exact.
    prefill_fp8: bool = False
    # Launch decode step t+1 before step t's tokens reach the host (its input ids are t's tokens sampled on the
    # device), so the host's bookkeeping overlaps the GPU. Engages for steady decoding without penalties or
    # logprobs (adallm_core/overlap.py).
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        _check_types(self)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {self.kernel_backend!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_num_seqs:
            # a step's token budget below its sequence count starves the decodes late in the running order
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs})")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        # these three failed only once the engine started, as a RuntimeError or OverflowError that named nothing
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not -2**63 <= self.seed < 2**63:
            raise ValueError(f"seed must be a 64-bit integer, got {self.seed!r}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}")
        if not (isinstance(self.cpu_kv_cache_gb, (int, float)) and 0 < self.cpu_kv_cache_gb < math.inf):
            raise ValueError(f"cpu_kv_cache_gb must be a finite number > 0, got {self.cpu_kv_cache_gb!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS}, "
                             f"got {self.distributed_executor_backend!r}")

    # --- mapping from other front ends -------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, with_model: bool = True) -> None:
        """Add one --flag per field (vLLM spelling: --max-model-len ...)."""
        for f in fields(cls):
            if f.name == "model" and not with_model:
                continue
            flag = "--" + f.name.replace("_", "-")
            default = f.default
            if isinstance(default, bool):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            else:
                kind = _field_type(f)
                parser.add_argument(flag, type=kind, default=default)

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EngineArgs":
        """From a Serve user_config / job option dict; unknown keys are an error that names them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown engine argument(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_types(args: EngineArgs) -> None:
    """Numbers and flags of the wrong type (a YAML "4", LLM(enforce_eager="false")) are named here: they were a
    TypeError naming no field, or a string that reads as true. Text fields have their own checks (model: a Path too)."""
    for f in fields(args):
        value, text, kind = getattr(args, f.name), str(f.type), _field_type(f)
        if (value is None and text.startswith("Optional")) or (kind is str and text != "bool"):
            continue
        typed = _as_field_type(value, text, kind)
        if typed is None:
            shape = {"bool": "true or false"}.get(text, "an integer" if kind is int else "a number")
            raise ValueError(f"{f.name} must be {shape}, got {value!r}")
        setattr(args, f.name, typed)


def _as_field_type(value, text: str, kind: type):
    """value as a plain bool / int / float, or None when it is none of the field's kind; numpy's scalars (a
    DataFrame's or a config read with numpy) count as the numbers they hold."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")  # numpy 2, 1
    is_bool = isinstance(value, bool) or numpy_bool
    if text == "bool":
        return bool(value) if is_bool else None
    if is_bool:
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value) if kind is float and isinstance(value, numbers.Real) else None


def _field_type(f: dataclasses.Field) -> type:
    text = str(f.type)
    if "int" in text:
        return int
    if "float" in text:
        return float
    return str
