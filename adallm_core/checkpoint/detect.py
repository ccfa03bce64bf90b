"""Which NVFP4 layout a checkpoint folder uses, from config.json's quantization_config and/or hf_quant_config.json."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from adallm_core.checkpoint.files import CheckpointError, read_json
from adallm_core.checkpoint.layout import GROUP_SIZE


@dataclass(frozen=True)
class QuantInfo:
    format: str | None  # 'modelopt' | 'compressed-tensors' | None (unquantized)
    ignore: list[str] = field(default_factory=list)  # module names / globs / 're:' patterns left dense
    kv_cache_fp8: bool = False  # the checkpoint declares an FP8 KV cache (it may carry k_scale / v_scale)


def _object(value, where: str) -> dict:
    """A field that must be a JSON object ({...}); a null, string or list would fail later on .get()."""
    if not isinstance(value, dict):
        raise CheckpointError(f"{where} is {value!r}, expected a JSON object")
    return value


def _names(value, where: str) -> list[str]:
    """A list of module names / patterns; a lone string would be read as its characters."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"{where} is {value!r}, expected a list of module names")
    return value


def _check_group_size(value, where: str) -> None:
    if value is not None and value != GROUP_SIZE:
        raise CheckpointError(f"{where} = {value}: NVFP4 needs group size {GROUP_SIZE}")


def _modelopt(quant: dict, where: str) -> QuantInfo:
    algo = quant.get("quant_algo")
    if algo != "NVFP4":
        raise CheckpointError(f"{where}: field 'quant_algo' = {algo!r} is not supported (supported: 'NVFP4')")
    _check_group_size(quant.get("group_size"), f"{where}: field 'group_size'")
    kv = quant.get("kv_cache_quant_algo")
    if kv not in (None, "FP8"):
        raise CheckpointError(f"{where}: field 'kv_cache_quant_algo' = {kv!r} is not supported (FP8 or null)")
    key = "exclude_modules" if quant.get("exclude_modules") else "ignore"
    return QuantInfo("modelopt", _names(quant.get(key), f"{where}: field {key!r}"), kv == "FP8")


def _compressed_tensors(qc: dict, where: str) -> QuantInfo:
    groups = _object(qc.get("config_groups") or {}, f"{where}: field 'config_groups'")
    for name, group in groups.items():  # a null one (no scheme) is reported below as num_bits=None
        _object(group or {}, f"{where}: field config_groups.{name}")
    formats = {qc.get("format")} | {(g or {}).get("format") for g in groups.values()}
    if formats - {None, "nvfp4-pack-quantized"}:
        raise CheckpointError(
            f"{where}: field 'format' = {sorted(f for f in formats if f)} is not supported "
            f"(supported: 'nvfp4-pack-quantized')"
        )
    if not groups:
        raise CheckpointError(f"{where}: field 'config_groups' is missing or empty")
    for name, group in groups.items():
        w = _object((group or {}).get("weights") or {}, f"{where}: field config_groups.{name}.weights")
        if w.get("num_bits") != 4 or w.get("type") != "float":
            raise CheckpointError(
                f"{where}: config_groups.{name}.weights is num_bits={w.get('num_bits')} type={w.get('type')!r}; "
                f"NVFP4 needs num_bits=4 type='float'"
            )
        _check_group_size(w.get("group_size"), f"{where}: field config_groups.{name}.weights.group_size")
    sparsity = qc.get("sparsity_config")
    if sparsity and _object(sparsity, f"{where}: field 'sparsity_config'").get("format") not in (None, "dense"):
        raise CheckpointError(f"{where}: field sparsity_config.format = {sparsity.get('format')!r}: sparse "
                              f"(e.g. 2:4) weights are not supported")
    return QuantInfo("compressed-tensors", _names(qc.get("ignore"), f"{where}: field 'ignore'"),
                     _kv_cache_fp8(qc.get("kv_cache_scheme"), f"{where}: field 'kv_cache_scheme'"))


def _kv_cache_fp8(scheme, where: str) -> bool:
    """compressed-tensors' kv_cache_scheme: FP8 (num_bits 8, type float) or none; an INT8 cache is not one."""
    if not scheme:
        return False
    scheme = _object(scheme, where)
    if scheme.get("num_bits") != 8 or scheme.get("type") != "float":
        raise CheckpointError(f"{where} is num_bits={scheme.get('num_bits')} type={scheme.get('type')!r}; "
                              f"only an FP8 KV cache (num_bits=8 type='float') is supported")
    return True


def _check_agrees(qc: dict | None, folder: Path) -> None:
    """config.json beside hf_quant_config.json (newer ModelOpt exports write both) must say the same: a stale file
    of either kind would have the weights read in the wrong layout."""
    if not qc:
        return
    method, algo = qc.get("quant_method"), qc.get("quantization", qc).get("quant_algo")
    if method != "modelopt" or algo not in (None, "NVFP4"):
        raise CheckpointError(
            f"{folder / 'hf_quant_config.json'} says ModelOpt NVFP4 but {folder / 'config.json'} quantization_config "
            f"says quant_method={method!r} quant_algo={algo!r}; remove the file that does not describe the weights")


def detect_format(folder: Path, config: dict) -> QuantInfo:
    folder = Path(folder)
    hf_quant = folder / "hf_quant_config.json"
    qc = config.get("quantization_config")
    if hf_quant.exists():
        data = read_json(hf_quant)
        info = _modelopt(_object(data.get("quantization", data), f"{hf_quant}: field 'quantization'"), str(hf_quant))
        _check_agrees(qc and _object(qc, f"{folder / 'config.json'}: field 'quantization_config'"), folder)
        return info
    if not qc:
        return QuantInfo(None)
    where = f"{folder / 'config.json'} quantization_config"
    qc = _object(qc, f"{folder / 'config.json'}: field 'quantization_config'")
    method = qc.get("quant_method")
    if method == "modelopt":
        return _modelopt(qc.get("quantization", qc), where)
    if method == "compressed-tensors":
        return _compressed_tensors(qc, where)
    raise CheckpointError(
        f"{where}: field 'quant_method' = {method!r} is not supported (supported: 'modelopt', 'compressed-tensors')"
    )
