"""LLMEngine on the tiny models: batch invariance, preemption, prefix caching, abort, n > 1, lengths."""
import pytest

from adallm_core.sampling_params import RequestOutputKind, SamplingParams
from engine_fixtures import PROMPTS, greedy_tokens, make_engine, run_all

FAMILIES = ["qwen3", "gemma3"]  # gemma3: sliding-window KV group, prompts longer than its window


@pytest.fixture(scope="module", params=FAMILIES)
def engine(request):
    return make_engine(request.param)


@pytest.fixture(scope="module")
def alone(engine):
    """Each prompt's greedy tokens when it runs alone."""
    return [greedy_tokens(engine, [p])[0] for p in PROMPTS]


def test_batch_of_8_equals_alone(engine, alone):
    assert greedy_tokens(engine, PROMPTS) == alone
    assert engine.stats()["kv_blocks_used"] == 0


def test_joining_a_running_batch_midway_equals_alone(engine, alone):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"early{i}", PROMPTS[i], params)
    for _ in range(5):
        engine.step()
    for i in range(4, 8):
        engine.add_request(f"late{i}", PROMPTS[i], params)
    done = run_all(engine)
    got = [done[f"early{i}"].outputs[0].token_ids for i in range(4)] + [
        done[f"late{i}"].outputs[0].token_ids for i in range(4, 8)]
    assert got == alone


def test_preemption_gives_the_same_outputs(engine, alone):
    family = engine.runner.model_config.model_type
    small = make_engine("gemma3" if "gemma" in family else "qwen3", num_gpu_blocks_override=20,
                        max_num_batched_tokens=64)
    assert greedy_tokens(small, PROMPTS) == alone
    stats = small.stats()
    assert stats["num_preemptions"] > 0
    assert stats["kv_blocks_used"] == 0
    # num_cached_tokens counts prompt tokens from the prefix cache at first admission; a re-admission after
    # preemption hits its own recomputed blocks, prompt and generated, which must not count
    preempted_before = stats["num_preemptions"]
    for i in range(4):
        small.add_request(f"c{i}", PROMPTS[i], SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))
    done = run_all(small)
    assert small.stats()["num_preemptions"] > preempted_before
    assert all(o.num_cached_tokens <= len(o.prompt_token_ids) for o in done.values()), \
        {k: (o.num_cached_tokens, len(o.prompt_token_ids)) for k, o in done.items()}


def test_prefix_cache_reuses_blocks_and_gives_the_same_output(engine):
    tok = engine.tokenizer
    shared = tok.encode(PROMPTS[3])[:48]  # 3 full blocks of 16
    a, b = shared + tok.encode(" first", add_special_tokens=False), shared + tok.encode(" second", add_special_tokens=False)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine.add_request("pa", a, params)
    run_all(engine)
    hits_before = engine.stats()["prefix_cache_hit_tokens"]
    engine.add_request("pb", b, params)
    out = run_all(engine)["pb"]
    assert out.num_cached_tokens == 48
    assert engine.stats()["prefix_cache_hit_tokens"] - hits_before == 48
    family = "gemma3" if "gemma" in engine.runner.model_config.model_type else "qwen3"
    uncached = make_engine(family, enable_prefix_caching=False)
    uncached.add_request("pb", b, params)
    ref = run_all(uncached)["pb"]
    assert ref.num_cached_tokens == 0 and uncached.stats()["prefix_cache_hit_tokens"] == 0
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_abort_frees_every_block(engine):
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    for i in (1, 3, 5):
        engine.add_request(f"ab{i}", PROMPTS[i], params)
    for _ in range(3):
        engine.step()
    seqs = {s.request_id: s for s in engine.scheduler.running}
    assert set(seqs) == {"ab1", "ab3", "ab5"}
    own = sum(len([b for b in t if b]) for t in seqs["ab3"].block_tables)  # distinct prompts: nothing shared
    used = engine.stats()["kv_blocks_used"]
    out = engine.abort_request("ab3")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.stats()["kv_blocks_used"] == used - own
    engine.abort_request("ab1")
    engine.abort_request("ab5")
    assert engine.stats()["kv_blocks_used"] == 0 and not engine.has_unfinished_requests()



def test_abort_takes_a_list_of_ids_as_vllm_does(engine):
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    for i in (1, 3):
        engine.add_request(f"al{i}", PROMPTS[i], params)
    engine.step()
    outs = engine.abort_request(["al1", "al3", "unknown"])  # was a TypeError (unhashable list)
    assert sorted(o.request_id for o in outs) == ["al1", "al3"] and all(o.finished for o in outs)
    assert engine.stats()["kv_blocks_used"] == 0 and not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="request_id must be a string or a list of strings, got 5"):
        engine.abort_request(5)

def test_n_completions_share_the_prompt_and_differ(engine):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    hits_before = engine.stats()["prefix_cache_hit_tokens"]
    engine.add_request("multi", "A prompt no other test uses, long enough for two full blocks: " * 2, params)
    out = run_all(engine)["multi"]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    full_blocks = (len(out.prompt_token_ids) - 1) // 16
    assert engine.stats()["prefix_cache_hit_tokens"] - hits_before == 2 * 16 * full_blocks


def test_max_tokens_and_max_model_len_end_with_length(engine):
    engine.add_request("short", "Hello", SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    engine.add_request("long", list(range(5, 250)), SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True))
    done = run_all(engine)
    assert len(done["short"].outputs[0].token_ids) == 3 and done["short"].outputs[0].finish_reason == "length"
    assert len(done["long"].outputs[0].token_ids) == 256 - 245 and done["long"].outputs[0].finish_reason == "length"


