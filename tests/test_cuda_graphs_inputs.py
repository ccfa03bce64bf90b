"""DecodeInputs (the decode graphs' static input buffers, filled through a host mirror) on the CPU: after every
stage() the first b rows of each buffer hold exactly what the step's SeqSteps say, built here from scratch, while
the batch changes from step to step (tables grow, shrink to nulls, rows change hands, padding rows)."""
import random

import torch

from adallm_core.cuda_graphs import DecodeInputs, batch_buckets
from adallm_core.runner import SeqStep

BS, MAX_BLOCKS, BMAX, GROUPS = 4, 6, 8, 2


def expected(steps, b):
    n = len(steps)
    pos = [s.start_pos for s in steps] + [0] * (b - n)
    tables = []
    for g in range(GROUPS):
        rows = [list(s.block_tables[g]) + [0] * (MAX_BLOCKS - len(s.block_tables[g])) for s in steps]
        tables.append(torch.tensor(rows + [[0] * MAX_BLOCKS] * (b - n), dtype=torch.int32))
    slots = [torch.tensor([int(t[i, p // BS]) * BS + p % BS if i < n else -1 for i, p in enumerate(pos)])
             for t in tables]
    return dict(ids=torch.tensor([s.token_ids[0] for s in steps] + [0] * (b - n)), positions=torch.tensor(pos),
                seq_lens=torch.tensor(pos, dtype=torch.int32) + 1, tables=tables, slots=slots)


def test_staged_rows_match_the_steps_as_the_batch_changes():
    rng = random.Random(0)
    inputs = DecodeInputs(BMAX, MAX_BLOCKS, GROUPS, BS, torch.device("cpu"))
    seqs = {}  # id -> [length, tables (lists grown in place, like the engine's)]
    next_block = iter(range(1, 10_000))
    for step in range(60):
        # sequences come and go; survivors grow by one token
        for sid in [k for k, (length, _) in seqs.items() if rng.random() < 0.15 or length == MAX_BLOCKS * BS]:
            del seqs[sid]
        while len(seqs) < rng.randint(1, BMAX):
            seqs[rng.randrange(10**6)] = [rng.randint(1, BS * 3), [[], []]]
        for entry in seqs.values():
            entry[0] += 1
            length, tables = entry
            for g, t in enumerate(tables):
                while len(t) < -(-length // BS):
                    t.append(next(next_block) % 50 + 1)
                if g == 1 and len(t) > 3:  # a sliding window group: blocks left behind become nulls in place
                    t[len(t) - 4] = 0
        order = list(seqs)
        rng.shuffle(order)
        steps = [SeqStep([rng.randrange(384)], seqs[k][0] - 1, seqs[k][1]) for k in order]
        b = next(size for size in batch_buckets(BMAX) if size >= len(steps))
        inputs.stage(steps, b)
        want = expected(steps, b)
        torch.testing.assert_close(inputs.ids[:b], want["ids"], rtol=0, atol=0)
        torch.testing.assert_close(inputs.positions[:b], want["positions"], rtol=0, atol=0)
        torch.testing.assert_close(inputs.seq_lens[:b], want["seq_lens"], rtol=0, atol=0)
        for g in range(GROUPS):
            torch.testing.assert_close(inputs.tables[g][:b], want["tables"][g], rtol=0, atol=0)
            torch.testing.assert_close(inputs.slots[g][:b], want["slots"][g], rtol=0, atol=0)
