"""ResponseBuilder (deployments/responses.py) and the request bodies (deployments/openai_api.py) without a server:
OpenAI's completions logprobs and the fields its client may send as null."""
import pytest
from pydantic import ValidationError

from deployments.llm_server import ChoiceDelta
from deployments.openai_api import ChatCompletionRequest, CompletionRequest
from deployments.responses import ResponseBuilder

CHAT = [{"role": "user", "content": "hi"}]
# "a語のb" as a byte-level tokenizer may cut it: 語 (e8 aa 9e) in two tokens that are each part of a character
TOKENS = ["a", "bytes:\\xe8\\xaa", "bytes:\\x9e", "の", "b"]
TEXT = "a語のb"


def delta(tokens: list[str], text: str, finish_reason=None) -> ChoiceDelta:
    logprobs = [(t, -1.0 - i, [("z", -0.1), ("y", -0.2), (t, -1.0 - i)]) for i, t in enumerate(tokens)]
    return ChoiceDelta(0, 3, text, len(tokens), logprobs, finish_reason)


def test_completion_top_logprobs_always_hold_the_sampled_token():
    """OpenAI's completions give the top `logprobs` tokens plus the sampled one (up to logprobs + 1 entries)."""
    builder = ResponseBuilder("cmpl-1", "m", chat=False, top_logprobs=2, n=1, num_prompts=1)
    builder.add([delta(["x"], "x", "length")])
    (choice,) = builder.response().choices
    assert choice.logprobs.top_logprobs == [{"z": -0.1, "y": -0.2, "x": -1.0}]
    builder = ResponseBuilder("cmpl-2", "m", chat=False, top_logprobs=0, n=1, num_prompts=1)
    builder.add([delta(["x"], "x", "length")])
    assert builder.response().choices[0].logprobs.top_logprobs == [{"x": -1.0}]


@pytest.mark.parametrize("cut", [0, 1, 2, 3, 5])  # streamed in two chunks cut at each place, 0: not streamed
def test_text_offsets_count_characters_of_the_text(cut):
    """text_offset[i] is where token i starts in the text, in characters: a token that is only part of a character
    starts where that character does, and the next one after it."""
    builder = ResponseBuilder("cmpl-3", "m", chat=False, top_logprobs=1, n=1, num_prompts=1)
    if cut:
        whole = delta(TOKENS, TEXT, "length").logprobs
        first = ChoiceDelta(0, 3, "", cut, whole[:cut], None)
        second = ChoiceDelta(0, 3, TEXT, len(TOKENS) - cut, whole[cut:], "length")
        builder.add([first])
        streamed = builder.chunk([first]).choices[0].logprobs.text_offset
        builder.add([second])
        streamed += builder.chunk([second]).choices[0].logprobs.text_offset
    else:
        builder.add([delta(TOKENS, TEXT, "length")])
    offsets = builder.response().choices[0].logprobs.text_offset
    assert offsets == [0, 1, 1, 2, 3]
    assert [TEXT[o] for o in offsets] == ["a", "語", "語", "の", "b"]
    if cut:
        assert streamed == offsets


def test_text_offsets_after_bytes_that_never_became_a_character():
    """A stray lead byte (e5) that the next token does not continue shows as U+FFFD before that token: the token
    starts after it (its offset was one too low, on the U+FFFD)."""
    builder = ResponseBuilder("cmpl-4", "m", chat=False, top_logprobs=1, n=1, num_prompts=1)
    text = "a\ufffdap語"
    builder.add([delta(["a", "bytes:\\xe5", "ap", "bytes:\\xe8\\xaa", "bytes:\\x9e"], text, "length")])
    offsets = builder.response().choices[0].logprobs.text_offset
    assert offsets == [0, 1, 2, 4, 4] and text[2:4] == "ap" and text[4] == "語"


@pytest.mark.parametrize("field", ["temperature", "top_p", "top_k", "min_p", "n", "presence_penalty",
                                   "frequency_penalty", "stream"])
