"""How many parts the paged decode attention cuts the key range into (host rule; kernels in test_kernels_*)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from adallm_core.ops.metadata import AttentionMetadata  # noqa: E402
from adallm_core.ops.triton import paged_attention  # noqa: E402
from adallm_core.ops.triton.paged_attention import (  # noqa: E402
    DEFAULT_TILES, SHORT_BOUND, WIDE_PREFILL_TILES, num_splits_for, tiles_for)

ONE_WAVE = dict(BLOCK_N=256, num_warps=8, num_stages=1)  # the short bound's tiles at 128 dims (NOTES.md, session 43)
TWO_WAVES = dict(BLOCK_N=128, num_warps=8, num_stages=1)


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


@pytest.mark.parametrize("num_seqs,max_query_len,bound,tiles", [
    (16, 1, SHORT_BOUND, ONE_WAVE),  # decode under the short bound, 128 programs: 256-key tiles
    (16, 1, 100, ONE_WAVE),
    (32, 1, 300, TWO_WAVES),  # 256 programs on 132 SMs: half the keys a tile (won at batch 32)
    (8, 1, 300, DEFAULT_TILES),  # few programs keep their parts of one 64-key tile
    (1, 1, 100, DEFAULT_TILES),
    (16, 1, SHORT_BOUND + 1, DEFAULT_TILES),
    (16, 1, 8192, DEFAULT_TILES),
    (16, 7, 200, DEFAULT_TILES),  # prefill chunks keep the prefill tiles
])
def test_decode_tiles_follow_the_bound_and_programs(num_seqs, max_query_len, bound, tiles):
    assert tiles_for(_meta(num_seqs, max_query_len, bound), 8, 128, torch.device("cpu")) == tiles


@pytest.mark.parametrize("head_dim,one_wave,two_waves", [(256, 128, 128), (64, 256, 256), (16, 256, 256)])
def test_short_tiles_at_other_head_dims(head_dim, one_wave, two_waves):
    """Gemma3-4B/12B's 256-dim heads take 128 keys a tile (tests/test_compile_for_ada.py: no spills); narrower heads
    keep 256 keys, the most measured."""
    cpu = torch.device("cpu")
    assert tiles_for(_meta(16, 1, 300), 8, head_dim, cpu)["BLOCK_N"] == one_wave
    assert tiles_for(_meta(32, 1, 300), 8, head_dim, cpu)["BLOCK_N"] == two_waves


@pytest.mark.parametrize("mma_sync,head_dim,tiles", [
    (True, 256, WIDE_PREFILL_TILES),  # Ada/Ampere, Gemma3-4B/12B: 8 warps, one stage (no spills on sm_89)
    (True, 128, DEFAULT_TILES),
    (False, 256, DEFAULT_TILES),  # Hopper's wgmma code does not spill the default tiles
])
def test_prefill_tiles_follow_the_tensor_core_code(mma_sync, head_dim, tiles, monkeypatch):
    monkeypatch.setattr(paged_attention, "mma_sync_only", lambda device: mma_sync)
    assert tiles_for(_meta(2, 300, 300), 8, head_dim, torch.device("cpu")) == tiles
    decode = tiles_for(_meta(16, 1, 8192), 8, head_dim, torch.device("cpu"))
    assert decode == DEFAULT_TILES, "decode steps keep their own tiles"


@pytest.mark.parametrize("num_seqs,parts", [(1, 8), (8, 8), (16, 1), (32, 1)])
def test_short_bound_parts(num_seqs, parts):
    """Few programs split the short bound once per 64-key tile (up to the programs' limit); the batches that fill
    the GPU run one part."""
    cpu = torch.device("cpu")
    meta = _meta(num_seqs, 1, SHORT_BOUND)
    assert num_splits_for(meta, 8, cpu, tiles_for(meta, 8, 128, cpu)["BLOCK_N"]) == parts
