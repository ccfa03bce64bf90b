"""Structured outputs (vLLM's StructuredOutputsParams) on the tiny models: every output follows its grammar (checked
with jsonschema and Python's re, not the grammar library), greedy picks are transformers' argmax among the tokens
the grammar allows, and batching, async scheduling and preemption change nothing."""
import json
import re

import jsonschema
import pytest
import torch

from adallm_core.checkpoint.read import Checkpoint
from adallm_core.sampling_params import SamplingParams
from adallm_core.structured_output import StructuredOutputsParams
from engine_fixtures import PROMPTS, make_engine, run_all
from model_helpers import hf_on_dequantized, tiny_checkpoint

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]},
                                            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["ok", "size", "tags"], "additionalProperties": False}
REGEX = r"[a-c]{2,5}-\d\d"
CHOICES = ["yes", "no", 'say "maybe"\\']
GRAMMAR = 'root ::= "(" [0-9] [0-9]? ")" | "none"'


def check(kind: str, text: str) -> None:
    """The output follows its grammar: the independent check of each kind."""
    if kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict), text
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES, text
    else:
        assert re.fullmatch(r"\(\d\d?\)|none", text), text


# Grammars whose every output is short: a random tiny model inside a free JSON string (json_object) may take
# hundreds of tokens to close it, so json_object has its own test
STRUCTURES = {"json": dict(json=SCHEMA, disable_any_whitespace=True), "regex": dict(regex=REGEX),
              "choice": dict(choice=CHOICES), "grammar": dict(grammar=GRAMMAR)}


def submit_all(engine, temperatures=(0.0, 1.0), n: int = 1) -> dict:
    for kind, structure in STRUCTURES.items():
        for t in temperatures:
            for i, prompt in enumerate(PROMPTS[:3]):
                engine.add_request(f"{kind}/{t}/{i}", prompt, SamplingParams(
                    temperature=t, seed=i, n=n, max_tokens=48, structured_outputs=structure))
    return run_all(engine)


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def engine(request):
    return make_engine(request.param)


def test_every_output_follows_its_grammar(engine):
    done = submit_all(engine, n=2)
    for rid, out in done.items():
        kind = rid.split("/")[0]
        for c in out.outputs:
            assert c.finish_reason == "stop", (rid, c.text)
            check(kind, c.text)
    assert engine.stats()["kv_blocks_used"] == 0
    # the tiny models left alone write none of this: the grammar is what made it
    engine.add_request("free", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=20))
    free = run_all(engine)["free"].outputs[0].text
    with pytest.raises(Exception):
        check("json_object", free)


def test_json_object_gives_a_json_object():
    engine = make_engine()
    for any_whitespace in (True, False):
        structure = dict(json_object=True, disable_any_whitespace=not any_whitespace)
        engine.add_request("o", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=48, structured_outputs=structure))
        out = run_all(engine)["o"].outputs[0]
        assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict), out.text


@pytest.mark.parametrize("text, is_object", [('{"a": [1, "x"]}', True), ("{}", True), ("[1]", False), ("1", False),
                                            ('"s"', False)])
def test_json_object_takes_objects_only(text, is_object):
    """json_object (OpenAI's response_format) is any JSON object, not any JSON value: its grammar takes a text
    exactly when json.loads gives a dict."""
    assert isinstance(json.loads(text), dict) is is_object
    matcher = _grammars().matcher_factory(StructuredOutputsParams(json_object=True))()
    assert matcher.accept_string(text) is is_object


