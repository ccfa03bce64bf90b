"""Tool calls (OpenAI's `tools` and `tool_choice`; vLLM's `--enable-auto-tool-choice --tool-call-parser hermes`).

tool_choice "auto" reads the calls out of the answer, in the Hermes format that Qwen3's chat template teaches: one
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` block a call; the text outside the blocks stays content.
"required" and a named function constrain the answer with a JSON grammar instead (as vLLM does), so any model can
call: a named function's answer is its arguments object, a "required" answer a list of {name, parameters}.
Each reader takes one choice's text in pieces and gives back (content, tool call deltas) in OpenAI's streaming
shape: a call's first delta has its id and name, later ones add to its arguments.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Optional, Union

from deployments.reasoning import _partial_tag

PARSERS = ("hermes",)
CALL, END_CALL = "<tool_call>", "</tool_call>"
DEFINITIONS = ("$defs", "definitions")  # where a JSON schema keeps the subschemas its $refs name
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass
class ToolCallDelta:
    index: int  # of the call within its choice
    arguments: str
    id: Optional[str] = None  # with the name, on the call's first delta only
    name: Optional[str] = None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def first_delta(index: int, name: str, arguments: str) -> ToolCallDelta:
    return ToolCallDelta(index, arguments, new_call_id(), name)


def forced_schema(tools: list[dict], choice: Union[str, dict], parallel: bool) -> dict:
    """The JSON schema a forced answer follows: a named function's parameters, or for "required" a non-empty list of
    {name, parameters} over the tools (one item when parallel calls are off). A function without parameters takes
    none: {}."""
    params = {t["function"]["name"]: t["function"].get("parameters") or NO_PARAMETERS for t in tools}
    if isinstance(choice, dict):
        return params[choice["function"]["name"]]
    # A parameters schema's own definitions ("$ref": "#/$defs/X", as pydantic writes them) are read from the root of
    # the schema it is in: nested in the list's, they move to its root (vLLM's), where two tools must agree on a name.
    shared: dict[str, dict] = {}
    items = []
    for name, schema in params.items():
        schema = dict(schema)
        for key in DEFINITIONS:
            for def_name, definition in (schema.pop(key, None) or {}).items():
                if shared.setdefault(key, {}).setdefault(def_name, definition) != definition:
                    raise ValueError(f"tools: {key} {def_name!r} differs between tools; with tool_choice 'required' "
                                     "all tools' definitions share one schema")
        properties = {"name": {"type": "string", "enum": [name]}, "parameters": schema}
        items.append({"type": "object", "properties": properties, "required": ["name", "parameters"],
                      "additionalProperties": False})
    return {"type": "array", "minItems": 1, **({} if parallel else {"maxItems": 1}), "items": {"anyOf": items},
            **shared}


class NamedCall:
    """tool_choice naming a function: the whole answer is its arguments, streamed as they come."""

    finish_reason = None  # OpenAI's: a forced call finishes with "stop"

    def __init__(self, name: str):
        self.name, self.called = name, False

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        # nothing generated (max_tokens spent before the answer began: in the thinking, say) makes no call: arguments
        # that are no JSON at all would only fail in the client
        if not text:
            return "", []
        delta = ToolCallDelta(0, text) if self.called else first_delta(0, self.name, text)
        self.called = True
        return "", [delta]


class RequiredCalls:
    """tool_choice "required": the answer is a JSON list of {name, parameters}, read once it is whole. An answer cut
    short (max_tokens) is no list: it comes back as content."""

    finish_reason = "tool_calls"

    def __init__(self):
        self.called, self._text = False, ""

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        self._text += text
        if not final:
            return "", []
        try:
            deltas = [first_delta(i, c["name"], _arguments_text(c["parameters"]))
                      for i, c in enumerate(json.loads(self._text))]
        except (json.JSONDecodeError, RecursionError, TypeError, KeyError):
            return self._text, []
        self.called = bool(deltas)
        return "", deltas


class HermesCalls:
    """tool_choice "auto": <tool_call> blocks become calls as each closes (the last one also when left open); a block
    that is not a JSON object with a name and object arguments stays content as written. A tag cut between pieces is
    held back. Without parallel calls only the first call is kept (vLLM's)."""

    finish_reason = "tool_calls"

    def __init__(self, parallel: bool = True):
        self._count, self._parallel = 0, parallel  # calls parsed so far (kept or not)
        self._held = ""  # the start of a tag, or an open block's text
        self._in_call = False
        self._after_call = False  # the whitespace between blocks opens no content

    @property
    def called(self) -> bool:
        return self._count > 0

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        text, self._held = self._held + text, ""
        content, calls = "", []
        while text:
            if self._in_call:
                end = text.find(END_CALL)
                if end < 0:
                    break
                call = self._parse(text[len(CALL):end])
                if call is None:
                    content += text[: end + len(END_CALL)]
                elif self._parallel or self._count == 1:
                    calls.append(call)
                self._in_call, self._after_call, text = False, call is not None, text[end + len(END_CALL):]
            elif self._after_call:
                text = text.lstrip()
                self._after_call = not text
            else:
                start = text.find(CALL)
                if start < 0:
                    keep = 0 if final else _partial_tag(text, CALL)
                    content, text = content + text[: len(text) - keep], text[len(text) - keep:]
                    break
                content, text, self._in_call = content + text[:start], text[start:], True
        if final:
            # a last block left open whose JSON is whole (stop=["</tool_call>"], or eos right after it) is a call, as
            # vLLM's parser reads it; one cut inside its JSON (max_tokens) stays content
            call = self._parse(text[len(CALL):]) if self._in_call else None
            if call is not None:
                if self._parallel or self._count == 1:
                    calls.append(call)
                text = ""
            content, text = content + text, ""
        self._held = text
        return content, calls

    def _parse(self, body: str) -> Optional[ToolCallDelta]:
        call = _json(body)
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments = call.get("arguments")
        if arguments is None or arguments == "":  # none written: the call takes none
            arguments = {}
        # an object, or a string holding one: arguments that are no object (a list, a number, "Paris") would reach the
        # client as a call it cannot read, and come back in the next request as one this server refuses
        if not isinstance(arguments, dict) and not (isinstance(arguments, str) and isinstance(_json(arguments), dict)):
            return None
        self._count += 1
        return first_delta(self._count - 1, call["name"], _arguments_text(arguments))


_NO_JSON = object()


def _json(text: str):
    """The JSON value of text, or _NO_JSON: a model's text may be no JSON, or nest deeper than the parser goes."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return _NO_JSON


def _arguments_text(arguments) -> str:
    # OpenAI's arguments are a JSON string; a model that already wrote one as a string keeps it as written
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


ToolCallReader = Union[NamedCall, RequiredCalls, HermesCalls]


@dataclass
class ToolCallPlan:
    """How a chat request's answer holds its calls: "auto" (a parser reads them), "required", or a function name."""

    mode: str
    name: Optional[str] = None
    parallel: bool = True  # "auto": more than one call kept

    def reader(self) -> ToolCallReader:
        if self.mode == "named":
            return NamedCall(self.name)
        return RequiredCalls() if self.mode == "required" else HermesCalls(self.parallel)
