"""The decode benchmark's random checkpoint builds a working engine (tiny sizes of each family, CPU reference ops)."""
from __future__ import annotations

import pytest

from benchmarks.decode import build_engine, run_batch, step_bytes
from benchmarks.random_checkpoint import SHAPES, RandomCheckpoint

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=97)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_random_engine_generates_every_token(shape):
    overrides = dict(TINY, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2) if "a3b" in shape else TINY
    if shape.startswith("gemma3"):
        overrides = dict(overrides, sliding_window=8, query_pre_attn_scalar=16)
    engine, runner = build_engine(shape, 3, 12, 5, enforce_eager=True, device="cpu", overrides=overrides)
    row = run_batch(engine, 3, 12, 5, runner.model_config.vocab_size)
    assert row["total_tokens"] == 3 * 5
    assert row["decode_ms_step"] > 0
    # bytes of a step: the packed linears (0.5625 B a weight) + lm_head + KV, at least the lm_head
    assert step_bytes(runner, 3, 12) > 97 * 64 * 2


def test_random_nvfp4_has_the_intended_spread():
    ckpt = RandomCheckpoint("qwen3-8b", "cpu", overrides=TINY)
    w = ckpt.linear("model.layers.0.mlp.gate_proj").dequantize()
    assert w.shape == (128, 64)
    assert 0.01 < w.std().item() < 0.03


def test_unknown_names_are_refused():
    ckpt = RandomCheckpoint("qwen3-8b", "cpu", overrides=TINY)
    with pytest.raises(ValueError, match="no linear"):
        ckpt.linear("model.layers.0.mlp.nonsense")
    with pytest.raises(ValueError, match="unknown shape"):
        RandomCheckpoint("llama-70b", "cpu")
    assert ckpt.tensor("model.layers.1.self_attn.q_norm.weight").shape == (16,)
    with pytest.raises(ValueError, match="no tensor"):
        ckpt.tensor("model.layers.0.mlp.gate_proj.bias")
