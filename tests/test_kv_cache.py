"""Block pool, ref counts, prefix hashing and KV groups: exact block counts and ids."""
import pytest

from adallm_core.kv_cache import NULL_BLOCK, KVCacheManager, KVGroupSpec, hash_block
from adallm_core.kv_sizing import blocks_per_group, check_fits
from adallm_core.sampling_params import SamplingParams
from adallm_core.sequence import Sequence

BS = 4


def make_seq(tokens, rid="r"):
    return Sequence(rid, 0, tokens, SamplingParams(), 0.0, max_tokens=16)


def compute(kv, seq, n):
    """What the engine does for one scheduled chunk: allocate, compute, register full blocks."""
    if not seq.block_tables:
        computed = kv.get_computed_blocks(seq)
        n = min(n, seq.num_tokens - computed[1])
        assert kv.allocate_slots(seq, n, computed)
    else:
        assert kv.allocate_slots(seq, n)
    seq.num_computed_tokens += n
    kv.cache_full_blocks(seq)


def test_allocate_and_free_counts_blocks():
    kv = KVCacheManager([KVGroupSpec(num_blocks=11, block_size=BS)])
    seq = make_seq(list(range(1, 18)))  # 17 tokens -> 5 blocks
    compute(kv, seq, 17)
    assert len(seq.block_tables[0]) == 5 and NULL_BLOCK not in seq.block_tables[0]
    assert (kv.num_used_blocks, kv.num_total_blocks) == (5, 10)
    seq.append_token(99)
    compute(kv, seq, 1)  # token 18 still fits in block 5
    assert kv.num_used_blocks == 5
    kv.free(seq)
    assert kv.num_used_blocks == 0 and seq.block_tables == []


def test_prefix_hit_reuses_blocks_and_counts_tokens():
    kv = KVCacheManager([KVGroupSpec(num_blocks=20, block_size=BS)])
    a = make_seq(list(range(1, 21)), "a")  # 5 full blocks
    compute(kv, a, 20)
    a_blocks = list(a.block_tables[0])
    kv.free(a)
    b = make_seq(list(range(1, 13)) + [77, 78, 79, 80, 81], "b")  # shares 3 blocks with a
    compute(kv, b, 100)
    assert b.num_cached_tokens == 12
    assert b.block_tables[0][:3] == a_blocks[:3]
    assert kv.prefix_cache_hits == 12 and kv.prefix_cache_queries == 20 + 17


def test_full_prompt_hit_still_computes_last_token():
    kv = KVCacheManager([KVGroupSpec(num_blocks=20, block_size=BS)])
    a = make_seq(list(range(1, 17)))
    compute(kv, a, 16)
    b = make_seq(list(range(1, 17)))
    computed = kv.get_computed_blocks(b)
    assert computed[1] == 12  # 3 of the 4 full blocks: the last token's logits are needed


def test_shared_blocks_are_ref_counted():
    kv = KVCacheManager([KVGroupSpec(num_blocks=20, block_size=BS)])
    a, b = make_seq(list(range(1, 10)), "a"), make_seq(list(range(1, 10)), "b")
    compute(kv, a, 9)
    compute(kv, b, 9)
    assert b.block_tables[0][:2] == a.block_tables[0][:2]
    assert kv.num_used_blocks == 3 + 1  # two shared full blocks, one partial block each
    kv.free(a)
    assert kv.num_used_blocks == 3  # b still holds the shared ones
    kv.free(b)
    assert kv.num_used_blocks == 0


def test_same_block_content_after_a_different_prefix_is_a_miss():
    assert hash_block(None, (1, 2, 3, 4)) != hash_block(hash_block(None, (9, 9, 9, 9)), (1, 2, 3, 4))
    kv = KVCacheManager([KVGroupSpec(num_blocks=20, block_size=BS)])
    compute(kv, make_seq([9, 9, 9, 9, 1, 2, 3, 4, 5]), 9)
    b = make_seq([1, 2, 3, 4, 5, 6])
    assert kv.get_computed_blocks(b)[1] == 0


