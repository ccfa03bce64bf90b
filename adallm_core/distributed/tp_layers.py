"""The collectives a sharded model needs, added around the family's own layers (models/ stay TP-unaware):

    embed        vocab-parallel lookup: ids outside this rank's rows give 0, then all-reduce
    o_proj       row-parallel partial sums -> all-reduce (one per attention block)
    down_proj    row-parallel partial sums -> all-reduce (one per MLP; one per MoE block)
    lm_head      this rank's vocab columns -> all-gather along the vocab dim
"""
from __future__ import annotations

import torch

from adallm_core.distributed.sharding import vocab_range
from adallm_core.models.layers import SparseMoE


class AllReduceOutput:
    """Wraps a callable whose output is this rank's partial sum."""

    def __init__(self, inner, group):
        self.inner, self.group = inner, group

    def __getattr__(self, name):  # .weight, .out_features ... of the wrapped layer
        return getattr(self.inner, name)

    def __call__(self, *args):
        return self.group.all_reduce(self.inner(*args))


class VocabParallelEmbedding:
    """Wraps the family's embed() (Gemma scales inside it) over this rank's rows [start, end)."""

    def __init__(self, embed, start: int, end: int, group):
        self.embed, self.start, self.end, self.group = embed, start, end, group

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.end - self.start)
        x = self.embed(local.masked_fill(outside, 0))
        return self.group.all_reduce(x.masked_fill(outside[:, None], 0))


class GatherLogits:
    """lm_head over this rank's vocab rows -> the full [T, vocab] logits on every rank."""

    def __init__(self, lm_head, sizes: list[int], group):
        self.lm_head, self.sizes, self.group = lm_head, sizes, group

    def __getattr__(self, name):
        return getattr(self.lm_head, name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_gather_last_dim(self.lm_head(x), self.sizes)


def apply_tensor_parallel(model, group, full_cfg) -> None:
    """Add the collectives to a model built from a ShardedCheckpoint with a sharded ModelConfig."""
    for layer in model.layers:
        layer.self_attn.o_proj = AllReduceOutput(layer.self_attn.o_proj, group)
        if isinstance(layer.mlp, SparseMoE):
            layer.mlp = AllReduceOutput(layer.mlp, group)
        else:
            layer.mlp.down_proj = AllReduceOutput(layer.mlp.down_proj, group)
    start, end = vocab_range(full_cfg.vocab_size, group.rank, group.world_size)
    sizes = [b - a for a, b in (vocab_range(full_cfg.vocab_size, r, group.world_size) for r in range(group.world_size))]
    model.embed = VocabParallelEmbedding(model.embed, start, end, group)
    model.lm_head = GatherLogits(model.lm_head, sizes, group)
