"""Read a checkpoint folder (ModelOpt NVFP4, compressed-tensors NVFP4, or unquantized BF16/FP16) lazily.

Every quantized linear comes out as one NVFP4Weight (per-row multiplying global scale), whatever the layout;
modules the checkpoint leaves dense come out as a plain [N, K] tensor in their stored dtype. Tensors are read on
demand from memory-mapped shards; all headers are checked when the Checkpoint is opened, before any work starts.
"""
from __future__ import annotations

import logging
import math
import re
from functools import cached_property
from pathlib import Path

import torch

from adallm_core.checkpoint.detect import detect_format
from adallm_core.checkpoint.files import (
    INDEX_FILE, CheckpointError, load_config, open_shard, tensor_index, unlisted_shards,
)
from adallm_core.checkpoint.layout import (
    FORMATS, FUSED_EXPERTS, FUSED_EXPERTS_HELP, GLOBAL_NAME, PACKED_NAME, is_excluded,
)
from adallm_core.checkpoint.shapes import expected_dense_shape, expected_linear_shape, text_config
from adallm_core.nvfp4 import BLOCK_SIZE, NVFP4Weight

__all__ = ["Checkpoint", "CheckpointError"]
logger = logging.getLogger(__name__)

# Where Gemma3ForConditionalGeneration keeps the language model (transformers 5 names, then older ones).
_TEXT_PREFIXES = (
    ("model.", "model.language_model."), ("model.", "language_model.model."), ("lm_head", "language_model.lm_head"),
)
_KV_SCALE = re.compile(r"layers\.(\d+)\.self_attn\.(?:k_proj\.|v_proj\.|attn\.)?([kv])_scale$")
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
# Tensors only a quantized checkpoint has (NVFP4 in either layout; FP8's weight_scale_inv).
_QUANT_PARTS = (".weight_packed", ".weight_scale", ".weight_scale_2", ".weight_global_scale", ".weight_scale_inv")


