"""Async scheduling (EngineArgs.async_scheduling): the next decode step is launched before this one's tokens are
read. On the CPU nothing overlaps, but every bookkeeping path is the same as on a GPU, so each test runs one
workload with it on and off and asks for identical outputs (greedy and seeded sampling are reproducible), and for
the run-ahead path to have been taken."""
import pytest

from adallm_core.sampling_params import SamplingParams
from adallm_core.sequence import Sequence
from engine_fixtures import PROMPTS, make_engine, run_all

GREEDY = dict(temperature=0.0, ignore_eos=True)


def outputs(done: dict) -> dict:
    return {rid: [(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs) for c in out.outputs]
            for rid, out in done.items()}


def run_staggered(engine, requests, join_after: int = 3) -> dict:
    """Half the requests at once, the rest after `join_after` steps (they join a running batch)."""
    half = len(requests) // 2
    for rid, prompt, params in requests[:half]:
        engine.add_request(rid, prompt, params)
    done = {}
    for _ in range(join_after):
        done.update({o.request_id: o for o in engine.step() if o.finished})
    for rid, prompt, params in requests[half:]:
        engine.add_request(rid, prompt, params)
    done.update(run_all(engine))
    return done


def reference_tokens(family: str) -> dict:
    """Greedy continuations of two prompts, to pick stop ids and a stop string that really occur."""
    engine = make_engine(family, async_scheduling=False)
    for i in (1, 3):
        engine.add_request(f"r{i}", PROMPTS[i], SamplingParams(max_tokens=24, **GREEDY))
    done = run_all(engine)
    return {i: done[f"r{i}"].outputs[0] for i in (1, 3)}


def mixed_requests(family: str) -> list:
    ref = reference_tokens(family)
    r1, r3 = ref[1], ref[3]
    return [
        ("long", PROMPTS[0], SamplingParams(max_tokens=40, **GREEDY)),
        ("stop_id", PROMPTS[1], SamplingParams(max_tokens=24, stop_token_ids=[r1.token_ids[6]], **GREEDY)),
        ("stop_text", PROMPTS[3], SamplingParams(max_tokens=24, stop=[r3.text[-12:-6]], **GREEDY)),
        # min_tokens bans the stop id until 10 tokens exist: the ban must count the token still on the device
        ("min_tokens", PROMPTS[1], SamplingParams(max_tokens=24, min_tokens=10,
                                                  stop_token_ids=sorted(set(r1.token_ids[:12])), **GREEDY)),
        ("short", PROMPTS[6], SamplingParams(max_tokens=3, **GREEDY)),
        ("eos", PROMPTS[4], SamplingParams(max_tokens=30, temperature=0.0)),
        ("n2", PROMPTS[2], SamplingParams(n=2, max_tokens=12, **GREEDY)),
        ("seeded", PROMPTS[5], SamplingParams(max_tokens=10, temperature=0.9, seed=3, ignore_eos=True)),
        # need the host (results or token history): while these run, steps are read one by one
        ("logprobs", PROMPTS[7], SamplingParams(max_tokens=8, logprobs=2, **GREEDY)),
        ("penalty", PROMPTS[2], SamplingParams(max_tokens=8, repetition_penalty=1.3, **GREEDY)),
    ]


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])  # gemma3: sliding-window KV groups free blocks as they go
def test_mixed_workload_gives_the_same_outputs(family):
    requests = mixed_requests(family)
    sync, ahead = make_engine(family, async_scheduling=False), make_engine(family)
    want = outputs(run_staggered(sync, requests))
    got = outputs(run_staggered(ahead, requests))
    assert got == want
    assert sync.stats()["num_steps_run_ahead"] == 0 and ahead.stats()["num_steps_run_ahead"] > 10
    assert [got[rid][0][2] for rid in ("stop_id", "stop_text")] == ["stop"] * 2
    assert len(got["min_tokens"][0][0]) >= 10
    for engine in (sync, ahead):
        assert engine.stats()["kv_blocks_used"] == 0 and not engine.has_unfinished_requests()


def test_preemption_while_running_ahead():
    """A cache too small for the batch: the step ahead preempts sequences whose token is still on the device."""
    requests = [(f"p{i}", PROMPTS[i], SamplingParams(max_tokens=40, **GREEDY)) for i in range(6)]
    roomy = make_engine(async_scheduling=False, max_model_len=128)
    for rid, prompt, params in requests:
        roomy.add_request(rid, prompt, params)
    want = outputs(run_all(roomy))
    tight = make_engine(num_gpu_blocks_override=14, max_model_len=128)
    for rid, prompt, params in requests:
        tight.add_request(rid, prompt, params)
    assert outputs(run_all(tight)) == want
    stats = tight.stats()
    assert stats["num_preemptions"] > 0 and stats["num_steps_run_ahead"] > 0 and stats["kv_blocks_used"] == 0


