"""deployments/tool_calls.py: calls read out of an answer, whole or fed in pieces of any size; forced calls' schemas."""
import json

import jsonschema
import pytest

from deployments.tool_calls import HermesCalls, NamedCall, RequiredCalls, forced_schema

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now"}}]
PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
NOW = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'

HERMES_CASES = [
    # (answer, content, [(name, arguments object)])
    (PARIS, "", [("get_weather", {"city": "Paris"})]),
    ("Let me look.\n" + PARIS + "\n" + NOW, "Let me look.\n", [("get_weather", {"city": "Paris"}), ("now", {})]),
    (PARIS + "\nDone.", "Done.", [("get_weather", {"city": "Paris"})]),
    ("No call here, only <tool text.", "No call here, only <tool text.", []),
    ("<tool_call>not json</tool_call> after", "<tool_call>not json</tool_call> after", []),  # kept as written
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),  # no name
    ('x <tool_call>{"name": "now", "argu', 'x <tool_call>{"name": "now", "argu', []),  # cut by max_tokens
    # the last block left open, its JSON whole: stop=["</tool_call>"] ends the answer there (vLLM's parser takes it)
    ('x <tool_call>{"name": "now", "arguments": {"tz": "UTC"}}\n', "x ", [("now", {"tz": "UTC"})]),
    ('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": {}}', "",
     [("a", {}), ("b", {})]),
    ("<tool_ca", "<tool_ca", []),
    ('<tool_call>{"name": "now", "arguments": null}</tool_call>', "", [("now", {})]),
    ('<tool_call>{"name": "now", "arguments": [1]}</tool_call>', '<tool_call>{"name": "now", "arguments": [1]}'
     '</tool_call>', []),  # arguments that are no object: not a call
    ('<tool_call>{"name": "now", "arguments": "{\\"a\\": 1}"}</tool_call>', "", [("now", {"a": 1})]),  # as a string
]


def _feed(reader, answer: str, piece: int):
    parts = [answer[i:i + piece] for i in range(0, len(answer), piece)] or [""]
    content, deltas = "", []
    for i, part in enumerate(parts):
        text, calls = reader.feed(part, final=i == len(parts) - 1)
        content += text
        deltas += calls
    return content, deltas


def _calls(deltas) -> list[tuple[str, dict]]:
    """(name, arguments) per call, from deltas as a client joins them: by index, the first with id and name."""
    calls: list[list] = []
    for d in deltas:
        if d.index == len(calls):
            assert d.id and d.id.startswith("call_") and d.name
            calls.append([d.name, ""])
        else:
            assert d.id is None and d.name is None
        calls[d.index][1] += d.arguments
    return [(name, json.loads(args)) for name, args in calls]


@pytest.mark.parametrize("answer, content, calls", HERMES_CASES)
@pytest.mark.parametrize("piece", [10**6, 1, 2, 5, 11])
def test_hermes_blocks_whole_or_in_pieces(answer, content, calls, piece):
    reader = HermesCalls()
    got_content, deltas = _feed(reader, answer, piece)
    assert (got_content, _calls(deltas)) == (content, calls)
    assert reader.called == bool(calls)
    assert len({d.id for d in deltas if d.id}) == len(calls)  # an id a call


@pytest.mark.parametrize("arguments", ['"Paris"', "[]", "false", "0", '"[1]"', '"{oops"'])
def test_hermes_arguments_that_are_no_object_stay_content(arguments):
    """Arguments that are no JSON object (nor a string holding one) make no call: the client could not read them, and
    sent back (messages.append(reply.message)) they are refused by this server's own check (SentFunctionCall)."""
    answer = '<tool_call>{"name": "now", "arguments": %s}</tool_call>' % arguments
    reader = HermesCalls()
    assert _feed(reader, answer, 10**6) == (answer, []) and not reader.called


