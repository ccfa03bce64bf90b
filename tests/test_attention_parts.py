"""How many parts the paged decode attention cuts the key range into (host rule; kernels in test_kernels_*)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from adallm_core.ops.metadata import AttentionMetadata  # noqa: E402
from adallm_core.ops.triton.paged_attention import num_splits_for  # noqa: E402


def _meta(num_seqs: int, max_query_len: int, bound: int) -> AttentionMetadata:
    empty = torch.zeros(num_seqs + 1, dtype=torch.int32)
    return AttentionMetadata(empty, empty[:num_seqs], torch.zeros(num_seqs, 1, dtype=torch.int32), max_query_len,
                             bound)


@pytest.mark.parametrize("num_seqs,bound,parts", [
    (1, 256, 4),  # batch 1 (8 programs): parts even over a short bound, one per 64-key tile of it
    (1, 100, 2),
    (1, 64, 1),
    (4, 256, 4),  # 32 programs: still few
    (8, 256, 4),  # 64 programs: few up to half the 132 SMs
    (8, 128, 2),
    (1, 8192, 16),  # at most 16
    (16, 256, 1),  # 128 programs: short bounds are not split
    (16, 1024, 1),
    (16, 8192, 4),  # long bounds: until the programs cover two per SM
    (64, 8192, 1),
])
def test_decode_parts_follow_programs_and_bound(num_seqs, bound, parts):
    assert num_splits_for(_meta(num_seqs, 1, bound), 8, torch.device("cpu")) == parts


def test_prefill_is_never_split():
    assert num_splits_for(_meta(1, 7, 8192), 8, torch.device("cpu")) == 1

