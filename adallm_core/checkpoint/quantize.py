"""BF16/FP16 Hugging Face checkpoint -> NVFP4 checkpoint in the ModelOpt or compressed-tensors layout.

Memory-bounded: tensors are read in row chunks from the memory-mapped input (the map is reopened every
READ_WINDOW bytes so touched pages do not pile up in RSS) and written piece by piece at precomputed offsets, so the
peak is a fixed working set, not a shard or a model. Output goes to a temporary folder next to DST, renamed into
place only when complete: a failed or interrupted run leaves no DST.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adallm_core import nvfp4
from adallm_core.checkpoint import layout
from adallm_core.checkpoint.files import (
    INDEX_FILE, CheckpointError, load_config, open_shard, read_json, shard_files,
)
from adallm_core.checkpoint.st_writer import ST_DTYPES, StreamingSafetensorsWriter

CHUNK_ELEMENTS = 1 << 22  # elements per row chunk; the working set is ~20 bytes per element
READ_WINDOW = 128 << 20  # bytes read through one memory map before reopening it
_FLOAT_DTYPES = ("BF16", "F16", "F32")
# The source's weights in other formats (many repos ship pytorch_model.bin beside the safetensors): the BF16 model
# again, not a side file. Copied, they would double the output and sit under a config that says NVFP4.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".bin.index.json")


@dataclass
class _Tensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    prefix: str | None  # quantized linear prefix, None when copied as is

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


class _ShardReader:
    """Row slices of a shard's tensors through a memory map that is reopened every READ_WINDOW bytes."""

    def __init__(self, path: Path):
        self.path, self.handle, self.read = path, None, 0

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._read(lambda f: f.get_slice(name)[start:stop])

    def tensor(self, name: str) -> torch.Tensor:
        return self._read(lambda f: f.get_tensor(name))

    def _read(self, get) -> torch.Tensor:
        if self.handle is None or self.read > READ_WINDOW:
            self.close()
            self.handle, self.read = open_shard(self.path).__enter__(), 0
        part = get(self.handle)
        self.read += part.numel() * part.element_size()
        return part

    def close(self) -> None:
        if self.handle is not None:
            self.handle.__exit__(None, None, None)
            self.handle = None


def _plan_shard(path: Path, exclude: list[str]) -> list[_Tensor]:
    plan = []
    with open_shard(path) as f:
        for name in f.keys():
            sl = f.get_slice(name)
            st_dtype, shape = sl.get_dtype(), tuple(sl.get_shape())
            if st_dtype not in ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {st_dtype}")
            if layout.FUSED_EXPERTS.search(name):  # else copied as BF16: the experts, most of the model, unquantized
                raise CheckpointError(f"{path}: tensor {name!r} {layout.FUSED_EXPERTS_HELP}")
            t = _Tensor(name, ST_DTYPES[st_dtype], shape, layout.quantized_linear_prefix(name))
            if t.prefix and layout.is_excluded(t.prefix, exclude):
                t.prefix = None
            if t.prefix:
                if st_dtype not in _FLOAT_DTYPES or len(shape) != 2 or shape[1] % layout.GROUP_SIZE:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has dtype {st_dtype} and shape {list(shape)}; NVFP4 needs a 2-D "
                        f"BF16/FP16/F32 weight with in_features a multiple of {layout.GROUP_SIZE} "
                        f"(use --exclude to keep this module dense)"
                    )
            plan.append(t)
    return plan


def _output_specs(plan: list[_Tensor], fmt: str) -> dict:
    specs = {}
    for t in plan:
        if t.prefix:
            specs.update(layout.quantized_specs(fmt, t.prefix, *t.shape))
        else:
            specs[t.name] = (t.dtype, t.shape)
    return specs


