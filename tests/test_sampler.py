"""Sampler against closed-form references: empirical frequencies vs softmax, exact penalty arithmetic."""
import math

import pytest
import torch

from adallm_core.sampler import Sampler, SamplingRow
from adallm_core.sampling_params import SamplingParams

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def rows(n, **kw):
    return [SamplingRow(SamplingParams(**kw), [1], []) for _ in range(n)]


def frequencies(tokens, vocab=4):
    return torch.bincount(torch.tensor(tokens), minlength=vocab).float() / len(tokens)


def sample_many(n=20000, seed=0, **kw):
    return Sampler(seed=seed)(LOGITS.expand(n, 4), rows(n, **kw)).token_ids


def test_greedy_is_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    out = Sampler()(logits, rows(5, temperature=0.0))
    assert out.token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_matches_softmax(temperature):
    expected = torch.softmax(LOGITS / temperature, -1)
    got = frequencies(sample_many(temperature=temperature))
    assert torch.allclose(got, expected, atol=0.015), (got, expected)


@pytest.mark.parametrize(
    "kw,kept",
    [
        (dict(top_k=2), [0, 1]),
        (dict(top_p=0.7), [0, 1]),  # 0.5 < 0.7 <= 0.5 + 0.3
        (dict(top_p=0.5), [0]),
        (dict(min_p=0.2), [0, 1, 2]),  # 0.05 < 0.2 * 0.5
        (dict(top_k=3, top_p=0.83), [0, 1]),  # top_k first: 0.5+0.3 of the renormalized 0.95 is 0.84 >= 0.83
        (dict(min_p=0.2, top_p=0.83), [0, 1]),  # vLLM: min_p first, then top_p over what it kept (as top_k)
    ],
)
def test_truncation_renormalizes_over_the_kept_tokens(kw, kept):
    expected = torch.zeros(4)
    expected[kept] = PROBS[kept] / PROBS[kept].sum()
    got = frequencies(sample_many(**kw))
    assert torch.allclose(got, expected, atol=0.015), (got, expected)


def test_min_p_reads_the_probabilities_after_temperature():
    """vLLM applies min_p to the tempered distribution. At temperature 2 the probabilities are sqrt(PROBS)
    renormalized, [0.379, 0.294, 0.208, 0.120]: min_p=0.3 keeps all four (0.120 >= 0.3 * 0.379), where the raw
    PROBS would drop token 3 (0.05 < 0.3 * 0.5)."""
    expected = PROBS.sqrt() / PROBS.sqrt().sum()
    got = frequencies(sample_many(temperature=2.0, min_p=0.3))
    assert torch.allclose(got, expected, atol=0.015), (got, expected)


def test_min_p_of_1_keeps_every_token_tied_with_the_top():
    """min_p drops tokens whose probability is below min_p times the top one's (vLLM's strict <): at min_p=1 the
    two tokens tied at the top stay, 50/50, and only the third is dropped."""
    logits = torch.tensor([1.0, 1.0, 0.0, -1.0]).expand(20000, 4)
    got = frequencies(Sampler(seed=0)(logits, rows(20000, min_p=1.0)).token_ids)
    assert torch.allclose(got, torch.tensor([0.5, 0.5, 0.0, 0.0]), atol=0.015), got


