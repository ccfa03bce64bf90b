"""LLMEngine: requests in, one step at a time: schedule -> runner.execute -> sample -> update -> outputs.

With async_scheduling the next decode step is launched before this one's tokens are read (overlap.py).
AsyncLLM (the background-loop engine for servers) lives in async_engine.py.
"""
from __future__ import annotations

import copy
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch

from adallm_core.config import EngineArgs
from adallm_core.cuda_graphs import capture_stream
from adallm_core.kv_cache import KVCacheManager, KVGroupSpec
from adallm_core.kv_sizing import blocks_per_group, check_fits, kv_budget_bytes
from adallm_core.memory_profile import graph_step_seqs, step_peak_bytes
from adallm_core.outputs import CompletionOutput, RequestOutput
from adallm_core.overlap import DeviceTokens, TokenBuffers
from adallm_core.prefill_graphs import token_buckets
from adallm_core.runner import PromptScores, PromptScoring, SeqStep
from adallm_core.sampler import Sampler, SamplingRow, logprob_entry
from adallm_core.sampling_params import ContextLengthError, RequestOutputKind, SamplingParams
from adallm_core.scheduler import Scheduler, SchedulerOutput
from adallm_core.sequence import Request, Sequence, SequenceStatus
from adallm_core.structured_output import GrammarCompiler
from adallm_core.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)

BATCHED_TOKENS_DEFAULT_CAP = 8192


@dataclass
class LaunchedStep:
    """A step whose GPU work is queued: what to do with its logits once they are read."""

    sampled: list[Sequence]  # sequences that get a token from this step, in logits row order
    rows: list[SamplingRow]
    logits: torch.Tensor
    tokens: Optional[DeviceTokens]  # sampled on the device at launch (async scheduling), else when read
    scored: list[tuple[Sequence, int]] = ()  # prompt_logprobs: (sequence, rows it scored), in step order
    scores: Optional[PromptScores] = None


