"""Decode CUDA graphs: one graph per batch-size bucket, captured at start-up, replayed for pure-decode steps.

A slow host spends ~100 ms launching an 8B model's kernels one by one (shared/KERNELS.md); a graph replays the
whole decode step with one launch. Every graph reads the same static input buffers and writes one static logits
buffer; they are captured largest bucket first into one memory pool, so the smaller graphs reuse its memory.
A batch of n decodes runs in the smallest bucket >= n; the padding rows decode token 0 at position 0 of block 0
with slot -1 (nothing is stored) and their logits are dropped. Attention metadata carries max_seq_len =
max_model_len, an upper bound, so the kernels' grids do not depend on the step.
EngineArgs.enforce_eager turns this off; prefill and mixed steps always run eagerly.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Sequence

import torch

from adallm_core.models.layers import ForwardContext
from adallm_core.ops import AttentionMetadata

logger = logging.getLogger(__name__)


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, up to max_num_seqs (which is always a bucket)."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs] + list(range(8, max_num_seqs, 8)) + [max_num_seqs]
    return sorted(set(sizes))


class DecodeGraphs:
    """Captured decode steps for one ModelRunner (its KV caches must be allocated and bound)."""

    def __init__(self, runner, max_num_seqs: int):
        self.runner = runner
        self.buckets = batch_buckets(max_num_seqs)
        bmax, dev = self.buckets[-1], runner.device
        self.max_blocks = math.ceil(runner.max_model_len / runner.block_size)
        groups = len(runner.kv_groups)
        self.ids = torch.zeros(bmax, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(bmax, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(bmax, dtype=torch.int32, device=dev)
        self.qsl = torch.arange(bmax + 1, dtype=torch.int32, device=dev)
        self.tables = [torch.zeros(bmax, self.max_blocks, dtype=torch.int32, device=dev) for _ in range(groups)]
        self.slots = [torch.full((bmax,), -1, dtype=torch.int64, device=dev) for _ in range(groups)]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture()

    def _forward(self, b: int) -> torch.Tensor:
        metas = tuple(AttentionMetadata(self.qsl[: b + 1], self.seq_lens[:b], t[:b], 1, self.runner.max_model_len)
                      for t in self.tables)
        ctx = ForwardContext(self.positions[:b], metas, tuple(s[:b] for s in self.slots))
        model = self.runner.model
        return model.compute_logits(model.forward(self.ids[:b], ctx))

    @torch.inference_mode()
    def _capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.runner.device)
        for b in reversed(self.buckets):  # largest first: the pool grows once
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: compiles kernels, sizes their workspaces
                self._forward(b)
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize(self.runner.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = self._forward(b)
            self.graphs[b] = graph
        torch.cuda.synchronize(self.runner.device)
        logger.info("captured %d decode CUDA graphs (batch sizes %s) in %.1f s", len(self.graphs), self.buckets,
                    time.perf_counter() - start)

    def can_run(self, steps: Sequence) -> bool:
        return len(steps) <= self.buckets[-1] and all(len(s.token_ids) == 1 and s.sample for s in steps)

    @torch.inference_mode()
    def run(self, steps: Sequence) -> torch.Tensor:
        """Replay for n single-token steps -> float32 logits [n, vocab] (a copy: the buffer is reused)."""
        n = len(steps)
        b = next(size for size in self.buckets if size >= n)
        bs = self.runner.block_size
        pos = torch.tensor([s.start_pos for s in steps], dtype=torch.int64)
        self.ids[:n].copy_(torch.tensor([s.token_ids[0] for s in steps], dtype=torch.int64), non_blocking=True)
        self.positions[:n].copy_(pos, non_blocking=True)
        self.seq_lens[:n].copy_((pos + 1).to(torch.int32), non_blocking=True)
        self.seq_lens[n:b].fill_(1)
        self.positions[n:b].zero_()
        self.ids[n:b].zero_()
        for g, (table, slot) in enumerate(zip(self.tables, self.slots)):
            rows = torch.zeros(n, self.max_blocks, dtype=torch.int32)
            for i, s in enumerate(steps):
                t = s.block_tables[g]
                rows[i, : len(t)] = torch.as_tensor(list(t)[: self.max_blocks], dtype=torch.int32)
            blocks = rows[torch.arange(n), pos // bs].long()
            table[:n].copy_(rows, non_blocking=True)
            table[n:b].zero_()
            slot[:n].copy_(blocks * bs + pos % bs, non_blocking=True)
            slot[n:b].fill_(-1)
        self.graphs[b].replay()
        return self.logits[b][:n].clone()
