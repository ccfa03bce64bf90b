"""OpenAI request and response bodies (pydantic). Unknown fields are rejected by name, never ignored."""
from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from adallm_core.sampling_params import RequestOutputKind, SamplingParams
from adallm_core.tokenizer import chat_template_options, unicode_text  # here too: the 400 then names the field
from deployments.tool_calls import ToolCallPlan, forced_schema

INT64_MAX = 2**63 - 1
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class Strict(BaseModel):
    # extra="forbid": a field this server does not implement is a 400 that names it.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False  # a last chunk, without choices, carries the request's usage
    continuous_usage_stats: bool = False  # with include_usage, every chunk carries the usage so far (vLLM's)
    # OpenAI's padding of chunks against length side channels: a local server has no use for it, so it is accepted
    # (the openai client types it) and has no effect
    include_obfuscation: Optional[bool] = None

    @field_validator("include_usage", "continuous_usage_stats", mode="before")
    @classmethod
    def _null_is_false(cls, value):
        return False if value is None else value  # nullable in OpenAI's API and vLLM's


MAX_STOP_STRINGS = 16
NULL_MEANS_DEFAULT = ("n", "presence_penalty", "frequency_penalty", "stream", "min_tokens", "ignore_eos",
                      "include_stop_str_in_output")
# left out (or null): the model's recommended value (generation_config.json), else SamplingParams' default (vLLM's)
MODEL_DEFAULTED = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


# Free JSON (schemas, template kwargs, call arguments) nests at most this deep: a request travels to its replica
# pickled, which failed from ~500 levels (a 500), and a grammar of a schema that deep compiled for minutes.
MAX_JSON_DEPTH = 128
TOO_DEEP = f"nests deeper than {MAX_JSON_DEPTH} levels of objects and arrays"


def shallow(value):
    """value, or a ValueError when its objects and arrays nest deeper than MAX_JSON_DEPTH (counted level by level: no
    recursion of our own)."""
    level = [value]
    for _ in range(MAX_JSON_DEPTH):  # a value of d levels has none left after d of these
        level = [v for x in level if isinstance(x, (dict, list)) for v in (x.values() if isinstance(x, dict) else x)]
        if not level:
            return value
    raise ValueError(TOO_DEEP)


def only_with_true(value, info, other: str):
    """A field validator's check that a field is given only alongside `other: true` (declared before it)."""
    if value is not None and not info.data.get(other):
        raise ValueError(f"{info.field_name} can only be given with {other}: true")
    return value


class JsonSchemaFormat(Strict):
    name: str
    schema_: dict[str, Any] = Field(..., alias="schema")
    description: Optional[str] = None
    strict: Optional[bool] = None  # the schema is always enforced

    @field_validator("schema_")
    @classmethod
    def _shallow(cls, schema):
        return shallow(schema)