class LLMEngine:
    """Continuous-batching engine over one ModelRunner. Not thread-safe: AsyncLLM serializes calls."""

    def __init__(self, engine_args: EngineArgs, runner, tokenizer: Tokenizer, sampling_defaults: Optional[dict] = None):
        self.engine_args = args = engine_args
        self.runner = runner
        self.tokenizer = tokenizer
        self.kernel_backend: str = runner.kernel_backend
        self.max_model_len: int = runner.max_model_len
        self.vocab_size: int = runner.vocab_size
        # the model maker's recommended sampling (generation_config.json), for requests that leave fields out
        self.sampling_defaults: dict = sampling_defaults or {}
        self.eos_token_ids = tuple(tokenizer.eos_token_ids) or tuple(runner.model_config.eos_token_ids)
        # the tokenizer's own eos ends a request with stop_reason None; generation_config.json's others stop it as
        # stop_token_ids do, naming the token (vLLM's)
        self.primary_eos_token_id = tokenizer.eos_token_id
        # the default budget also fits a decode token for every sequence that may run (max_num_seqs)
        self.max_num_batched_tokens = args.max_num_batched_tokens or max(
            min(max(2048, self.max_model_len), BATCHED_TOKENS_DEFAULT_CAP), args.max_num_seqs)

        windows = [g.sliding_window for g in runner.kv_groups]
        # CUDA: the largest step's own memory, measured before the KV budget is taken from what is free
        self.step_peak_bytes = self.graph_pool_bytes = 0
        if runner.device.type == "cuda" and args.num_gpu_blocks_override is None:
            self.step_peak_bytes = step_peak_bytes(runner, self.max_num_batched_tokens, args.max_num_seqs)
            if getattr(runner, "use_cuda_graphs", False):
                # the prefill graphs keep a pool for good, as large as their largest bucket's step (its eager peak
                # counts the sampler's temporaries too: an upper bound; prompt scoring runs eager, outside it);
                # measured on the capture stream, so the cuBLAS workspace that stream keeps exists before the
                # budget reads the free memory
                largest = token_buckets(args.max_num_batched_tokens)[-1]
                with torch.cuda.stream(capture_stream(runner.device)):
                    seqs = graph_step_seqs(largest, args.max_num_seqs, self.max_model_len)
                    self.graph_pool_bytes = step_peak_bytes(runner, largest, seqs, scored=False)
        budget = kv_budget_bytes(runner.device, args.gpu_memory_utilization, args.cpu_kv_cache_gb)
        budget = max(0, budget - self.step_peak_bytes - self.graph_pool_bytes)
        if self.step_peak_bytes:
            logger.info("KV budget: %.2f GB (%.0f%% of the memory free after the weights, less %.2f GB that a step "
                        "of %d tokens measured and %.2f GB for the prefill graphs)", budget / 2**30,
                        100 * args.gpu_memory_utilization, self.step_peak_bytes / 2**30, self.max_num_batched_tokens,
                        self.graph_pool_bytes / 2**30)
        counts = blocks_per_group(budget, runner.kv_block_bytes(), windows, args.block_size, args.max_num_seqs,
                                  self.max_num_batched_tokens, args.num_gpu_blocks_override)
        check_fits(counts, windows, args.block_size, self.max_model_len, self.max_num_batched_tokens)
        runner.allocate_kv_cache(counts)
        self.kv = KVCacheManager([KVGroupSpec(n, args.block_size, w) for n, w in zip(counts, windows)],
                                 args.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, args.max_num_seqs, self.max_num_batched_tokens)
        self.sampler = Sampler(args.seed, runner.device)
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, self.eos_token_ids)  # structured outputs
        self.requests: dict[str, Request] = {}
        # a runner that takes input ids from the device can run a step ahead (the tensor-parallel one cannot)
        self.async_scheduling = args.async_scheduling and getattr(runner, "accepts_device_input_ids", False)
        self._token_buffers = TokenBuffers(args.max_num_seqs, runner.device) if self.async_scheduling else None
        self._in_flight: Optional[LaunchedStep] = None
        self.num_steps_run_ahead = 0
        logger.info("engine ready: kernel backend %s, KV blocks per group %s (block_size %d, windows %s), "
                    "max_model_len %d, max_num_seqs %d, max_num_batched_tokens %d, prefix caching %s",
                    self.kernel_backend, counts, args.block_size, windows, self.max_model_len, args.max_num_seqs,
                    self.max_num_batched_tokens, args.enable_prefix_caching)

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "LLMEngine":
        from adallm_core.checkpoint.files import generation_sampling_defaults, load_config
        from adallm_core.checkpoint.read import Checkpoint
        from adallm_core.model_source import resolve_model_path
        from adallm_core.runner import ModelRunner

        path = resolve_model_path(engine_args.model)
        load_config(path)  # a folder that is no checkpoint is named as such before its tokenizer is tried
        tokenizer = Tokenizer.for_engine(engine_args, path)
        sampling_defaults = generation_sampling_defaults(path)
        if engine_args.tensor_parallel_size > 1:
            from adallm_core.distributed.executor import TensorParallelRunner

            runner = TensorParallelRunner(engine_args, path)
        else:
            runner = ModelRunner(engine_args, Checkpoint(path), engine_args.device)
        try:
            return cls(engine_args, runner, tokenizer, sampling_defaults)
        except BaseException:  # e.g. a cache too small for max_model_len: no worker outlives the error
            if hasattr(runner, "shutdown"):
                runner.shutdown()
            raise

    # --- requests ---------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Union[str, list[int]], params: Optional[SamplingParams] = None,
                    add_special_tokens: bool = True) -> None:
        """Queue a request. A bad request raises ValueError naming what is wrong; the engine is untouched."""
        self.admit(self.make_request(request_id, prompt, params, add_special_tokens))

    def make_request(self, request_id: str, prompt: Union[str, list[int]], params: Optional[SamplingParams] = None,
                     add_special_tokens: bool = True) -> Request:
        """Validate and tokenize, without touching the engine's state (AsyncLLM calls this off the loop thread)."""
        if not isinstance(request_id, str):  # as vLLM: a list is unhashable, and abort("7") would miss a 7
            raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        # the request's own copy (vLLM's clone): the step reads it live, and a caller may reuse and change its object
        params = copy.deepcopy(params)
        params.validate()
        prompt = prompt_of(prompt)  # {"prompt": ...} / {"prompt_token_ids": ...} as vLLM takes them
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        elif isinstance(prompt, (list, tuple)):
            text, ids = None, list(prompt)
            bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool)
                        or not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"prompt_token_ids: {bad!r} is not a token id in [0, {self.vocab_size})")
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty: it must have at least one token")
        outside = sorted(t for t in params.logit_bias or () if t >= self.vocab_size)
        if outside:
            raise ValueError(f"logit_bias: token ids {outside[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ContextLengthError.of(self.max_model_len, f"and the prompt has {len(ids)} tokens: it must leave "
                                        "room for at least one generated token")
        room = self.max_model_len - len(ids)
        max_tokens = min(params.max_tokens, room) if params.max_tokens is not None else room
        new_matcher = self.grammars.matcher_factory(params.structured_outputs) if params.structured_outputs else None
        now = time.monotonic()
        seqs = []
        for i in range(params.n):
            seq = Sequence(request_id, i, ids, params, now, max_tokens)
            seq.grammar = new_matcher() if new_matcher is not None else None
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.stop, params.skip_special_tokens,
                                                     params.include_stop_str_in_output)
            seqs.append(seq)
        return Request(request_id, text, ids, params, seqs)

    def admit(self, req: Request) -> None:
        """Queue a request made by make_request(); it joins the next step."""
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.scheduler.add(req.seqs)

    def abort_request(self, request_id: Union[str, list[str]]
                      ) -> Union[Optional[RequestOutput], list[RequestOutput]]:
        """Stop a request now and free all its blocks; returns its last output (finish_reason 'abort').
        A list of ids (vLLM takes one) returns the outputs of those that were still unfinished."""
        if not isinstance(request_id, str):
            return [o for r in request_ids_of(request_id) if (o := self.abort_request(r)) is not None]
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
                seq.detokenizer.flush()
        return self._output(req, force=True)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- the step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step and return its outputs. With async scheduling the step returned may be the one launched by
        the previous call, and the next one is then already running on the device."""
        launched, self._in_flight = self._in_flight, None
        if launched is None:
            sched = self.scheduler.schedule()
            if not sched.scheduled:
                if self.scheduler.has_unfinished():
                    raise RuntimeError("scheduler made no progress although requests are waiting (KV cache too small?)")
                return []
            launched = self._launch(sched, self._seq_steps(sched))
        if launched.tokens is not None and self._can_run_ahead(launched):
            self._in_flight = self._launch_ahead(launched)
        return self._finish(launched)

    def _launch(self, sched: SchedulerOutput, steps: list, input_ids: Optional[torch.Tensor] = None) -> LaunchedStep:
        scored = [(s.seq, len(st.score.targets)) for s, st in zip(sched.scheduled, steps) if st.score is not None]
        scores = None
        if scored:
            logits, scores = self.runner.execute_scored(steps)
        elif input_ids is None:
            logits = self.runner.execute(steps)
        else:
            logits = self.runner.execute(steps, input_ids=input_ids)
        # Bookkeeping that needs no sampled token runs before anything waits for the GPU (on a GPU the step may
        # still be running). Rows first: they read the output lengths, which update() does not change.
        sampled = [s.seq for s in sched.scheduled if s.sample]
        rows = [self._sampling_row(seq) for seq in sampled]
        self.scheduler.update(sched)
        tokens = None
        if self.async_scheduling and sampled and Sampler.on_device(rows):
            tokens = self._token_buffers.tokens(self.sampler.sample_on_device(logits, rows))
        return LaunchedStep(sampled, rows, logits, tokens, scored, scores)

    def _can_run_ahead(self, launched: LaunchedStep) -> bool:
        """Every running sequence gets its next input from `launched` and nobody waits to join: the next schedule
        is then all single-token decodes of those sequences (or fewer, if the cache forces a preemption)."""
        running = self.scheduler.running
        if self.scheduler.waiting or len(running) != len(launched.sampled):
            return False
        if all(len(seq.output_token_ids) + 1 >= seq.max_tokens for seq in launched.sampled):
            return False  # every sequence ends with this token: a step ahead would be thrown away
        ids = {seq.seq_id for seq in launched.sampled}
        return all(seq.seq_id in ids for seq in running)

    def _launch_ahead(self, launched: LaunchedStep) -> Optional[LaunchedStep]:
        for seq in launched.sampled:  # its token exists on the device only: count it, its id comes later
            seq.num_placeholders += 1
        sched = self.scheduler.schedule()
        row_of = {seq.seq_id: i for i, seq in enumerate(launched.sampled)}
        if any(s.num_new_tokens != 1 or not s.sample or s.seq.seq_id not in row_of for s in sched.scheduled):
            raise RuntimeError(f"async scheduling: the step ahead is not all decodes of the last step's sequences: "
                               f"{sched.scheduled}")
        if not sched.scheduled:
            return None
        rows = [row_of[s.seq.seq_id] for s in sched.scheduled]
        ids = launched.tokens.ids
        ids = ids[: len(rows)] if rows == list(range(len(rows))) else ids[torch.tensor(rows, device=ids.device)]
        self.num_steps_run_ahead += 1
        steps = [SeqStep([0], s.start_pos, s.seq.block_tables, True) for s in sched.scheduled]
        return self._launch(sched, steps, ids)

    def _finish(self, launched: LaunchedStep) -> list[RequestOutput]:
        """Read the step's tokens (waiting for the device) and do its bookkeeping: stops, detokenization, outputs."""
        if launched.scored:
            self._record_prompt_logprobs(launched.scored, launched.scores)
        if not launched.sampled:
            return []
        if launched.tokens is not None:
            token_ids = launched.tokens.tolist()  # sampled ahead: no logprobs were asked for
            logprobs = ranks = [None] * len(launched.sampled)
        else:
            result = self.sampler(launched.logits, launched.rows)
            token_ids, logprobs, ranks = result.token_ids, result.logprobs, result.ranks
        touched: dict[str, Request] = {}
        requests = self.requests
        for seq, token, lp, rank in zip(launched.sampled, token_ids, logprobs, ranks):
            if seq.num_placeholders:  # the step ahead counted this token already
                seq.num_placeholders -= 1
            if seq.is_finished:  # stopped (or aborted) while this step ran ahead: its token is dropped
                continue
            self._append_token(seq, token, lp, rank)
            touched[seq.request_id] = requests[seq.request_id]
        outputs = [o for req in touched.values() if (o := self._output(req)) is not None]
        for req in touched.values():
            if req.finished:
                del self.requests[req.request_id]
        return outputs

    def _seq_steps(self, sched: SchedulerOutput) -> list:
        return [SeqStep(s.seq.token_slice(s.start_pos, s.start_pos + s.num_new_tokens), s.start_pos,
                        s.seq.block_tables, s.sample, _prompt_scoring(s.seq, s.start_pos, s.num_new_tokens))
                for s in sched.scheduled]

    @staticmethod
    def _record_prompt_logprobs(scored: list[tuple[Sequence, int]], scores: PromptScores) -> None:
        target_lps, ranks, top_ids, top_lps = (t.tolist() for t in (
            scores.target_logprobs, scores.target_ranks, scores.top_ids, scores.top_logprobs))
        row = 0
        for seq, count in scored:
            num_top = seq.params.prompt_logprobs
            prompt, scored_so_far = seq.prompt_token_ids, seq.prompt_logprobs
            for r in range(row, row + count):
                scored_so_far.append(logprob_entry(prompt[len(scored_so_far)], target_lps[r], top_ids[r][:num_top],
                                                   top_lps[r][:num_top]))
                seq.prompt_ranks.append(ranks[r])
            row += count

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        p = seq.params
        # a placeholder is a token generated before this one (async scheduling): it counts towards min_tokens
        if len(seq.output_token_ids) + seq.num_placeholders < p.min_tokens:  # too early to stop: no eos / stop ids
            # eos too with ignore_eos (vLLM's: min_tokens bans every stop id, ignore_eos only keeps eos from stopping)
            banned = tuple(p.stop_token_ids) + self.eos_token_ids
            return SamplingRow(p, seq.prompt_token_ids, seq.output_token_ids, seq.index, banned, seq.num_placeholders,
                               seq.active_grammar, seq.grammar_waits_for is not None)
        if seq.sampling_row is None:  # made once: it holds the sequence's live token lists
            seq.sampling_row = SamplingRow(p, seq.prompt_token_ids, seq.output_token_ids, seq.index)
        row = seq.sampling_row
        row.num_placeholders = seq.num_placeholders
        row.grammar, row.grammar_waits = seq.active_grammar, seq.grammar_waits_for is not None
        return row

    def _append_token(self, seq: Sequence, token: int, logprobs: Optional[dict[int, float]],
                      rank: Optional[int] = None) -> None:
        """Record the sampled token, then the stop checks in vLLM's order: eos, stop ids, stop strings, length."""
        out = seq.output_token_ids
        out.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.logprob_ranks.append(rank)
            seq.cumulative_logprob += logprobs[token]
        p = seq.params
        may_stop = len(out) >= p.min_tokens  # eos / stop ids: banned before, so the earliest is token min_tokens + 1
        # stop strings as vLLM checks them: in text from token min_tokens + 1 on (a match may start before it)
        check_strings = len(out) > p.min_tokens
        # structured outputs: the mask let only tokens the grammar takes through; once complete (it took a stop
        # token) the output ends, ignore_eos or not
        grammar = seq.active_grammar
        grammar_done = grammar is not None and (not grammar.accept_token(token) or grammar.is_terminated())
        status = None
        if may_stop and not p.ignore_eos and token in self.eos_token_ids:
            status = SequenceStatus.FINISHED_STOPPED
            if token != self.primary_eos_token_id:
                seq.stop_reason = token
        elif grammar_done:
            status = SequenceStatus.FINISHED_STOPPED
        elif may_stop and token in p.stop_token_ids:
            status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, token
        elif (stop := seq.detokenizer.update(token, check_stop=check_strings)) is not None:
            status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, stop
        elif len(out) >= seq.max_tokens or len(seq.prompt_token_ids) + len(out) >= self.max_model_len:
            status = SequenceStatus.FINISHED_LENGTH
        if status is None:
            if seq.grammar_waits_for is not None:
                _start_grammar_after_its_text(seq)
            return
        stopped_by_token = status is SequenceStatus.FINISHED_STOPPED and not isinstance(seq.stop_reason, str)
        if stopped_by_token and p.include_stop_str_in_output:
            seq.detokenizer.update(token, check_stop=False)  # an eos / stop token's own text (vLLM's)
        if seq.stop_reason is None or isinstance(seq.stop_reason, int):
            stop = seq.detokenizer.flush(check_strings)  # text held back for an unfinished character
            if stop is not None:  # ...which completed a stop string after all: the text ends before it
                status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, stop
        self.scheduler.finish(seq, status)

    # --- outputs ------------------------------------------------------------------------------------
    def _output(self, req: Request, force: bool = False) -> Optional[RequestOutput]:
        kind = req.params.output_kind
        finished = req.finished
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        completions = []
        delta = kind is RequestOutputKind.DELTA
        for seq in req.seqs:
            if seq.final_sent:
                continue
            status = seq.status
            done = status.finished
            text = seq.detokenizer.output_text(done)
            tokens, logprobs, ranks = seq.output_token_ids, seq.logprobs, seq.logprob_ranks
            if delta:
                if len(tokens) == seq.num_sent_tokens and not done and not force:
                    continue
                text, tokens = text[seq.num_sent_chars:], tokens[seq.num_sent_tokens:]
                logprobs = logprobs[seq.num_sent_tokens:] if logprobs is not None else None
                ranks = ranks[seq.num_sent_tokens:] if ranks is not None else None
                seq.num_sent_chars += len(text)
                seq.num_sent_tokens += len(tokens)
                seq.final_sent = done
            completions.append(CompletionOutput(
                seq.index, text, list(tokens), status.finish_reason, seq.stop_reason,
                list(logprobs) if logprobs is not None else None,
                seq.cumulative_logprob if seq.logprobs is not None else None,
                list(ranks) if ranks is not None else None))
        prompt_logprobs = self._prompt_logprobs_out(req, delta, force)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, completions, finished,
                             num_cached_tokens=req.seqs[0].num_cached_tokens, prompt_logprobs=prompt_logprobs,
                             prompt_token_ranks=None if prompt_logprobs is None else list(req.seqs[0].prompt_ranks))

    @staticmethod
    def _prompt_logprobs_out(req: Request, delta: bool, force: bool) -> Optional[list]:
        scored = req.seqs[0].prompt_logprobs
        if scored is None or (delta and req.prompt_logprobs_sent):
            return None
        if delta:  # once, when complete (or cut short by an abort)
            if len(scored) < len(req.prompt_token_ids) and not force:
                return None
            req.prompt_logprobs_sent = True
        return list(scored)

    # --- introspection --------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_requests": len(self.requests),
            "kv_blocks_total": self.kv.num_total_blocks,
            "kv_blocks_used": self.kv.num_used_blocks,
            "kv_usage": self.kv.usage,
            "prefix_cache_query_tokens": self.kv.prefix_cache_queries,
            "prefix_cache_hit_tokens": self.kv.prefix_cache_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "kernel_backend": self.kernel_backend,
            "num_steps_run_ahead": self.num_steps_run_ahead,
        }

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (a single-GPU runner holds nothing to stop)."""
        if hasattr(self.runner, "shutdown"):
            self.runner.shutdown()


_request_counter = itertools.count()


def _start_grammar_after_its_text(seq: Sequence) -> None:
    """structured_outputs.start_after: once the output holds the text, the grammar constrains the next token on.
    Only text new since the last step is searched (with a tag's worth before it, for one cut between steps): a long
    thinking would otherwise be read again every step."""
    text, tag = seq.detokenizer.text, seq.grammar_waits_for
    if text.find(tag, max(0, seq.grammar_wait_scanned - len(tag) + 1)) >= 0:
        seq.grammar_waits_for = None
    seq.grammar_wait_scanned = len(text)


def _prompt_scoring(seq: Sequence, start: int, num_new: int) -> Optional[PromptScoring]:
    """The prompt tokens this step's rows predict and the sequence has not scored yet (rows at positions p predict
    the tokens at p + 1); None when there are none."""
    if not seq.scores_prompt:
        return None
    first = max(start + 1, len(seq.prompt_logprobs))  # a recompute after preemption scores nothing twice
    last = min(start + num_new, seq.num_prompt_tokens - 1)
    if first > last:
        return None
    return PromptScoring(first - 1 - start, seq.prompt_token_ids[first:last + 1], seq.params.prompt_logprobs)


def prompt_of(p):
    """{"prompt": text} / {"prompt_token_ids": [...]} (vLLM's TextPrompt / TokensPrompt) -> the text or the ids;
    anything else as it is (make_request checks it)."""
    if not isinstance(p, dict):
        return p
    unknown = sorted(set(p) - {"prompt", "prompt_token_ids"})
    if unknown:
        raise ValueError(f"prompt dict key(s) {unknown} are not supported (a text model takes 'prompt' or "
                         f"'prompt_token_ids')")
    if len(p) != 1:
        raise ValueError(f"a prompt dict needs exactly one of 'prompt' or 'prompt_token_ids', got {sorted(p)}")
    if "prompt" in p:
        return p["prompt"]
    ids = p["prompt_token_ids"]
    if not isinstance(ids, (list, tuple)):  # list(5) would be a TypeError, which fails AsyncLLM's whole batch
        raise ValueError(f"prompt_token_ids must be a list of token ids, got {type(ids).__name__}")
    return list(ids)


def request_ids_of(request_id) -> list[str]:
    """What abort takes: one id or a list of them (vLLM takes both); anything else is a ValueError."""
    ids = [request_id] if isinstance(request_id, str) else request_id
    if not isinstance(ids, (list, tuple, set)) or not all(isinstance(r, str) for r in ids):
        raise ValueError(f"request_id must be a string or a list of strings, got {request_id!r}")
    return list(ids)


def next_request_id() -> str:
    return str(next(_request_counter))


def __getattr__(name: str):
    if name in ("AsyncLLM", "EngineDeadError"):  # adallm_core.__init__ looks AsyncLLM up here
        from adallm_core import async_engine

        return getattr(async_engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
