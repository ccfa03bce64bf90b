"""Iteration-level scheduler: no prefill or decode phase, one token budget per step.

Each step every running sequence's num_computed_tokens catches up towards num_tokens: decodes (one token)
first, then prefill chunks, within max_num_batched_tokens; then waiting sequences join in FCFS order while
max_num_seqs and the KV cache allow. When blocks run out, the newest running sequence is preempted
(recompute: its blocks are freed and it goes back to the front of the queue).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from adallm_core.kv_cache import KVCacheManager
from adallm_core.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, from start_pos on
    start_pos: int  # seq.num_computed_tokens when scheduled
    sample: bool  # this step reaches the last known token: its logits give the next one

    @classmethod
    def of(cls, seq: Sequence, num_new_tokens: int) -> "ScheduledSeq":
        start = seq.num_computed_tokens
        return cls(seq, num_new_tokens, start, start + num_new_tokens == seq.num_tokens)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is the newest
        self.num_preemptions = 0

    # --- queue changes ------------------------------------------------------------------------
    def add(self, seqs: Iterable[Sequence]) -> None:
        self.waiting.extend(seqs)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Leave at once (finished or aborted): every block goes back to the pool now."""
        seq.status = status
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled_ids: set[int] = set()
        decodes, prefills = [], []  # (seq, tokens it has not computed yet)
        for s in self.running:
            todo = s.num_tokens - s.num_computed_tokens
            if todo == 1:
                decodes.append((s, 1))
            elif todo > 1:
                prefills.append((s, todo))
        for seq, todo in decodes + prefills:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(todo, budget)
            while not self.kv.allocate_slots(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim.seq_id in scheduled_ids:  # it had a slot this step already: hand the budget back
                    scheduled_ids.discard(victim.seq_id)
                    for i, s in enumerate(out.scheduled):
                        if s.seq is victim:
                            budget += out.scheduled.pop(i).num_new_tokens
                            break
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, num_new, seq.num_computed_tokens, num_new == todo))
                scheduled_ids.add(seq.seq_id)
                budget -= num_new

        # Waiting sequences join only when nothing had to be preempted (the cache is tight otherwise).
        skipped = []
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._sibling_prefilling(seq):
                # it waits for its sibling's prompt blocks to reach the prefix cache; later requests go on joining
                skipped.append(self.waiting.popleft())
                continue
            computed = self.kv.get_computed_blocks(seq)
            num_new = min(seq.num_tokens - computed[1], budget)
            if not self.kv.allocate_slots(seq, num_new, computed):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq.of(seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))  # still first in line
        return out

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _sibling_prefilling(self, seq: Sequence) -> bool:
        if seq.index == 0 or not self.kv.enable_prefix_caching:
            return False
        return any(s.request_id == seq.request_id and s.num_computed_tokens < s.num_prompt_tokens
                   for s in self.running)

    def update(self, out: SchedulerOutput) -> None:
        """After the runner computed the step: advance computed tokens and offer full blocks to the cache."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.kv.cache_full_blocks(s.seq)
