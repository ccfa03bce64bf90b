"""ModelRunner: builds the model on the device, owns the paged KV cache, runs one forward step.

One step = a flat batch of tokens from several sequences (prefill chunks and decodes mixed):

    tokens     [ s0 t0 t1 t2 | s1 t9 | s2 t4 ]      query_start_loc = [0, 3, 4, 5]
    positions  [  5  6  7    |  12   |  40   ]      start_pos + i
    slot       block_tables[g][pos // block_size] * block_size + pos % block_size   (one mapping per KV group)
"""
from __future__ import annotations

import gc
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from adallm_core.model_config import ModelConfig
from adallm_core.models.layers import ForwardContext
from adallm_core.models.registry import get_model_class
from adallm_core.ops import AttentionMetadata, select_ops

logger = logging.getLogger(__name__)

MAX_MODEL_LEN_DEFAULT_CAP = 8192
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# Prompt rows scored at a time (prompt_logprobs). Every chunk's logits read the whole lm_head: in chunks of one row
# (max_num_seqs 1) a 2048-token prompt of Qwen3-8B's shapes took 0.9 s to score on an H200, 17x its prefill.
SCORE_ROWS = 128


@dataclass(frozen=True)
class SeqStep:
    """One sequence's share of a step."""

    token_ids: Sequence[int]  # tokens to compute now (a prefill chunk, or the one token to decode)
    start_pos: int  # tokens of this sequence already in the KV cache
    block_tables: Sequence[Sequence[int]]  # one block table per KV group (runner.model_config.kv_groups order)
    sample: bool = True  # return logits for this sequence's last token
    score: Optional["PromptScoring"] = None  # prompt_logprobs: logprobs of known next tokens for some rows


@dataclass(frozen=True)
class PromptScoring:
    """Rows first_row, first_row + 1, ... of a step predict targets[0], targets[1], ... (tokens already known)."""

    first_row: int
    targets: Sequence[int]
    num_top: int  # also return this many of the most likely tokens a row


@dataclass
class PromptScores:
    """Every scored row of a step, in step order, on the device: the target's logprob and rank, the top tokens."""

    target_logprobs: torch.Tensor  # float32 [rows]
    target_ranks: torch.Tensor  # int64 [rows]: 1 + how many tokens are more likely (vLLM's Logprob.rank)
    top_ids: torch.Tensor  # int64 [rows, max num_top of the step]
    top_logprobs: torch.Tensor  # float32 [rows, max num_top of the step]


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
    return DTYPES[dtype]