def test_greedy_picks_are_transformers_argmax_among_the_allowed_tokens():
    import xgrammar as xgr

    engine = make_engine("qwen3")
    ids = engine.tokenizer.encode(PROMPTS[1])
    for kind in ("json", "regex"):
        params = SamplingParams(temperature=0.0, max_tokens=48, structured_outputs=STRUCTURES[kind])
        engine.add_request(kind, ids, params)
        out = run_all(engine)[kind].outputs[0].token_ids
        matcher = engine.grammars.matcher_factory(params.structured_outputs)()
        hf = hf_on_dequantized("qwen3", Checkpoint(tiny_checkpoint("qwen3", "modelopt")))
        with torch.no_grad():
            logits = hf(torch.tensor([ids + out[:-1]])).logits[0, len(ids) - 1:].float()
        bitmask = xgr.allocate_token_bitmask(1, engine.vocab_size)
        for j, token in enumerate(out):
            matcher.fill_next_token_bitmask(bitmask)
            allowed = logits[j].clone()
            xgr.apply_token_bitmask_inplace(allowed[None], bitmask)
            assert token == int(allowed.argmax()), (kind, j)
            assert matcher.accept_token(token)
        assert matcher.is_terminated()  # the last token was a stop token the completed grammar allowed


def test_async_scheduling_batching_and_preemption_change_nothing():
    plain = {rid: [c.token_ids for c in o.outputs] for rid, o in submit_all(
        make_engine("qwen3", async_scheduling=False)).items()}
    for engine in (make_engine("qwen3", async_scheduling=True),
                   make_engine("qwen3", num_gpu_blocks_override=20, max_num_batched_tokens=64)):
        # unconstrained neighbours decode beside them (and may run ahead when alone)
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"n{i}", prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
        done = submit_all(engine)
        assert {rid: [c.token_ids for c in o.outputs] for rid, o in done.items() if rid[0] != "n"} == plain
        assert engine.stats()["kv_blocks_used"] == 0
    assert engine.stats()["num_preemptions"] > 0


def test_masks_filled_on_the_thread_pool_equal_row_by_row(monkeypatch):
    from adallm_core import structured_output

    got = []
    for rows in (10**6, 1):  # never, always
        monkeypatch.setattr(structured_output, "BATCH_FILL_ROWS", rows)
        done = submit_all(make_engine("qwen3"), n=2)
        got.append({rid: [c.token_ids for c in o.outputs] for rid, o in done.items()})
    assert got[0] == got[1] and len(got[0]) == 4 * 2 * 3


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("marker_starts", ["at the output's start", "in the step before"])
def test_a_grammar_may_wait_for_a_text_before_it_starts(async_scheduling, marker_starts):
    """start_after (set by the server's reasoning parser to "</think>"): the output is free until it holds that
    text, then follows the grammar. The marker here is a piece of what the tiny model writes unconstrained: all of
    it up to token k, or its last characters from two before token k's text (found though cut between steps)."""
    engine = make_engine(async_scheduling=async_scheduling)
    engine.add_request("free", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    free = run_all(engine)["free"].outputs[0].token_ids
    decode = engine.tokenizer.decode

    def fits(k):  # whole characters, complete exactly at token k (and not earlier, for a cut one)
        text, before = decode(free[:k]), decode(free[:k - 1])
        if "\ufffd" in text or text == before or not text.startswith(before):
            return None
        start = 0 if marker_starts == "at the output's start" else len(before) - 2
        return text[start:] if start >= 0 and text.find(text[start:]) == start else None

    k = next(k for k in range(2, 12) if fits(k))
    marker = fits(k)
    structure = dict(regex=REGEX, start_after=marker)
    engine.add_request("s", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=structure))
    engine.add_request("n", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    out = run_all(engine)["s"].outputs[0]
    assert out.token_ids[:k] == free[:k]  # unconstrained up to the token that completed the marker...
    check("regex", out.text[len(marker):])  # ...constrained from the next one
    assert out.finish_reason == "stop" and engine.stats()["kv_blocks_used"] == 0


def test_a_complete_grammar_ends_the_output_even_with_ignore_eos():
    engine = make_engine()
    engine.add_request("c", PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                                       structured_outputs=dict(choice=CHOICES)))
    out = run_all(engine)["c"].outputs[0]
    assert out.text in CHOICES and out.finish_reason == "stop"


