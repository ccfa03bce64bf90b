"""Paged KV-cache bookkeeping: ref-counted blocks, prefix caching by chained content hash, KV groups.

The tensors live in the runner; this module only decides which block ids each sequence owns.

    group 0 (full attention):    seq.block_tables[0] = [7, 3, 9, 12]        one block per block_size tokens
    group 1 (sliding window):    seq.block_tables[1] = [0, 0, 4, 8]         0 = NULL_BLOCK: fell out of the window

Block 0 of every pool is the null block: never handed out, so a block table entry 0 means "nothing here"
(the runner never reads it: those positions are outside the sliding window).
A freed block that holds a full, hashed block of tokens stays in the cache (evictable, LRU order) until
allocate() reuses it, so a later request with the same prefix can pick it up again.
"""
from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from adallm_core.sequence import Sequence

NULL_BLOCK = 0


@dataclass(frozen=True)
class KVGroupSpec:
    """Layers that share one block table: all full-attention layers, or all sliding-window layers."""

    num_blocks: int  # including the null block
    block_size: int
    sliding_window: Optional[int] = None  # tokens; None = full attention


def hash_block(parent_hash: Optional[bytes], token_ids: tuple[int, ...]) -> bytes:
    """Chained content hash: a block's hash covers every token before it, so equal hash == equal prefix. SHA-256,
    not hash(): Python's hash of a tuple of ints is unkeyed and undone step by step, so a crafted prompt could
    collide with another request's prefix and be served its KV blocks (the class of vLLM's CVE-2025-25183)."""
    digest = hashlib.sha256(parent_hash or b"")  # a first block's bytes are shorter: no parent reads as one
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: Optional[bytes] = None


