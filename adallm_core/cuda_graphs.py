"""Decode CUDA graphs: one graph per batch-size bucket and context bound, captured at start-up, replayed for
pure-decode steps.

A slow host spends ~100 ms launching an 8B model's kernels one by one (shared/KERNELS.md); a graph replays the
whole decode step with one launch. Every graph reads the same static input buffers and writes the rows of one
float32 logits buffer (one per bucket would take ~0.3 GB for Gemma3's 262k vocabulary at 64 sequences); they are
captured largest bucket first into one memory pool, so the smaller graphs reuse its memory.
A batch of n decodes runs in the smallest bucket >= n; the padding rows decode token 0 at position 0 of block 0
with slot -1 (nothing is stored) and their logits are dropped. The host writes each step's inputs into a pinned
mirror of the static buffers (DecodeInputs) and sends them with a few non-blocking copies. Attention metadata
carries max_seq_len = the graph's context bound, so the kernels' grids do not depend on the step: a step runs the
graphs of the smallest bound its longest sequence fits (context_bounds), so short contexts under a long
max_model_len skip the split attention's parts and merge, which only long ones need.
EngineArgs.enforce_eager turns this off; prefill and mixed steps have graphs of their own (prefill_graphs.py).
"""
from __future__ import annotations

import collections
import contextlib
import gc
import logging
import math
import time
from typing import Callable, Sequence

import torch

from adallm_core.models.layers import ForwardContext
from adallm_core.ops import AttentionMetadata

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def no_collection_while_capturing():
    """Collect garbage first, and none while capturing. A collection mid-capture that frees an earlier runner's
    graphs (a reference cycle) destroys them while the stream captures, which invalidates the capture: seen in the
    GPU tests as "operation not permitted when stream is capturing (function reset)", ten times, one per graph of
    the runner before. Torch's own capture no longer collects first."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def capture_stream(device) -> torch.cuda.Stream:
    """The one stream that every warm-up and capture on `device` runs on, for the life of the process. cuBLAS keeps a
    workspace for good on each stream it ran on (32 MiB on the H100): a fresh stream per capture added one, outside
    the KV budget, each time an engine started or its KV cache was reallocated (seen in the GPU tests: 64 MiB)."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[index] = torch.cuda.Stream(index)
    return _CAPTURE_STREAMS[index]


@no_collection_while_capturing()
def capture_buckets(forward: Callable[[int], None], buckets: Sequence[int], pool, device,
                    stage: Callable[[int], None] | None = None) -> dict[int, torch.cuda.CUDAGraph]:
    """One graph of forward(b) per bucket b, largest first (the shared pool grows once). Each is run once on a side
    stream first (compiles kernels, sizes their workspaces); stage(b), if given, writes its inputs beforehand."""
    graphs = {}
    stream = capture_stream(device)  # the warm-up's workspaces are the capture's
    for b in sorted(buckets, reverse=True):
        if stage is not None:
            stage(b)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward(b)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            forward(b)
        graphs[b] = graph
    torch.cuda.synchronize(device)
    return graphs


# Under a long max_model_len the decode attention cuts each sequence's keys into parts and merges them, which pays
# for long contexts but not for short ones once the (sequence, KV head) programs fill the GPU. Steps whose contexts
# all fit this bound replay graphs captured with it, under which such batches run one part in one or two key tiles
# (ops/triton/paged_attention.tiles_for): at batch 16 and 256-512 keys 10-16 us a layer against 18-24 in the serving
# bound's 4 parts, and 3.54 -> 3.37 ms a step at 320 keys in (H100; benchmarks/NOTES.md, session 43).
SHORT_CONTEXT = 512


def context_bounds(max_model_len: int) -> list[int]:
    """The context bounds decode graphs are captured for: SHORT_CONTEXT and max_model_len where it is longer."""
    return [SHORT_CONTEXT, max_model_len] if max_model_len > SHORT_CONTEXT else [max_model_len]