class ModelRunner:
    """Owns the model and the KV cache tensors; the engine owns which blocks each sequence uses."""

    def __init__(self, engine_args, checkpoint, device: Union[str, torch.device] = "auto", parallel=None):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(engine_args.dtype, self.device)
        self.ops = select_ops(engine_args.kernel_backend, self.device, engine_args.prefill_fp8)  # before weights load
        self.kernel_backend = self.ops.name
        self.model_config = cfg = ModelConfig.from_hf_config(checkpoint.hf_config, checkpoint.path)
        self.vocab_size = cfg.vocab_size  # the logits' width: the whole vocabulary, on every tensor-parallel rank
        if parallel is not None:  # tensor parallel (adallm_core.distributed): this rank's heads, columns, vocab rows
            full_cfg, (cfg, checkpoint) = cfg, parallel.shard(cfg, checkpoint)
            self.model_config = cfg
        self.max_model_len = _resolve_max_model_len(engine_args.max_model_len, cfg)
        self.block_size = engine_args.block_size
        # fp8: E4M3 with per-layer scales. bf16: unquantized KV, kept at the activations' precision.
        self.kv_cache_dtype = torch.float8_e4m3fn if engine_args.kv_cache_dtype == "fp8" else (
            torch.float32 if self.dtype == torch.float32 else torch.bfloat16
        )
        if self.kv_cache_dtype == torch.float8_e4m3fn and self.kernel_backend == "triton":
            _check_fp8_kv(self.device)
        model_cls = get_model_class(cfg.architecture)
        with torch.inference_mode():
            self.model = model_cls(cfg, checkpoint, self.ops, self.device, self.dtype, self.max_model_len,
                                   embedding_on_host=engine_args.embedding_on_host,
                                   quantize_lm_head=engine_args.quantize_lm_head)
        if parallel is not None:
            parallel.wrap_model(self.model, full_cfg)
        scales = checkpoint.kv_scales() if engine_args.kv_cache_dtype == "fp8" else {}
        self.kv_scales = [tuple(float(s) for s in scales.get(i, (1.0, 1.0))) for i in range(cfg.num_layers)]
        self.kv_groups = cfg.kv_groups
        self.kv_caches: list[torch.Tensor] = []
        # decode CUDA graphs (adallm_core.cuda_graphs), captured once the KV cache exists
        # (not with the reference ops: their boolean masks and .tolist() sync with the host, which capture forbids)
        self.use_cuda_graphs = (self.device.type == "cuda" and not engine_args.enforce_eager
                                and self.kernel_backend != "reference")
        self.max_num_seqs = engine_args.max_num_seqs
        self.max_num_batched_tokens = engine_args.max_num_batched_tokens
        self.graphs = None
        self.prefill_graphs = None  # adallm_core.prefill_graphs: steps of up to 512 tokens that are not pure decode
        logger.info(
            "model %s on %s: dtype %s, kv cache %s (%d KV groups), kernel backend %s, max_model_len %d",
            cfg.architecture, self.device, self.dtype, self.kv_cache_dtype, len(self.kv_groups),
            self.kernel_backend, self.max_model_len,
        )

    # --- KV cache -------------------------------------------------------------------------------------
    def kv_block_bytes(self) -> list[int]:
        """Bytes of one block (K and V, every layer of the group) for each KV group."""
        cfg = self.model_config
        per_layer = 2 * self.block_size * cfg.num_kv_heads * cfg.head_dim * self.kv_cache_dtype.itemsize
        return [len(g.layers) * per_layer for g in self.kv_groups]

    def allocate_kv_cache(self, num_blocks: Union[int, Sequence[int]], capture_graphs: bool = True) -> None:
        """One zeroed tensor [layers_in_group, 2, num_blocks, block_size, Hk, D] per KV group; then the decode CUDA
        graphs, unless capture_graphs is False (a temporary cache: memory_profile)."""
        counts = [num_blocks] * len(self.kv_groups) if isinstance(num_blocks, int) else list(num_blocks)
        if len(counts) != len(self.kv_groups) or min(counts) < 1:
            raise ValueError(f"num_blocks: need one positive count per KV group ({len(self.kv_groups)}), got {num_blocks}")
        cfg = self.model_config
        attn_layers = self.model.attention_layers()
        self.kv_caches = []
        for group, n in zip(self.kv_groups, counts):
            shape = (len(group.layers), 2, n, self.block_size, cfg.num_kv_heads, cfg.head_dim)
            cache = torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
            self.kv_caches.append(cache)
            for j, layer in enumerate(group.layers):
                attn_layers[layer].bind_cache(cache[j, 0], cache[j, 1], *self.kv_scales[layer])
        if self.use_cuda_graphs and capture_graphs:
            from adallm_core.cuda_graphs import DecodeGraphs
            from adallm_core.prefill_graphs import PrefillGraphs

            pool = torch.cuda.graph_pool_handle()
            logits = torch.empty(self.max_num_seqs, self.vocab_size, dtype=torch.float32, device=self.device)
            # the prefill graphs' steps are the larger: captured first, the shared pool grows once
            self.prefill_graphs = PrefillGraphs(self, logits, pool,
                                                max_num_batched_tokens=self.max_num_batched_tokens)
            self.graphs = DecodeGraphs(self, self.max_num_seqs, logits, pool)

    def free_kv_cache(self) -> None:
        """Unbind and drop the KV cache (and the graphs that read it), so its memory can return to the device."""
        self.release_graphs()
        for layer in self.model.attention_layers():
            layer.bind_cache(None, None, 1.0, 1.0)
        self.kv_caches = []

    def release_graphs(self) -> None:
        """Drop the CUDA graphs. Tensor-parallel ranks do this before destroying their NCCL group: graphs that
        captured its all-reduces keep destroy_process_group waiting forever (seen on 2 GPUs)."""
        self.graphs = self.prefill_graphs = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --- one step ---------------------------------------------------------------------------------------
    accepts_device_input_ids = True  # execute(input_ids=...): async scheduling can feed it a step ahead

    @torch.inference_mode()
    def execute(self, steps: Sequence[SeqStep], input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run one forward step -> float32 logits [number of steps with sample=True, vocab], in step order.

        input_ids: for single-token steps only, their ids as a device tensor (the previous step's tokens, not yet
        on the host); the steps' own token_ids are then placeholders."""
        if not steps:
            raise ValueError("execute() needs at least one SeqStep")
        if any(s.score is not None for s in steps):
            raise ValueError("steps that score prompt tokens run through execute_scored()")
        if input_ids is not None and (input_ids.shape != (len(steps),) or any(len(s.token_ids) != 1 for s in steps)):
            raise ValueError(f"execute(input_ids=...) needs one id per single-token step, got {tuple(input_ids.shape)} "
                             f"for {len(steps)} steps")
        if self.graphs is not None and self.graphs.can_run(steps):
            # decode steps: earlier blocks were checked when they were written; only the one written now is new
            self._check(steps, [1] * len(steps), [st.start_pos for st in steps], new_blocks_only=True)
            return self.graphs.run(steps, input_ids)
        bucket = self.prefill_graphs.bucket_for(steps) if self.prefill_graphs is not None else None
        if bucket is not None and input_ids is None:
            self._check(steps, [len(s.token_ids) for s in steps], [s.start_pos for s in steps])
            return self.prefill_graphs.run(steps, bucket)
        ids, ctx, sample_rows = self.prepare_inputs(steps)
        if input_ids is not None:
            ids.copy_(input_ids)
        hidden = self.model.forward(ids, ctx)
        return self.model.compute_logits(hidden[sample_rows])

    @torch.inference_mode()
    def execute_scored(self, steps: Sequence[SeqStep]) -> tuple[torch.Tensor, PromptScores]:
        """execute(), eager, for a step where some sequences score their prompt (SeqStep.score): the logits of the
        sampled rows, and the scores of every scored row."""
        if not steps:
            raise ValueError("execute_scored() needs at least one SeqStep")
        rows, targets, num_top = [], [], 0
        first = 0
        for i, s in enumerate(steps):
            if s.score is not None:
                sc = s.score
                if sc.first_row < 0 or sc.first_row + len(sc.targets) > len(s.token_ids):
                    raise ValueError(f"SeqStep {i}: scores rows {sc.first_row}..{sc.first_row + len(sc.targets)} "
                                     f"of {len(s.token_ids)}")
                rows.extend(range(first + sc.first_row, first + sc.first_row + len(sc.targets)))
                targets.extend(sc.targets)
                num_top = max(num_top, sc.num_top)
            first += len(s.token_ids)
        ids, ctx, sample_rows = self.prepare_inputs(steps)
        hidden = self.model.forward(ids, ctx)
        logits = self.model.compute_logits(hidden[sample_rows])
        return logits, self._score(hidden, rows, targets, num_top)

    def _score(self, hidden: torch.Tensor, rows: list[int], targets: list[int], num_top: int) -> PromptScores:
        # SCORE_ROWS (or max_num_seqs) rows of logits at a time, a bound the memory profile measures
        rows_t = torch.tensor(rows, dtype=torch.int64, device=self.device)
        targets_t = torch.tensor(targets, dtype=torch.int64, device=self.device)
        out = PromptScores(torch.empty(len(rows), device=self.device),
                           torch.empty(len(rows), dtype=torch.int64, device=self.device),
                           torch.empty(len(rows), num_top, dtype=torch.int64, device=self.device),
                           torch.empty(len(rows), num_top, device=self.device))
        chunk = max(self.max_num_seqs, SCORE_ROWS)
        for i in range(0, len(rows), chunk):
            end = min(i + chunk, len(rows))
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[rows_t[i:end]]), dim=-1)
            target = logprobs.gather(1, targets_t[i:end, None])
            out.target_logprobs[i:end] = target.squeeze(1)
            # int32 counts, and max for one top token: torch's sum into int64 and topk over a vocabulary-wide row
            # cost 1.3x and 8.5x as much (H100, 128 rows of Qwen3's vocabulary: 195 / 153 us, 454 / 53 us)
            out.target_ranks[i:end] = (logprobs > target).sum(dim=1, dtype=torch.int32) + 1
            if num_top == 1:
                top, top_id = logprobs.max(dim=-1, keepdim=True)
                out.top_logprobs[i:end], out.top_ids[i:end] = top, top_id
            elif num_top:
                out.top_logprobs[i:end], out.top_ids[i:end] = logprobs.topk(num_top, dim=-1)
        return out

    def prepare_inputs(self, steps: Sequence[SeqStep]):
        """Flat token ids, the ForwardContext (positions, per-group metadata and slot mapping), sampled rows."""
        q_lens = [len(s.token_ids) for s in steps]
        starts = [s.start_pos for s in steps]
        self._check(steps, q_lens, starts)
        cpu = torch.device("cpu")
        q_lens_t = torch.tensor(q_lens, dtype=torch.int64)
        starts_t = torch.tensor(starts, dtype=torch.int64)
        qsl = torch.zeros(len(steps) + 1, dtype=torch.int64)
        torch.cumsum(q_lens_t, 0, out=qsl[1:])
        seq_of_token = torch.repeat_interleave(torch.arange(len(steps)), q_lens_t)
        positions = torch.arange(int(qsl[-1])) - qsl[:-1][seq_of_token] + starts_t[seq_of_token]
        seq_lens = starts_t + q_lens_t
        metas, slots = [], []
        for g in range(len(self.kv_groups)):
            tables = [list(s.block_tables[g]) for s in steps]
            width = max(len(t) for t in tables)
            bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64, device=cpu)
            slot = bt[seq_of_token, positions // self.block_size] * self.block_size + positions % self.block_size
            slots.append(slot.to(self.device))
            metas.append(AttentionMetadata(
                query_start_loc=qsl.to(torch.int32).to(self.device),
                seq_lens=seq_lens.to(torch.int32).to(self.device),
                block_tables=bt.to(torch.int32).to(self.device),
                max_query_len=max(q_lens),
                max_seq_len=int(seq_lens.max()),
            ))
        ids = torch.tensor(list(itertools.chain.from_iterable(s.token_ids for s in steps)), dtype=torch.int64)
        sample_rows = (qsl[1:] - 1)[torch.tensor([s.sample for s in steps])]
        ctx = ForwardContext(positions.to(self.device), tuple(metas), tuple(slots))
        return ids.to(self.device), ctx, sample_rows.to(self.device)

    def _check(self, steps, q_lens, starts, new_blocks_only: bool = False) -> None:
        if not self.kv_caches:
            raise RuntimeError("KV cache not allocated: call allocate_kv_cache() first")
        for i, (s, q, start) in enumerate(zip(steps, q_lens, starts)):
            if q < 1 or start < 0:
                raise ValueError(f"SeqStep {i}: needs >= 1 token and start_pos >= 0, got {q} tokens at {start}")
            if start + q > self.max_model_len:
                raise ValueError(f"SeqStep {i}: context {start + q} exceeds max_model_len {self.max_model_len}")
            if len(s.block_tables) != len(self.kv_groups):
                raise ValueError(f"SeqStep {i}: {len(s.block_tables)} block tables, model has {len(self.kv_groups)} KV groups")
            need = math.ceil((start + q) / self.block_size)
            first = start // self.block_size if new_blocks_only else 0
            for g, table in enumerate(s.block_tables):
                if len(table) < need:
                    raise ValueError(f"SeqStep {i}: block table {g} has {len(table)} blocks, {need} needed for {start + q} tokens")
                ids = table[first:need] if new_blocks_only else table
                if ids and not 0 <= min(ids) <= max(ids) < self.kv_caches[g].shape[2]:
                    raise ValueError(f"SeqStep {i}: block table {g} holds ids outside [0, {self.kv_caches[g].shape[2]})")


def _resolve_max_model_len(requested, cfg: ModelConfig) -> int:
    if requested is None:
        return min(cfg.max_context_len, MAX_MODEL_LEN_DEFAULT_CAP)
    if requested > cfg.max_context_len:
        raise ValueError(f"max_model_len {requested} exceeds the model's context length {cfg.max_context_len} "
                         f"(max_position_embeddings {cfg.max_position_embeddings} and its RoPE scaling)")
    return requested


def _check_fp8_kv(device: torch.device) -> None:
    """The Triton kernels read and write an FP8 cache with Ada's E4M3 conversions: refuse it on an older GPU, by name."""
    from adallm_core.ops.triton.nvfp4_gemm import FP8_CAPABILITY

    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_CAPABILITY:
        raise ValueError(f"kv_cache_dtype 'fp8' needs compute capability >= 8.9 (Ada, Hopper); "
                         f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}: use kv_cache_dtype 'bf16' "
                         f"(--kv-cache-dtype bf16)")