def test_unseeded_rows_beside_seeded_ones_still_follow_the_softmax():
    """A batch that mixes seeded and unseeded rows draws the unseeded rows' noise from the engine's generator: each
    unseeded row still samples softmax(logits / T), not the argmax."""
    n = 20000
    seeded = [SamplingRow(SamplingParams(temperature=1.0, seed=i), [1], []) for i in range(n // 2)]
    unseeded = rows(n // 2, temperature=1.0)
    tokens = Sampler(seed=0)(LOGITS.expand(n, 4), seeded + unseeded).token_ids
    for part in (tokens[: n // 2], tokens[n // 2:]):
        got = frequencies(part)
        assert torch.allclose(got, PROBS, atol=0.02), (got, PROBS)


def test_a_top_p_that_is_0_in_float32_keeps_the_top_token():
    """top_p 1e-300 passes the API's (0, 1] check, and is 0 as float32: the top token must still be kept (it dropped
    them all, and the NaN row's argmax picked token 0)."""
    logits = LOGITS.flip(0).expand(200, 4)  # the likeliest token last
    assert set(Sampler(seed=0)(logits, rows(200, top_p=1e-300)).token_ids) == {3}


def test_penalties_exact_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    row = SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5,
                                     presence_penalty=0.25), prompt_token_ids=[4], output_token_ids=[0, 0, 1])
    processed = logits.clone()
    Sampler()._apply_penalties(processed, [row])
    # vLLM's order: repetition first, then frequency and presence (output tokens only)
    # token 0: 2 / 2 - (0.5*2 + 0.25) = -0.25 ; token 1: -1 * 2 - 0.75 = -2.75 ; token 4 (prompt): -2 * 2
    assert processed.tolist() == [[-0.25, -2.75, 0.5, 3.0, -4.0]]


def test_repetition_penalty_applies_before_frequency_penalty():
    # vLLM: 0.5 / 2 - 0.4 < 0, so token 1 wins; the other order, (0.5 - 0.4) / 2 > 0, kept token 0
    logits = torch.tensor([[0.5, 0.0]])
    row = SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.4), [1], [0])
    assert Sampler()(logits, [row]).token_ids == [1]


def test_penalties_are_per_row():
    logits = torch.tensor([[1.0, 0.9], [1.0, 0.9]])
    plain = SamplingRow(SamplingParams(temperature=0.0), [5], [0])
    penalized = SamplingRow(SamplingParams(temperature=0.0, frequency_penalty=1.0), [5], [0])
    assert Sampler()(logits, [plain, penalized]).token_ids == [0, 1]


def test_banned_tokens_never_chosen():
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    row = SamplingRow(SamplingParams(temperature=0.0), [1], [], banned_token_ids=(0,))
    assert Sampler()(logits, [row]).token_ids == [1]


def test_banned_ids_past_the_vocabulary_are_ignored():
    """stop_token_ids take any id >= 0 (vLLM's), so min_tokens may ban one the logits row does not have: it bans
    nothing there, and the ids inside the row are still banned."""
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    row = SamplingRow(SamplingParams(temperature=0.0), [1], [], banned_token_ids=(0, 7, 1_000_000))
    assert Sampler()(logits, [row]).token_ids == [1]


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(1))

    def draw(batch_extra, engine_seed, steps=8):
        out = []
        for step in range(steps):
            me = SamplingRow(SamplingParams(temperature=1.0, seed=42), [1], list(range(step)))
            others = rows(batch_extra, temperature=1.0)
            batch = torch.cat([torch.randn(batch_extra, 100), logits]) if batch_extra else logits
            out.append(Sampler(seed=engine_seed)(batch, others + [me]).token_ids[-1])
        return out

    alone = draw(0, engine_seed=0)
    assert draw(5, engine_seed=7) == alone
    assert draw(2, engine_seed=3) == alone
    assert len(set(alone)) > 1  # it really samples


def test_different_seeds_and_completion_indices_differ():
    logits = torch.zeros(1, 1000)
    s = Sampler()
    a = s(logits, [SamplingRow(SamplingParams(seed=1), [1], [])]).token_ids
    b = s(logits, [SamplingRow(SamplingParams(seed=2), [1], [])]).token_ids
    c = s(logits, [SamplingRow(SamplingParams(seed=1), [1], [], index=1)]).token_ids
    assert a != b and a != c


def test_logprobs_top_n_and_sampled_token():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(2))
    rs = [SamplingRow(SamplingParams(temperature=0.0, logprobs=3), [1], []),
          SamplingRow(SamplingParams(temperature=0.0), [1], [])]
    out = Sampler()(logits, rs)
    ref = torch.log_softmax(logits[0], -1)
    top = ref.topk(3)
    assert out.logprobs[1] is None
    assert set(out.logprobs[0]) == set(top.indices.tolist())  # greedy token is the top-1
    for tok, lp in out.logprobs[0].items():
        assert math.isclose(lp, ref[tok].item(), rel_tol=1e-6)


def test_logprobs_zero_gives_only_the_sampled_token():
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(3))
    out = Sampler()(logits, [SamplingRow(SamplingParams(temperature=1.0, logprobs=0, seed=5), [1], [])])
    (tok, lp), = out.logprobs[0].items()
    assert tok == out.token_ids[0] and math.isclose(lp, torch.log_softmax(logits[0], -1)[tok].item(), rel_tol=1e-6)


def test_seeded_row_is_the_exponential_race_of_its_own_generator():
    # independent reference: argmax(probs / q), q ~ Exp(1) from a fresh generator seeded by step_seed()
    from adallm_core.sampler import step_seed

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(4))
    rs = [SamplingRow(SamplingParams(temperature=0.7, seed=11), [1], [3, 4]),
          SamplingRow(SamplingParams(temperature=1.0), [1], []),
          SamplingRow(SamplingParams(temperature=0.0), [1], []),
          SamplingRow(SamplingParams(temperature=1.3, seed=5), [1], [9], index=2)]
    got = Sampler(seed=1)(logits, rs).token_ids
    for i, (temp, seed, index, step) in {0: (0.7, 11, 0, 2), 3: (1.3, 5, 2, 1)}.items():
        q = torch.empty(50).exponential_(generator=torch.Generator().manual_seed(step_seed(seed, index, step)))
        assert got[i] == int((torch.softmax(logits[i] / temp, -1) / q).argmax())
    assert got[2] == int(logits[2].argmax())