def test_a_block_that_differs_only_in_its_last_token_is_a_miss():
    """Every token of a block is part of its hash: a prompt whose 8th token differs shares only the first block, and
    the second is computed again (served from the cache, it would attend to the other prompt's KV for that token)."""
    kv = KVCacheManager([KVGroupSpec(num_blocks=20, block_size=BS)])
    compute(kv, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a"), 9)
    assert kv.get_computed_blocks(make_seq([1, 2, 3, 4, 5, 6, 7, 99, 9]))[1] == 4
    assert kv.get_computed_blocks(make_seq([1, 2, 3, 99, 5, 6, 7, 8, 9]))[1] == 0
    assert kv.get_computed_blocks(make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))[1] == 8


def test_a_collision_of_pythons_hash_reuses_nothing(monkeypatch):
    """The prefix cache's keys do not rest on hash(): Python's hash of a tuple of ints can be steered by a crafted
    prompt. With every hash() colliding, a different prompt still misses."""
    from adallm_core import kv_cache

    monkeypatch.setattr(kv_cache, "hash", lambda value: 0, raising=False)  # found before the builtin
    kv = KVCacheManager([KVGroupSpec(num_blocks=20, block_size=BS)])
    compute(kv, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]), 9)
    assert kv.get_computed_blocks(make_seq([8, 7, 6, 5, 4, 3, 2, 1, 9]))[1] == 0
    assert kv.get_computed_blocks(make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))[1] == 8  # the same prompt still hits


def test_evicted_blocks_miss_and_lru_keeps_recent():
    kv = KVCacheManager([KVGroupSpec(num_blocks=7, block_size=BS)])  # 6 usable
    a = make_seq(list(range(1, 18)))  # 5 blocks
    compute(kv, a, 17)
    kv.free(a)
    filler = make_seq(list(range(100, 112)))  # 3 blocks: the never-used one, a's partial tail, a's 4th block
    compute(kv, filler, 12)
    # a's tail blocks were freed first, so the head of its prefix survives
    b = make_seq(list(range(1, 18)))
    assert kv.get_computed_blocks(b)[1] == 12
    filler2 = make_seq(list(range(200, 212)))  # the 3 remaining free blocks: the rest of a's prefix
    compute(kv, filler2, 12)
    assert kv.get_computed_blocks(make_seq(list(range(1, 18))))[1] == 0


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager([KVGroupSpec(num_blocks=4, block_size=BS)])  # 3 usable
    a = make_seq(list(range(1, 9)))
    compute(kv, a, 8)
    b = make_seq(list(range(50, 59)))  # needs 3 blocks, 1 free
    computed = kv.get_computed_blocks(b)
    assert not kv.allocate_slots(b, 9, computed)
    assert b.block_tables == [] and kv.num_used_blocks == 2


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager([KVGroupSpec(num_blocks=20, block_size=BS)], enable_prefix_caching=False)
    compute(kv, make_seq(list(range(1, 18))), 17)
    assert kv.get_computed_blocks(make_seq(list(range(1, 18)))) == ([[]], 0)


