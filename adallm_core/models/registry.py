"""Model classes by Hugging Face architecture name (config.json `architectures[0]`)."""
from __future__ import annotations

from adallm_core.models.gemma3 import Gemma3ForCausalLM
from adallm_core.models.qwen3 import Qwen3ForCausalLM
from adallm_core.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForCausalLM,  # text part only
}


def get_model_class(architecture: str):
    if architecture not in MODEL_REGISTRY:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[architecture]