@pytest.mark.parametrize("piece", [10**6, 7])
def test_json_nested_deeper_than_the_parser_goes_stays_content(piece):
    """A degenerate answer ("[[[[..." in a block, or a required list) failed the whole request with RecursionError
    (json.loads' nesting limit) instead of coming back as the text it is."""
    deep = "[" * 5000
    answer = "a <tool_call>" + deep + "</tool_call>"
    assert _feed(HermesCalls(), answer, piece) == (answer, [])
    arguments = '<tool_call>{"name": "now", "arguments": "%s"}</tool_call>' % deep
    assert _feed(HermesCalls(), arguments, piece) == (arguments, [])
    assert _feed(RequiredCalls(), deep, piece) == (deep, [])


@pytest.mark.parametrize("piece", [10**6, 1, 3])
def test_a_named_call_streams_its_arguments(piece):
    reader = NamedCall("get_weather")
    content, deltas = _feed(reader, '{"city": "Oslo"}', piece)
    assert content == "" and _calls(deltas) == [("get_weather", {"city": "Oslo"})] and reader.called


def test_a_named_call_with_nothing_generated_makes_no_call():
    """max_tokens spent before the answer began (in the thinking, say): no call with arguments that are no JSON."""
    reader = NamedCall("now")
    assert reader.feed("", final=True) == ("", []) and not reader.called


@pytest.mark.parametrize("piece", [10**6, 4])
def test_required_calls_are_read_once_the_list_is_whole(piece):
    answer = json.dumps([{"name": "get_weather", "parameters": {"city": "Rome"}}, {"name": "now", "parameters": {}}])
    reader = RequiredCalls()
    content, deltas = _feed(reader, answer, piece)
    assert content == "" and _calls(deltas) == [("get_weather", {"city": "Rome"}), ("now", {})] and reader.called


def test_a_required_list_cut_short_stays_content():
    reader = RequiredCalls()
    assert reader.feed('[{"name": "now", "param', final=True) == ('[{"name": "now", "param', []) and not reader.called


def test_the_forced_schemas_take_what_they_should_and_nothing_else():
    named = forced_schema(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, parallel=True)
    assert named == WEATHER
    no_arguments = forced_schema(TOOLS, {"type": "function", "function": {"name": "now"}}, parallel=True)
    jsonschema.validate({}, no_arguments)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"a": 1}, no_arguments)
    required = forced_schema(TOOLS, "required", parallel=True)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Rome"}}, {"name": "now", "parameters": {}}],
                        required)
    for bad in ([], [{"name": "get_weather", "parameters": {}}], [{"name": "other", "parameters": {}}],
                [{"name": "now"}], {"name": "now", "parameters": {}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, required)
    single = forced_schema(TOOLS, "required", parallel=False)
    jsonschema.validate([{"name": "now", "parameters": {}}], single)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "now", "parameters": {}}] * 2, single)


@pytest.mark.parametrize("piece", [10**6, 1, 4])
def test_without_parallel_calls_only_the_first_is_kept(piece):
    reader = HermesCalls(parallel=False)
    content, deltas = _feed(reader, "a\n" + PARIS + "\n" + NOW + "\nb", piece)
    assert (content, _calls(deltas)) == ("a\nb", [("get_weather", {"city": "Paris"})])


def _server_deltas(pieces: list[str], plan, prompt_tail=None, n=1):
    """LLMServer._deltas over engine outputs of `pieces` (the last one finished), merged as one streamed message."""
    import collections
    from types import SimpleNamespace

    from adallm_core.outputs import CompletionOutput, RequestOutput
    from deployments.llm_server import LLMServer, _merge
    from deployments.reasoning import ThinkSplitter

    server = object.__new__(LLMServer.func_or_class)  # no engine: _deltas reads only the outputs here
    server.engine = SimpleNamespace(tokenizer=None, shutdown=lambda: None)  # LLMServer.__del__ shuts it down
    thinking = collections.defaultdict(lambda: ThinkSplitter(prompt_tail)) if prompt_tail is not None else None
    tools = collections.defaultdict(plan.reader)
    deltas = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        outs = [CompletionOutput(index=c, text=piece, token_ids=[1], finish_reason="stop" if last else None)
                for c in range(n)]
        deltas += server._deltas(0, RequestOutput("r", None, [1], outs, finished=last), n, None, thinking, tools)
    return _merge(deltas)