def test_abort_while_a_step_runs_ahead():
    engine = make_engine()
    params = SamplingParams(max_tokens=30, **GREEDY)
    for i in (1, 3, 5):
        engine.add_request(f"ab{i}", PROMPTS[i], params)
    done = {}
    for _ in range(6):
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.stats()["num_steps_run_ahead"] > 0
    out = engine.abort_request("ab3")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    done.update(run_all(engine))
    assert "ab3" not in done
    alone = make_engine(async_scheduling=False)
    for i in (1, 5):
        alone.add_request(f"ab{i}", PROMPTS[i], params)
    assert outputs({k: done[k] for k in ("ab1", "ab5")}) == outputs(run_all(alone))
    assert engine.stats()["kv_blocks_used"] == 0 and not engine.has_unfinished_requests()


def test_blocks_filled_ahead_reach_the_prefix_cache_with_their_real_tokens():
    """A block completed by a token that was still on the device is cached once its id is known: a later prompt
    made of the prompt and the generated text hits it, as without async scheduling."""
    engine, sync = make_engine(), make_engine(async_scheduling=False)
    params = SamplingParams(max_tokens=40, **GREEDY)
    first = {}
    for e in (engine, sync):
        e.add_request("gen", PROMPTS[3], params)
        first[e] = run_all(e)["gen"]
    assert first[engine].outputs[0].token_ids == first[sync].outputs[0].token_ids
    follow = first[sync].prompt_token_ids + first[sync].outputs[0].token_ids[:36]
    again = {}
    for e in (engine, sync):
        e.add_request("again", follow, SamplingParams(max_tokens=6, **GREEDY))
        again[e] = run_all(e)["again"]
    assert again[engine].num_cached_tokens == again[sync].num_cached_tokens > len(first[sync].prompt_token_ids)
    assert again[engine].outputs[0].token_ids == again[sync].outputs[0].token_ids


@pytest.mark.parametrize("generated,placeholders,banned", [(8, 1, True), (9, 1, False), (9, 0, True)])
def test_min_tokens_counts_the_token_still_on_the_device(generated, placeholders, banned):
    """The row for the step ahead is made before the previous token's id is known; that token counts."""
    engine = make_engine()
    params = SamplingParams(max_tokens=20, min_tokens=10, stop_token_ids=[7], temperature=0.0)
    seq = Sequence("r", 0, [1, 2, 3], params, 0.0, 20)
    seq.output_token_ids.extend([5] * generated)
    seq.num_placeholders = placeholders
    row = engine._sampling_row(seq)
    assert bool(row.banned_token_ids) is banned
    assert row.step == generated + placeholders  # a seeded draw's step counts the token on the device


def test_seeded_sampling_runs_ahead_with_the_same_draws():
    """Random sampling needs nothing from the host but its parameters, so it runs ahead too; a seeded row's draw
    depends on how many tokens it generated, the one still on the device included."""
    requests = [
        (f"s{i}", PROMPTS[i], SamplingParams(max_tokens=24, temperature=0.8, seed=11 + i, ignore_eos=True, **extra))
        for i, extra in enumerate([{}, dict(top_k=20), dict(top_p=0.9), dict(min_p=0.05), dict(n=2),
                                   dict(min_tokens=12, stop_token_ids=[3, 4, 5])])
    ]
    runs = []
    for on in (False, True):
        engine = make_engine(async_scheduling=on)
        runs.append((outputs(run_staggered(engine, requests)), engine.stats()["num_steps_run_ahead"]))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == 0 and runs[1][1] > 10
    assert len(set(tuple(o[0][0]) for o in runs[1][0].values())) == len(requests)  # really sampled: all differ


def test_unseeded_sampling_runs_ahead():
    engine = make_engine()
    for i in range(4):
        engine.add_request(f"u{i}", PROMPTS[i], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95,
                                                               ignore_eos=True))
    done = run_all(engine)
    assert all(len(done[f"u{i}"].outputs[0].token_ids) == 16 for i in range(4))
    assert engine.stats()["num_steps_run_ahead"] > 5 and engine.stats()["kv_blocks_used"] == 0


def test_penalty_requests_alone_read_every_generated_token():
    """Penalties read the generated tokens on the host, so a batch of penalty requests (nothing else needing the
    host) samples step by step: each step sees the token sampled just before it, as without async scheduling."""
    requests = [(f"pen{i}", PROMPTS[i], SamplingParams(max_tokens=24, **GREEDY, **extra)) for i, extra in enumerate(
        [dict(frequency_penalty=2.0), dict(presence_penalty=2.0), dict(repetition_penalty=3.0)])]
    runs = []
    for on in (False, True):
        engine = make_engine(async_scheduling=on)
        for rid, prompt, params in requests:
            engine.add_request(rid, prompt, params)
        runs.append(outputs(run_all(engine)))
    assert runs[1] == runs[0]


def test_a_batch_of_max_num_seqs_runs_ahead():
    """The host buffers hold a token per sequence that may run (max_num_seqs): a full batch runs ahead with the
    same tokens as step by step."""
    requests = [(f"f{i}", PROMPTS[i], SamplingParams(max_tokens=12, **GREEDY)) for i in range(4)]
    runs = []
    for on in (False, True):
        engine = make_engine(async_scheduling=on, max_num_seqs=4)
        for rid, prompt, params in requests:
            engine.add_request(rid, prompt, params)
        runs.append((outputs(run_all(engine)), engine.stats()["num_steps_run_ahead"]))
    assert runs[1][0] == runs[0][0]
    assert runs[0][1] == 0 and runs[1][1] > 5
