"""Per-step attention metadata: built once per step by the runner, shared by every attention layer."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each sequence's queries sit in the flat token batch and where its keys live in the paged cache.

    The flat batch holds B sequences back to back; sequence b owns query tokens
    query_start_loc[b] : query_start_loc[b+1]. Its context (cached tokens + this step's tokens) is
    seq_lens[b] long, so query token i of sequence b is at position seq_lens[b] - q_len_b + i.
    Token at position p lives in cache slot block_tables[b, p // block_size] * block_size + p % block_size.
    Block-table entries that a sequence no longer needs (outside a sliding window, or padding) may be -1.
    """

    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32, context length INCLUDING this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    # Derived index tensors: computed on first use, then reused by every layer of the step.
    @functools.cached_property
    def query_lens(self) -> torch.Tensor:  # [B] int64
        return (self.query_start_loc[1:] - self.query_start_loc[:-1]).long()

    @functools.cached_property
    def token_to_seq(self) -> torch.Tensor:  # [T] int64: which sequence each query token belongs to
        seqs = torch.arange(self.num_seqs, device=self.seq_lens.device)
        return torch.repeat_interleave(seqs, self.query_lens)

    @functools.cached_property
    def token_index_in_seq(self) -> torch.Tensor:  # [T] int64: i, the token's index among its sequence's queries
        t = torch.arange(self.token_to_seq.shape[0], device=self.seq_lens.device)
        return t - self.query_start_loc[:-1].long()[self.token_to_seq]
