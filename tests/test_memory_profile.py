"""The start-up step that measures the largest step's memory (adallm_core/memory_profile.py). The measurement itself
is CUDA's (tests/test_engine_gpu.py); here, on the CPU, the step it runs: real prompts whose logits match
transformers, on a temporary cache that is gone afterwards, leaving the runner as it was."""
import pytest
import torch
from model_helpers import hf_last_logits, hf_on_dequantized, tiny_checkpoint

from adallm_core.checkpoint.read import Checkpoint
from adallm_core.config import EngineArgs
from adallm_core.memory_profile import graph_step_seqs, largest_step, run_largest_step
from adallm_core.runner import ModelRunner, SeqStep


def test_largest_step_splits_the_tokens_over_the_sequences():
    assert largest_step(8192, 64, 8192) == [128] * 64
    assert largest_step(10, 4, 100) == [3, 3, 2, 2]
    assert largest_step(3, 64, 100) == [1, 1, 1]  # fewer tokens than sequences: one token each
    assert largest_step(4096, 2, 1000) == [1000, 1000]  # no sequence past max_model_len


@pytest.mark.parametrize("bucket,num_seqs,max_model_len", [(512, 2, 64), (512, 16, 512), (16, 1, 8), (512, 3, 100)])
def test_the_graph_pool_is_measured_over_the_whole_bucket(bucket, num_seqs, max_model_len):
    """A captured prefill graph runs its bucket's tokens whatever the sequences hold (the padding fills it), so the
    step that sizes its pool holds them all, even where max_num_seqs sequences of max_model_len hold fewer."""
    lengths = largest_step(bucket, graph_step_seqs(bucket, num_seqs, max_model_len), max_model_len)
    assert sum(lengths) == bucket and max(lengths) <= max_model_len
    assert len(lengths) >= min(num_seqs, bucket)  # never fewer rows than the engine samples


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "gemma3"])
def test_largest_step_runs_real_prompts_and_frees_its_cache(family):
    ckpt = Checkpoint(tiny_checkpoint(family, "modelopt"))
    args = EngineArgs(model=str(ckpt.path), dtype="float32", kv_cache_dtype="bf16", block_size=4, max_model_len=64)
    runner = ModelRunner(args, ckpt, "cpu")
    logits = run_largest_step(runner, tokens=70, num_seqs=3)  # 24, 23 and 23 tokens over 6 blocks each
    assert runner.kv_caches == [] and all(a.k_cache is None for a in runner.model.attention_layers())

    # the step's prompts, rebuilt as it draws them: each sequence's last logits are transformers' for that prompt
    ids = torch.randint(runner.model_config.vocab_size, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    hf = hf_on_dequantized(family, ckpt)
    hf.set_attn_implementation("sdpa")
    starts = [0, 24, 47, 70]
    assert logits.shape == (3, runner.model_config.vocab_size)
    for row, (a, b) in enumerate(zip(starts, starts[1:])):
        ref = hf_last_logits(hf, ids[a:b])
        assert ref.abs().max() > 0.5
        torch.testing.assert_close(logits[row], ref, rtol=0, atol=1e-4)

    # a cache allocated afterwards serves as before
    runner.allocate_kv_cache([32] * len(runner.kv_groups))
    again = runner.execute([SeqStep(ids[:24], 0, [list(range(1, 7))] * len(runner.kv_groups))])
    torch.testing.assert_close(again[0], logits[0], rtol=0, atol=1e-5)