def test_output_kinds(engine):
    def collect(kind):
        engine.add_request("k", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True,
                                                             output_kind=kind))
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
        return outs

    cumulative, delta, final = (collect(k) for k in RequestOutputKind)
    assert len(final) == 1 and final[0].finished
    assert len(cumulative) == len(delta) == 5
    assert cumulative[-1].outputs[0].token_ids == final[0].outputs[0].token_ids
    assert sum((d.outputs[0].token_ids for d in delta), []) == final[0].outputs[0].token_ids
    assert "".join(d.outputs[0].text for d in delta) == final[0].outputs[0].text


def test_delta_outputs_finish_each_completion_once(engine):
    """DELTA with n=2: a completion that stops early is reported finished once; the outputs that follow carry only
    the completion still running, and each one's deltas add up to its final tokens. The reference is the same seeded
    request without the stop id, cut after the stop id's first appearance by hand."""
    params = dict(n=2, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)
    engine.add_request("ref", PROMPTS[3], SamplingParams(**params))
    a, b = (c.token_ids for c in run_all(engine)["ref"].outputs)
    stop = next(t for t in a[:5] if t not in b)  # ends completion 0 early, never completion 1
    engine.add_request("d", PROMPTS[3], SamplingParams(**params, stop_token_ids=[stop],
                                                       output_kind=RequestOutputKind.DELTA))
    deltas = []
    while engine.has_unfinished_requests():
        deltas += [c for o in engine.step() for c in o.outputs]
    for index, want in ((0, a[: a.index(stop) + 1]), (1, b)):
        mine = [c for c in deltas if c.index == index]
        assert sum((c.token_ids for c in mine), []) == want
        assert [c.finish_reason for c in mine if c.finish_reason] == ["stop" if index == 0 else "length"]
        assert mine[-1].finish_reason is not None


def test_logprobs_are_returned_per_token(engine):
    engine.add_request("lp", PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=4, logprobs=2, ignore_eos=True))
    c = run_all(engine)["lp"].outputs[0]
    assert len(c.logprobs) == 4
    for tok, lps in zip(c.token_ids, c.logprobs):
        assert tok in lps and lps[tok] == max(lps.values()) and len(lps) == 2  # greedy: the top-1 is the token
    assert c.cumulative_logprob == pytest.approx(sum(lps[t] for t, lps in zip(c.token_ids, c.logprobs)))


def test_cumulative_logprob_sums_the_sampled_tokens_not_the_top_ones(engine):
    """Sampled at temperature 1.5 some tokens are not their step's most likely one: the cumulative logprob adds each
    sampled token's own logprob (OpenAI's and vLLM's), which is then below the sum of the top ones."""
    params = SamplingParams(temperature=1.5, seed=3, max_tokens=8, logprobs=3, ignore_eos=True)
    engine.add_request("lps", PROMPTS[1], params)
    c = run_all(engine)["lps"].outputs[0]
    chosen = [lps[t] for t, lps in zip(c.token_ids, c.logprobs)]
    assert any(lp < max(lps.values()) for lp, lps in zip(chosen, c.logprobs))  # the case this test is about
    assert c.cumulative_logprob == pytest.approx(sum(chosen))
    assert c.cumulative_logprob < sum(max(lps.values()) for lps in c.logprobs)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_kv_cache_is_batch_and_preemption_invariant(family):
    # fp8 (the default KV dtype) rounds K/V on write: still the same tokens alone, batched, and recomputed.
    fp8 = make_engine(family, kv_cache_dtype="fp8", enable_prefix_caching=False)
    alone = [greedy_tokens(fp8, [p], max_tokens=12)[0] for p in PROMPTS]
    assert greedy_tokens(fp8, PROMPTS, max_tokens=12) == alone
    small = make_engine(family, kv_cache_dtype="fp8", num_gpu_blocks_override=10, max_model_len=128,
                        max_num_batched_tokens=64)
    assert greedy_tokens(small, PROMPTS, max_tokens=12) == alone
    assert small.stats()["num_preemptions"] > 0


def test_default_token_budget_fits_every_running_sequence():
    """Unset, the step's token budget is at least max_num_seqs, as when it is set (EngineArgs refuses less): with
    3000 sequences decoding, a budget of 2048 would leave 952 of them waiting every step."""
    engine = make_engine(max_num_batched_tokens=None, max_num_seqs=3000)
    assert engine.max_num_batched_tokens == 3000
    assert make_engine(max_num_batched_tokens=None).max_num_batched_tokens == 2048  # max(2048, max_model_len 256)


def test_params_changed_after_add_request_do_not_reach_the_running_request(engine):
    """A caller reusing one SamplingParams for its next request: the first one's sequences read the object live, so
    asking for logprobs now made the step append to the first one's logprobs list, which it never had (None)."""
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine.add_request("first", PROMPTS[1], params)
    engine.step()
    params.logprobs, params.max_tokens = 2, 4  # for the next request only
    engine.add_request("second", PROMPTS[2], params)
    done = run_all(engine)
    assert done["first"].outputs[0].logprobs is None and len(done["first"].outputs[0].token_ids) == 6
    assert len(done["second"].outputs[0].logprobs) == len(done["second"].outputs[0].token_ids) == 4
    assert engine.stats()["kv_blocks_used"] == 0