def test_the_server_reads_calls_after_the_thinking_and_merges_their_pieces():
    from deployments.tool_calls import ToolCallPlan

    answer = "<think>maybe <tool_call> here?</think>\n\nOk.\n" + PARIS
    pieces = [answer[i:i + 3] for i in range(0, len(answer), 3)]
    (merged,) = _server_deltas(pieces, ToolCallPlan("auto"), prompt_tail="<|im_start|>assistant\n")
    assert (merged.reasoning, merged.text, merged.finish_reason) == ("maybe <tool_call> here?", "Ok.\n", "tool_calls")
    assert _calls(merged.tool_calls) == [("get_weather", {"city": "Paris"})] and len(merged.tool_calls) == 1
    # a named call streamed in many pieces: one delta a choice after the merge, id and name first, for each of n
    merged = _server_deltas(['{"ci', 'ty": ', '"Oslo"}'], ToolCallPlan("named", "get_weather"), n=2)
    assert [m.index for m in merged] == [0, 1] and all(m.finish_reason == "stop" for m in merged)
    for m in merged:
        assert len(m.tool_calls) == 1 and _calls(m.tool_calls) == [("get_weather", {"city": "Oslo"})]
    assert merged[0].tool_calls[0].id != merged[1].tool_calls[0].id


def test_the_response_has_null_content_for_calls_alone_and_each_call_whole():
    from deployments.llm_server import ChoiceDelta
    from deployments.responses import ResponseBuilder
    from deployments.tool_calls import ToolCallDelta

    builder = ResponseBuilder("id", "m", chat=True, top_logprobs=None, n=2, num_prompts=1)
    first = [ChoiceDelta(0, 5, "\n", 3, None, None, tool_calls=[ToolCallDelta(0, '{"a"', "call_x", "f")]),
             ChoiceDelta(1, 5, "Just text.", 3, None, None)]
    later = [ChoiceDelta(0, 5, "", 2, None, "tool_calls", tool_calls=[ToolCallDelta(0, ": 1}"),
                                                                     ToolCallDelta(1, "{}", "call_y", "g")])]
    for deltas in (first, later):
        builder.add(deltas)
        chunk = builder.chunk(deltas).choices[0].delta
        assert chunk.tool_calls[0].type == ("function" if chunk.tool_calls[0].id else None)
    assert builder.chunk(later).choices[0].delta.content is None  # no text beside the calls
    # a call's later deltas leave out id, type and name (OpenAI's and vLLM's streams; a strict client refuses nulls)
    sent = json.loads(builder.chunk(later).model_dump_json())["choices"][0]["delta"]["tool_calls"]
    assert sent == [{"index": 0, "function": {"arguments": ": 1}"}},
                    {"index": 1, "id": "call_y", "type": "function", "function": {"name": "g", "arguments": "{}"}}]
    calls, plain = builder.response().choices
    assert calls.message.content is None and calls.finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in calls.message.tool_calls] == [
        ("call_x", "f", '{"a": 1}'), ("call_y", "g", "{}")]
    assert plain.message.content == "Just text." and plain.message.tool_calls == []


PLACE = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def _with_defs(place: dict) -> dict:
    """A parameters schema as pydantic (and openai.pydantic_function_tool) writes one: nested models under $defs."""
    return {"type": "object", "properties": {"place": {"$ref": "#/$defs/Place"}}, "required": ["place"],
            "$defs": {"Place": place}}


