"""The two published NVFP4 layouts: tensor names per quantized linear and the quantization config blocks.

  ModelOpt:            <p>.weight uint8 [N, K/2], <p>.weight_scale e4m3 [N, K/16], <p>.weight_scale_2 f32 [],
                       <p>.input_scale f32 []            (global scale multiplies)
  compressed-tensors:  <p>.weight_packed uint8 [N, K/2], <p>.weight_scale e4m3 [N, K/16],
                       <p>.weight_global_scale f32 [1]   (global scale divides); <p>.input_global_scale optional
"""
from __future__ import annotations

import fnmatch
import re

import torch

FORMATS = ("modelopt", "compressed-tensors")
GROUP_SIZE = 16

# The linears that get quantized; everything else (embeddings, lm_head, norms, MoE router mlp.gate) stays dense.
_QUANTIZABLE = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")
# Dense linears that readers must know are not quantized (listed in ignore / exclude_modules).
_DENSE_LINEAR = re.compile(r"(^|\.)(lm_head|mlp\.gate)\.weight$")
# Gemma3ForConditionalGeneration: only the language model is quantized; the vision side stays as it is.
VISION_IGNORE = ("re:.*vision_tower.*", "re:.*multi_modal_projector.*")
# The same for ModelOpt: its readers (vLLM, TensorRT-LLM) take exclude_modules as '*' wildcards and know no 're:'.
VISION_EXCLUDE_GLOBS = ("*vision_tower*", "*multi_modal_projector*")

# transformers 5's native MoE layout (save_pretrained(save_original_format=False)): one 3-D tensor per layer for all
# experts. Neither quantized nor loaded here: the engine and published checkpoints name each expert's linears.
FUSED_EXPERTS = re.compile(r"(^|\.)experts\.(gate_up_proj|down_proj)$")
FUSED_EXPERTS_HELP = ("is transformers 5's fused MoE expert layout; adallm reads per-expert names "
                      "(...mlp.experts.0.gate_proj.weight), as published checkpoints have them: re-save the model "
                      "with save_pretrained() and its default save_original_format=True")

# Linears the engine runs as one: they must be all quantized or all dense.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

PACKED_NAME = {"modelopt": "weight", "compressed-tensors": "weight_packed"}
GLOBAL_NAME = {"modelopt": "weight_scale_2", "compressed-tensors": "weight_global_scale"}


def quantized_linear_prefix(name: str) -> str | None:
    """'model.layers.0.mlp.up_proj.weight' -> 'model.layers.0.mlp.up_proj'; None for tensors that stay dense."""
    if not _QUANTIZABLE.search(name) or is_excluded(name, list(VISION_IGNORE)):
        return None
    return name[: -len(".weight")]


def dense_linear_prefix(name: str) -> str | None:
    return name[: -len(".weight")] if _DENSE_LINEAR.search(name) else None


def fused_partners(prefix: str) -> list[str]:
    """'...self_attn.k_proj' -> the q/k/v prefixes beside it; a linear that is fused with nothing -> [prefix]."""
    parent, _, leaf = prefix.rpartition(".")
    group = next((g for g in FUSED_GROUPS if leaf in g), (leaf,))
    return [f"{parent}.{name}" for name in group]


def is_excluded(prefix: str, patterns: list[str]) -> bool:
    """Exclude patterns are shell-style globs over module names ('*.down_proj', 'model.layers.0.*'), or 're:<regex>'
    as in compressed-tensors' ignore lists."""
    for p in patterns:
        if p.startswith("re:") and re.fullmatch(p[3:], prefix) or fnmatch.fnmatchcase(prefix, p):
            return True
    return False


def quantized_specs(fmt: str, prefix: str, n: int, k: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) that a quantized linear [N, K] is stored as."""
    specs = {
        f"{prefix}.{PACKED_NAME[fmt]}": (torch.uint8, (n, k // 2)),
        f"{prefix}.weight_scale": (torch.float8_e4m3fn, (n, k // GROUP_SIZE)),
    }
    if fmt == "modelopt":
        specs[f"{prefix}.weight_scale_2"] = (torch.float32, ())
        specs[f"{prefix}.input_scale"] = (torch.float32, ())
    else:
        specs[f"{prefix}.weight_global_scale"] = (torch.float32, (1,))
    return specs


def quantization_config(fmt: str, ignore: list[str], producer_version: str) -> tuple[dict, dict | None]:
    """(config.json's quantization_config, hf_quant_config.json or None) for a weight-only NVFP4 conversion."""
    if fmt == "modelopt":
        quant = {
            "quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": GROUP_SIZE, "exclude_modules": ignore,
        }
        producer = {"name": "adallm", "version": producer_version}
        hf_quant_config = {"producer": producer, "quantization": quant}
        return {"quant_method": "modelopt", **quant, "producer": producer}, hf_quant_config
    weights = {  # as compressed-tensors serializes its NVFP4A16 preset
        "num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": GROUP_SIZE,
        "dynamic": False, "observer": "minmax", "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": "torch.float8_e4m3fn",
    }
    # The NVFP4A16 scheme of llm-compressor: FP4 weights, activations left in 16 bits (nothing was calibrated).
    return {
        "quant_method": "compressed-tensors",
        "format": "nvfp4-pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None,
                "format": "nvfp4-pack-quantized",
            },
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "producer": {"name": "adallm", "version": producer_version},
    }, None
