"""Scheduler: token budget, decodes first, chunked prefill, max_num_seqs, FCFS, preemption, abort.

The "model" here is a pure function of a sequence's tokens, so any correct schedule gives the same outputs.
"""
from adallm_core.kv_cache import KVCacheManager, KVGroupSpec
from adallm_core.sampling_params import SamplingParams
from adallm_core.scheduler import Scheduler
from adallm_core.sequence import Sequence, SequenceStatus

BS = 4


def make_seq(rid, n_prompt, max_tokens=3, start=1, index=0):
    return Sequence(rid, index, list(range(start, start + n_prompt)), SamplingParams(), 0.0, max_tokens)


def next_token(seq):
    return (sum(seq.all_token_ids) * 31 + seq.num_tokens) % 1000


def make_sched(num_blocks=256, max_num_seqs=8, budget=16, groups=None, caching=True):
    kv = KVCacheManager(groups or [KVGroupSpec(num_blocks, BS)], enable_prefix_caching=caching)
    return Scheduler(kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)


def run(sched, seqs):
    """Drive the scheduler like the engine: schedule, 'compute', update, sample, finish."""
    sched.add(seqs)
    steps, finished = [], []
    while sched.has_unfinished():
        out = sched.schedule()
        assert out.scheduled, "scheduler stalled"
        assert out.num_batched_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        steps.append([(s.seq.request_id, s.num_new_tokens, s.sample) for s in out.scheduled])
        sched.update(out)
        for s in out.scheduled:
            if s.sample:
                s.seq.append_token(next_token(s.seq))
                if s.seq.num_output_tokens >= s.seq.max_tokens:
                    sched.finish(s.seq, SequenceStatus.FINISHED_LENGTH)
                    finished.append(s.seq.request_id)
        assert len(steps) < 500
    return steps, finished


def test_budget_chunks_prefill_and_schedules_decodes_first():
    sched = make_sched(budget=16)
    steps, _ = run(sched, [make_seq("a", 10), make_seq("b", 10, start=100), make_seq("c", 10, start=200)])
    assert steps[0] == [("a", 10, True), ("b", 6, False)]
    assert steps[1] == [("a", 1, True), ("b", 4, True), ("c", 10, True)]
    assert steps[2] == [("a", 1, True), ("b", 1, True), ("c", 1, True)]
    assert len(steps) == 4  # 3 tokens each: after step 3, "a" is done (3 samples), b and c decode once more


def test_decode_of_a_running_sequence_goes_before_a_prefill_chunk():
    sched = make_sched(budget=8)
    steps, _ = run(sched, [make_seq("a", 3), make_seq("b", 20, start=100)])
    assert steps[0] == [("a", 3, True), ("b", 5, False)]
    assert steps[1] == [("a", 1, True), ("b", 7, False)]
    assert steps[2] == [("a", 1, True), ("b", 7, False)]
    assert steps[3] == [("b", 1, True)]


def test_max_num_seqs_and_fcfs():
    sched = make_sched(max_num_seqs=2, budget=64)
    seqs = [make_seq(r, 5, max_tokens=2 + i, start=10 * i) for i, r in enumerate("abcd")]
    steps, finished = run(sched, seqs)
    assert [r for r, _, _ in steps[0]] == ["a", "b"]
    assert finished == ["a", "b", "c", "d"]
    assert all(len(s) <= 2 for s in steps)


def test_preemption_gives_same_outputs_as_a_large_cache():
    def outputs(num_blocks):
        sched = make_sched(num_blocks=num_blocks, budget=32)
        seqs = [make_seq(f"r{i}", 6 + 3 * i, max_tokens=12, start=50 * i) for i in range(6)]
        run(sched, seqs)
        return {s.request_id: s.output_token_ids for s in seqs}, sched.num_preemptions, sched.kv.num_used_blocks

    big, big_preempt, _ = outputs(256)
    small, small_preempt, used = outputs(14)  # 13 usable blocks for 6 sequences of up to 33 tokens
    assert big_preempt == 0 and small_preempt > 0
    assert small == big
    assert used == 0


def test_preemption_takes_the_newest_and_requeues_it_first():
    sched = make_sched(num_blocks=7, budget=64)  # 6 usable blocks
    a, b, c = make_seq("a", 8, max_tokens=20), make_seq("b", 7, max_tokens=20, start=100), make_seq("c", 3, start=200)
    sched.add([a, b, c])
    first = sched.schedule()  # a: 2 blocks, b: 2 blocks, c: 1 block
    assert [s.seq.request_id for s in first.scheduled] == ["a", "b", "c"]
    sched.update(first)
    for s in first.scheduled:
        s.seq.append_token(1)
    b.append_token(1)  # b grows to 9 tokens -> needs a 3rd block; a needs a 3rd for its 9th token too
    sched.running.remove(b)
    sched.running.insert(0, b)
    b.num_computed_tokens = 8
    d = make_seq("d", 3, start=300)
    sched.add([d])  # waits behind the preempted sequence: it came later
    out = sched.schedule()
    assert out.preempted == [c]  # the newest running sequence, not an older one
    assert list(sched.waiting) == [c, d] and c.num_computed_tokens == 0 and c.block_tables == []
    assert sorted(s.seq.request_id for s in out.scheduled) == ["a", "b"]