def test_null_means_the_default(field):
    """The openai client types these as nullable; null is the default, as if the field were left out."""
    given = ChatCompletionRequest(model="m", messages=CHAT, **{field: None})
    assert getattr(given, field) == getattr(ChatCompletionRequest(model="m", messages=CHAT), field)
    assert ChatCompletionRequest(model="m", messages=CHAT, logprobs=None).to_sampling_params().logprobs is None


def test_stop_strings_of_any_length_and_at_most_16_of_them():
    long_stop = "\n### Instruction:"
    assert CompletionRequest(model="m", prompt="x", stop=long_stop).to_sampling_params().stop == [long_stop]
    assert len(CompletionRequest(model="m", prompt="x", stop=["s"] * 16).stop) == 16
    with pytest.raises(ValidationError, match="at most 16 stop strings, got 17"):
        CompletionRequest(model="m", prompt="x", stop=["s"] * 17)


@pytest.mark.parametrize(("fields", "named"), [(dict(top_logprobs=2), "top_logprobs can only be given with logprobs"),
                                               (dict(stream_options={"include_usage": True}),
                                                "stream_options can only be given with stream: true")])
def test_fields_that_need_another(fields, named):
    with pytest.raises(ValidationError, match=named):
        ChatCompletionRequest(model="m", messages=CHAT, **fields)

def test_best_of_beside_an_invalid_n_adds_no_second_error():
    """n = 0 is the error; best_of was then compared with 1 and named too, pointing the client at the wrong field."""
    with pytest.raises(ValidationError) as refused:
        CompletionRequest(model="m", prompt="hi", n=0, best_of=2)
    assert [e["loc"] for e in refused.value.errors()] == [("n",)]


@pytest.mark.parametrize("as_text", [False, True])
def test_free_json_nests_at_most_128_levels(as_text):
    """The limit is 128 levels of objects and arrays, as its message says: 129 was taken too."""
    import json

    for levels, ok in ((128, True), (129, False)):
        text = '{"a": ' + "[" * (levels - 1) + "]" * (levels - 1) + "}"  # by hand: the object and each '['
        given = {"json": text if as_text else json.loads(text)}
        if ok:
            assert CompletionRequest(model="m", prompt="x", structured_outputs=given).structured_outputs
            continue
        with pytest.raises(ValidationError, match="nests deeper than 128 levels"):
            CompletionRequest(model="m", prompt="x", structured_outputs=given)


@pytest.mark.parametrize("field", ["name", "tool_call_id"])
def test_a_message_field_the_template_writes_is_valid_unicode(field):
    """A message's name (passed to the template since it may write it, as vLLM does) or a tool message's
    tool_call_id holding a lone surrogate (JSON's "\\ud83d") reached the tokenizer, which takes no such text: a 500
    on /tokenize. Refused by name, as content is."""
    message = {"role": "tool", "content": "42", "tool_call_id": "call_1", field: "cut \ud83d"}
    with pytest.raises(ValidationError, match="lone surrogate") as refused:
        ChatCompletionRequest(model="m", messages=[*CHAT, message])
    assert [e["loc"] for e in refused.value.errors()] == [("messages", 1, field)]


def test_error_metrics_label_routes_not_raw_paths():
    """Paths a client invents (scanners' /wp-login.php) share one label; known routes keep their template."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from deployments.errors import install_error_handlers

    recorded = []
    app = FastAPI()
    install_error_handlers(app, lambda route, status: recorded.append((route, status)))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return {}

    client = TestClient(app)
    client.get("/wp-login.php")
    client.get("/.env")
    client.post("/v1/completions", json={"model": "m"})
    assert recorded == [("unmatched", 404), ("unmatched", 404), ("/v1/completions", 400)]


@pytest.mark.parametrize("chat", [True, False])
def test_a_token_the_grammar_forbids_is_logprob_minus_9999(chat):
    """With structured outputs, top logprobs may hold tokens the grammar forbids: -inf, which JSON cannot carry
    (json.dumps writes -Infinity, pydantic null); vLLM's server writes -9999.0."""
    import json
    import math

    builder = ResponseBuilder("x-1", "m", chat=chat, top_logprobs=2, n=1, num_prompts=1)
    builder.add([ChoiceDelta(0, 3, "a", 1, [("a", -0.5, [("a", -0.5), ("b", -math.inf)])], "stop")])
    for body in (builder.response().model_dump_json(), json.dumps(builder.response().model_dump())):
        logprobs = json.loads(body, parse_constant=lambda c: pytest.fail(f"{c} in {body}"))["choices"][0]["logprobs"]
        if chat:
            assert [t["logprob"] for t in logprobs["content"][0]["top_logprobs"]] == [-0.5, -9999.0]
        else:
            assert logprobs["top_logprobs"] == [{"a": -0.5, "b": -9999.0}]