@pytest.mark.parametrize("structure, message", [
    (dict(json="{not json"), "structured_outputs.json: Failed to parse JSON"),
    (dict(json={"type": "objekt"}), "structured_outputs.json: Unsupported type"),
    (dict(regex="(("), "structured_outputs.regex: Regex parsing error"),
    (dict(grammar="root ::= ("), "structured_outputs.grammar: EBNF parser error"),
    (dict(choice=[]), "structured_outputs.choice: must be a non-empty list"),
    (dict(json=SCHEMA, regex="a"), "exactly one of"),
    (dict(), "exactly one of"),
    (dict(jsn=SCHEMA), "unknown key(s) ['jsn']"),
    (dict(grammar='root ::= root "a"'), "structured_outputs.grammar: it matches no text at all"),
    (dict(json_object=True, disable_any_whitespace="yes"), "disable_any_whitespace: must be a bool"),
    ("json", "must be a dict"),
])
def test_bad_structures_are_refused_by_name(structure, message):
    engine = make_engine()
    with pytest.raises(ValueError, match="invalid sampling parameter structured_outputs") as info:
        engine.add_request("bad", PROMPTS[0], SamplingParams(structured_outputs=structure))
    assert message in str(info.value)
    assert not engine.has_unfinished_requests()


def test_min_tokens_cannot_be_combined():
    with pytest.raises(ValueError, match="min_tokens.*structured_outputs"):
        SamplingParams(min_tokens=2, structured_outputs=StructuredOutputsParams(regex="a+"))


def test_choices_outside_the_basic_multilingual_plane():
    """json.dumps' default escapes write 😀 as a surrogate pair, which xgrammar reads as two code points no text
    has: the grammar then allows no token of the choice and the output was random bytes."""
    engine = make_engine()
    choices = ["😀 yes", "no 🙂", "𝔵"]
    for t in (0.0, 1.0):
        for i, prompt in enumerate(PROMPTS[:3]):
            engine.add_request(f"{t}/{i}", prompt, SamplingParams(temperature=t, seed=i, max_tokens=24,
                                                                  structured_outputs=dict(choice=choices)))
    for rid, out in run_all(engine).items():
        assert out.outputs[0].text in choices and out.outputs[0].finish_reason == "stop", (rid, out.outputs[0].text)


def test_logprobs_are_over_the_tokens_the_grammar_allows():
    """vLLM masks the logits before its sampler, so its (raw) logprobs are those of the distribution sampled from:
    every top token is one the grammar allowed (those it forbids, asked for, are -inf) and the allowed ones sum to 1."""
    import math

    import xgrammar as xgr

    engine = make_engine("qwen3")
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=24, logprobs=20,
                            structured_outputs=dict(choice=CHOICES))
    engine.add_request("c", PROMPTS[1], params)
    out = run_all(engine)["c"].outputs[0]
    assert out.text in CHOICES
    matcher = engine.grammars.matcher_factory(params.structured_outputs)()
    bitmask = xgr.allocate_token_bitmask(1, engine.vocab_size)
    for token, entry in zip(out.token_ids, out.logprobs):
        matcher.fill_next_token_bitmask(bitmask)
        allowed = set(xgr.testing._get_masked_tokens_from_bitmask(bitmask, engine.vocab_size)) ^ set(
            range(engine.vocab_size))
        assert all(t in allowed for t, lp in entry.items() if lp > -math.inf), (token, entry)
        if len(allowed) <= 20:  # all of them in the top 20: their probabilities sum to 1
            assert math.isclose(sum(math.exp(lp) for lp in entry.values()), 1.0, rel_tol=1e-4), entry
        assert matcher.accept_token(token)


