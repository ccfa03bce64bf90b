"""Engine-level sampling: seeds across batch compositions, stop strings / stop ids / min_tokens, bad requests."""
import math

import pytest

from adallm_core.sampling_params import SamplingParams
from engine_fixtures import PROMPTS, greedy_tokens, make_engine, run_all


@pytest.fixture(scope="module")
def engine():
    return make_engine("qwen3")


SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_tokens=12, ignore_eos=True)
NOISE = SamplingParams(temperature=1.2, max_tokens=10, ignore_eos=True)


def test_seeded_request_is_reproducible_across_batch_compositions(engine):
    engine.add_request("alone", PROMPTS[2], SEEDED)
    alone = run_all(engine)["alone"].outputs[0].token_ids

    for i in (0, 1, 3, 4, 5):
        engine.add_request(f"noise{i}", PROMPTS[i], NOISE)
    engine.add_request("batched", PROMPTS[2], SEEDED)
    batched = run_all(engine)["batched"].outputs[0].token_ids

    for i in (5, 6, 7):
        engine.add_request(f"early{i}", PROMPTS[i], NOISE)
    for _ in range(4):
        engine.step()
    engine.add_request("joined", PROMPTS[2], SEEDED)
    joined = run_all(engine)["joined"].outputs[0].token_ids

    other_engine = make_engine("qwen3", seed=99)
    other_engine.add_request("x", PROMPTS[2], SEEDED)
    elsewhere = run_all(other_engine)["x"].outputs[0].token_ids
    assert alone == batched == joined == elsewhere
    greedy = greedy_tokens(engine, [PROMPTS[2]], max_tokens=12)[0]
    assert alone != greedy  # it really sampled


def test_min_tokens_keeps_each_seeded_completion_its_own_draws(engine):
    """min_tokens only bans the eos / stop ids: n seeded completions draw as without it (each from its own
    (seed, index, step)), so they differ from one another and, where no banned token was drawn, equal the run
    without min_tokens."""
    free = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    engine.add_request("free", PROMPTS[1], free)
    want = [c.token_ids for c in run_all(engine)["free"].outputs]
    assert not set(engine.eos_token_ids) & {t for w in want for t in w}  # the ban changes no draw here
    engine.add_request("min", PROMPTS[1], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, min_tokens=8))
    got = [c.token_ids for c in run_all(engine)["min"].outputs]
    assert got == want and len({tuple(g) for g in got}) == 3


def _clean_boundary(tok, tokens):
    """(stop string spanning a token boundary, its index in the full text)."""
    full = tok.decode(tokens)
    for i in range(1, len(tokens) - 1):
        head, nxt = tok.decode(tokens[:i]), tok.decode(tokens[: i + 1])
        if not head or not nxt.startswith(head) or len(nxt) == len(head) or not full.startswith(nxt):
            continue
        b = len(head)
        s = full[b - 1: b + 1]
        if "\ufffd" not in s and full.find(s) == b - 1:
            return s, b - 1
    raise AssertionError(f"no clean token boundary in {full!r}")


def test_stop_string_across_token_boundaries_is_not_emitted(engine):
    tokens = greedy_tokens(engine, [PROMPTS[1]], max_tokens=32)[0]
    tok = engine.tokenizer
    stop, at = _clean_boundary(tok, tokens)
    engine.add_request("s", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True,
                                                       stop=["never-there", stop]))
    c = run_all(engine)["s"].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == tok.decode(tokens)[:at]
    assert tokens[: len(c.token_ids)] == c.token_ids and len(c.token_ids) < 32