def test_a_step_that_preempts_admits_nobody_waiting():
    """The module's rule: waiting sequences join only in a step that preempted nothing. Here b is preempted in step
    3 and the one block it freed would take its 3-token chunk again at once; it waits for the next step instead."""
    sched = make_sched(num_blocks=4, budget=4, caching=False)  # 3 usable blocks
    a, b = make_seq("a", 5, max_tokens=20), make_seq("b", 7, max_tokens=20, start=100)
    steps = []
    sched.add([a, b])
    for _ in range(4):
        out = sched.schedule()
        steps.append(([(s.seq.request_id, s.num_new_tokens) for s in out.scheduled], out.preempted))
        sched.update(out)
        for s in out.scheduled:
            if s.sample:
                s.seq.append_token(next_token(s.seq))
    assert steps[0] == ([("a", 4)], [])  # a: 1 block
    assert steps[1] == ([("a", 1), ("b", 3)], [])  # a: 2 blocks, b: 1 block, none left
    # b's next 3 tokens need a 2nd block: b (the newest) is preempted, and it does not join this step again
    assert steps[2] == ([("a", 1)], [b])
    assert list(sched.waiting) == [] and steps[3] == ([("a", 1), ("b", 3)], [])


def test_abort_frees_every_block_at_once():
    sched = make_sched(num_blocks=64, budget=8)
    a, b = make_seq("a", 30, max_tokens=50), make_seq("b", 10, start=100)
    sched.add([a, b])
    for _ in range(3):  # a is mid-prefill, b waiting or running
        out = sched.schedule()
        sched.update(out)
    assert sched.kv.num_used_blocks > 0
    sched.finish(a, SequenceStatus.FINISHED_ABORTED)
    sched.finish(b, SequenceStatus.FINISHED_ABORTED)
    assert sched.kv.num_used_blocks == 0 and not sched.has_unfinished()
    assert a.status.finish_reason == "abort"


def test_waiting_sibling_reuses_prompt_blocks_of_the_first():
    sched = make_sched(budget=64)
    seqs = [make_seq("r", 17, max_tokens=2, index=i) for i in range(3)]
    steps, _ = run(sched, seqs)
    assert steps[0] == [("r", 17, True)]  # siblings wait one step for the prompt blocks
    assert all(s.num_cached_tokens == 16 for s in seqs[1:])
    assert sched.kv.prefix_cache_hits == 32


def test_without_prefix_caching_siblings_do_not_wait():
    """The wait is for the first sibling's cached prompt blocks: with no prefix cache there is nothing to wait for,
    and all three completions start together, each computing the whole prompt."""
    sched = make_sched(budget=64, caching=False)
    seqs = [make_seq("r", 17, max_tokens=2, index=i) for i in range(3)]
    steps, _ = run(sched, seqs)
    assert steps[0] == [("r", 17, True)] * 3
    assert all(s.num_cached_tokens == 0 for s in seqs)


def test_later_requests_join_while_a_sibling_waits_for_the_first_ones_prompt():
    # the first sibling's prompt takes three steps of chunked prefill; its siblings wait for its blocks, and a request
    # behind them need not
    sched = make_sched(budget=8)
    siblings = [make_seq("r", 20, max_tokens=2, index=i) for i in range(2)]
    other = make_seq("o", 3, max_tokens=2, start=500)
    steps, _ = run(sched, siblings + [other])
    assert steps[:3] == [[("r", 8, False)], [("r", 8, False)], [("r", 4, True), ("o", 3, True)]]  # "o" in the third
    assert ("r", 4, True) in steps[3]  # the second sibling joins once the first one's prompt is whole
    assert siblings[1].num_cached_tokens == 16  # ...and reuses its full blocks


def test_a_sibling_that_waits_for_the_prompt_keeps_its_place_in_line():
    """FCFS: a sibling skipped while the first completion's prompt is computed stays ahead of requests that came
    after it. With max_num_seqs=3 the one free slot of step 2 is the sibling's, not the later request's."""
    sched = make_sched(budget=12, max_num_seqs=3)
    first, sibling = (make_seq("r", 10, max_tokens=2, index=i) for i in range(2))
    other, later = make_seq("o", 3, start=500), make_seq("p", 3, start=600)
    sched.add([first, sibling, other, later])
    out = sched.schedule()  # r#0 takes 10 tokens, r#1 waits for its blocks, o takes the 2 tokens left
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("r", 10), ("o", 2)]
    assert list(sched.waiting) == [sibling, later]
    sched.update(out)
    first.append_token(next_token(first))
    out = sched.schedule()
    # r#0 decodes, o finishes its prompt, and r#1 joins with the 2 tokens past its 8 cached ones
    assert [(s.seq.request_id, s.seq.index, s.num_new_tokens) for s in out.scheduled] == [
        ("r", 0, 1), ("o", 0, 1), ("r", 1, 2)]
    assert list(sched.waiting) == [later]


def test_sliding_window_group_keeps_few_blocks():
    groups = [KVGroupSpec(64, BS), KVGroupSpec(64, BS, sliding_window=8)]
    sched = make_sched(groups=groups, budget=8)
    seq = make_seq("a", 40, max_tokens=30)
    sched.add([seq])
    peak = 0
    while sched.has_unfinished():
        out = sched.schedule()
        sliding_used = sched.kv.pools[1].num_usable - sched.kv.pools[1].num_free
        peak = max(peak, sliding_used)
        sched.update(out)
        if out.scheduled[0].sample:
            seq.append_token(next_token(seq))
            if seq.num_output_tokens == seq.max_tokens:
                sched.finish(seq, SequenceStatus.FINISHED_LENGTH)
    assert peak <= -(-(8 + 8) // BS) + 1
    assert sched.kv.num_used_blocks == 0
