"""ModelConfig from transformers configs: both RoPE spellings, layer kinds, KV groups, MoE layers, eos ids."""
import json

import pytest
import torch
from transformers import Gemma3TextConfig, Qwen3Config, Qwen3MoeConfig

from adallm_core.model_config import ModelConfig

SMALL = dict(vocab_size=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16)


def test_gemma3_legacy_rope_keys_and_transformers5_form_agree():
    legacy = Gemma3TextConfig(num_hidden_layers=6, sliding_window=8, rope_theta=1e6, rope_local_base_freq=1e4,
                              rope_scaling={"rope_type": "linear", "factor": 8.0},
                              architectures=["Gemma3ForCausalLM"], **SMALL)
    new = Gemma3TextConfig(num_hidden_layers=6, sliding_window=8, architectures=["Gemma3ForCausalLM"],
                           rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}, **SMALL)
    for hf in (legacy, new):
        cfg = ModelConfig.from_hf_config(hf)
        assert cfg.layer_types == ("sliding_attention",) * 5 + ("full_attention",)  # 5 local : 1 global
        assert [(g.sliding_window, g.layers) for g in cfg.kv_groups] == [(None, (5,)), (8, (0, 1, 2, 3, 4))]
        local, f_local = cfg.rope_inv_freq("sliding_attention")
        glob, f_glob = cfg.rope_inv_freq("full_attention")
        d = torch.arange(0, 16, 2).float() / 16
        torch.testing.assert_close(local, 1.0 / 1e4**d)
        torch.testing.assert_close(glob, 1.0 / 1e6**d / 8.0)  # linear scaling divides the frequencies
        assert f_local == f_glob == 1.0
        assert cfg.query_pre_attn_scalar == 256 and cfg.activation == "gelu_tanh" and cfg.tie_word_embeddings


def test_qwen3_moe_layers_and_eos_from_generation_config(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 3]}))
    hf = Qwen3MoeConfig(num_hidden_layers=4, mlp_only_layers=[2], decoder_sparse_step=1, num_experts=4,
                        num_experts_per_tok=2, moe_intermediate_size=8, norm_topk_prob=True, rope_theta=1e6,
                        eos_token_id=3, architectures=["Qwen3MoeForCausalLM"], **SMALL)
    cfg = ModelConfig.from_hf_config(hf, tmp_path)
    assert cfg.moe_layers == (True, True, False, True)
    assert cfg.eos_token_ids == (7, 3)
    assert cfg.rope_parameters == {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}
    assert cfg.sliding_window is None and len(cfg.kv_groups) == 1 and cfg.norm_topk_prob


def test_unsupported_configs_are_refused_by_name():
    with pytest.raises(ValueError, match="architectures"):
        ModelConfig.from_hf_config(Qwen3Config(num_hidden_layers=1, **SMALL))
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        ModelConfig.from_hf_config(Gemma3TextConfig(num_hidden_layers=1, attn_logit_softcapping=50.0,
                                                    architectures=["Gemma3ForCausalLM"], **SMALL))
    cfg = ModelConfig.from_hf_config(Qwen3Config(num_hidden_layers=1, architectures=["Qwen3ForCausalLM"],
                                                 rope_scaling={"rope_type": "dynamic", "factor": 2.0}, **SMALL))
    with pytest.raises(ValueError, match="dynamic"):
        cfg.rope_inv_freq("full_attention")


@pytest.mark.parametrize("config_class,arch", [
    (Qwen3Config, "Qwen3ForCausalLM"), (Qwen3MoeConfig, "Qwen3MoeForCausalLM"), (Gemma3TextConfig, "Gemma3ForCausalLM"),
])
def test_attention_bias_is_refused(config_class, arch):
    """transformers gives q/k/v/o biases with attention_bias true; the model code has none and would drop them."""
    with pytest.raises(ValueError, match="attention_bias"):
        ModelConfig.from_hf_config(config_class(num_hidden_layers=1, attention_bias=True, architectures=[arch],
                                                **SMALL))


def test_rope_that_changes_with_sequence_length_is_refused():
    """transformers switches longrope to its long_factor for a sequence past original_max_position_embeddings (all
    positions at once); a fixed cos/sin table cannot, so it would silently keep the short factors."""
    rope = {"rope_type": "longrope", "rope_theta": 1e6, "original_max_position_embeddings": 16,
            "short_factor": [1.0] * 8, "long_factor": [4.0] * 8}
    cfg = ModelConfig.from_hf_config(Qwen3Config(num_hidden_layers=1, architectures=["Qwen3ForCausalLM"],
                                                 rope_parameters=rope, **SMALL))
    with pytest.raises(ValueError, match="longrope"):
        cfg.rope_inv_freq("full_attention")


def test_moe_with_another_activation_than_silu_is_refused():
    """The MoE experts (ops.moe) are SwiGLU only; transformers' Qwen3MoeExperts use hidden_act."""
    hf = Qwen3MoeConfig(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                        hidden_act="gelu_pytorch_tanh", architectures=["Qwen3MoeForCausalLM"], **SMALL)
    with pytest.raises(ValueError, match="gelu_pytorch_tanh"):
        ModelConfig.from_hf_config(hf)
    hf.mlp_only_layers = [0, 1]  # no MoE layer left: the dense MLPs take any supported activation
    assert ModelConfig.from_hf_config(hf).activation == "gelu_tanh"


@pytest.mark.parametrize("text,match", [
    ("{not json", r"generation_config\.json: not valid JSON"),
    ('{"eos_token_id": "</s>"}', r"generation_config\.json: field 'eos_token_id' = '</s>' is not a token id"),
    ('{"eos_token_id": [1, null]}', r"generation_config\.json: field 'eos_token_id' = \[1, None\] is not a token id"),
])
def test_bad_generation_config_is_named(tmp_path, text, match):
    """Read as the engine's model config (also where --tokenizer points elsewhere and the tokenizer never reads it)."""
    (tmp_path / "generation_config.json").write_text(text)
    hf = Qwen3Config(num_hidden_layers=1, architectures=["Qwen3ForCausalLM"], **SMALL)
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_config(hf, tmp_path)


@pytest.mark.parametrize("config_class,arch,rope,expected", [
    # Qwen3's documented long-context setting: yarn, factor 4 over the 32768 it was trained on
    (Qwen3Config, "Qwen3ForCausalLM", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
     131072),
    (Qwen3Config, "Qwen3ForCausalLM", {"rope_type": "linear", "factor": 2.0}, 81920),
    (Qwen3Config, "Qwen3ForCausalLM", None, 40960),
    (Qwen3Config, "Qwen3ForCausalLM", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, 40960),
    # Gemma3's max_position_embeddings (128K) already counts its global layers' linear factor 8
    (Gemma3TextConfig, "Gemma3ForCausalLM", {"rope_type": "linear", "factor": 8.0}, 40960),
])
def test_context_length_counts_rope_scaling_as_vllm_derives_it(config_class, arch, rope, expected):
    """vLLM's derived max_model_len (_get_and_verify_max_len): a longer max_model_len is refused, up to it taken."""
    hf = config_class(num_hidden_layers=1, max_position_embeddings=40960, rope_scaling=rope, architectures=[arch],
                      **SMALL)
    assert ModelConfig.from_hf_config(hf).max_context_len == expected