def test_include_stop_str_in_output_keeps_the_stop_string_and_token_text(engine):
    """vLLM's include_stop_str_in_output: the text ends with the stop string (streamed deltas too); a stop token's
    text is kept as well."""
    from adallm_core.sampling_params import RequestOutputKind

    tokens = greedy_tokens(engine, [PROMPTS[1]], max_tokens=32)[0]
    tok = engine.tokenizer
    stop, at = _clean_boundary(tok, tokens)
    base = dict(temperature=0.0, max_tokens=32, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    engine.add_request("s", PROMPTS[1], SamplingParams(**base))
    c = run_all(engine)["s"].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == tok.decode(tokens)[: at + len(stop)] and c.text.endswith(stop)
    engine.add_request("d", PROMPTS[1], SamplingParams(**base, output_kind=RequestOutputKind.DELTA))
    pieces = []
    while engine.has_unfinished_requests():
        pieces += [o.outputs[0].text for o in engine.step()]
    assert "".join(pieces) == c.text
    stop_id = tokens[3]
    engine.add_request("t", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True,
                                                       stop_token_ids=[stop_id], include_stop_str_in_output=True))
    c = run_all(engine)["t"].outputs[0]
    assert c.token_ids[-1] == stop_id and c.text == tok.decode(c.token_ids)


def test_stop_token_ids_and_min_tokens(engine):
    tokens = greedy_tokens(engine, [PROMPTS[4]], max_tokens=12)[0]
    first = next(i for i in range(1, len(tokens)) if tokens.index(tokens[i]) == i)  # a token new at i >= 1
    stop_id = tokens[first]
    engine.add_request("st", PROMPTS[4], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                        stop_token_ids=[stop_id]))
    c = run_all(engine)["st"].outputs[0]
    assert c.token_ids == tokens[: first + 1] and c.finish_reason == "stop" and c.stop_reason == stop_id
    # min_tokens: the stop id is not allowed before min_tokens tokens exist, and stops the request from there on
    engine.add_request("mt", PROMPTS[4], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                        stop_token_ids=[stop_id], min_tokens=first + 2))
    c = run_all(engine)["mt"].outputs[0]
    assert stop_id not in c.token_ids[: first + 2]
    if stop_id in c.token_ids:  # sampled again later: the request ends there
        assert c.token_ids.index(stop_id) == len(c.token_ids) - 1 and c.finish_reason == "stop"
    else:
        assert len(c.token_ids) == 12 and c.finish_reason == "length"
    engine.add_request("mt0", PROMPTS[4], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                         stop_token_ids=[stop_id], min_tokens=first))
    c = run_all(engine)["mt0"].outputs[0]  # exactly min_tokens before it: allowed, so the plain stop's output
    assert c.token_ids == tokens[: first + 1] and c.finish_reason == "stop" and c.stop_reason == stop_id


def test_min_tokens_bans_eos_with_ignore_eos_too(engine):
    """vLLM's min_tokens: "before EOS or stop_token_ids can be generated"; its ban covers the eos ids whether or not
    ignore_eos is set (ignore_eos only keeps eos from stopping the request). eos is pushed up by logit_bias here."""
    for eos in engine.eos_token_ids:
        params = SamplingParams(temperature=0.0, max_tokens=5, min_tokens=3, ignore_eos=True, logit_bias={eos: 100})
        engine.add_request("e", PROMPTS[0], params)
        c = run_all(engine)["e"].outputs[0]
        assert all(t not in engine.eos_token_ids for t in c.token_ids[:3]), c.token_ids
        assert c.token_ids[3:] == [eos, eos] and c.finish_reason == "length"


class ScriptedSampler:
    """Samples the given tokens in order (the engine's sampler stands in for a model that would write them)."""

    def __init__(self, script: list[int]):
        self.script = script

    def __call__(self, logits, rows):
        from adallm_core.sampler import SamplerOutput

        none = [None] * len(rows)
        return SamplerOutput([self.script[len(r.output_token_ids)] for r in rows], none, none)


