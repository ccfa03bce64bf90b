"""Finding and opening the files of a Hugging Face checkpoint folder: config.json and the safetensors shards."""
from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors import safe_open

SUPPORTED_ARCHITECTURES = (
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",  # the text part only
)
INDEX_FILE = "model.safetensors.index.json"
_NUMBERED_SHARD = re.compile(r"^(.+)-(\d+)-of-(\d+)\.safetensors$")  # model-00001-of-00003.safetensors


class CheckpointError(ValueError):
    """A checkpoint file or field is missing, corrupt or unsupported; the message names which."""


# A repo cloned without git-lfs holds these small text files in place of its large ones.
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _check_not_lfs_pointer(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LFS_POINTER))
    except OSError:  # unreadable: the caller's own error says so
        return
    if head == _LFS_POINTER:
        raise CheckpointError(f"{path}: a Git LFS pointer, not the file itself (cloned without git-lfs?); "
                              f"run `git lfs pull` in {Path(path).parent}")


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        _check_not_lfs_pointer(path)
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def generation_eos_ids(folder: Path) -> list[int]:
    """generation_config.json's eos_token_id (a token id or a list of them); [] when the file or field is absent."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return []
    value = read_json(path).get("eos_token_id")
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(type(i) is int and i >= 0 for i in ids):  # bool is an int too, but no token id
        raise CheckpointError(f"{path}: field 'eos_token_id' = {value!r} is not a token id or a list of token ids")
    return ids


# generation_config.json field -> SamplingParams field: the model maker's recommended sampling (e.g. Qwen3's
# temperature 0.6, top_p 0.95, top_k 20), which vLLM uses where a request leaves a field out
GENERATION_CONFIG_SAMPLING = {"repetition_penalty": "repetition_penalty", "temperature": "temperature",
                              "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "max_new_tokens": "max_tokens"}


def generation_sampling_defaults(folder: Path) -> dict:
    """SamplingParams fields from generation_config.json ({} when the file is absent), checked by SamplingParams."""
    from adallm_core.sampling_params import SamplingParams

    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    config = read_json(path)
    defaults = {ours: config[theirs] for theirs, ours in GENERATION_CONFIG_SAMPLING.items()
                if config.get(theirs) is not None}
    try:
        SamplingParams(**defaults)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return defaults


def load_config(folder: Path) -> dict:
    """config.json, checked to be a supported architecture with a quantization config read here, that transformers
    reads too (so does the tokenizer, which the engine loads before the weights)."""
    from adallm_core.checkpoint.detect import detect_format
    from adallm_core.checkpoint.shapes import text_config

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (does not exist or is not a directory)")
    config = read_json(folder / "config.json")
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise CheckpointError(
            f"{folder / 'config.json'}: field 'architectures' = {archs} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    detect_format(folder, config)  # first: transformers' own error for a quantization_config that is no object names
    text_config(config, folder / "config.json")  # neither the file nor the field
    return config


def shard_files(folder: Path) -> list[Path]:
    """The safetensors shards: those named in model.safetensors.index.json, else every *.safetensors in the folder."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: field 'weight_map' is missing or empty")
        for tensor, name in weight_map.items():  # a null or a number would fail deep in sorted() / Path
            if not isinstance(name, str) or not name:
                raise CheckpointError(f"{index}: weight_map maps tensor {tensor!r} to {name!r}, not a shard file name")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (folder / name).is_file():
                tensor = next(t for t, s in weight_map.items() if s == name)
                raise CheckpointError(f"{index}: shard {name!r} (holding e.g. tensor {tensor!r}) is missing")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weight files found")
    _check_numbered_shards(folder, files)
    return files


def _check_numbered_shards(folder: Path, files: list[Path]) -> None:
    """Without an index, 'model-00001-of-00003.safetensors' still says how many shards there are: a missing one is
    named as such, not as the first tensor it held."""
    for path in files:
        m = _NUMBERED_SHARD.match(path.name)
        if m is None:
            continue
        stem, width, total = m.group(1), len(m.group(2)), int(m.group(3))
        for i in range(1, total + 1):
            name = f"{stem}-{i:0{width}d}-of-{m.group(3)}.safetensors"
            if not (folder / name).is_file():
                raise CheckpointError(f"{folder / name}: missing (the folder holds {path.name} and no {INDEX_FILE})")


def unlisted_shards(folder: Path) -> list[Path]:
    """*.safetensors beside model.safetensors.index.json that it does not name: not read (a stale copy is common),
    but worth naming when a tensor is missing (the index may have forgotten a shard)."""
    folder = Path(folder)
    if not (folder / INDEX_FILE).exists():
        return []
    return sorted(set(folder.glob("*.safetensors")) - set(shard_files(folder)))


def open_shard(path: Path):
    """safe_open (memory-mapped), turning safetensors' errors into a CheckpointError naming the file."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own SafetensorError (not a ValueError) for a bad header
        _check_not_lfs_pointer(path)
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def tensor_index(folder: Path) -> dict[str, Path]:
    """tensor name -> the shard holding it, read from each shard's own header (so a stale index cannot lie)."""
    where: dict[str, Path] = {}
    for path in shard_files(folder):
        with open_shard(path) as f:
            for name in f.keys():
                if name in where:
                    raise CheckpointError(f"{path}: tensor {name!r} is also in {where[name]}")
                where[name] = path
    return where
