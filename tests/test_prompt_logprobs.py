"""SamplingParams.prompt_logprobs (vLLM's): each prompt token's logprob under the model, and the top-N, checked
against transformers' own model class on the same dequantized weights; through chunked prefill, the prefix cache,
preemption, n > 1 and each output kind."""
import pytest
import torch

from adallm_core.checkpoint.read import Checkpoint
from adallm_core.engine import _prompt_scoring
from adallm_core.runner import PromptScoring, SeqStep
from adallm_core.sampling_params import RequestOutputKind, SamplingParams
from adallm_core.sequence import Sequence
from engine_fixtures import PROMPTS, make_engine, run_all
from model_helpers import hf_on_dequantized, tiny_checkpoint

TOP = 3


def hf_prompt_logprobs(family: str, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: row i is the distribution of token i + 1 given tokens 0..i."""
    model = hf_on_dequantized(family, Checkpoint(tiny_checkpoint(family, "modelopt")))
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)


def assert_matches(scored: list, ids: list[int], ref: torch.Tensor, top: int = TOP) -> None:
    assert scored[0] is None and len(scored) == len(ids)
    for i in range(1, len(ids)):
        entry, row = scored[i], ref[i - 1]
        assert entry[ids[i]] == pytest.approx(float(row[ids[i]]), abs=1e-4), i
        best = row.topk(top)
        assert set(best.indices.tolist()) | {ids[i]} == set(entry), i
        for t, lp in zip(best.indices.tolist(), best.values.tolist()):
            assert entry[t] == pytest.approx(lp, abs=1e-4), (i, t)


def assert_ranks(ranks: list, ids: list[int], ref: torch.Tensor) -> None:
    """Each prompt token's rank: 1 + the tokens more likely under transformers (within the logprobs' 1e-4)."""
    assert ranks[0] is None and len(ranks) == len(ids)
    for i in range(1, len(ids)):
        row, lp = ref[i - 1], float(ref[i - 1][ids[i]])
        assert int((row > lp + 1e-4).sum()) + 1 <= ranks[i] <= int((row > lp - 1e-4).sum()) + 1, i
    assert len(ids) < 5 or max(ranks[1:]) > 1  # random tokens: most are not the model's first choice


@pytest.mark.parametrize("kind", [RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA])
def test_sampled_tokens_ranks_equal_transformers(kind):
    """vLLM's Logprob.rank of a sampled token (logprobs=0: outside any top list) is known: 1 + the tokens the model
    found more likely, checked on transformers' distribution at each generated position; per delta, they join up."""
    engine = make_engine("qwen3")
    ids = engine.tokenizer.encode(PROMPTS[5])
    engine.add_request("s", ids, SamplingParams(temperature=1.5, seed=3, max_tokens=8, ignore_eos=True, logprobs=0,
                                                output_kind=kind))
    tokens, logprobs, ranks = [], [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            c = out.outputs[0]
            tokens, logprobs, ranks = (tokens + c.token_ids, logprobs + c.logprobs, ranks + c.logprob_ranks) \
                if kind is RequestOutputKind.DELTA else (c.token_ids, c.logprobs, c.logprob_ranks)
    ref = hf_prompt_logprobs("qwen3", ids + tokens)[len(ids) - 1:]  # row j: the distribution of generated token j
    assert len(tokens) == len(ranks) == len(logprobs) == 8
    assert [e[t] for t, e in zip(tokens, logprobs)] == pytest.approx([float(r[t]) for r, t in zip(ref, tokens)],
                                                                      abs=1e-4)
    assert_ranks([None] + ranks, [None] + tokens, ref)  # its rows i - 1 for tokens i: shift by the None
    assert max(ranks) > 1  # temperature 1.5: not every token is the model's first choice


@pytest.mark.parametrize("family,budget", [("qwen3", 512), ("gemma3", 8), ("qwen3_moe", 7)])
def test_prompt_logprobs_equal_transformers(family, budget, monkeypatch):
    # budget < prompt length: the prompt is scored chunk by chunk, and rows are scored 4 at a time (max_num_seqs,
    # above runner.SCORE_ROWS patched to 1)
    monkeypatch.setattr("adallm_core.runner.SCORE_ROWS", 1)
    engine = make_engine(family, max_num_batched_tokens=budget, max_num_seqs=4)
    ids = engine.tokenizer.encode(PROMPTS[5])
    engine.add_request("a", ids, SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=TOP))
    out = run_all(engine)["a"]
    ref = hf_prompt_logprobs(family, ids)
    assert_matches(out.prompt_logprobs, ids, ref)
    assert_ranks(out.prompt_token_ranks, ids, ref)
    assert out.outputs[0].logprobs is None  # prompt_logprobs asks nothing of the generated tokens
    assert engine.stats()["kv_blocks_used"] == 0


def test_one_top_token_is_the_most_likely():
    # one top token takes the runner's max over the row, not topk
    engine = make_engine("qwen3", max_num_seqs=4)
    ids = engine.tokenizer.encode(PROMPTS[5])
    engine.add_request("a", ids, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1))
    out = run_all(engine)["a"]
    ref = hf_prompt_logprobs("qwen3", ids)
    assert_matches(out.prompt_logprobs, ids, ref, top=1)
    assert_ranks(out.prompt_token_ranks, ids, ref)


def test_prompt_logprobs_zero_gives_only_the_prompt_tokens_own():
    engine = make_engine()
    ids = engine.tokenizer.encode(PROMPTS[1])
    engine.add_request("z", ids, SamplingParams(max_tokens=1, prompt_logprobs=0))
    scored = run_all(engine)["z"].prompt_logprobs
    ref = hf_prompt_logprobs("qwen3", ids)
    assert [list(e) for e in scored[1:]] == [[t] for t in ids[1:]]
    assert scored[-1][ids[-1]] == pytest.approx(float(ref[-1, ids[-1]]), abs=1e-4)