def test_held_back_text_that_completes_a_stop_string_finishes_with_stop():
    """A token that ends in part of a character is held back; when the request ends on length, the flushed text is
    checked for stop strings too, and one found there makes the finish reason "stop", not "length"."""
    engine = make_engine("qwen3", async_scheduling=False)
    tok = engine.tokenizer
    split = next(i for i in range(tok.vocab_size) if len(s := tok.decode([i])) >= 2 and s[0] != "\ufffd"
                 and s.endswith("\ufffd"))  # e.g. "a" then the first byte of a character
    engine.sampler = ScriptedSampler([split])
    engine.add_request("r", PROMPTS[0], SamplingParams(max_tokens=1, ignore_eos=True, stop=[tok.decode([split])[0]]))
    c = run_all(engine)["r"].outputs[0]
    assert (c.text, c.token_ids, c.finish_reason) == ("", [split], "stop")


def test_an_aborted_request_shows_the_text_held_back_for_an_unfinished_character():
    """Tokens ending in part of a character are held back while more may follow; an abort ends the sequence, so its
    last output shows them as the full decode does (U+FFFD for the incomplete bytes), matching its token ids."""
    engine = make_engine("qwen3", async_scheduling=False)
    tok = engine.tokenizer
    split = next(i for i in range(tok.vocab_size) if len(s := tok.decode([i])) >= 2 and s[0] != "\ufffd"
                 and s.endswith("\ufffd"))  # e.g. "a" then the first byte of a character
    engine.sampler = ScriptedSampler([split] * 10)
    engine.add_request("r", PROMPTS[0], SamplingParams(max_tokens=10, ignore_eos=True))
    assert [o.outputs[0].text for _ in range(2) for o in engine.step()] == ["", ""]  # both held back
    c = engine.abort_request("r").outputs[0]
    assert c.token_ids == [split, split] and c.finish_reason == "abort"
    assert c.text == tok.hf.decode([split, split]) and c.text.endswith("\ufffd")


def test_min_tokens_checks_stop_strings_after_min_tokens_tokens_as_stop_ids():
    """vLLM: with min_tokens=m a stop id is banned up to token m, and stop strings are looked for from token m + 1 on
    (in text from there: a match may begin earlier). A stop string completed by token m stopped the request."""
    engine = make_engine("qwen3", async_scheduling=False)
    tok = engine.tokenizer
    script = [tok.encode(c, add_special_tokens=False)[0] for c in "xyzw"]  # one token each
    engine.sampler = ScriptedSampler(script)
    got = {}
    for m in (0, 1, 2):
        engine.add_request(f"m{m}", PROMPTS[0], SamplingParams(max_tokens=4, min_tokens=m, ignore_eos=True, stop=["y"]))
        c = run_all(engine)[f"m{m}"].outputs[0]
        got[m] = (c.text, len(c.token_ids), c.finish_reason)
    assert got == {0: ("x", 2, "stop"), 1: ("x", 2, "stop"), 2: ("xyzw", 4, "length")}
    # a match that begins in text from before min_tokens and ends after it is found
    engine.add_request("span", PROMPTS[0], SamplingParams(max_tokens=4, min_tokens=2, ignore_eos=True, stop=["yz"]))
    c = run_all(engine)["span"].outputs[0]
    assert (c.text, len(c.token_ids), c.finish_reason, c.stop_reason) == ("x", 3, "stop", "yz")
    assert engine.stats()["kv_blocks_used"] == 0


def test_eos_from_generation_config(engine):
    import json
    from pathlib import Path

    gen = json.loads((Path(engine.tokenizer.path) / "generation_config.json").read_text())["eos_token_id"]
    assert set(gen) <= set(engine.eos_token_ids)
    # ignore_eos=False: a request that would sample eos stops there with finish_reason "stop"
    # the tokenizer's own eos stops with stop_reason None, generation_config's others name the token (vLLM's)
    tokens = greedy_tokens(engine, [PROMPTS[0]], max_tokens=8)[0]
    primary = engine.primary_eos_token_id
    for is_primary in (True, False):
        engine.eos_token_ids = (tokens[2],)
        engine.primary_eos_token_id = tokens[2] if is_primary else None
        try:
            engine.add_request("eos", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8))
            c = run_all(engine)["eos"].outputs[0]
        finally:
            engine.eos_token_ids = tuple(engine.tokenizer.eos_token_ids)
            engine.primary_eos_token_id = primary
        assert c.token_ids == tokens[: tokens.index(tokens[2]) + 1] and c.finish_reason == "stop"
        assert c.stop_reason == (None if is_primary else tokens[2])


