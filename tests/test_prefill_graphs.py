"""Prefill graphs' padding on the CPU: PrefillGraphs(capture=False) runs the padded forward a graph would replay
(static buffers, a padding sequence, empty rows, max_query_len = the bucket) eagerly, and its logits must equal the
runner's eager steps for the same tokens. Every family, so the sliding-window group and the MoE see padding too."""
import pytest
import torch
from model_helpers import Blocks, tiny_checkpoint

from adallm_core.checkpoint.read import Checkpoint
from adallm_core.config import EngineArgs
from adallm_core.prefill_graphs import PrefillGraphs, token_buckets
from adallm_core.runner import ModelRunner, SeqStep
from adallm_core.testing import FAMILIES

BS = 4


def runner_for(family, max_num_seqs=8, max_model_len=128):
    ckpt = Checkpoint(tiny_checkpoint(family, "modelopt"))
    args = EngineArgs(model=str(ckpt.path), block_size=BS, max_model_len=max_model_len, kv_cache_dtype="bf16",
                      max_num_seqs=max_num_seqs)
    runner = ModelRunner(args, ckpt, "cpu")
    runner.allocate_kv_cache([96] * len(runner.kv_groups))
    return runner


def drive(r, seed=3):
    """Steps that land in several buckets, with and without padding: a mixed step of 59 tokens (a chunk that is
    not sampled, two whole prompts), the chunk's rest (15), a step of exactly 16 tokens, then decodes."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (45, 20, 9, 16)]
    blocks = Blocks(BS, len(r.kv_groups))
    out = [r.execute([SeqStep(seqs[0][:30], 0, blocks.tables_for(0, 30), sample=False),
                      SeqStep(seqs[1], 0, blocks.tables_for(1, 20)), SeqStep(seqs[2], 0, blocks.tables_for(2, 9))])]
    out.append(r.execute([SeqStep(seqs[0][30:], 30, blocks.tables_for(0, 45))]))
    out.append(r.execute([SeqStep(seqs[3], 0, blocks.tables_for(3, 16))]))
    for _ in range(3):
        for s in seqs:
            s.append(int(torch.randint(3, 384, (1,), generator=g)))
        out.append(r.execute([SeqStep([s[-1]], len(s) - 1, blocks.tables_for(i, len(s))) for i, s in enumerate(seqs)]))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_steps_match_eager_steps(family):
    padded = runner_for(family)
    logits = torch.empty(padded.max_num_seqs, padded.model_config.vocab_size)
    padded.prefill_graphs = PrefillGraphs(padded, logits, capture=False)
    got, want = drive(padded), drive(runner_for(family))
    assert padded.prefill_graphs.replays == len(want)  # every step took the padded path
    assert [a.shape for a in got] == [b.shape for b in want]
    for step, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_longer_than_max_model_len(family):
    """Three prompts of 30 tokens in a model of max_model_len 32 fill bucket 128 with 38 padding tokens: more than
    any real sequence may hold. Their rotary positions and block table must stay inside the buffers (past them the
    GPU read out of bounds in one test order: an illegal memory access during Gemma3's capture)."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 384, (30,), generator=g).tolist() for _ in range(3)]
    padded, eager = runner_for(family, max_model_len=32), runner_for(family, max_model_len=32)
    padded.prefill_graphs = PrefillGraphs(padded, torch.empty(8, padded.model_config.vocab_size), capture=False)
    got, want = ([r.execute([SeqStep(p, 0, Blocks(BS, len(r.kv_groups)).tables_for(i, 30))
                             for i, p in enumerate(prompts)])] for r in (padded, eager))
    assert padded.prefill_graphs.replays == 1
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)


def test_steps_past_the_buckets_run_eagerly():
    r = runner_for("qwen3", max_num_seqs=2)
    graphs = PrefillGraphs(r, torch.empty(2, r.model_config.vocab_size), capture=False)
    one = SeqStep([5], 0, [[1]])
    assert graphs.bucket_for([SeqStep([5] * 16, 0, [[1] * 4])]) == 16
    assert graphs.bucket_for([SeqStep([5] * 17, 0, [[1] * 5])]) == 32
    assert graphs.bucket_for([SeqStep([5] * 513, 0, [[1] * 129])]) is None  # more tokens than the largest bucket
    assert graphs.bucket_for([one, one, one]) is None  # more sequences than the logits rows


def test_buckets_stop_at_the_step_budget():
    assert token_buckets(None) == [16, 32, 64, 128, 256, 512]
    assert token_buckets(100) == [16, 32, 64, 128]
    assert token_buckets(4096) == [16, 32, 64, 128, 256, 512]


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_tokens_with_padded_steps(family):
    """The engine's own steps through the padded path: chunked prompts (a 40-token budget), prefix-cache hits (the
    prompts share a long prefix, so later ones start past cached blocks), decodes beside chunks, Gemma3's window
    dropping blocks. Greedy tokens equal those of the engine's plain steps."""
    from engine_fixtures import PROMPTS, greedy_tokens, make_engine

    prompts = [PROMPTS[3] + p for p in PROMPTS] + PROMPTS[:3]
    kw = dict(max_num_batched_tokens=40, max_num_seqs=6, enable_prefix_caching=True)
    padded = make_engine(family, **kw)
    runner = padded.runner
    runner.prefill_graphs = PrefillGraphs(runner, torch.empty(6, runner.model_config.vocab_size), capture=False,
                                          max_num_batched_tokens=40)
    got = greedy_tokens(padded, prompts)
    assert runner.prefill_graphs.replays > len(prompts)  # prompts in chunks, and decodes beside them
    stats = padded.stats()
    assert stats["kv_blocks_used"] == 0 and stats["prefix_cache_hit_tokens"] > 0
    assert got == greedy_tokens(make_engine(family, **kw), prompts)