def bound_for(bounds: Sequence[int], context: int) -> int:
    """The smallest of the (ascending) bounds that holds `context` keys; the longest where none does."""
    return next((b for b in bounds if b >= context), bounds[-1])


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, up to max_num_seqs (which is always a bucket)."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs] + list(range(8, max_num_seqs, 8)) + [max_num_seqs]
    return sorted(set(sizes))


class DecodeInputs:
    """The graphs' static input buffers, and the pinned host mirror each step is written into first.

    Two flat device buffers, so a step needs few copies (rows [0, b) of each part feed the graph of bucket b):
        ints  int64 [(2 + G) * bmax]              ids | positions | slot mapping of each of the G KV groups
        lens  int32 [bmax + G * bmax * max_blocks] seq_lens | block tables of each group, [bmax, max_blocks] each
    A block table row of the mirror is rewritten only when its content changed (the sequence got a block, another
    sequence took that row); rows past the batch are padding: token 0 at position 0, seq_len 1, table of zeros,
    slot -1.
    """

    def __init__(self, bmax: int, max_blocks: int, num_groups: int, block_size: int, device: torch.device):
        self.bmax, self.max_blocks, self.block_size = bmax, max_blocks, block_size
        pin = device.type == "cuda"
        self.host_ints = torch.zeros((2 + num_groups) * bmax, dtype=torch.int64, pin_memory=pin)
        self.host_lens = torch.zeros(bmax + num_groups * bmax * max_blocks, dtype=torch.int32, pin_memory=pin)
        self.ints = torch.zeros(self.host_ints.shape, dtype=torch.int64, device=device)
        self.lens = torch.zeros(self.host_lens.shape, dtype=torch.int32, device=device)
        self.ids, self.positions, self.slots = self._ints_parts(self.ints, num_groups)
        self.seq_lens, self.tables = self._lens_parts(self.lens, num_groups)
        self._ids, self._pos, self._slots = self._ints_parts(self.host_ints.numpy(), num_groups)
        self._lens, self._tables = self._lens_parts(self.host_lens.numpy(), num_groups)
        self._host_tables = self._lens_parts(self.host_lens, num_groups)[1]
        self._rows: list[list[Sequence[int]]] = [[()] * bmax for _ in range(num_groups)]  # what each row holds
        self._lens[:] = 1
        for slot in self._slots:
            slot[:] = -1
        self.ints.copy_(self.host_ints)
        self.lens.copy_(self.host_lens)
        # the copies read the mirror after stage() returns: the next stage() waits for them before writing
        self._copied = torch.cuda.Event() if pin else None

    def _ints_parts(self, flat, groups):
        b = self.bmax
        return flat[:b], flat[b:2 * b], [flat[(2 + g) * b:(3 + g) * b] for g in range(groups)]

    def _lens_parts(self, flat, groups):
        b, size = self.bmax, self.bmax * self.max_blocks
        return flat[:b], [flat[b + g * size:b + (g + 1) * size].reshape(b, self.max_blocks) for g in range(groups)]

    def stage(self, steps: Sequence, b: int) -> None:
        """Write n single-token steps (and padding up to bucket b) into the device buffers."""
        n = len(steps)
        if self._copied is not None:
            self._copied.synchronize()
        positions = [s.start_pos for s in steps]
        self._ids[:n] = [s.token_ids[0] for s in steps]
        self._pos[:n] = positions
        self._lens[:n] = self._pos[:n] + 1
        self._ids[n:b] = 0
        self._pos[n:b] = 0
        self._lens[n:b] = 1
        bs, width = self.block_size, self.max_blocks
        for g, (rows, table, slot) in enumerate(zip(self._rows, self._tables, self._slots)):
            slots = []
            for i, s in enumerate(steps):
                t = s.block_tables[g]
                if t != rows[i]:
                    k = min(len(t), width)
                    table[i, :k] = t[:k]
                    table[i, k:] = 0
                    rows[i] = t[:]  # a copy: the engine's list grows in place
                slots.append(t[positions[i] // bs] * bs + positions[i] % bs)
            for i in range(n, b):
                if rows[i]:
                    table[i] = 0
                    rows[i] = ()
            slot[:n] = slots
            slot[n:b] = -1
        self.ints.copy_(self.host_ints, non_blocking=True)
        self.seq_lens.copy_(self.host_lens[:self.bmax], non_blocking=True)
        for dev_table, host_table in zip(self.tables, self._host_tables):
            dev_table[:b].copy_(host_table[:b], non_blocking=True)
        if self._copied is not None:
            self._copied.record()


class DecodeGraphs:
    """Captured decode steps for one ModelRunner (its KV caches must be allocated and bound)."""

    def __init__(self, runner, max_num_seqs: int, logits: torch.Tensor, pool):
        """logits: a float32 buffer of >= max_num_seqs rows to write into (shared with the prefill graphs);
        pool: a graph memory pool to capture into (shared too: a step replays one graph at a time)."""
        self.runner = runner
        self.buckets = batch_buckets(max_num_seqs)
        self.bucket_of = [next(b for b in self.buckets if b >= n) for n in range(self.buckets[-1] + 1)]
        self.max_blocks = math.ceil(runner.max_model_len / runner.block_size)
        self.inputs = DecodeInputs(self.buckets[-1], self.max_blocks, len(runner.kv_groups), runner.block_size,
                                   runner.device)
        self.qsl = torch.arange(self.buckets[-1] + 1, dtype=torch.int32, device=runner.device)
        self.bounds = context_bounds(runner.max_model_len)
        self.replays = collections.Counter()  # (bucket, bound) -> replays
        self.logits = logits
        self._capture(pool)

    def _forward(self, b: int, bound: int) -> None:
        """One decode step of bucket b over contexts of up to `bound` keys, its logits into rows [0, b) of the shared
        buffer."""
        inp = self.inputs
        metas = tuple(AttentionMetadata(self.qsl[: b + 1], inp.seq_lens[:b], t[:b], 1, bound) for t in inp.tables)
        ctx = ForwardContext(inp.positions[:b], metas, tuple(s[:b] for s in inp.slots))
        model = self.runner.model
        model.compute_logits(model.forward(inp.ids[:b], ctx), out=self.logits[:b])

    @torch.inference_mode()
    def _capture(self, pool) -> None:
        start = time.perf_counter()
        self.graphs = {}
        for bound in sorted(self.bounds, reverse=True):  # the longest's split buffers first: the pool grows once
            captured = capture_buckets(lambda b, bound=bound: self._forward(b, bound), self.buckets, pool,
                                       self.runner.device)
            self.graphs.update({(b, bound): graph for b, graph in captured.items()})
        self.capture_seconds = time.perf_counter() - start  # start-up cost, reported by benchmarks.decode
        logger.info("captured %d decode CUDA graphs (batch sizes %s, contexts up to %s) in %.1f s", len(self.graphs),
                    self.buckets, self.bounds, self.capture_seconds)

    def graph_for(self, batch: int, context: int) -> tuple[int, int]:
        """The (bucket, bound) of the graph that runs `batch` sequences whose longest has `context` keys."""
        return self.bucket_of[batch], bound_for(self.bounds, context)

    def most_replayed(self, batch: int) -> tuple[int, int]:
        """The (bucket, bound) the steps of `batch` sequences replayed most (the graph the step benchmarks time);
        the longest bound's if none ran."""
        bucket = self.bucket_of[batch]
        ran = [key for key in self.replays if key[0] == bucket]
        return max(ran, key=self.replays.__getitem__) if ran else (bucket, self.bounds[-1])

    def can_run(self, steps: Sequence) -> bool:
        return len(steps) <= self.buckets[-1] and all(len(s.token_ids) == 1 and s.sample for s in steps)

    @torch.inference_mode()
    def run(self, steps: Sequence, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replay for n single-token steps -> float32 logits [n, vocab] (a copy: the buffer is reused).
        input_ids: the steps' ids on the device (async scheduling), copied over the staged ones."""
        n = len(steps)
        key = self.graph_for(n, max(s.start_pos for s in steps) + 1)
        self.inputs.stage(steps, key[0])
        if input_ids is not None:
            self.inputs.ids[:n].copy_(input_ids)
        self.graphs[key].replay()
        self.replays[key] += 1
        return self.logits[:n].clone()