def test_a_cached_prefix_is_scored_again_and_others_still_hit_the_cache():
    engine = make_engine(enable_prefix_caching=True)
    ids = engine.tokenizer.encode(PROMPTS[3])
    assert len(ids) > 32  # two full blocks of 16 to be cached
    plain = SamplingParams(temperature=0.0, max_tokens=2)
    engine.add_request("warm", ids, plain)
    run_all(engine)
    engine.add_request("scored", ids, SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=TOP))
    scored = run_all(engine)["scored"]
    assert scored.num_cached_tokens == 0  # its prompt rows must be computed to be scored
    assert_matches(scored.prompt_logprobs, ids, hf_prompt_logprobs("qwen3", ids))
    engine.add_request("again", ids, plain)
    assert run_all(engine)["again"].num_cached_tokens >= 32


def test_a_scored_prompt_is_no_prefix_cache_query():
    # it looks nothing up: counted as a query of len(ids) tokens with no hit, it lowered the reported hit rate
    engine = make_engine(enable_prefix_caching=True)
    ids = engine.tokenizer.encode(PROMPTS[3])
    engine.add_request("scored", ids, SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=TOP))
    run_all(engine)
    assert engine.stats()["prefix_cache_query_tokens"] == 0
    engine.add_request("plain", ids, SamplingParams(temperature=0.0, max_tokens=2))
    hit = run_all(engine)["plain"].num_cached_tokens
    stats = engine.stats()
    assert hit >= 32 and (stats["prefix_cache_query_tokens"], stats["prefix_cache_hit_tokens"]) == (len(ids), hit)


def test_prompt_logprobs_survive_preemption_and_batching():
    # 20 blocks of 16 for 8 prompts: sequences are preempted and recomputed, and nothing is scored twice
    engine = make_engine(num_gpu_blocks_override=20, max_num_batched_tokens=64)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, prompt_logprobs=TOP)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    done = run_all(engine)
    assert engine.stats()["num_preemptions"] > 0 and engine.stats()["kv_blocks_used"] == 0
    for i, ids in enumerate(prompts):
        if len(ids) > 1:
            ref = hf_prompt_logprobs("qwen3", ids)
            assert_matches(done[str(i)].prompt_logprobs, ids, ref)
            assert_ranks(done[str(i)].prompt_token_ranks, ids, ref)
        else:
            assert done[str(i)].prompt_logprobs == [None]


def test_a_recompute_scores_only_what_is_missing():
    seq = Sequence("r", 0, list(range(10, 30)), SamplingParams(prompt_logprobs=1), 0.0, 4)
    assert _prompt_scoring(seq, 0, 8) == PromptScoring(0, list(range(11, 19)), 1)
    seq.prompt_logprobs.extend({t: 0.0} for t in range(11, 19))  # scored up to position 8
    assert _prompt_scoring(seq, 0, 16) == PromptScoring(8, list(range(19, 27)), 1)  # after preemption
    assert _prompt_scoring(seq, 16, 4) == PromptScoring(0, list(range(27, 30)), 1)  # last row predicts no prompt
    assert _prompt_scoring(Sequence("r", 1, [1, 2, 3], SamplingParams(prompt_logprobs=1), 0.0, 4), 0, 3) is None


@pytest.mark.parametrize("kind", list(RequestOutputKind))
def test_each_output_kind_carries_the_prompt_logprobs(kind):
    engine = make_engine()
    ids = engine.tokenizer.encode(PROMPTS[3])
    engine.add_request("k", ids, SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=5, ignore_eos=True,
                                                prompt_logprobs=1, output_kind=kind))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    carried = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
    if kind is RequestOutputKind.DELTA:
        assert len(carried) == 1  # once, as vLLM's deltas do
    else:
        assert len(carried) == len(outs) >= 1
    assert_matches(carried[0], ids, hf_prompt_logprobs("qwen3", ids), top=1)


def test_a_delta_request_aborted_mid_prompt_gets_the_rows_scored_so_far():
    """DELTA sends the prompt logprobs once, when whole, or when an abort cuts the prompt short: then the abort's
    output carries the rows scored so far (the first 8-token chunk predicts tokens 1..8), transformers' values."""
    engine = make_engine(max_num_batched_tokens=8, max_num_seqs=4)
    ids = engine.tokenizer.encode(PROMPTS[5])
    assert len(ids) > 16
    engine.add_request("d", ids, SamplingParams(max_tokens=3, prompt_logprobs=1, output_kind=RequestOutputKind.DELTA))
    assert engine.step() == []  # a chunk of the prompt: nothing sampled, nothing to send yet
    out = engine.abort_request("d")
    assert out.finished and len(out.prompt_logprobs) == 9
    assert_matches(out.prompt_logprobs, ids[:9], hf_prompt_logprobs("qwen3", ids), top=1)


def test_scored_steps_must_go_through_execute_scored():
    engine = make_engine()
    step = SeqStep([5, 6, 7], 0, [[1]] * len(engine.runner.kv_groups), True, PromptScoring(0, [6, 7], 1))
    with pytest.raises(ValueError, match="execute_scored"):
        engine.runner.execute([step])
    too_many = SeqStep([5, 6, 7], 0, step.block_tables, True, PromptScoring(2, [6, 7], 1))
    with pytest.raises(ValueError, match="scores rows 2..4 of 3"):
        engine.runner.execute_scored([too_many])


@pytest.mark.parametrize("value", [-1, 21, 1.5, True, "2"])
def test_bad_prompt_logprobs_are_refused_by_name(value):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)