class BlockPool:
    """Blocks of one KV group. Free blocks sit in LRU order; hashed free blocks are evictable cache entries."""

    def __init__(self, num_blocks: int, enable_caching: bool):
        if num_blocks < 2:
            raise ValueError(f"a KV block pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.cached: dict[bytes, Block] = {}  # block hash -> block holding those tokens

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    def allocate(self) -> int:
        block_id, _ = self.free.popitem(last=False)  # least recently freed first
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict its cache entry: the block is about to be overwritten
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None
        block.ref_cnt = 1
        return block_id

    def touch(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_cnt == 0:
            del self.free[block_id]
        block.ref_cnt += 1

    def release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_cnt -= 1
        assert block.ref_cnt >= 0, f"block {block_id} released more often than taken"
        if block.ref_cnt == 0:
            self.free[block_id] = None

    def lookup(self, block_hash: bytes) -> Optional[int]:
        block = self.cached.get(block_hash)
        return None if block is None else block.block_id

    def cache(self, block_id: int, block_hash: bytes) -> None:
        if not self.enable_caching or block_hash in self.cached:
            return  # first writer wins; an equal block elsewhere simply stays uncached
        block = self.blocks[block_id]
        block.block_hash = block_hash
        self.cached[block_hash] = block


class KVCacheManager:
    """Hands out blocks to sequences for every KV group at once; what the scheduler talks to."""

    def __init__(self, groups: list[KVGroupSpec], enable_prefix_caching: bool = True):
        if not groups:
            raise ValueError("KVCacheManager needs at least one KV group")
        sizes = {g.block_size for g in groups}
        if len(sizes) != 1:
            raise ValueError(f"all KV groups must share one block_size, got {sorted(sizes)}")
        self.groups = groups
        self.block_size = groups[0].block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pools = [BlockPool(g.num_blocks, enable_prefix_caching) for g in groups]
        self._has_sliding = any(g.sliding_window is not None for g in groups)
        self._num_registered: dict[int, int] = {}  # seq_id -> full blocks already offered to the cache
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of those, tokens served from the cache

    # --- stats --------------------------------------------------------------------------------
    @property
    def num_total_blocks(self) -> int:
        return sum(p.num_usable for p in self.pools)

    @property
    def num_used_blocks(self) -> int:
        return sum(p.num_usable - p.num_free for p in self.pools)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_total_blocks

    # --- prefix cache -------------------------------------------------------------------------
    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, tuple(seq.token_slice(i * bs, (i + 1) * bs))))
        return hashes

    def get_computed_blocks(self, seq: Sequence) -> tuple[list[list[int]], int]:
        """Longest cached prefix of a sequence that has no blocks yet: (block tables, number of tokens)."""
        empty: list[list[int]] = [[] for _ in self.groups]
        if not self.enable_prefix_caching or seq.scores_prompt:  # prompt_logprobs: every prompt row is computed
            return empty, 0
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs  # the last token is always computed: its logits are needed
        hashes = self._block_hashes(seq, max_blocks)
        n = max_blocks
        for g, pool in zip(self.groups, self.pools):
            if g.sliding_window is None:
                n = next((i for i in range(n) if pool.lookup(hashes[i]) is None), n)
        # sliding groups only need the blocks still inside the window at the hit length
        while n > 0 and not all(self._window_cached(g, p, hashes, n) for g, p in zip(self.groups, self.pools)):
            n -= 1
        if n == 0:
            return empty, 0
        tables = []
        for g, pool in zip(self.groups, self.pools):
            first = self._first_needed_block(g, n * bs)
            tables.append([NULL_BLOCK] * first + [pool.lookup(h) for h in hashes[first:n]])
        return tables, n * bs

    def _first_needed_block(self, group: KVGroupSpec, num_computed: int) -> int:
        # Queries at positions >= num_computed attend to positions >= num_computed - window + 1; keep one spare.
        if group.sliding_window is None:
            return 0
        return max(0, num_computed - group.sliding_window) // self.block_size

    def _window_cached(self, group: KVGroupSpec, pool: BlockPool, hashes: list[bytes], n: int) -> bool:
        first = self._first_needed_block(group, n * self.block_size)
        return all(pool.lookup(h) is not None for h in hashes[first:n])

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Offer the sequence's newly computed full blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        done = self._num_registered.get(seq.seq_id, 0)
        # a placeholder (a token the device is still sampling) has no id to hash yet: its block waits a step
        full = min(seq.num_computed_tokens, seq.num_tokens - seq.num_placeholders) // self.block_size
        if full <= done:
            return
        hashes = self._block_hashes(seq, full)
        for table, pool in zip(seq.block_tables, self.pools):
            for i in range(done, full):
                if table[i] != NULL_BLOCK:
                    pool.cache(table[i], hashes[i])
        self._num_registered[seq.seq_id] = full

    # --- allocation ---------------------------------------------------------------------------
    def allocate_slots(self, seq: Sequence, num_new_tokens: int,
                       computed: Optional[tuple[list[list[int]], int]] = None) -> bool:
        """Give `seq` blocks for num_new_tokens more tokens; all groups or none. False: not enough free blocks.

        `computed` is get_computed_blocks()'s answer for a sequence scheduled for the first time.
        """
        first_time = not seq.block_tables
        if not first_time and not self._has_sliding:  # the common decode step: room in the last block already
            need = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
            for table in seq.block_tables:
                if len(table) < need:
                    break
            else:
                return True
        hit_tables, num_hit = computed if computed is not None else ([[] for _ in self.groups], 0)
        num_computed = num_hit if first_time else seq.num_computed_tokens
        total_blocks = math.ceil((num_computed + num_new_tokens) / self.block_size)
        if not first_time:
            self._free_outside_window(seq, num_computed)
        plan = []
        for g, pool in enumerate(self.pools):
            table = hit_tables[g] if first_time else seq.block_tables[g]
            num_new = total_blocks - len(table)
            # taking a hit block that sits in the free queue removes it from there
            revived = sum(1 for b in table if b != NULL_BLOCK and pool.blocks[b].ref_cnt == 0) if first_time else 0
            if pool.num_free < num_new + revived:
                return False
            plan.append((table, num_new))
        if first_time:
            seq.block_tables = [list(t) for t, _ in plan]
            for table, pool in zip(seq.block_tables, self.pools):
                for b in table:
                    if b != NULL_BLOCK:
                        pool.touch(b)
            seq.num_computed_tokens = num_hit
            if seq.num_preemptions == 0:  # a re-admission after preemption hits its own recomputed blocks
                seq.num_cached_tokens = num_hit
            # counted here, once per admission (a failed try is retried later); a sequence scoring its prompt looked
            # nothing up (get_computed_blocks), so it is no query, as in vLLM
            if self.enable_prefix_caching and not seq.scores_prompt:
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += num_hit
            self._num_registered[seq.seq_id] = num_hit // self.block_size
        for table, pool, (_, num_new) in zip(seq.block_tables, self.pools, plan):
            table.extend(pool.allocate() for _ in range(num_new))
        return True

    def _free_outside_window(self, seq: Sequence, num_computed: int) -> None:
        for g, (group, pool) in enumerate(zip(self.groups, self.pools)):
            if group.sliding_window is None:
                continue
            table = seq.block_tables[g]
            i = min(self._first_needed_block(group, num_computed), len(table)) - 1
            while i >= 0 and table[i] != NULL_BLOCK:  # dropped blocks form a prefix: stop at the first null
                pool.release(table[i])
                table[i] = NULL_BLOCK
                i -= 1

    def free(self, seq: Sequence) -> None:
        """Return every block of the sequence (abort, finish, preemption). Tail blocks go first in LRU order,
        so a prefix's head stays cached longest."""
        for table, pool in zip(seq.block_tables, self.pools):
            for b in reversed(table):
                if b != NULL_BLOCK:
                    pool.release(b)
        seq.block_tables = []
        self._num_registered.pop(seq.seq_id, None)