class Checkpoint:
    """A checkpoint folder. .linear(prefix) -> NVFP4Weight | dense Tensor; .tensor(name); .has(name); .kv_scales()."""

    def __init__(self, path):
        self.path = Path(path)
        self.config = load_config(self.path)
        info = detect_format(self.path, self.config)
        self.quant_format, self.ignore, self.kv_cache_fp8 = info.format, info.ignore, info.kv_cache_fp8
        self._where = tensor_index(self.path)
        self._unlisted = unlisted_shards(self.path)
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for shard in sorted(set(self._where.values())):
            with open_shard(shard) as f:
                for name in f.keys():
                    if FUSED_EXPERTS.search(name):  # else named later as a per-expert tensor "not found"
                        raise CheckpointError(f"{shard}: tensor {name!r} {FUSED_EXPERTS_HELP}")
                    sl = f.get_slice(name)
                    self._meta[name] = (_dtype(sl.get_dtype(), shard, name), tuple(sl.get_shape()))
        self._handles: dict[Path, object] = {}
        self._check_shapes()

    @cached_property
    def hf_config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path)

    # -- names ------------------------------------------------------------------------------------------------
    def _resolve(self, name: str) -> str | None:
        if name in self._where:
            return name
        for ours, theirs in _TEXT_PREFIXES:
            if name.startswith(ours) and theirs + name[len(ours):] in self._where:
                return theirs + name[len(ours):]
        return None

    def _unlisted_hint(self) -> str:
        if not self._unlisted:
            return ""
        return f" ({INDEX_FILE} does not list {', '.join(p.name for p in self._unlisted)}, which the folder also holds)"

    def has(self, name: str) -> bool:
        return self._resolve(name) is not None

    def tensor(self, name: str, index=None) -> torch.Tensor:
        """One stored tensor, as stored (norms, embeddings, router, lm_head...). `index` (e.g. (slice(a, b),) or
        (slice(None), slice(a, b))) reads only that slice from the memory map (tensor-parallel shards)."""
        real = self._resolve(name)
        if real is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} not found in any shard{self._unlisted_hint()}")
        shard = self._where[real]
        if shard not in self._handles:
            self._handles[shard] = open_shard(shard).__enter__()
        if index is None:
            return self._handles[shard].get_tensor(real)
        # A column slice comes back as a view of the rows it spans: copy, so only the slice stays resident.
        return self._handles[shard].get_slice(real)[index].clone(memory_format=torch.contiguous_format)

    # -- linears ----------------------------------------------------------------------------------------------
    def _is_quantized(self, prefix: str) -> bool:
        """ModelOpt names its packed weight '.weight' as a dense one is: uint8 or a weight_scale beside it tells them
        apart. A packed weight of another dtype is then reported as such, not as a dense weight that is missing."""
        if self.quant_format is None:
            return False
        packed = self._resolve(f"{prefix}.{PACKED_NAME[self.quant_format]}")
        if packed is None:
            return False
        return (self._meta[packed][0] == torch.uint8 or self.quant_format == "compressed-tensors"
                or self.has(f"{prefix}.weight_scale"))

    def linear(self, prefix: str, rows: slice | None = None, cols: slice | None = None) -> NVFP4Weight | torch.Tensor:
        """'model.layers.0.self_attn.q_proj' or 'model.layers.0.mlp.experts.3.gate_proj' -> NVFP4Weight [N, K], or
        the dense weight [N, K] when the checkpoint leaves that module unquantized.

        rows / cols (in weight elements) read only that block: a tensor-parallel shard. For NVFP4, cols must
        start and stop on whole 16-element scale groups."""
        whole = rows is None and cols is None
        rows, cols = rows or slice(None), cols or slice(None)
        if not self._is_quantized(prefix):
            return self.tensor(f"{prefix}.weight", None if whole else (rows, cols))
        if any(c is not None and c % BLOCK_SIZE for c in (cols.start, cols.stop)):
            raise CheckpointError(f"{self.path}: {prefix}: columns {cols.start}:{cols.stop} cut a {BLOCK_SIZE}-element scale group")
        packed_cols = slice(_div(cols.start, 2), _div(cols.stop, 2))
        scale_cols = slice(_div(cols.start, BLOCK_SIZE), _div(cols.stop, BLOCK_SIZE))
        fmt = self.quant_format
        packed = self.tensor(f"{prefix}.{PACKED_NAME[fmt]}", None if whole else (rows, packed_cols))
        scale = self.tensor(f"{prefix}.weight_scale", None if whole else (rows, scale_cols))
        g = self._global_scale(f"{prefix}.{GLOBAL_NAME[fmt]}")
        if fmt == "modelopt":
            return NVFP4Weight.from_modelopt(packed, scale, g)
        return NVFP4Weight.from_compressed_tensors(packed, scale, g)

    def _global_scale(self, name: str) -> torch.Tensor:
        """A linear's global scale; 0, < 0, Inf or NaN (a corrupt file: no exporter writes one) would make all its
        weights 0 or NaN, read without a word."""
        g = self.tensor(name)
        if not bool((torch.isfinite(g) & (g > 0)).all()):
            raise CheckpointError(f"{self._where[self._resolve(name)]}: tensor {name!r} = {g.flatten().tolist()}; "
                                  f"a global scale must be finite and > 0")
        return g

    def kv_scales(self) -> dict[int, tuple[float, float]]:
        """layer -> (k_scale, v_scale) for FP8 KV caches, matched by suffix; {} when the checkpoint has none."""
        found: dict[int, dict[str, float]] = {}
        for name in self._where:
            m = _KV_SCALE.search(name)
            if m:
                found.setdefault(int(m.group(1)), {})[m.group(2)] = self._kv_scale(name)
        scales = {layer: (s["k"], s["v"]) for layer, s in sorted(found.items()) if "k" in s and "v" in s}
        if found:
            logger.info("%s: found k/v scales for %d of %d layers", self.path, len(scales), len(found))
        return scales

    def _kv_scale(self, name: str) -> float:
        """One per-tensor k/v scale. compressed-tensors' attn_head strategy stores one per KV head [H_kv, 1, 1]:
        the cache here has one scale per layer, and taking the first head's would quantize the others wrongly."""
        value = self.tensor(name).float()
        if value.numel() != 1:
            raise CheckpointError(f"{self._where[name]}: tensor {name!r} has shape {list(value.shape)}: per-head or "
                                  f"per-channel k/v scales are not supported (use --kv-cache-dtype bf16)")
        scale = float(value.reshape(()))
        if not (math.isfinite(scale) and scale > 0):  # the cache divides by it: every stored key would be inf or NaN
            raise CheckpointError(f"{self._where[name]}: tensor {name!r} is {scale}; a k/v scale must be finite "
                                  f"and > 0")
        return scale

    # -- validation (headers only) ----------------------------------------------------------------------------
    def _check_shapes(self) -> None:
        if self.quant_format is None:
            self._check_unquantized()
        else:
            self._check_layout()
        config = text_config(self.config)
        prefixes = {name.rsplit(".", 1)[0] for name in self._meta if name.endswith((".weight", ".weight_packed"))}
        for prefix in sorted(prefixes):
            want = expected_linear_shape(config, prefix)  # None for embeddings, norms and the vision side
            if self._is_quantized(prefix):
                self._check_quantized(prefix, want)
            elif want is not None:
                self._expect(f"{prefix}.weight", _FLOATS, want)
        for name in sorted(self._meta):  # norms and the input embedding (whose size no linear check covers)
            if (want := expected_dense_shape(config, name)) is not None:
                self._expect(name, _FLOATS, want)

    def _check_unquantized(self) -> None:
        """No quantization config, but quantized tensors: the file that describes them was lost (not copied, or
        config.json replaced by the BF16 model's). Read as dense, they would fail far from the cause."""
        name = next((n for n in sorted(self._meta) if n.endswith(_QUANT_PARTS)), None)
        if name is not None:
            raise CheckpointError(
                f"{self._where[name]}: tensor {name!r} belongs to a quantized checkpoint, but "
                f"{self.path / 'config.json'} has no quantization_config and there is no hf_quant_config.json; "
                f"restore the one the export wrote")

    def _check_layout(self) -> None:
        """Tensors in the other NVFP4 layout (config files taken from another export of the same model): named as
        such, not as the dense '.weight' it then looks for (their global scales are each other's reciprocals)."""
        other = next(f for f in FORMATS if f != self.quant_format)
        name = next((n for n in sorted(self._meta) if n.endswith(f".{GLOBAL_NAME[other]}")), None)
        if name is not None:
            raise CheckpointError(
                f"{self._where[name]}: tensor {name!r} is in the {other} layout, but the quantization config says "
                f"{self.quant_format}; use the config.json (and hf_quant_config.json) that came with these weights")

    def _check_quantized(self, prefix: str, want: tuple[int, int] | None) -> None:
        fmt = self.quant_format
        packed_name = f"{prefix}.{PACKED_NAME[fmt]}"
        if is_excluded(prefix, self.ignore):
            raise CheckpointError(f"{self.path}: module {prefix!r} is listed as unquantized but stores {packed_name!r}")
        if want is None:  # a linear this project has no shape rule for: check the parts agree with each other
            stored = self._meta[packed_name][1]
            want = (stored[0], stored[-1] * 2) if len(stored) == 2 else (-1, -1)
        n, k = want
        self._expect(packed_name, (torch.uint8,), (n, k // 2))
        self._expect(f"{prefix}.weight_scale", (torch.float8_e4m3fn,), (n, k // BLOCK_SIZE))
        self._expect(f"{prefix}.{GLOBAL_NAME[fmt]}", (torch.float32,), None)

    def _expect(self, name: str, dtypes: tuple, shape: tuple | None) -> None:
        real = self._resolve(name)
        if real is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing{self._unlisted_hint()}")
        dtype, got = self._meta[real]
        where = f"{self._where[real]}: tensor {real!r}"
        if dtype not in dtypes:
            raise CheckpointError(f"{where} has dtype {dtype}, expected {' or '.join(map(str, dtypes))}")
        if shape is None and int(torch.Size(got).numel()) != 1:
            raise CheckpointError(f"{where} has shape {list(got)}, expected a single value")
        if shape is not None and got != tuple(shape):
            raise CheckpointError(f"{where} has shape {list(got)}, expected {list(shape)}")


def _div(x: int | None, d: int) -> int | None:
    return None if x is None else x // d


def _dtype(st_dtype: str, shard: Path, name: str) -> torch.dtype:
    from adallm_core.checkpoint.st_writer import ST_DTYPES

    if st_dtype not in ST_DTYPES:
        raise CheckpointError(f"{shard}: tensor {name!r} has unsupported dtype {st_dtype}")
    return ST_DTYPES[st_dtype]
