"""Which decode graphs a step replays, on the CPU: graphs are captured per batch bucket and context bound
(cuda_graphs.context_bounds), and a step takes the smallest bound its longest context fits. The short bound exists
for the decode attention's split rule: the same batch gets one part under it and several under a serving bound."""
import pytest
import torch

from adallm_core.cuda_graphs import SHORT_CONTEXT, bound_for, context_bounds
from adallm_core.ops.metadata import AttentionMetadata

pytest.importorskip("triton")
from adallm_core.ops.triton.paged_attention import num_splits_for  # noqa: E402


@pytest.mark.parametrize("max_model_len,bounds", [(128, [128]), (SHORT_CONTEXT, [SHORT_CONTEXT]),
                                                  (SHORT_CONTEXT + 1, [SHORT_CONTEXT, SHORT_CONTEXT + 1]),
                                                  (8192, [SHORT_CONTEXT, 8192])])
def test_context_bounds(max_model_len, bounds):
    assert context_bounds(max_model_len) == bounds


@pytest.mark.parametrize("context,bound", [(1, SHORT_CONTEXT), (SHORT_CONTEXT // 2, SHORT_CONTEXT),
                                           (SHORT_CONTEXT, SHORT_CONTEXT), (SHORT_CONTEXT + 1, 8192), (8192, 8192),
                                           (9000, 8192)])
def test_a_step_takes_the_smallest_bound_that_holds_its_longest_context(context, bound):
    assert bound_for(context_bounds(8192), context) == bound


def bound_meta(batch: int, bound: int) -> AttentionMetadata:
    lens = torch.full((batch,), 129, dtype=torch.int32)
    return AttentionMetadata(torch.arange(batch + 1, dtype=torch.int32), lens, torch.zeros(batch, 9, dtype=torch.int32),
                             1, bound)


@pytest.mark.parametrize("batch", [16, 32])
def test_the_short_bound_runs_one_part_where_the_serving_bound_splits(batch):
    """Qwen3-8B's 8 KV heads on an H100's SM count (off the GPU): batches of 16+ sequences split the keys under the
    default serving bound (8192) but not under SHORT_CONTEXT, so short contexts skip the parts' merge."""
    cpu = torch.device("cpu")
    assert num_splits_for(bound_meta(batch, SHORT_CONTEXT), 8, cpu) == 1
    assert num_splits_for(bound_meta(batch, 8192), 8, cpu) > 1


def test_the_short_bound_graphs_take_the_attention_short_tiles():
    """The attention keys its one-tile decode tiles to the same bound the short graphs are captured with."""
    from adallm_core.ops.triton.paged_attention import DEFAULT_TILES, SHORT_BOUND, tiles_for

    assert SHORT_BOUND == SHORT_CONTEXT
    assert tiles_for(bound_meta(16, SHORT_CONTEXT), 8, 128, torch.device("cpu")) != DEFAULT_TILES
