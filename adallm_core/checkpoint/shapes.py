"""Expected [out_features, in_features] of each linear of the supported families, from config.json."""
from __future__ import annotations

import re

from adallm_core.checkpoint.files import CheckpointError

_LINEAR = re.compile(r"layers\.\d+\.(self_attn|mlp)\.(?:experts\.\d+\.)?(\w+_proj)$")
_LM_HEAD = re.compile(r"(?:^|\.)lm_head$")
_ROUTER = re.compile(r"layers\.\d+\.mlp\.gate$")
_NORM = re.compile(r"(?:layers\.\d+\.(?:self_attn\.)?(\w*norm)|(?:^|\.)(norm))\.weight$")
_EMBEDDING = re.compile(r"(?:^|\.)embed_tokens\.weight$")


def text_config(config: dict, where="config.json") -> dict:
    """The language-model part of config.json (Gemma3ForConditionalGeneration nests it under text_config), with
    transformers' defaults for the fields it omits: published configs leave out those equal to the default
    (google/gemma-3-4b-it's text_config has no head_dim, num_attention_heads or vocab_size)."""
    raw = {**config, **config["text_config"]} if isinstance(config.get("text_config"), dict) else config
    return {**_transformers_text_config(config, where), **raw}


def _transformers_text_config(config: dict, where) -> dict:
    """The text config as transformers (and so the model build) reads config.json; {} for a type it does not know."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if config.get("model_type") not in CONFIG_MAPPING:
        return {}
    try:
        text = CONFIG_MAPPING[config["model_type"]].from_dict(config).get_text_config()
    except Exception as e:  # transformers 5 validates through huggingface_hub's StrictDataclassError: no ValueError
        message = " ".join(str(e).split())  # those span lines
        raise CheckpointError(f"{where}: transformers cannot read it: {type(e).__name__}: {message}") from None
    return text.to_dict() if isinstance(text, PretrainedConfig) else {}


def expected_linear_shape(c: dict, prefix: str) -> tuple[int, int] | None:
    """(N, K) of 'model.layers.3.self_attn.k_proj', 'lm_head', the MoE router '...mlp.gate' etc., or None when the
    module is not a known linear. c: text_config(config.json), resolved once by the caller."""
    m, head, router = _LINEAR.search(prefix), _LM_HEAD.search(prefix), _ROUTER.search(prefix)
    if not (m or head or router) or "vision_tower" in prefix or "multi_modal_projector" in prefix:  # no rule there
        return None
    try:
        hidden = c["hidden_size"]
        if head or router:
            return (c["vocab_size"] if head else c.get("num_experts") or c["num_local_experts"], hidden)
        head_dim = c.get("head_dim") or hidden // c["num_attention_heads"]
        q = c["num_attention_heads"] * head_dim
        kv = c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim
        inter = c["moe_intermediate_size"] if ".experts." in prefix else c.get("intermediate_size")
    except KeyError as e:
        raise CheckpointError(f"config.json: field {e.args[0]!r} is missing") from None
    return {
        "q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
        "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter),
    }.get(m.group(2))


def expected_dense_shape(c: dict, name: str) -> tuple[int, ...] | None:
    """Shape of a norm weight ('...input_layernorm.weight', '...q_norm.weight', 'model.norm.weight') or of the
    input embedding table, from c = text_config(config.json); None for any other tensor."""
    if "vision_tower" in name or "multi_modal_projector" in name:
        return None
    norm, embedding = _NORM.search(name), _EMBEDDING.search(name)
    if not norm and not embedding:
        return None
    try:
        hidden = c["hidden_size"]
        if embedding:
            return (c["vocab_size"], hidden)
        kind = next(g for g in norm.groups() if g)
        return (c.get("head_dim") or hidden // c["num_attention_heads"],) if kind in ("q_norm", "k_norm") else (hidden,)
    except KeyError as e:
        raise CheckpointError(f"config.json: field {e.args[0]!r} is missing") from None