class ResponseFormat(Strict):
    """OpenAI's response_format: text (no constraint), json_object, or json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = Field(None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _only_for_json_schema(cls, value, info):
        if (value is not None) != (info.data.get("type") == "json_schema"):
            raise ValueError("json_schema is given exactly when type is 'json_schema'")
        return value

    def structured_outputs(self) -> Optional[dict]:
        # no free whitespace, as OpenAI's: a grammar open to it lets a model pad with it until max_tokens
        if self.type == "json_object":
            return {"json_object": True, "disable_any_whitespace": True}
        if self.type == "json_schema":
            return {"json": self.json_schema.schema_, "disable_any_whitespace": True}
        return None


class StructuredOutputs(Strict):
    """vLLM's structured_outputs (the openai client sends it in extra_body)."""

    json_: Optional[Union[dict[str, Any], str]] = Field(None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    disable_any_whitespace: bool = False

    @field_validator("json_")
    @classmethod
    def _shallow(cls, schema):
        if isinstance(schema, str):  # as text: the engine parses it (JSON that is none is its error to report)
            try:
                shallow(json.loads(schema))
            except json.JSONDecodeError:
                pass
            except RecursionError:  # deeper than the parser goes
                raise ValueError(TOO_DEEP) from None
            return schema
        return shallow(schema)

    def as_dict(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True)


class SamplingFields(Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: Optional[int] = Field(None, ge=1, le=INT64_MAX)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)  # None: see MODEL_DEFAULTED
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: Optional[int] = Field(None, ge=-1, le=INT64_MAX)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    seed: Optional[int] = Field(None, ge=-(2**63), le=INT64_MAX)
    stop: Optional[Union[str, list[str]]] = None
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    logit_bias: Optional[dict[str, float]] = None  # token id (a string, as JSON keys are) -> bias in [-100, 100]
    # vLLM's sampling fields beyond OpenAI's (the openai client sends them in extra_body)
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=INT64_MAX, allow_inf_nan=False)
    min_tokens: int = Field(0, ge=0, le=INT64_MAX)
    stop_token_ids: Optional[list[TokenId]] = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputs] = None
    prompt_logprobs: Optional[int] = Field(None, ge=0, le=20)  # vLLM's: each prompt token's logprob, rank, top N

    @field_validator("structured_outputs")
    @classmethod
    def _one_structure(cls, value, info):
        fmt = info.data.get("response_format")
        if value is not None and fmt is not None and fmt.type != "text":
            raise ValueError("give response_format or structured_outputs, not both")
        return value

    @field_validator(*NULL_MEANS_DEFAULT, mode="before")
    @classmethod
    def _null_is_default(cls, value, info):
        # OpenAI's API and client type these as nullable: null asks for the default, as omitting them does
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("stop")
    @classmethod
    def _at_most_16_stop_strings(cls, value):
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(value)}")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value, info):
        return only_with_true(value, info, "stream")

    @field_validator("prompt_logprobs")
    @classmethod
    def _not_streamed(cls, value, info):
        if value is not None and info.data.get("stream"):  # as vLLM
            raise ValueError("prompt_logprobs is not available with stream: true")
        return value

    def sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int], prompt_logprobs: Optional[int] = None,
                        model_defaults: Optional[dict] = None) -> SamplingParams:
        """model_defaults: the model's recommended sampling (generation_config.json) for fields the request left out,
        max_tokens among them."""
        model_defaults = model_defaults or {}
        chosen = {}
        for name in MODEL_DEFAULTED:
            value = getattr(self, name)
            value = model_defaults.get(name) if value is None else value
            if value is not None:  # neither sent nor recommended: SamplingParams' default
                chosen[name] = value
        if max_tokens is None:
            max_tokens = model_defaults.get("max_tokens")
        return SamplingParams(
            **chosen,
            n=self.n,
            seed=self.seed,
            stop=self.stop,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            structured_outputs=self._structure(),
            max_tokens=max_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            output_kind=RequestOutputKind.DELTA,  # the server streams (and sums up) deltas
        )

    @property
    def max_tokens_field(self) -> Optional[str]:
        """The field the max_tokens came from: the one an error about it names. None when the request sent none: the
        model's recommended max_tokens then stands in, capped at what the prompt leaves (vLLM's), never an error."""
        return "max_tokens" if self.max_tokens is not None else None

    @property
    def structure_field(self) -> str:
        """The field that asked for a structure: the one an error about it names."""
        return "structured_outputs" if self.structured_outputs is not None else "response_format"

    def _structure(self) -> Optional[dict]:
        if self.structured_outputs is not None:
            return self.structured_outputs.as_dict()
        return self.response_format.structured_outputs() if self.response_format is not None else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options.continuous_usage_stats


