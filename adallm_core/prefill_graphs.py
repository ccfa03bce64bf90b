"""Prefill and mixed-step CUDA graphs: one graph per token-count bucket, captured at start-up beside the decode ones.

A prompt's step runs ~300 launches on Qwen3-8B; on the H100 machine's slow host a 128-token prompt took 17.8-32 ms
of wall time for 8.4 ms of GPU work, 512 tokens 25.6-56.6 ms for 18.4, while 2048 tokens kept the GPU 90-96% busy
(benchmarks/NOTES.md, session 36). Steps of up to MAX_TOKENS tokens that are not pure decode replay a graph instead.

A step of n sequences and t tokens runs in the smallest bucket T >= t. Its sequences take rows [0, n) of the
metadata; the T - t padding tokens form one more sequence (row n) over block 0 that stores nothing (slot -1), every
token at rotary position 0; rows past n are sequences without queries, which the kernels skip. The padding can be
longer than max_model_len (a 512-token bucket, a model of 256), so the tables and max_seq_len are as wide as the
larger of the two. The metadata carries max_query_len = T and that max_seq_len, upper bounds, so no kernel's grid
depends on the step. A graph computes the logits of min(T, max_num_seqs) rows (the sampled sequences' last tokens
first) into the logits buffer it shares with the decode graphs, and all graphs share one memory pool: a step
replays one graph at a time.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Sequence

import numpy as np
import torch

from adallm_core.cuda_graphs import capture_buckets
from adallm_core.models.layers import ForwardContext
from adallm_core.ops import AttentionMetadata

logger = logging.getLogger(__name__)

TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512)
MAX_TOKENS = TOKEN_BUCKETS[-1]


def token_buckets(max_num_batched_tokens: int | None) -> list[int]:
    """The buckets a step can reach: those below max_num_batched_tokens and the first at or above it."""
    cap = max_num_batched_tokens or MAX_TOKENS
    return [b for i, b in enumerate(TOKEN_BUCKETS) if i == 0 or TOKEN_BUCKETS[i - 1] < cap]


class PrefillInputs:
    """The graphs' static input buffers and their pinned host mirror (rows [0, T) / [0, S) feed bucket T's graph).

        ints  int64 [(2 + G) * tmax + rmax]            ids | positions | slot mapping of each KV group | sampled rows
        lens  int32 [smax + 1 + smax + G * smax * w]   query_start_loc | seq_lens | block tables [smax, w] per group
    """

    def __init__(self, tmax: int, rmax: int, max_blocks: int, num_groups: int, block_size: int, device):
        self.tmax, self.rmax, self.smax, self.width, self.block_size = tmax, rmax, rmax + 1, max_blocks, block_size
        pin = device.type == "cuda"
        ints = (2 + num_groups) * tmax + rmax
        lens = 2 * self.smax + 1 + num_groups * self.smax * max_blocks
        self.host_ints = torch.zeros(ints, dtype=torch.int64, pin_memory=pin)
        self.host_lens = torch.zeros(lens, dtype=torch.int32, pin_memory=pin)
        self.ints = torch.zeros(ints, dtype=torch.int64, device=device)
        self.lens = torch.zeros(lens, dtype=torch.int32, device=device)
        self.groups = num_groups
        self.ids, self.positions, self.slots, self.sample_rows = self._ints_parts(self.ints)
        self.qsl, self.seq_lens, self.tables = self._lens_parts(self.lens)
        self._ids, self._pos, self._slots, self._rows = self._ints_parts(self.host_ints.numpy())
        self._qsl, self._lens, self._tables = self._lens_parts(self.host_lens.numpy())
        self._host_tables = self._lens_parts(self.host_lens)[2]
        # the copies read the mirror after stage() returns: the next stage() waits for them before writing
        self._copied = torch.cuda.Event() if pin else None

    def _ints_parts(self, flat):
        t, g = self.tmax, self.groups
        return flat[:t], flat[t:2 * t], [flat[(2 + i) * t:(3 + i) * t] for i in range(g)], flat[(2 + g) * t:]

    def _lens_parts(self, flat):
        s, size = self.smax, self.smax * self.width
        tables = [flat[2 * s + 1 + i * size:2 * s + 1 + (i + 1) * size].reshape(s, self.width)
                  for i in range(self.groups)]
        return flat[:s + 1], flat[s + 1:2 * s + 1], tables

    def stage(self, steps: Sequence, tokens: int, rows: int) -> int:
        """Write the steps (and the padding sequence up to `tokens` tokens) into the device buffers; returns how
        many rows are sampled. `rows`: the bucket's logits rows (its sequence rows are rows + 1)."""
        n = len(steps)
        if self._copied is not None:
            self._copied.synchronize()
        q_lens = np.array([len(s.token_ids) for s in steps], dtype=np.int64)
        starts = np.array([s.start_pos for s in steps], dtype=np.int64)
        t = int(q_lens.sum())
        qsl = self._qsl
        qsl[0] = 0
        np.cumsum(q_lens, out=qsl[1:n + 1])
        qsl[n + 1:rows + 2] = tokens  # the padding sequence, then empty ones
        self._lens[:n] = starts + q_lens
        self._lens[n] = tokens - t
        self._lens[n + 1:rows + 1] = 0
        seq_of_token = np.repeat(np.arange(n), q_lens)
        pos = self._pos
        pos[:t] = np.arange(t) - qsl[:n][seq_of_token] + starts[seq_of_token]
        pos[t:tokens] = 0  # the rotary table has max_model_len rows; the padding's rotation does not matter
        self._ids[:t] = [i for s in steps for i in s.token_ids]
        self._ids[t:tokens] = 0
        bs, width = self.block_size, self.width
        for g, (table, slot) in enumerate(zip(self._tables, self._slots)):
            for i, s in enumerate(steps):
                row = s.block_tables[g]
                k = min(len(row), width)
                table[i, :k] = row[:k]
                table[i, k:] = 0
            table[n] = 0
            slot[:t] = table[seq_of_token, pos[:t] // bs] * bs + pos[:t] % bs
            slot[t:tokens] = -1
        sampled = [i for i, s in enumerate(steps) if s.sample]
        self._rows[:len(sampled)] = qsl[1:n + 1][sampled] - 1
        self._rows[len(sampled):rows] = 0
        self.ints.copy_(self.host_ints, non_blocking=True)
        self.lens[:2 * self.smax + 1].copy_(self.host_lens[:2 * self.smax + 1], non_blocking=True)
        for dev_table, host_table in zip(self.tables, self._host_tables):
            dev_table[:n + 1].copy_(host_table[:n + 1], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        return len(sampled)


class PrefillGraphs:
    """Captured prefill and mixed steps for one ModelRunner (its KV caches must be allocated and bound).

    capture=False replays nothing: run() calls the same padded forward eagerly (CPU tests check the padding)."""

    def __init__(self, runner, logits: torch.Tensor, pool=None, capture: bool = True,
                 max_num_batched_tokens: int | None = None):
        self.runner, self.logits, self.capture = runner, logits, capture
        self.buckets = token_buckets(max_num_batched_tokens)
        self.rows = {b: min(b, runner.max_num_seqs, logits.shape[0]) for b in self.buckets}
        self.max_seq_len = max(runner.max_model_len, self.buckets[-1])  # the padding sequence's too
        self.inputs = PrefillInputs(self.buckets[-1], max(self.rows.values()), math.ceil(self.max_seq_len /
                                    runner.block_size), len(runner.kv_groups), runner.block_size, runner.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = 0
        if capture:
            self._capture(pool)

    def _forward(self, tokens: int) -> None:
        """One step of bucket `tokens`, the logits of its rows into the shared buffer."""
        inp, rows, runner = self.inputs, self.rows[tokens], self.runner
        metas = tuple(AttentionMetadata(inp.qsl[:rows + 2], inp.seq_lens[:rows + 1], t[:rows + 1], tokens,
                                        self.max_seq_len) for t in inp.tables)
        ctx = ForwardContext(inp.positions[:tokens], metas, tuple(s[:tokens] for s in inp.slots))
        model = runner.model
        hidden = model.forward(inp.ids[:tokens], ctx)
        model.compute_logits(hidden.index_select(0, inp.sample_rows[:rows]), out=self.logits[:rows])

    @torch.inference_mode()
    def _capture(self, pool) -> None:
        start = time.perf_counter()
        # warm-up and capture read every token as a padding token: nothing is stored
        self.graphs = capture_buckets(self._forward, self.buckets, pool, self.runner.device,
                                      stage=lambda b: self.inputs.stage([], b, self.rows[b]))
        self.capture_seconds = time.perf_counter() - start  # start-up cost, reported by benchmarks.decode
        logger.info("captured %d prefill CUDA graphs (up to %s tokens) in %.1f s", len(self.graphs), self.buckets,
                    self.capture_seconds)

    def bucket_for(self, steps: Sequence) -> int | None:
        """The bucket this step replays in, or None (too many tokens or sequences: it runs eagerly)."""
        tokens = sum(len(s.token_ids) for s in steps)
        bucket = next((b for b in self.buckets if b >= tokens), None)
        return bucket if bucket is not None and len(steps) <= self.rows[bucket] else None

    @torch.inference_mode()
    def run(self, steps: Sequence, bucket: int) -> torch.Tensor:
        """float32 logits [sampled steps, vocab] in step order (a copy: the buffer is reused)."""
        sampled = self.inputs.stage(steps, bucket, self.rows[bucket])
        if self.capture:
            self.graphs[bucket].replay()
        else:
            self._forward(bucket)
        self.replays += 1
        return self.logits[:sampled].clone()
