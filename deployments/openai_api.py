"""OpenAI request and response bodies (pydantic). Unknown fields are rejected by name, never ignored."""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adallm_core.sampling_params import RequestOutputKind, SamplingParams
from adallm_core.tokenizer import chat_template_options, unicode_text  # here too: the 400 then names the field

INT64_MAX = 2**63 - 1
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class Strict(BaseModel):
    # extra="forbid": a field this server does not implement is a 400 that names it.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


MAX_STOP_STRINGS = 16
NULL_MEANS_DEFAULT = ("temperature", "top_p", "top_k", "min_p", "n", "presence_penalty", "frequency_penalty", "stream",
                      "repetition_penalty", "min_tokens", "ignore_eos", "include_stop_str_in_output")


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

    def as_dict(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True)


class SamplingFields(Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: Optional[int] = Field(None, ge=1, le=INT64_MAX)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1, le=INT64_MAX)
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
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
    repetition_penalty: float = Field(1.0, gt=0.0, le=INT64_MAX, allow_inf_nan=False)
    min_tokens: int = Field(0, ge=0, le=INT64_MAX)
    stop_token_ids: Optional[list[TokenId]] = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputs] = None

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

    def sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int],
                        prompt_logprobs: Optional[int] = None) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            stop=self.stop,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
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


class CompletionRequest(SamplingFields):
    # A string, a list of strings, a list of token ids, or a list of lists of token ids.
    prompt: Union[str, list[str], list[TokenId], list[list[TokenId]]]
    max_tokens: Optional[int] = Field(16, ge=0, le=INT64_MAX)  # 0: with echo, the prompt scored, nothing generated
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: Optional[bool] = False  # each choice starts with the prompt (with logprobs, and the prompt's logprobs)

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

    def to_sampling_params(self) -> SamplingParams:
        if self.prompt_only and not self.echo:
            raise ValueError("invalid sampling parameter max_tokens=0: must be >= 1, or 0 with echo: true (the "
                             "prompt alone, scored with logprobs)")
        if self.prompt_only and self.min_tokens > 0:
            # SamplingParams' own message would name max_tokens=1 (the token generated and dropped), not what was sent
            raise ValueError(f"invalid sampling parameter min_tokens={self.min_tokens}: must be at most max_tokens=0")
        max_tokens = 1 if self.prompt_only else self.max_tokens
        return self.sampling_params(max_tokens, self.logprobs, self.logprobs if self.echo else None)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    @field_validator("content")
    @classmethod
    def _utf8(cls, content):
        for text in [content] if isinstance(content, str) else [p.text for p in content]:
            unicode_text(text)
        return content

    def as_template_input(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatTemplateFields(Strict):
    """vLLM's chat template options (the openai client sends them in extra_body), e.g. Qwen3's
    chat_template_kwargs: {"enable_thinking": false}."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
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
            raise ValueError("chat_template is not accepted in a request: this server renders the model's own template")
        # the kwargs win over the fields, so they may make a contradiction: the client's mistake (a 400), checked
        # here rather than where template_options() is called, which answered it with a 500
        chat_template_options(info.data.get("add_generation_prompt", True),
                              info.data.get("continue_final_message", False), value)
        return value

    def template_options(self) -> dict:
        return chat_template_options(self.add_generation_prompt, self.continue_final_message,
                                     self.chat_template_kwargs)


class ChatCompletionRequest(ChatTemplateFields, SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=INT64_MAX)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value, info):
        return only_with_true(value, info, "logprobs")

    def to_sampling_params(self) -> SamplingParams:
        if self.max_completion_tokens is not None and self.min_tokens > self.max_completion_tokens:
            # SamplingParams' own message would name max_tokens, which this request did not send
            raise ValueError(f"invalid sampling parameter min_tokens={self.min_tokens}: must be at most "
                             f"max_completion_tokens={self.max_completion_tokens}")
        max_tokens = self.max_completion_tokens or self.max_tokens  # None: up to max_model_len
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens, logprobs)


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


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


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
    content: str
    reasoning_content: Optional[str] = None  # with a reasoning parser: the thinking, apart from the answer


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None


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
    created: int = Field(default_factory=lambda: int(time.time()))
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