class _Recorder:
    """RequestMetrics' two calls, kept instead of exported."""

    def __init__(self):
        self.statuses, self.generations = [], []

    def record_status(self, route, status):
        self.statuses.append((route, status))

    def record_generation(self, route, ttft_s, total_s, prompt_tokens, completion_tokens, *args):
        self.generations.append((route, ttft_s, total_s, prompt_tokens, completion_tokens, *args))


class _Outputs:
    """A DeploymentResponseGenerator's side the ingress uses: items after the first, then its end."""

    def __init__(self, items):
        self.items, self.cancelled = list(items), False

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self):
        self.cancelled = True


def _stream(monkeypatch, rest) -> tuple[list[str], _Recorder]:
    """The SSE events of a chat stream whose first deltas came, then `rest`; and what the metrics recorded."""
    import asyncio

    from deployments import ingress

    recorder = _Recorder()
    monkeypatch.setattr(ingress, "_metrics", recorder)
    # the class as written, under serve.ingress's wrapper (whose __del__ expects a running replica)
    server = object.__new__(ingress.OpenAiIngress.func_or_class.__mro__[1])
    body = ChatCompletionRequest(model="m", messages=CHAT, stream=True)
    builder = ResponseBuilder("chatcmpl-1", "m", chat=True, top_logprobs=None, n=1, num_prompts=1)
    first = [ChoiceDelta(0, 3, "a", 1, None, None)]

    async def events():
        return [e async for e in server._events("/v1/chat/completions", body, builder, first, _Outputs(rest))]

    return asyncio.run(events()), recorder


def test_a_stream_that_fails_midway_is_recorded_as_its_error():
    """The stream's 200 went out before the failure, but the request failed: the metrics count the error event's
    status (it counted a success, and adallm_request_errors never saw engine failures or lost replicas)."""
    from ray.exceptions import ActorDiedError

    from deployments.llm_server import RequestError

    with pytest.MonkeyPatch.context() as monkeypatch:
        events, recorder = _stream(monkeypatch, [RequestError("engine error: boom", status=500)])
        assert '"engine error: boom"' in events[-2] and events[-1] == "data: [DONE]\n\n"
        assert recorder.statuses == [("/v1/chat/completions", 500)]
        assert [g[4] for g in recorder.generations] == [1]  # the tokens it did generate still count
        events, recorder = _stream(monkeypatch, [ActorDiedError()])
        assert '"replica_lost"' in events[-2]
        assert recorder.statuses == [("/v1/chat/completions", 503)]
        _, recorder = _stream(monkeypatch, [[ChoiceDelta(0, 3, "b", 1, None, "stop")]])
        assert recorder.statuses == [("/v1/chat/completions", 200)]


class _Observed:
    """A Ray Histogram or Counter that keeps its values."""

    def __init__(self):
        self.values = []

    def observe(self, value, tags=None):
        self.values.append(value)

    inc = observe


