"""Greedy generations of the engine (batch of 8, mixed lengths, continuous batching, paged KV) equal
transformers' own model class `generate` on the dequantized NVFP4 weights, for each family and both formats."""
import pytest
import torch

from adallm_core.checkpoint.read import Checkpoint
from adallm_core.sampling_params import SamplingParams
from engine_fixtures import PROMPTS, make_engine, run_all
from model_helpers import hf_on_dequantized, tiny_checkpoint

NEW_TOKENS = 32


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "gemma3"])
def test_greedy_batch_matches_transformers_generate(family, fmt):
    path = tiny_checkpoint(family, fmt)
    engine = make_engine(family, fmt, kv_cache_dtype="bf16")
    prompt_ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    if family == "gemma3":
        window = engine.runner.model_config.sliding_window
        assert sum(len(p) > window for p in prompt_ids) >= 4, "Gemma3 prompts must outgrow the sliding window"
    # Both stop on the eos ids of generation_config.json, as a user of either would see.
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    for i, ids in enumerate(prompt_ids):
        engine.add_request(str(i), ids, params)
    done = run_all(engine)
    ours = [done[str(i)].outputs[0].token_ids for i in range(len(prompt_ids))]

    hf = hf_on_dequantized(family, Checkpoint(path))
    with torch.no_grad():
        ref = [hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids):].tolist()
               for ids in prompt_ids]
    assert sum(len(r) == NEW_TOKENS for r in ref) >= 6  # mostly full-length continuations, not early eos
    mismatches = [i for i in range(len(PROMPTS)) if ours[i] != ref[i]]
    assert not mismatches, [(i, ours[i], ref[i]) for i in mismatches]
