"""The CUDA memory the largest step takes beyond the weights and the KV cache, measured once at start-up so the KV
budget leaves room for it (as vLLM's profiling run does).

The largest step the scheduler can form is max_num_batched_tokens prompt tokens over up to max_num_seqs sequences,
each sampled, followed by the sampler's worst case over those rows (top-k/top-p sort, min-p, penalties, logprobs).
It matters on the cards this project is for: Gemma3-27B leaves about 5-6 GB of a 24 GB card free after its weights,
gpu_memory_utilization 0.9 gives 90% of that to the KV cache, and a step of 8192 prompt tokens needs more than the
~0.6 GB left: 1.34 GB at its peak over 64 sequences (its gate|up output alone is 704 MB; H200, random weights,
benchmarks/NOTES.md). Without the measurement that step would fail mid-serving instead of at start-up.
"""
from __future__ import annotations

import gc
import itertools
import math

import torch

from adallm_core.runner import PromptScoring, SeqStep
from adallm_core.sampler import Sampler, SamplingRow
from adallm_core.sampling_params import MAX_LOGPROBS, SamplingParams

# every logits processor and the logprobs at once: the sampler's most memory
WORST_CASE_SAMPLING = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                                     frequency_penalty=0.5, presence_penalty=0.5, logprobs=20, seed=0)


def largest_step(tokens: int, num_seqs: int, max_model_len: int) -> list[int]:
    """Prompt lengths of the largest step: `tokens` split evenly over min(num_seqs, tokens) sequences, none longer
    than max_model_len (so at most num_seqs x max_model_len tokens in all)."""
    seqs = min(num_seqs, tokens)
    tokens = min(tokens, seqs * max_model_len)
    return [tokens // seqs + (i < tokens % seqs) for i in range(seqs)]


def graph_step_seqs(bucket: int, num_seqs: int, max_model_len: int) -> int:
    """Sequences for measuring a captured bucket's step. Its padding fills the bucket whatever the sequences hold,
    so where max_num_seqs sequences of max_model_len fall short of it, as many as make up its tokens (each one
    sampled: more rows than the graph's, an upper bound)."""
    return max(num_seqs, -(-bucket // max_model_len))


def block_ends(lengths: list[int], block_size: int) -> list[int]:
    """The temporary cache's layout: sequence i takes blocks ends[i] .. ends[i + 1] - 1, after the KV manager's
    null block 0; ends[-1] is the cache's block count."""
    return list(itertools.accumulate((math.ceil(n / block_size) for n in lengths), initial=1))


def run_largest_step(runner, tokens: int, num_seqs: int, scored: bool = True) -> torch.Tensor:
    """Run the largest step on a temporary KV cache that holds just its tokens, then sample its logits the
    costliest way, and free the cache. Random token ids from a generator of its own: no state of the engine's
    (its sampler's generators, its KV blocks, its prefix cache) is touched. Returns the step's logits.
    scored: every row is also scored with the most top tokens prompt_logprobs takes (its chunks of logits,
    runner.SCORE_ROWS rows, live beside the step's hidden states)."""
    lengths = largest_step(tokens, num_seqs, runner.max_model_len)
    ends = block_ends(lengths, runner.block_size)
    ids = torch.randint(runner.vocab_size, (sum(lengths),), generator=torch.Generator().manual_seed(0))
    ids = ids.tolist()
    starts = list(itertools.accumulate(lengths, initial=0))
    steps = [SeqStep(ids[starts[i]:starts[i + 1]], 0, [list(range(ends[i], ends[i + 1]))] * len(runner.kv_groups),
                     score=PromptScoring(0, ids[starts[i]:starts[i + 1]], MAX_LOGPROBS) if scored else None)
             for i in range(len(lengths))]
    runner.allocate_kv_cache([ends[-1]] * len(runner.kv_groups), capture_graphs=False)
    try:
        logits = runner.execute_scored(steps)[0] if scored else runner.execute(steps)
        rows = [SamplingRow(WORST_CASE_SAMPLING, s.token_ids[-8:], s.token_ids[:8], index=i,
                            banned_token_ids=(0,)) for i, s in enumerate(steps)]
        Sampler(0, runner.device)(logits, rows)
    finally:
        runner.free_kv_cache()
    return logits


def step_peak_bytes(runner, tokens: int, num_seqs: int, scored: bool = True) -> int:
    """CUDA bytes the largest step allocates at its peak beyond what was allocated before it and its temporary KV
    cache: activations, logits, the sampler's temporaries, workspaces. The cache's blocks go back to the device."""
    dev = runner.device
    gc.collect()  # garbage of cycles counted in `before` and freed by a collection mid-step would hide part of the peak
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    lengths = largest_step(tokens, num_seqs, runner.max_model_len)
    kv_bytes = block_ends(lengths, runner.block_size)[-1] * sum(runner.kv_block_bytes())
    try:
        run_largest_step(runner, tokens, num_seqs, scored)
        torch.cuda.synchronize(dev)
    except torch.cuda.OutOfMemoryError as exc:
        raise ValueError(f"a step of {tokens} prompt tokens over up to {num_seqs} sequences does not fit in the "
                         f"memory the weights left on {dev}: lower max_num_batched_tokens or max_num_seqs") from exc
    peak = torch.cuda.max_memory_allocated(dev) - before - kv_bytes
    torch.cuda.empty_cache()
    return max(0, peak)