@pytest.mark.parametrize(("n", "num_prompts"), [(1, 1), (2, 1), (1, 3)])
def test_time_per_output_token_is_each_choices_not_the_requests_throughput(n, num_prompts):
    """Choices (n, or several prompts) are generated side by side: 5 tokens each take 4 steps after the first token
    whatever their number. Dividing by all the request's tokens made TPOT n times too small."""
    import time

    from deployments import ingress
    from deployments.metrics import RequestMetrics

    metrics = object.__new__(RequestMetrics)
    for name in ("requests", "errors", "ttft", "tpot", "prompt_tokens", "generation_tokens", "prompt_len"):
        setattr(metrics, name, _Observed())
    builder = ResponseBuilder("cmpl-4", "m", chat=False, top_logprobs=None, n=n, num_prompts=num_prompts)
    builder.add([ChoiceDelta(i, 3, "abcde", 5, None, "length") for i in range(n * num_prompts)])
    builder.start, builder.first_token_s = time.perf_counter() - 9.0, 1.0  # 8 s after the first token
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(ingress, "_metrics", metrics)
        ingress.OpenAiIngress.func_or_class.__mro__[1]._record(None, "/v1/completions", builder)
    assert metrics.tpot.values == [pytest.approx(2.0, abs=0.05)]
    assert metrics.generation_tokens.values == [5 * n * num_prompts]


def test_every_routes_successes_are_counted_not_only_its_errors():
    """adallm_requests counted /tokenize, /v1/models, /health only when they failed (the error handlers record
    errors; only the generation routes recorded their 200s): their error ratio read 1. The generation routes record
    their own, once, at the end."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from deployments.errors import OpenAIError, install_error_handlers
    from deployments.metrics import install_status_counter

    recorded = []
    app = FastAPI()
    install_error_handlers(app, lambda route, status: recorded.append((route, status)))
    install_status_counter(app, lambda route, status: recorded.append((route, status)), ("/v1/completions",))

    @app.post("/tokenize")
    async def tokenize(fail: bool = False):
        if fail:
            raise OpenAIError(400, "bad")
        return {}

    @app.post("/v1/completions")
    async def completions():
        return {}

    client = TestClient(app)
    client.post("/tokenize")
    client.post("/tokenize?fail=true")
    client.post("/v1/completions")
    client.get("/nowhere")
    assert recorded == [("/tokenize", 200), ("/tokenize", 400), ("unmatched", 404)]


def test_a_max_tokens_the_request_left_out_is_capped_at_the_context_not_refused():
    """vLLM's get_max_tokens: the model's max_new_tokens (generation_config.json) stands in for a max_tokens the
    request left out, capped at what the prompt leaves of max_model_len. It was refused as a context-length error
    naming max_tokens, a field the request never sent; a max_tokens the request sends is still checked."""
    from types import SimpleNamespace

    from adallm_core.sampling_params import ContextLengthError
    from deployments.llm_server import GenerateRequest, LLMServer

    server = object.__new__(LLMServer.func_or_class)  # no engine: _prompts reads the tokenizer and max_model_len
    prompt = list(range(20))
    tokenizer = SimpleNamespace(encode=lambda text: prompt, encode_chat=lambda messages, **options: prompt)
    server.engine = SimpleNamespace(max_model_len=32, tokenizer=tokenizer)
    recommended = {"max_tokens": 16}  # 20 + 16 > 32
    left_out = [ChatCompletionRequest(model="m", messages=CHAT),
                CompletionRequest(model="m", prompt="x", max_tokens=None)]
    sent = [ChatCompletionRequest(model="m", messages=CHAT, max_completion_tokens=16),
            CompletionRequest(model="m", prompt="x", max_tokens=16)]
    for body in left_out + sent:
        messages = CHAT if isinstance(body, ChatCompletionRequest) else None
        request = GenerateRequest("id", body.to_sampling_params(recommended), prompts=["x"], messages=messages,
                                  max_tokens_field=body.max_tokens_field)  # as the ingress makes it
        if body in left_out:
            assert server._prompts(request) == [prompt]  # the engine generates up to max_model_len: 12 tokens
        else:
            with pytest.raises(ContextLengthError, match=f"{body.max_tokens_field}=16 is too large"):
                server._prompts(request)
