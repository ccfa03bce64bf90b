"""Sequence: one stream of tokens the scheduler moves through the engine (a request with n > 1 owns n of them)."""
from __future__ import annotations

import enum
import itertools
from typing import Optional

from adallm_core.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    # Plain attributes set once below: these are read for every sequence every step.
    finished: bool
    finish_reason: Optional[str]


for _status, _reason in ((SequenceStatus.WAITING, None), (SequenceStatus.RUNNING, None),
                         (SequenceStatus.FINISHED_STOPPED, "stop"), (SequenceStatus.FINISHED_LENGTH, "length"),
                         (SequenceStatus.FINISHED_ABORTED, "abort")):
    _status.finished = _reason is not None
    _status.finish_reason = _reason


class Sequence:
    """Tokens of one sequence and how far the KV cache has caught up with them.

    The scheduler's one rule: each step, num_computed_tokens moves towards num_tokens (prompt chunks or one
    decode token); when it reaches num_tokens the step samples a new token, which makes num_tokens grow by one.
    """

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float, max_tokens: int):
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n completions
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.arrival_time = arrival_time
        self.max_tokens = max_tokens  # resolved: params.max_tokens or what fits in max_model_len
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_placeholders = 0  # async scheduling: a token still being sampled on the device, counted ahead
        self.num_cached_tokens = 0  # prompt tokens that came from the prefix cache at first schedule
        self.block_tables: list[list[int]] = []  # one per KV group, owned by KVCacheManager
        self.block_hashes: list[bytes] = []  # chained content hashes of this sequence's full blocks
        self.stop_reason: Optional[object] = None
        self.logprobs: Optional[list[dict[int, float]]] = [] if params.logprobs is not None else None
        self.logprob_ranks: Optional[list[int]] = [] if params.logprobs is not None else None  # each sampled one's rank
        self.cumulative_logprob = 0.0
        # prompt_logprobs, scored by the request's first sequence only: one entry per prompt token scored so far
        self.prompt_logprobs: Optional[list] = [None] if params.prompt_logprobs is not None and index == 0 else None
        self.prompt_ranks: Optional[list] = [None] if self.prompt_logprobs is not None else None  # each token's rank
        self.detokenizer = None  # set by the engine (IncrementalDetokenizer)
        self.sampling_row = None  # the engine's SamplingRow for it, made once (it holds the live token lists)
        self.grammar = None  # structured outputs: this sequence's xgrammar matcher (set by the engine)
        # structured_outputs.start_after: the grammar waits until the output holds that text
        structure = params.structured_outputs
        self.grammar_waits_for = structure.start_after if structure is not None else None
        self.grammar_wait_scanned = 0  # how much of the output text was searched for it: each step reads only new text
        self.num_preemptions = 0
        self.num_sent_tokens = 0  # DELTA outputs: what the caller already has
        self.num_sent_chars = 0
        self.final_sent = False

    # --- token views --------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def active_grammar(self):
        """The matcher that constrains the next token, if any (None while it waits for start_after)."""
        return self.grammar if self.grammar_waits_for is None else None

    @property
    def scores_prompt(self) -> bool:
        """It still has prompt tokens to score (prompt_logprobs): they must be computed, not read from the cache."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_placeholders

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output without building the whole list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}#{self.index}, {self.status.name}, "
                f"computed={self.num_computed_tokens}/{self.num_tokens})")


class Request:
    """What the user submitted: one prompt, its parameters, and the n sequences generating for it."""

    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int], params: SamplingParams,
                 seqs: list[Sequence]):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seqs = seqs
        self.prompt_logprobs_sent = False  # DELTA outputs carry the prompt's logprobs once

    @property
    def finished(self) -> bool:
        for s in self.seqs:
            if not s.status.finished:
                return False
        return True