def test_eos_from_the_model_config_when_the_tokenizer_names_none(tmp_path):
    """A tokenizer with no eos (none in its config, no generation_config.json) leaves the model's config.json
    eos_token_id to end requests: pushed up by logit_bias, it stops the request after one token."""
    import json
    import shutil

    from engine_fixtures import tiny_model

    shutil.copytree(tiny_model("qwen3"), tmp_path, dirs_exist_ok=True)
    (tmp_path / "generation_config.json").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("eos_token")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    eos = json.loads((tmp_path / "config.json").read_text())["eos_token_id"]
    engine = make_engine(model=str(tmp_path))
    assert engine.tokenizer.eos_token_ids == () and engine.eos_token_ids == (eos,)
    engine.add_request("e", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=5, logit_bias={eos: 100}))
    c = run_all(engine)["e"].outputs[0]
    assert (c.token_ids, c.finish_reason) == ([eos], "stop")


def _mutated(**kw):
    p = SamplingParams()
    for k, v in kw.items():
        setattr(p, k, v)
    return p


@pytest.mark.parametrize("prompt,params,match", [
    (list(range(1, 301)), None, r"maximum context length is 256 tokens \(max_model_len\), and the prompt has 300 tokens"),
    # exactly max_model_len tokens leave no room for a generated token
    (list(range(1, 257)), None, r"the prompt has 256 tokens: it must leave room for at least one generated token"),
    ([], None, "prompt is empty"),
    ("", None, "prompt is empty"),
    ([5, 100_000], None, "100000 is not a token id"),
    ("hi", _mutated(temperature=math.nan), "temperature"),
    ("hi", _mutated(top_p=-0.5), "top_p"),
    ("hi", _mutated(presence_penalty=math.inf), "presence_penalty"),
    ("hi", _mutated(max_tokens=0), "max_tokens"),
    ("hi", _mutated(stop=[3]), "stop"),
    ("hi", _mutated(max_tokens=4, min_tokens=5), "min_tokens=5: must be at most max_tokens=4"),
    ("hi", _mutated(stop=5), "stop"),
    ("hi", _mutated(stop_token_ids=7), "stop_token_ids"),
    ("hi", _mutated(ignore_eos="false"), "ignore_eos"),
    ("hi", _mutated(skip_special_tokens=None), "skip_special_tokens"),
    ("hi", _mutated(output_kind="delta"), "output_kind"),
    ("hi", _mutated(max_tokens=True), "max_tokens"),
    ("hi", {"temperature": 0}, "must be a SamplingParams"),
    ("hi", SamplingParams(logit_bias={3: 1.0, 100_000: 1.0}), r"logit_bias: token ids \[100000\] are outside"),
    (3.5, None, "prompt must be a string or a list of token ids"),
    ({"prompt_token_ids": 5}, None, "prompt_token_ids must be a list of token ids, got int"),
    ({"prompt_token_ids": None}, None, "prompt_token_ids must be a list of token ids, got NoneType"),
])
def test_bad_request_is_rejected_alone(engine, prompt, params, match):
    good = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    engine.add_request("ok", PROMPTS[3], good)
    engine.step()
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", prompt, params)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok", "again", good)
    done = run_all(engine)
    assert set(done) == {"ok"}
    assert done["ok"].outputs[0].token_ids == greedy_tokens(engine, [PROMPTS[3]], max_tokens=10)[0]
    assert engine.stats()["kv_blocks_used"] == 0



