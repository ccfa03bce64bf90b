"""What the runner and the engine need to know about a model, read once from its Hugging Face config."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from adallm_core.checkpoint.files import SUPPORTED_ARCHITECTURES, generation_eos_ids

FULL, SLIDING = "full_attention", "sliding_attention"
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
# RoPE types whose max_position_embeddings already counts their scaling (vLLM's list)
ROPE_TYPES_SCALED_IN_CONFIG = ("su", "longrope", "llama3")


@dataclass(frozen=True)
class KVGroup:
    """Layers that share one block table (and one block pool): all full-attention layers, or all sliding ones."""

    sliding_window: Optional[int]
    layers: tuple[int, ...]


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    intermediate_size: int
    rms_norm_eps: float
    activation: str  # 'silu' | 'gelu_tanh'
    layer_types: tuple[str, ...]  # per layer: FULL | SLIDING
    sliding_window: Optional[int]  # tokens a query sees in a sliding layer, itself included (HF semantics)
    rope_parameters: dict  # layer type -> {'rope_type', 'rope_theta', ...} (transformers 5 form, standardized)
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    # Qwen3-MoE
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[bool, ...] = ()
    # Gemma3
    query_pre_attn_scalar: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    hf_config: Any = field(default=None, repr=False, compare=False)

    @property
    def kv_groups(self) -> list[KVGroup]:
        """Group 0: full-attention layers (if any); then the sliding-window layers (if any)."""
        groups = []
        for kind in (FULL, SLIDING):
            layers = tuple(i for i, t in enumerate(self.layer_types) if t == kind)
            if layers:
                groups.append(KVGroup(self.sliding_window if kind == SLIDING else None, layers))
        return groups

    @property
    def max_context_len(self) -> int:
        """The longest context the model takes, as vLLM derives it: max_position_embeddings times the RoPE scaling
        factor (yarn: original_max_position_embeddings times it), so Qwen3 with its documented yarn factor 4 takes
        131072 tokens. Gemma3's max_position_embeddings already counts its linear scaling."""
        if "gemma3" in self.model_type:
            return self.max_position_embeddings
        length, factor = self.max_position_embeddings, 1.0
        for params in self.rope_parameters.values():
            rope_type = params.get("rope_type", "default")
            if rope_type in ROPE_TYPES_SCALED_IN_CONFIG:
                continue
            factor = params.get("factor") or factor
            if rope_type == "yarn":
                length = params.get("original_max_position_embeddings") or length
        return int(length * factor)

    def rope_inv_freq(self, layer_type: str) -> tuple[torch.Tensor, float]:
        """(inv_freq [head_dim/2] float32, attention_factor) for a layer type, as transformers computes them."""
        params = self.rope_parameters[layer_type]
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            dim = self.head_dim
            inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            return inv_freq, 1.0
        if "dynamic" in rope_type or rope_type == "longrope":  # transformers' dynamic_rope_update recomputes these
            raise ValueError(f"rope_type {rope_type!r} (changes with sequence length) is not supported")
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unknown rope_type {rope_type!r} in rope_parameters[{layer_type!r}]")
        nested = _is_nested(self.hf_config.rope_parameters)
        kwargs = {"layer_type": layer_type} if nested else {}
        inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](self.hf_config, None, **kwargs)
        return inv_freq.float(), float(factor)

    @classmethod
    def from_hf_config(cls, hf_config, model_dir: Optional[Path] = None) -> "ModelConfig":
        """hf_config: a transformers config (its rope_parameters are already standardized from any legacy keys)."""
        archs = getattr(hf_config, "architectures", None) or []
        if not archs:
            raise ValueError("config.json has no 'architectures': cannot tell which model class to build")
        text = hf_config.get_text_config()
        n = text.num_hidden_layers
        act_name = getattr(text, "hidden_activation", None) or getattr(text, "hidden_act", "silu")
        if act_name not in ACTIVATIONS:
            raise ValueError(f"config.json: unsupported activation {act_name!r}; supported: {sorted(ACTIVATIONS)}")
        if getattr(text, "attn_logit_softcapping", None) is not None:
            raise ValueError("config.json: attn_logit_softcapping is not supported (Gemma2-style attention)")
        if getattr(text, "attention_bias", False):  # transformers adds q/k/v/o biases; the layers here have none
            raise ValueError("config.json: attention_bias is not supported (q/k/v/o projections with biases)")
        if getattr(text, "use_bidirectional_attention", False):
            raise ValueError("config.json: use_bidirectional_attention is not supported (causal LM only)")
        window = getattr(text, "sliding_window", None)
        layer_types = getattr(text, "layer_types", None) or [SLIDING if window else FULL] * n
        if SLIDING not in layer_types:
            window = None
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        num_experts = getattr(text, "num_experts", 0) or 0
        sparse_step = getattr(text, "decoder_sparse_step", 1) or 1
        mlp_only = set(getattr(text, "mlp_only_layers", None) or [])
        moe_layers = tuple(num_experts > 0 and i not in mlp_only and (i + 1) % sparse_step == 0 for i in range(n))
        if any(moe_layers) and ACTIVATIONS[act_name] != "silu":  # ops.moe's experts are SwiGLU only
            raise ValueError(f"config.json: activation {act_name!r} is not supported in MoE experts (silu only)")
        return cls(
            # the first one adallm builds, as vLLM picks from the list (load_config refuses a list with none)
            architecture=next((a for a in archs if a in SUPPORTED_ARCHITECTURES), archs[0]),
            model_type=text.model_type,
            num_layers=n,
            hidden_size=text.hidden_size,
            num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads,
            head_dim=head_dim,
            vocab_size=text.vocab_size,
            max_position_embeddings=text.max_position_embeddings,
            intermediate_size=getattr(text, "intermediate_size", 0) or 0,
            rms_norm_eps=text.rms_norm_eps,
            activation=ACTIVATIONS[act_name],
            layer_types=tuple(layer_types),
            sliding_window=window,
            rope_parameters=_rope_by_layer_type(text, set(layer_types)),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            eos_token_ids=_eos_ids(hf_config, text, model_dir),
            num_experts=num_experts,
            num_experts_per_tok=getattr(text, "num_experts_per_tok", 0) or 0,
            moe_intermediate_size=getattr(text, "moe_intermediate_size", 0) or 0,
            norm_topk_prob=bool(getattr(text, "norm_topk_prob", False)),
            moe_layers=moe_layers,
            query_pre_attn_scalar=getattr(text, "query_pre_attn_scalar", None),
            final_logit_softcapping=getattr(text, "final_logit_softcapping", None),
            hf_config=text,
        )


def _is_nested(rope_parameters: dict) -> bool:
    return bool(rope_parameters) and set(rope_parameters) <= {FULL, SLIDING}


def _rope_by_layer_type(text, layer_types: set[str]) -> dict:
    params = getattr(text, "rope_parameters", None)
    if not params:  # very old configs: nothing standardized
        params = {"rope_type": "default", "rope_theta": getattr(text, "rope_theta", 10000.0)}
    if _is_nested(params):
        missing = layer_types - set(params)
        if missing:
            raise ValueError(f"config.json rope_parameters has no entry for layer type(s) {sorted(missing)}")
        return {t: dict(params[t]) for t in layer_types}
    return {t: dict(params) for t in layer_types}


def _eos_ids(hf_config, text, model_dir: Optional[Path]) -> tuple[int, ...]:
    """eos ids from generation_config.json (what generate() stops on) plus config.json's."""
    ids: list[int] = []
    sources = [getattr(hf_config, "eos_token_id", None), getattr(text, "eos_token_id", None)]
    if model_dir is not None:
        sources.insert(0, generation_eos_ids(model_dir))
    for value in sources:
        for i in [value] if isinstance(value, int) else (value or []):
            if i not in ids:
                ids.append(int(i))
    return tuple(ids)