class CompletionRequest(SamplingFields):
    # A string, a list of strings, a list of token ids, or a list of lists of token ids.
    prompt: Union[str, list[str], list[TokenId], list[list[TokenId]]]
    max_tokens: Optional[int] = Field(16, ge=0, le=INT64_MAX)  # 0: with echo, the prompt scored, nothing generated
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: Optional[bool] = False  # each choice starts with the prompt (with logprobs, and the prompt's logprobs)
    # OpenAI's fields this server does not implement: null (their default) is taken, anything else named in a 400
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value is not None:
            raise ValueError("suffix is not supported (only null)")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value, info):
        if "n" not in info.data:  # n itself was refused: its error says what is wrong
            return value
        n = info.data["n"]
        if value is not None and value != n:  # best_of = n returns every candidate: no choosing among more
            raise ValueError(f"best_of other than n ({n}) is not supported, got {value}")
        return value

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt):
        items = [prompt] if isinstance(prompt, str) else prompt
        if not items or any(not isinstance(p, int) and len(p) == 0 for p in items):
            raise ValueError("a prompt must not be empty")
        for p in items:
            if isinstance(p, str):
                unicode_text(p)
        return prompt

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    @property
    def prompt_only(self) -> bool:
        """max_tokens 0 with echo (vLLM's): the prompt and its logprobs alone (one token is generated and dropped)."""
        return self.max_tokens == 0

    def to_sampling_params(self, model_defaults: Optional[dict] = None) -> SamplingParams:
        if self.prompt_only and not self.echo:
            raise ValueError("invalid sampling parameter max_tokens=0: must be >= 1, or 0 with echo: true (the "
                             "prompt alone, scored with logprobs)")
        if self.prompt_only and self.min_tokens > 0:
            # SamplingParams' own message would name max_tokens=1 (the token generated and dropped), not what was sent
            raise ValueError(f"invalid sampling parameter min_tokens={self.min_tokens}: must be at most max_tokens=0")
        max_tokens = 1 if self.prompt_only else self.max_tokens
        scored = [n for n in (self.logprobs if self.echo else None, self.prompt_logprobs) if n is not None]
        return self.sampling_params(max_tokens, self.logprobs, max(scored) if scored else None, model_defaults)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionName(Strict):
    name: str


class FunctionDefinition(FunctionName):
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema of the arguments object
    strict: Optional[bool] = None  # a forced call always follows the schema

    @field_validator("parameters")
    @classmethod
    def _an_object(cls, parameters):
        # arguments are an object (OpenAI's rule; a call sent back with others is refused): a forced call following
        # a schema of another type would answer with arguments no client can send back
        if parameters is not None and parameters.get("type", "object") != "object":
            raise ValueError(f"must be a JSON schema of type 'object' (the arguments object), got type "
                             f"{parameters['type']!r}")
        return shallow(parameters)


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition

    @model_validator(mode="after")
    def _utf8(self):
        return _unicode_fields(self)


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SentFunctionCall(Strict, FunctionCall):
    @field_validator("arguments", mode="before")
    @classmethod
    def _none_is_empty(cls, arguments):
        # a call without arguments may come back with none at all (null, ""): no arguments, {}, as vLLM takes it
        return "{}" if arguments is None or (isinstance(arguments, str) and not arguments.strip()) else arguments

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments):
        # templates take the arguments as an object (vLLM parses them too): text that is none is the client's error
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ValueError(f"a tool call's arguments must be a JSON object: {e}") from None
        except RecursionError:  # deeper than the parser goes
            raise ValueError(TOO_DEEP) from None
        if not isinstance(parsed, dict):
            raise ValueError(f"a tool call's arguments must be a JSON object, got {arguments!r}")
        shallow(parsed)  # the template takes them parsed
        return arguments


class SentToolCall(Strict):
    id: str
    type: Literal["function"]
    function: SentFunctionCall

    @model_validator(mode="after")
    def _utf8(self):
        return _unicode_fields(self)


def _unicode_fields(model: BaseModel) -> BaseModel:
    # every string of it goes to the template and the tokenizer, which take no lone surrogate
    unicode_text(json.dumps(model.model_dump(), ensure_ascii=False))
    return model


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Optional[Union[str, list[TextPart]]] = Field(None, validate_default=True)
    name: Optional[str] = None
    tool_calls: Optional[list[SentToolCall]] = None  # an assistant's earlier calls
    tool_call_id: Optional[str] = Field(None, validate_default=True)  # a tool message: the call it answers
    # An answer sent back as the client got it (`messages.append(reply.choices[0].message)`) carries these too: the
    # thinking (not shown to the template again, as Qwen3's drops it) and OpenAI's fields this server never fills.
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None
    refusal: Optional[Any] = None
    annotations: Optional[Any] = None
    audio: Optional[Any] = None
    function_call: Optional[Any] = None

    @field_validator("refusal", "annotations", "audio", "function_call")
    @classmethod
    def _only_null(cls, value, info):
        if value is not None:
            raise ValueError(f"{info.field_name} is not supported in a message (only null)")
        return value

    @field_validator("content")
    @classmethod
    def _utf8(cls, content, info):
        if content is None and info.data.get("role") != "assistant":  # an assistant that only called has none
            raise ValueError(f"a {info.data.get('role')} message needs content")
        for text in [] if content is None else [content] if isinstance(content, str) else [p.text for p in content]:
            unicode_text(text)
        return content

    @field_validator("name", "tool_call_id")
    @classmethod
    def _unicode(cls, value):  # the template may write them into the prompt, as it writes content
        return value if value is None else unicode_text(value)

    @field_validator("tool_calls")
    @classmethod
    def _assistant_calls(cls, value, info):
        if value is not None and info.data.get("role") != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        return value

    @field_validator("tool_call_id", mode="after")
    @classmethod
    def _tool_answers_a_call(cls, value, info):
        if (value is None) == (info.data.get("role") == "tool"):
            raise ValueError("a tool message, and only a tool message, has a tool_call_id")
        return value

    def as_template_input(self) -> dict[str, Any]:
        content = self.content or ""
        # text parts joined by newlines, as vLLM (and LLM.chat) join them for templates that take a string
        text = content if isinstance(content, str) else "\n".join(p.text for p in content)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": json.loads(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:  # a participant's name, which some templates write (vLLM passes it on)
            message["name"] = self.name
        return message


