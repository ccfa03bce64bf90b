"""The tiny test models are real transformers checkpoints with the features the engine must handle."""
import json
import multiprocessing

import pytest
import torch
from safetensors import safe_open

from adallm_core import testing
from adallm_core.checkpoint.read import Checkpoint

TEXT = "Привет, 日本語のテキスト 🙂 — café: tokens across multi-byte characters"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: testing.build_tiny_checkpoint(f, root / f) for f in testing.FAMILIES}


def test_transformers_loads_and_runs_each(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for family, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert model.dtype == torch.bfloat16
        ids = tok(TEXT, return_tensors="pt").input_ids
        assert ids.shape[1] > 16  # longer than Gemma3's sliding window
        logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], 384) and bool(torch.isfinite(logits).all())
        assert tok.decode(ids[0], skip_special_tokens=True) == TEXT
        assert max(tok.get_vocab().values()) < model.config.vocab_size


def test_tokenizer_splits_multibyte_characters_and_has_chat_templates(models):
    from transformers import AutoTokenizer

    qwen = AutoTokenizer.from_pretrained(models["qwen3"])
    pieces = [qwen.decode([i]) for i in qwen.encode("日本語のテキスト")]
    assert any("\ufffd" in p for p in pieces)  # some tokens are partial UTF-8 sequences: detokenizers must cope
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert qwen.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )
    gemma = AutoTokenizer.from_pretrained(models["gemma3"])
    assert gemma.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\n"
    )
    assert gemma.encode("hi")[0] == gemma.bos_token_id and qwen.bos_token is None


def test_configs_exercise_the_model_features(models):
    gemma = json.loads((models["gemma3"] / "config.json").read_text())
    assert gemma["sliding_window"] == 16
    assert set(gemma["layer_types"]) == {"sliding_attention", "full_attention"}
    rope = gemma["rope_parameters"]
    assert rope["sliding_attention"]["rope_theta"] != rope["full_attention"]["rope_theta"]
    assert gemma["query_pre_attn_scalar"] != gemma["head_dim"] and gemma["tie_word_embeddings"]
    moe = json.loads((models["qwen3_moe"] / "config.json").read_text())
    assert (moe["num_experts"], moe["num_experts_per_tok"], moe["norm_topk_prob"]) == (8, 2, True)
    qwen = json.loads((models["qwen3"] / "config.json").read_text())
    assert not qwen["tie_word_embeddings"] and qwen["max_position_embeddings"] == 2048
    for path in models.values():
        gen = json.loads((path / "generation_config.json").read_text())
        assert isinstance(gen["eos_token_id"], list) and len(gen["eos_token_id"]) == 2


def test_every_norm_has_its_own_weights(models):
    """transformers starts every norm at the same scale; the builder randomizes them, so a layer that applied one
    norm's weight in another's place would fail the parity tests."""
    for family, path in models.items():
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            norms = [f.get_tensor(n).float() for n in sorted(f.keys()) if n.endswith("norm.weight")]
        assert len(norms) >= 4, family
        assert all(n.std() > 0.1 for n in norms), family
        assert all(not torch.equal(a, b) for i, a in enumerate(norms) for b in norms[i + 1:] if a.shape == b.shape)


def test_moe_checkpoint_uses_published_per_expert_names(models):
    with safe_open(str(models["qwen3_moe"] / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.1.mlp.experts.7.down_proj.weight").get_shape() == [64, 64]
    assert {f"model.layers.0.mlp.experts.{e}.{p}.weight" for e in range(8) for p in ("gate_proj", "up_proj")} <= names
    assert not any("gate_up_proj" in n for n in names)


def test_builds_are_deterministic(models, tmp_path):
    again = testing.build_tiny_checkpoint("qwen3_moe", tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (models["qwen3_moe"] / name).read_bytes()
    other = testing.build_tiny_checkpoint("qwen3_moe", tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown model family 'llama'"):
        testing.build_tiny_checkpoint("llama", "/nonexistent")


def _demo_path(cache: str) -> str:
    import os

    os.environ["ADALLM_CACHE"] = cache
    return str(testing.demo_model_path())


def test_demo_model_is_built_once_even_when_first_used_concurrently(tmp_path, monkeypatch):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        paths = pool.map(_demo_path, [str(tmp_path)] * 2)
    assert paths[0] == paths[1] == str(tmp_path / testing.DEMO_NAME)
    assert sorted(p.name for p in tmp_path.iterdir()) == [testing.DEMO_NAME]  # no temp folders left
    monkeypatch.setenv("ADALLM_CACHE", str(tmp_path))
    ckpt = Checkpoint(testing.demo_model_path())
    assert ckpt.quant_format == "modelopt" and ckpt.config["architectures"] == ["Qwen3ForCausalLM"]