@pytest.mark.parametrize("logits,top_k,top_p", [
    ([2.0, 1.0, 1.0, 0.5, 1.0, 0.0], 2, 1.0),  # three tokens tie for 2nd place: all three stay
    ([3.0, 3.0, 1.0, 0.0], 1, 1.0),  # top_k=1 with a tie at the top samples both
    ([3.0, 1.0, 1.0, 0.0, -1.0], 2, 0.9),  # then top_p over what top_k kept (0.787 + 0.107 < 0.9: all three)
])
def test_top_k_keeps_every_token_tied_with_the_kth_as_transformers_and_vllm(logits, top_k, top_p):
    """Reference: transformers' TopKLogitsWarper then TopPLogitsWarper (vLLM's order and rule: a token is dropped
    when its logit is below the k-th largest, so ties with it stay), sampled by the seeded row's exponential race."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from adallm_core.sampler import step_seed

    x = torch.tensor([logits])
    warped = TopPLogitsWarper(top_p)(None, TopKLogitsWarper(top_k)(None, x.clone())) if top_p < 1 else \
        TopKLogitsWarper(top_k)(None, x.clone())
    probs = torch.softmax(warped[0], -1)
    sampler = Sampler()
    got, want = [], []
    for seed in range(300):
        row = SamplingRow(SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, seed=seed), [1], [])
        got.append(sampler(x, [row]).token_ids[0])
        q = torch.empty(len(logits)).exponential_(generator=torch.Generator().manual_seed(step_seed(seed, 0, 0)))
        want.append(int((probs / q).argmax()))
    assert got == want
    assert set(want) == set(torch.nonzero(probs).flatten().tolist())  # every kept token was drawn


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=0.0, repetition_penalty=1.5),
                                dict(temperature=1.0, top_p=0.5, presence_penalty=0.5), dict(temperature=1.0, logprobs=2)])
def test_sampler_leaves_the_callers_logits_untouched(kw):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(6))
    before = logits.clone()
    rs = [SamplingRow(SamplingParams(**kw), [1, 2], [3], banned_token_ids=(5,) if i == 0 else ()) for i in range(3)]
    Sampler()(logits, rs)
    assert torch.equal(logits, before)


def test_logit_bias_shifts_the_distribution_exactly():
    bias = {3: math.log(10.0), 0: -100.0}  # token 3's odds x10, token 0 out of reach
    expected = torch.softmax(LOGITS + torch.tensor([-100.0, 0.0, 0.0, math.log(10.0)]), -1)
    got = frequencies(sample_many(logit_bias=bias))
    assert torch.allclose(got, expected, atol=0.015), (got, expected)
    assert sample_many(n=4, temperature=0.0, logit_bias={2: 5.0}) == [2] * 4  # 0.15 -> e^5 x 0.15 beats 0.5


def test_logit_bias_applies_before_the_repetition_penalty_and_leaves_logprobs_raw():
    # vLLM: bias first, then the penalty: token 0 (seen) (1 - 2) * 2 = -2 < -1.5, so token 1 wins; the other
    # order, 1 / 2 - 2 = -1.5, would keep token 0 ahead of token 1's -1.6
    logits = torch.tensor([[1.0, -1.6]])
    row = SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=2.0, logit_bias={0: -2.0}, logprobs=1),
                      [0], [])
    out = Sampler()(logits, [row])
    assert out.token_ids == [1]
    assert out.logprobs[0][1] == pytest.approx(torch.log_softmax(logits, -1)[0, 1].item())  # before any processor


def test_logit_bias_is_per_row():
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    rs = [SamplingRow(SamplingParams(temperature=0.0), [5], []),
          SamplingRow(SamplingParams(temperature=0.0, logit_bias={1: 1.5}), [5], [])]
    assert Sampler()(logits, rs).token_ids == [0, 1]
    assert Sampler().sample_on_device(logits, rs).tolist() == [0, 1]  # the async path applies it too


def test_a_logit_bias_over_the_whole_vocabulary_is_exact_and_built_once():
    """A map over every token (as a client may send) is turned into tensors once per check, not every step."""
    vocab = 50_000
    logits = torch.randn(8, vocab, generator=torch.Generator().manual_seed(3))
    bias = {t: float(t % 7) - 3.0 for t in range(vocab)}
    params = SamplingParams(temperature=0.0, logit_bias=bias)
    rs = [SamplingRow(params, [1], []) for _ in range(8)]
    want = (logits + torch.tensor([bias[t] for t in range(vocab)])).argmax(-1).tolist()
    assert Sampler()(logits, rs).token_ids == want
    built = params.logit_bias_tensors()
    assert params.logit_bias_tensors() is built  # cached: the sampler's steps reuse it
    params.logit_bias = {5: 100.0}
    params.validate()  # as the engine does when a request is added: the cache follows the new map
    assert params.logit_bias_tensors()[0].tolist() == [5]


def test_logit_bias_tensors_survive_a_concurrent_check():
    """AsyncLLM checks a request's params (validate(), which drops the cache) on the caller's thread while its engine
    thread samples rows holding the same params: a shared SamplingParams, or a completions request whose prompts
    are admitted in two batches. A check between the cache's build and its return handed the sampler None (a
    TypeError that ends the engine loop)."""
    import sys
    import threading
    import time

    params = SamplingParams(logit_bias={1: 2.0, 3: -1.0})
    done = threading.Event()

    def check_again():
        while not done.is_set():
            params.validate()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    checker = threading.Thread(target=check_again)
    checker.start()
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            tensors = params.logit_bias_tensors()
            assert tensors is not None and tensors[0].tolist() == [1, 3]
    finally:
        done.set()
        checker.join()
        sys.setswitchinterval(interval)