def test_required_calls_keep_the_definitions_their_refs_name():
    """Nested in the "required" list's schema, a tool's "#/$defs/..." refs named nothing: the grammar failed to compile
    (a 400 for a valid request). The definitions move to the root, as vLLM does."""
    import xgrammar as xgr

    tools = [{"type": "function", "function": {"name": "weather", "parameters": _with_defs(PLACE)}}] + TOOLS
    schema = forced_schema(tools, "required", parallel=True)
    jsonschema.validate([{"name": "weather", "parameters": {"place": {"city": "Oslo"}}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "weather", "parameters": {"place": {}}}], schema)
    xgr.Grammar.from_json_schema(json.dumps(schema))  # compiles
    assert "$defs" in tools[0]["function"]["parameters"]  # the request's own tools are left as they were


def test_required_calls_refuse_tools_whose_definitions_clash():
    from pydantic import ValidationError

    from deployments.errors import describe_validation_error
    from deployments.openai_api import ChatCompletionRequest

    other = {"type": "object", "properties": {"zip": {"type": "string"}}}
    tools = [{"type": "function", "function": {"name": n, "parameters": _with_defs(p)}} for n, p in
             (("a", PLACE), ("b", other))]
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=tools,
                              tool_choice="required")
    message, param = describe_validation_error(e.value.errors())
    assert param == "tool_choice" and "tools: $defs 'Place' differs between tools" in message
    same = [{"type": "function", "function": {"name": n, "parameters": _with_defs(PLACE)}} for n in "ab"]
    ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=same, tool_choice="required")


@pytest.mark.parametrize("arguments", ["", "  ", None])
def test_an_earlier_call_sent_back_without_arguments_takes_none(arguments):
    """vLLM reads a history call's missing arguments (null or "") as {}; they were a 400 here."""
    from deployments.openai_api import ChatCompletionRequest

    call = {"id": "c", "type": "function", "function": {"name": "now", "arguments": arguments}}
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": None, "tool_calls": [call]},
                                                      {"role": "tool", "tool_call_id": "c", "content": "noon"}])
    assert body.messages[1].as_template_input()["tool_calls"][0]["function"]["arguments"] == {}


def test_a_participants_name_reaches_the_template():
    """OpenAI's message name (which participant spoke) was dropped before the template; vLLM passes it on."""
    from adallm_core.testing import demo_model_path
    from adallm_core.tokenizer import Tokenizer
    from deployments.openai_api import ChatCompletionRequest

    tok = Tokenizer(demo_model_path(), "{% for m in messages %}{{ m.name or m.role }}: {{ m.content }}\n{% endfor %}")
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi", "name": "ann"},
                                                      {"role": "user", "content": "yo"}])
    assert tok.apply_chat_template([m.as_template_input() for m in body.messages], False) == "ann: hi\nuser: yo\n"


@pytest.mark.parametrize("tool_choice", ["auto", "required", {"type": "function", "function": {"name": "city"}}])
def test_parameters_that_are_no_object_schema_are_refused(tool_choice):
    """A function's arguments are a JSON object (OpenAI's rule, and this server's for calls sent back): parameters of
    another type were taken, and a forced call then answered with arguments such as '"Paris"', which the client's
    next request (messages.append(reply.message)) had refused as no object."""
    from pydantic import ValidationError

    from deployments.errors import describe_validation_error
    from deployments.openai_api import ChatCompletionRequest, SentFunctionCall

    with pytest.raises(ValidationError, match="arguments must be a JSON object"):
        SentFunctionCall(name="city", arguments='"Paris"')
    tools = [{"type": "function", "function": {"name": "city", "parameters": {"type": "string"}}}]
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=tools,
                              tool_choice=tool_choice)
    message, param = describe_validation_error(e.value.errors())
    assert param == "tools.0.function.parameters" and "must be a JSON schema of type 'object'" in message, message
    for parameters in ({"type": "object", "properties": {}}, {}, {"properties": {"a": {"type": "string"}}}):
        tools[0]["function"]["parameters"] = parameters
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=tools,
                              tool_choice=tool_choice)