class ChatTemplateFields(Strict):
    """vLLM's chat template options (the openai client sends them in extra_body), e.g. Qwen3's
    chat_template_kwargs: {"enable_thinking": false}."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: Optional[list[Tool]] = None  # the template shows them to the model
    chat_template_kwargs: Optional[dict[str, Any]] = None

    @field_validator("continue_final_message")
    @classmethod
    def _not_with_a_generation_prompt(cls, value, info):
        if value and info.data.get("add_generation_prompt"):
            raise ValueError("continue_final_message needs add_generation_prompt: false (it continues the last "
                             "message instead of opening a new one)")
        return value

    @field_validator("chat_template_kwargs")
    @classmethod
    def _agree_with_the_fields(cls, value, info):
        # A client's own template (apply_chat_template's chat_template) would run any Jinja it sends, and its errors
        # are 500s: refused, as vLLM does without --trust-request-chat-template.
        if (value or {}).get("chat_template") is not None:
            raise ValueError("chat_template is not accepted in a request: this server renders the model's own template "
                             "(or the one `adallm serve --chat-template` gave)")
        # the kwargs win over the fields, so they may make a contradiction: the client's mistake (a 400), checked
        # here rather than where template_options() is called, which answered it with a 500
        chat_template_options(info.data.get("add_generation_prompt", True),
                              info.data.get("continue_final_message", False), value)
        # the template may write any of them into the prompt, which the tokenizer takes only as valid Unicode
        unicode_text(json.dumps(shallow(value), ensure_ascii=False))
        return value

    def template_options(self) -> dict:
        options = chat_template_options(self.add_generation_prompt, self.continue_final_message,
                                        self.chat_template_kwargs)
        return {**options, "tools": self.tool_dicts()} if self.tools else options

    def tool_dicts(self) -> list[dict]:
        return [t.model_dump(exclude_none=True) for t in self.tools or ()]


class ChatCompletionRequest(ChatTemplateFields, SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=INT64_MAX)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    # None: "auto" with tools, else "none" (OpenAI's)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = Field(None,
                                                                                              validate_default=True)
    parallel_tool_calls: Optional[bool] = True  # null: the default

    @field_validator("parallel_tool_calls", mode="before")
    @classmethod
    def _null_is_true(cls, value):
        return True if value is None else value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _named_choice(cls, value):
        # a dict can only be a named choice: its own errors, not the union's (which lead with the strings')
        if isinstance(value, dict):
            try:
                return NamedToolChoice.model_validate(value)
            except ValidationError as e:
                err = e.errors()[0]
                raise ValueError(f"a named tool_choice is {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}: "
                                 f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value, info):
        return only_with_true(value, info, "logprobs")

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_the_tools(cls, value, info):
        if "tools" not in info.data:  # the tools were refused: that error is the one to report
            return value
        tools = info.data["tools"] or []
        if value is None:
            return "auto" if tools else "none"
        if value != "none" and not tools:
            raise ValueError(f"tool_choice {_choice_text(value)} needs tools")
        if isinstance(value, NamedToolChoice) and value.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"tool_choice names {value.function.name!r}, which is not among the tools")
        if value == "required":
            forced_schema([t.model_dump() for t in tools], value, True)  # tools that cannot share one schema: a 400
        forced = value == "required" or isinstance(value, NamedToolChoice)
        fmt = info.data.get("response_format")
        if forced and (info.data.get("structured_outputs") is not None or (fmt is not None and fmt.type != "text")):
            raise ValueError(f"tool_choice {_choice_text(value)} sets the answer's grammar: give no response_format "
                             "or structured_outputs with it")
        return value

    def tool_plan(self) -> Optional[ToolCallPlan]:
        """How the answer holds its calls; None: no calls are read out of it (tool_choice "none")."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return ToolCallPlan("named", self.tool_choice.function.name)
        return None if self.tool_choice == "none" else ToolCallPlan(self.tool_choice, parallel=self.parallel_tool_calls)

    @property
    def structure_field(self) -> str:
        return "tools" if self._forced_tool_schema() is not None else super().structure_field

    def _structure(self) -> Optional[dict]:
        forced = self._forced_tool_schema()
        return {"json": forced, "disable_any_whitespace": True} if forced is not None else super()._structure()

    def _forced_tool_schema(self) -> Optional[dict]:
        if self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice):
            choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) else "required"
            return forced_schema(self.tool_dicts(), choice, self.parallel_tool_calls)
        return None

    @property
    def max_tokens_field(self) -> Optional[str]:
        """The field the max_tokens came from: the one an error about it names (max_completion_tokens wins)."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else super().max_tokens_field

    def to_sampling_params(self, model_defaults: Optional[dict] = None) -> SamplingParams:
        if self.max_completion_tokens is not None and self.min_tokens > self.max_completion_tokens:
            # SamplingParams' own message would name max_tokens, which this request did not send
            raise ValueError(f"invalid sampling parameter min_tokens={self.min_tokens}: must be at most "
                             f"max_completion_tokens={self.max_completion_tokens}")
        max_tokens = self.max_completion_tokens or self.max_tokens  # None: up to max_model_len
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens, logprobs, self.prompt_logprobs, model_defaults)


def _choice_text(choice) -> str:
    return f"naming {choice.function.name!r}" if isinstance(choice, NamedToolChoice) else repr(choice)


class TokenizeRequest(ChatTemplateFields):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the model's chat template."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1, validate_default=True)
    add_special_tokens: Optional[bool] = None  # default: True for a prompt, False for messages (the template has them)
    return_token_strs: Optional[bool] = False  # vLLM's type: null asks for the default (no strings)

    @field_validator("prompt")
    @classmethod
    def _utf8(cls, prompt):
        return prompt if prompt is None else unicode_text(prompt)

    @field_validator("messages")
    @classmethod
    def _prompt_or_messages(cls, messages, info):
        if (messages is None) == (info.data.get("prompt") is None):
            raise ValueError("give exactly one of prompt or messages")
        return messages

    @property
    def special_tokens(self) -> bool:
        return self.add_special_tokens if self.add_special_tokens is not None else self.messages is None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(Strict):
    model: Optional[str] = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


# ---- responses ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[Optional[float]] = []  # None for an echoed prompt's first token, as OpenAI's
    top_logprobs: list[Optional[dict[str, float]]] = []
    text_offset: list[int] = []


class PromptLogprob(BaseModel):
    """vLLM's Logprob, as its prompt_logprobs hold them."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# one {token id: PromptLogprob} per prompt token (the first null: nothing predicts it)
PromptLogprobs = list[Optional[dict[int, PromptLogprob]]]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    prompt_logprobs: Optional[PromptLogprobs] = None  # vLLM's, for this choice's prompt


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = []


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]  # None when the answer is only tool calls
    reasoning_content: Optional[str] = None  # with a reasoning parser: the thinking, apart from the answer
    tool_calls: list[ToolCall] = []


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: Optional[PromptLogprobs] = None  # vLLM's


class _NoNulls(BaseModel):
    """Keys without a value are left out, not null: a call's later deltas carry no id, type or name (OpenAI's and
    vLLM's streams leave them out; a strict client may refuse a null)."""

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(_NoNulls):
    name: Optional[str] = None
    arguments: str = ""


class DeltaToolCall(_NoNulls):
    index: int
    id: Optional[str] = None  # id, type and name come with a call's first delta
    type: Optional[Literal["function"]] = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int  # when this server began serving it: the same on every call
    owned_by: str = "adallm"
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Any] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