def test_sliding_group_frees_blocks_outside_window():
    window, chunk = 8, 4
    kv = KVCacheManager([KVGroupSpec(64, BS), KVGroupSpec(64, BS, sliding_window=window)])
    seq = make_seq(list(range(1, 41)))  # 40 tokens, computed in chunks of 4
    bound = -(-(window + chunk) // BS) + 1
    for _ in range(10):
        compute(kv, seq, chunk)
        live = [b for b in seq.block_tables[1] if b != NULL_BLOCK]
        assert len(live) <= bound
    full, sliding = seq.block_tables
    assert len(full) == len(sliding) == 10 and NULL_BLOCK not in full
    # before computing token 40 onwards, positions < 40 - 8 = 32 (blocks 0..7) may go: checked at next alloc
    seq.append_token(5)
    compute(kv, seq, 1)
    assert seq.block_tables[1][:8] == [NULL_BLOCK] * 8 and NULL_BLOCK not in seq.block_tables[1][8:]
    assert kv.pools[1].num_usable - kv.pools[1].num_free == 3
    kv.free(seq)
    assert kv.num_used_blocks == 0


def test_sliding_group_prefix_hit_needs_only_window_blocks():
    window = 8
    kv = KVCacheManager([KVGroupSpec(64, BS), KVGroupSpec(64, BS, sliding_window=window)])
    a = make_seq(list(range(1, 30)))
    while a.num_computed_tokens < a.num_tokens:  # 29 tokens; sliding blocks behind the window are dropped
        compute(kv, a, min(4, a.num_tokens - a.num_computed_tokens))
    kv.free(a)
    b = make_seq(list(range(1, 30)))
    tables, hit = kv.get_computed_blocks(b)
    assert hit == 28
    assert tables[1][:5] == [NULL_BLOCK] * 5 and NULL_BLOCK not in tables[1][5:]  # blocks 5, 6 cover 20..27
    assert len(tables[0]) == 7 and NULL_BLOCK not in tables[0]


@pytest.mark.parametrize("num_blocks", [0, 1])
def test_pool_too_small_is_an_error(num_blocks):
    with pytest.raises(ValueError, match="at least 2 blocks"):
        KVCacheManager([KVGroupSpec(num_blocks, BS)])


def test_sizing_one_group_uses_the_whole_budget():
    assert blocks_per_group(10_000, [100], [None], BS, 8, 64) == [100]
    assert blocks_per_group(10_000, [100], [None], BS, 8, 64, num_blocks_override=7) == [7]


def test_sizing_sliding_group_gets_only_what_a_window_can_use():
    # per sequence a sliding group needs ceil((8 + 16) / 4) + 1 = 7 blocks: 2 sequences -> cap 15 (with null)
    full, sliding = blocks_per_group(100_000, [100, 50], [None, 8], BS, max_num_seqs=2, max_num_batched_tokens=16)
    assert sliding == 15
    assert full == (100_000 - 15 * 50) // 100  # the rest of the budget goes to the full group
    # a small budget: both groups get the same count (a sliding group never needs more than the full one)
    assert blocks_per_group(1_500, [100, 50], [None, 8], BS, 64, 16) == [10, 10]


def test_too_small_cache_refuses_to_start_with_the_numbers():
    check_fits([9, 9], [None, 8], BS, max_model_len=32, max_num_batched_tokens=16)  # 8 usable = 32 tokens
    with pytest.raises(ValueError, match=r"7 usable blocks .* max_model_len=32 needs 8"):
        check_fits([8], [None], BS, max_model_len=32, max_num_batched_tokens=16)


def test_a_prompt_scored_whole_may_come_from_the_cache_again():
    """prompt_logprobs: a prompt with rows left to score is computed, never read from the cache; once every prompt
    token is scored (a recompute after preemption), its cached blocks serve it like any other prompt."""
    kv = KVCacheManager([KVGroupSpec(num_blocks=20, block_size=BS)])
    compute(kv, make_seq(list(range(1, 10)), "a"), 9)
    seq = Sequence("s", 0, list(range(1, 10)), SamplingParams(prompt_logprobs=1), 0.0, max_tokens=16)
    assert kv.get_computed_blocks(seq)[1] == 0
    seq.prompt_logprobs += [{}] * 8  # [None] for the first token, then one entry per scored token: 9 of 9
    assert kv.get_computed_blocks(seq)[1] == 8


def test_a_failed_admission_is_not_counted_as_a_lookup():
    kv = KVCacheManager([KVGroupSpec(num_blocks=6, block_size=BS)])  # 5 usable
    a = make_seq(list(range(1, 18)))
    compute(kv, a, 17)  # 5 blocks: the pool is full
    b = make_seq(list(range(1, 18)))
    for _ in range(3):  # the scheduler retries every step while b waits
        assert not kv.allocate_slots(b, 1, kv.get_computed_blocks(b))
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (17, 0)
    kv.free(a)
    compute(kv, b, 17)
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (34, 16)