def _row_chunks(shape: tuple[int, ...]):
    """(start, stop) row ranges of about CHUNK_ELEMENTS elements each."""
    step = max(1, CHUNK_ELEMENTS // max(1, torch.Size(shape[1:]).numel()))
    for start in range(0, shape[0], step):
        yield start, min(shape[0], start + step)


def _quantize_tensor(reader: _ShardReader, t: _Tensor, fmt: str, out: StreamingSafetensorsWriter, device) -> None:
    divides = fmt == "compressed-tensors"
    n, k = t.shape
    where = f"{t.name} (in {reader.path})"
    amax = torch.zeros((), device=device)
    for a, b in _row_chunks(t.shape):
        amax = torch.maximum(amax, reader.rows(t.name, a, b).to(device).abs().amax().float())
    nvfp4.check_finite(amax, where)
    g = nvfp4.global_scale_from_amax(amax, divides=divides)
    for a, b in _row_chunks(t.shape):
        w = reader.rows(t.name, a, b).to(device)
        packed, block_scale = nvfp4.quantize(w, g, divides=divides, name=where)
        out.write(f"{t.prefix}.{layout.PACKED_NAME[fmt]}", packed, a * (k // 2))
        out.write(f"{t.prefix}.weight_scale", block_scale, a * (k // layout.GROUP_SIZE))
    if divides:
        out.write(f"{t.prefix}.weight_global_scale", g.reshape(1))
    else:
        out.write(f"{t.prefix}.weight_scale_2", g)
        # Weight-only conversion: no activation calibration. 1.0 keeps readers that expect the field working.
        out.write(f"{t.prefix}.input_scale", torch.ones((), dtype=torch.float32))


def _copy_tensor(reader: _ShardReader, t: _Tensor, out: StreamingSafetensorsWriter) -> None:
    if not t.shape:  # a scalar
        out.write(t.name, reader.tensor(t.name))
        return
    row_bytes = t.nbytes // t.shape[0] if t.shape[0] else 0
    for a, b in _row_chunks(t.shape):
        out.write(t.name, reader.rows(t.name, a, b), a * row_bytes)


def _check_patterns(exclude: list[str]) -> None:
    for pattern in exclude:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise CheckpointError(f"--exclude {pattern!r}: not a valid regular expression ({e})") from None


def _check_exclusions(tensors: list[_Tensor], exclude: list[str]) -> set[str]:
    """Exclusions the engine can load: each pattern matches something, fused linears stay alike, experts NVFP4.
    Returns the linears kept dense (the plan's: quantizable, but no prefix)."""
    linears = {p for t in tensors if (p := layout.quantized_linear_prefix(t.name))}
    kept_dense = {p for t in tensors if not t.prefix and (p := layout.quantized_linear_prefix(t.name))}
    for pattern in exclude:
        if not any(layout.is_excluded(p, [pattern]) for p in linears):
            raise CheckpointError(f"--exclude {pattern!r} matches no quantizable linear (their names look like "
                                  f"{min(linears, default='model.layers.0.mlp.down_proj')!r})")
    for prefix in sorted(kept_dense):
        if ".experts." in prefix:
            raise CheckpointError(f"--exclude keeps MoE expert {prefix} dense: the engine runs every expert in "
                                  f"NVFP4 (one grouped kernel for all of them)")
        quantized = [p for p in layout.fused_partners(prefix) if p in linears and p not in kept_dense]
        if quantized:
            raise CheckpointError(f"--exclude keeps {prefix} dense but not {', '.join(quantized)}: the engine runs "
                                  f"them as one fused linear, so exclude them together")
    return kept_dense


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer files, generation_config.json, chat template, README...: every top-level file but the weights."""
    for p in src.iterdir():
        weights = p.suffix == ".safetensors" or p.name.endswith(_OTHER_WEIGHTS)
        if p.is_file() and not weights and p.name not in (INDEX_FILE, "config.json"):
            shutil.copy2(p, dst / p.name)


def _convert_shard(path: Path, plan: list[_Tensor], fmt: str, out_dir: Path, device, bar) -> dict:
    """Write one output shard for one input shard; returns its tensor specs."""
    specs = _output_specs(plan, fmt)
    reader = _ShardReader(path)
    try:
        with StreamingSafetensorsWriter(out_dir / path.name, specs) as out:
            for t in plan:
                if t.prefix:
                    _quantize_tensor(reader, t, fmt, out, device)
                else:
                    _copy_tensor(reader, t, out)
                bar.update(t.nbytes)
    finally:
        reader.close()
    return specs


def _check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise CheckpointError(f"--device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"--device {device}: this torch has no CUDA device; use --device cpu")
    return device


def _producer_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adallm")
    except PackageNotFoundError:  # running from a source tree that was not pip-installed
        return "unknown"


def _refuse_quantized(src: Path) -> None:
    """Before load_config, which would name a quantization scheme it cannot read (FP8, GPTQ...) as unsupported."""
    if (src / "config.json").is_file() and read_json(src / "config.json").get("quantization_config"):
        raise CheckpointError(f"{src / 'config.json'}: field 'quantization_config' is set; source is already quantized")
    if (src / "hf_quant_config.json").exists():
        raise CheckpointError(f"{src / 'hf_quant_config.json'} exists; source is already quantized (ModelOpt)")


def quantize_checkpoint(src, dst, fmt: str = "modelopt", exclude=(), progress: bool = True, device="cpu") -> dict:
    """Convert SRC (BF16/FP16 HF checkpoint) into DST (NVFP4); the math runs on `device` (same bits on any).
    Returns the summary: tensors, quantized, bytes_in, bytes_out, seconds, format, dst."""
    from tqdm import tqdm

    src, dst, exclude = Path(src), Path(dst), list(exclude)
    if fmt not in layout.FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; choose from {', '.join(layout.FORMATS)}")
    if dst.exists():
        raise CheckpointError(f"{dst}: destination already exists; choose a new folder or remove it")
    device = _check_device(device)
    _refuse_quantized(src)
    config = load_config(src)
    shards = shard_files(src)
    _check_patterns(exclude)
    plans = {path: _plan_shard(path, exclude) for path in shards}
    tensors = [t for plan in plans.values() for t in plan]
    excluded = _check_exclusions(tensors, exclude)
    dense = {layout.dense_linear_prefix(t.name) for t in tensors}
    ignore = ["lm_head"] + sorted((dense | excluded) - {None, "lm_head"})  # lm_head stays dense even when tied
    vision = layout.VISION_EXCLUDE_GLOBS if fmt == "modelopt" else layout.VISION_IGNORE
    ignore += [p for p in vision if any(layout.is_excluded(t.name, [p]) for t in tensors)]
    start = time.time()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        weight_map = {}
        total = sum(t.nbytes for t in tensors)
        with tqdm(total=total, unit="B", unit_scale=True, desc="quantize", disable=not progress) as bar:
            for path, plan in plans.items():
                weight_map.update(dict.fromkeys(_convert_shard(path, plan, fmt, tmp, device, bar), path.name))
        bytes_out = sum((tmp / p.name).stat().st_size for p in shards)
        if len(shards) > 1 or (src / INDEX_FILE).exists():
            index = {"metadata": {"total_size": bytes_out}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        _copy_side_files(src, tmp)
        quant_config, hf_quant_config = layout.quantization_config(fmt, ignore, _producer_version())
        (tmp / "config.json").write_text(json.dumps({**config, "quantization_config": quant_config}, indent=2) + "\n")
        if hf_quant_config:
            (tmp / "hf_quant_config.json").write_text(json.dumps(hf_quant_config, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
        os.rename(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "tensors": len(tensors), "quantized": sum(bool(t.prefix) for t in tensors),
        "bytes_in": sum(p.stat().st_size for p in shards), "bytes_out": bytes_out,
        "seconds": round(time.time() - start, 3), "format": fmt, "dst": str(dst),
    }