def test_token_ids_from_the_vocabulary_size_up_are_refused(engine):
    """Token ids run from 0 to vocab_size - 1: vocab_size itself, in a prompt or a logit_bias key, is refused at
    admission (taken, it would index past the logits row in the step that runs every request)."""
    v = engine.vocab_size
    with pytest.raises(ValueError, match=rf"{v} is not a token id in \[0, {v}\)"):
        engine.add_request("p", [1, v], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=rf"logit_bias: token ids \[{v}\] are outside"):
        engine.add_request("b", [1, 2], SamplingParams(max_tokens=2, logit_bias={v - 1: 1.0, v: 1.0}))
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("request_id", [["r"], None, 7])
def test_request_id_must_be_a_string(engine, request_id):
    with pytest.raises(ValueError, match="request_id must be a string, got"):
        engine.add_request(request_id, "hi")
    assert not engine.has_unfinished_requests()

def test_a_tiny_positive_temperature_samples_the_argmax(engine):
    """logits / 1e-39 overflows to inf (NaN probabilities, token 0): temperatures below vLLM's 1e-5 are greedy."""
    greedy = greedy_tokens(engine, [PROMPTS[5]], max_tokens=6)[0]
    engine.add_request("t", PROMPTS[5], SamplingParams(temperature=1e-39, max_tokens=6, ignore_eos=True, seed=3))
    assert run_all(engine)["t"].outputs[0].token_ids == greedy


@pytest.mark.parametrize("kw", [dict(stop=5), dict(stop_token_ids=7), dict(ignore_eos="false"), dict(n=True),
                                dict(output_kind="delta"), dict(logprobs=True), dict(logit_bias=[1]),
                                dict(logit_bias={"a": 1.0}), dict(logit_bias={-1: 1.0}), dict(logit_bias={1: 101}),
                                dict(logit_bias={1: math.nan}), dict(logit_bias={True: 1.0}),
                                dict(include_stop_str_in_output=1), dict(logit_bias={1: 10**400}),
                                dict(temperature=10**400), dict(top_p=10**400), dict(repetition_penalty=10**400),
                                dict(top_p=0.0), dict(repetition_penalty=0.0), dict(stop_token_ids=[3, -1]),
                                dict(presence_penalty=2.5), dict(frequency_penalty=-2.5)])
def test_bad_constructor_values_are_value_errors_naming_the_field(kw):
    with pytest.raises(ValueError, match=f"invalid sampling parameter {next(iter(kw))}="):
        SamplingParams(**kw)


def test_logit_bias_steers_the_engine_and_takes_openai_string_keys(engine):
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logit_bias={"7": 100})
    assert params.logit_bias == {7: 100.0}
    engine.add_request("b", PROMPTS[0], params)
    assert run_all(engine)["b"].outputs[0].token_ids == [7, 7, 7, 7]
    banned = greedy_tokens(engine, [PROMPTS[0]], max_tokens=1)[0][0]  # the first greedy token, then biased away
    engine.add_request("c", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=1, logit_bias={banned: -100}))
    assert run_all(engine)["c"].outputs[0].token_ids != [banned]


def test_params_changed_after_construction_mean_what_the_constructor_would(engine):
    """The engine validates the params again when a request is added; values set on an existing SamplingParams
    (a stop string, top_k=-1, stop_token_ids=None) must mean what they mean to the constructor."""
    tokens = greedy_tokens(engine, [PROMPTS[1]], max_tokens=32)[0]
    text = engine.tokenizer.decode(tokens)
    # a stop string of two characters, the first of which also occurs earlier: read as characters, it stops there
    stop = next(text[j:j + 2] for j in range(1, len(text) - 1)
                if text.find(text[j:j + 2]) == j and text[j] in text[:j] and "\ufffd" not in text[j:j + 2])
    base = dict(temperature=0.0, max_tokens=32, ignore_eos=True)
    results = []
    for params in (SamplingParams(stop=stop, **base), _mutated(stop=stop, top_k=-1, stop_token_ids=None, **base)):
        engine.add_request("m", PROMPTS[1], params)
        c = run_all(engine)["m"].outputs[0]
        results.append((c.text, c.stop_reason, c.token_ids))
    assert results[0] == results[1] and results[0][1] == stop