AB = {"a": {"type": "integer"}, "b": {"type": "integer"}}
# (schema, JSON that xgrammar's grammar for it lets through but the schema refuses, the part the refusal names)
UNENFORCED = [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]", "'uniqueItems' (at #)"),
    ({"type": "object", "properties": {"n": {"type": "number", "multipleOf": 2}}, "required": ["n"]}, '{"n": 3}',
     "'multipleOf' (only a whole number, on integers) (at #/properties/n)"),
    ({"type": "integer", "multipleOf": 2.5}, "4", "'multipleOf'"),
    ({"type": "object", "properties": AB, "not": {"required": ["a"]}}, '{"a": 1}', "'not' (at #)"),
    ({"type": "object", "properties": AB, "if": {"required": ["a"]}, "then": {"required": ["b"]}}, '{"a": 1}',
     "'if'"),
    ({"type": "object", "properties": AB, "dependentRequired": {"a": ["b"]}}, '{"a": 1}', "'dependentRequired'"),
    ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "[1]", "'contains'"),
    ({"allOf": [{"type": "object", "properties": AB}, {"required": ["a"]}]}, '{"b": 1}',
     "'allOf' with more than one schema (at #)"),
    ({"type": "object", "properties": AB, "required": ["c"]}, '{"a": 1}',
     "'required' 'c', which 'properties' does not define, (at #)"),
    ({"type": "array", "items": {"anyOf": [{"type": "object", "required": ["x"]}]}}, "[{}]",
     "'required' 'x', which 'properties' does not define, (at #/items/anyOf/0)"),
    ({"type": "object", "properties": AB, "additionalProperties": {"type": "integer", "not": {"const": 1}}},
     '{"a": 1, "c": 1}', "'not' (at #/additionalProperties)"),
    ({"$defs": {"P": {"type": "integer", "not": {"const": 1}}}, "$ref": "#/$defs/P"}, "1", "'not' (at #/$defs/P)"),
]


@pytest.mark.parametrize("schema, breaking, part", UNENFORCED)
def test_a_schema_the_grammar_would_not_enforce_is_refused_by_name(schema, breaking, part):
    """xgrammar compiles these schemas but ignores the part named: the output could be JSON the schema refuses (as
    jsonschema checks it), returned as if it followed. The request is refused, naming that part, as vLLM's xgrammar
    backend refuses such schemas."""
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(breaking), schema)
    assert _is_grammar_accept_string(xgr.Grammar.from_json_schema(json.dumps(schema)), breaking)  # why it is refused
    for value in (schema, json.dumps(schema)):  # a dict or its text
        with pytest.raises(ValueError, match="invalid sampling parameter structured_outputs.json: ") as info:
            _grammars().matcher_factory(StructuredOutputsParams(json=value))
        assert part in str(info.value) and "is not enforced" in str(info.value)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"not": {"type": "string"}, "if": {"type": "integer"}}, "required": ["not"]},
    {"type": "array", "items": {"type": "integer"}, "uniqueItems": False},
    {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 2}}, "required": ["n"]},
    {"allOf": [{"$ref": "#/$defs/P"}], "$defs": {"P": {"type": "integer"}}},
    {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]}},
])
def test_schemas_the_grammar_enforces_are_taken(schema):
    """Keywords' names used as property names, and the forms of these keywords xgrammar does follow."""
    _grammars().matcher_factory(StructuredOutputsParams(json=schema))


def test_a_ref_outside_the_schema_is_refused_by_name():
    """xgrammar reads a $ref it cannot resolve (a URL) as any JSON at all: {"a": [1]} passes for a schema whose "a"
    may be nothing of the kind, so the schema is refused, naming the ref."""
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    schema = {"type": "object", "properties": {"a": {"$ref": "https://example.com/x.json"}}, "required": ["a"]}
    assert _is_grammar_accept_string(xgr.Grammar.from_json_schema(json.dumps(schema)), '{"a": [1]}')
    with pytest.raises(ValueError, match="'\\$ref' to 'https://example.com/x.json'") as info:
        _grammars().matcher_factory(StructuredOutputsParams(json=schema))
    assert "is not enforced" in str(info.value)


def _grammars():
    from adallm_core.structured_output import GrammarCompiler
    from adallm_core.testing import demo_model_path
    from adallm_core.tokenizer import Tokenizer

    tokenizer = Tokenizer(demo_model_path())
    return GrammarCompiler(tokenizer, tokenizer.vocab_size, tokenizer.eos_token_ids)
