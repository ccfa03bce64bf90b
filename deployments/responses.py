"""From the LLMServer's ChoiceDeltas to OpenAI bodies: streamed chunks, or one response at the end."""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Optional

from adallm_core.tokenizer import bytes_of_token_text
from deployments.llm_server import ChoiceDelta, TokenLogprob
from deployments.openai_api import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    PromptLogprob,
    PromptLogprobs,
    TokenLogprob as ChatTokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)


@dataclass
class _Choice:
    text: str = ""
    reasoning: str = ""  # chat with a reasoning parser
    tool_calls: list[ToolCall] = field(default_factory=list)  # chat with tools
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text_offsets: list[int] = field(default_factory=list)  # of each logprobs token, in characters of the text
    finish_reason: Optional[str] = None
    _chars: int = 0
    _utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    def add_logprobs(self, logprobs: list[TokenLogprob]) -> None:
        for entry in logprobs:
            self.logprobs.append(entry)
            raw = bytes_of_token_text(entry[0])
            # a token that is only part of a character adds no character until the one that completes it; bytes left
            # waiting that the next token shows are no character's start come before it in the text, as U+FFFD
            waiting = self._utf8.getstate()[0]
            continues = bool(raw) and 0x80 <= raw[0] <= 0xBF
            lost = len(waiting.decode("utf-8", "replace")) if waiting and not continues else 0
            self.text_offsets.append(self._chars + lost)
            self._chars += len(self._utf8.decode(raw))


class ResponseBuilder:
    """Collects one request's deltas; knows whether it serves /v1/completions or /v1/chat/completions."""

    def __init__(self, request_id: str, model: str, chat: bool, top_logprobs: Optional[int], n: int, num_prompts: int):
        self.request_id, self.model, self.chat = request_id, model, chat
        self.top_logprobs = top_logprobs  # None: logprobs not requested
        self.choices = [_Choice() for _ in range(n * num_prompts)]
        self.n = n
        self.prompt_tokens: dict[int, int] = {}  # prompt index -> its length, counted once for n samples
        self.prompt_logprobs: dict[int, list] = {}  # prompt index -> vLLM's prompt_logprobs, when asked for
        self.created = int(time.time())
        self.start = time.perf_counter()
        self.first_token_s: Optional[float] = None

    # ---- bookkeeping -------------------------------------------------------------------------
    def add(self, deltas: list[ChoiceDelta]) -> None:
        if self.first_token_s is None and any(d.num_tokens for d in deltas):
            self.first_token_s = time.perf_counter() - self.start
        for d in deltas:
            c = self.choices[d.index]
            c.text += d.text
            c.reasoning += d.reasoning
            for call in d.tool_calls:
                if call.index == len(c.tool_calls):
                    c.tool_calls.append(ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments="")))
                c.tool_calls[call.index].function.arguments += call.arguments
            c.num_tokens += d.num_tokens
            c.add_logprobs(d.logprobs or ())
            c.finish_reason = d.finish_reason or c.finish_reason
            if d.prompt_logprobs is not None:
                self.prompt_logprobs[d.index // self.n] = d.prompt_logprobs
        self.count_prompts(deltas)

    def count_prompts(self, deltas: list[ChoiceDelta]) -> None:
        """The prompts' lengths, for usage (n choices share one prompt); known before their first token is added."""
        for d in deltas:
            self.prompt_tokens[d.index // self.n] = d.prompt_tokens

    def usage(self) -> Usage:
        prompt = sum(self.prompt_tokens.values())
        completion = sum(c.num_tokens for c in self.choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    # ---- streaming ---------------------------------------------------------------------------
    def role_chunk(self) -> ChatCompletionChunk:
        choices = [ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(len(self.choices))]
        return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model, choices=choices)

    def chunk(self, deltas: list[ChoiceDelta]):
        """The streamed chunk for deltas already passed to add()."""
        if self.chat:
            choices = [
                ChatChunkChoice(
                    index=d.index,
                    delta=DeltaMessage(content=d.text if d.text or not d.tool_calls else None,
                                       reasoning_content=d.reasoning or None, tool_calls=_delta_calls(d)),
                    logprobs=self._chat_logprobs(d.logprobs),
                    finish_reason=d.finish_reason,
                )
                for d in deltas
            ]
            return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model, choices=choices)
        choices = [
            CompletionChoice(
                index=d.index,
                text=d.text,
                logprobs=self._completion_logprobs(d.logprobs, self.choices[d.index].text_offsets[-len(d.logprobs):]
                                                   if d.logprobs else []),
                finish_reason=d.finish_reason,
            )
            for d in deltas
        ]
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=choices)

    def usage_chunk(self):
        kind = ChatCompletionChunk if self.chat else CompletionResponse
        return kind(id=self.request_id, created=self.created, model=self.model, choices=[], usage=self.usage())

    # ---- non-streaming -----------------------------------------------------------------------
    def response(self):
        if self.chat:
            choices = [
                ChatChoice(
                    index=i,
                    # an answer of calls alone has no content (OpenAI's null), not the blank text around them
                    message=AssistantMessage(content=None if c.tool_calls and not c.text.strip() else c.text,
                                             reasoning_content=c.reasoning or None, tool_calls=c.tool_calls),
                    logprobs=self._chat_logprobs(c.logprobs if self.top_logprobs is not None else None),
                    finish_reason=c.finish_reason,
                )
                for i, c in enumerate(self.choices)
            ]
            return ChatCompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                          usage=self.usage(), prompt_logprobs=self._prompt_logprobs(0))
        choices = [
            CompletionChoice(
                index=i,
                text=c.text,
                logprobs=self._completion_logprobs(c.logprobs if self.top_logprobs is not None else None,
                                                   c.text_offsets),
                finish_reason=c.finish_reason,
                prompt_logprobs=self._prompt_logprobs(i // self.n),
            )
            for i, c in enumerate(self.choices)
        ]
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=choices, usage=self.usage())

    # ---- logprobs in each endpoint's format ------------------------------------------------------
    def _prompt_logprobs(self, prompt_index: int) -> Optional[PromptLogprobs]:
        scored = self.prompt_logprobs.get(prompt_index)
        if scored is None:
            return None
        return [None if entry is None else {t: PromptLogprob(logprob=_finite(lp), rank=rank, decoded_token=text)
                                            for t, (lp, rank, text) in entry.items()} for entry in scored]

    def _chat_logprobs(self, logprobs: Optional[list[TokenLogprob]]) -> Optional[ChatLogprobs]:
        if logprobs is None or self.top_logprobs is None:
            return None
        content = [
            ChatTokenLogprob(
                token=tok,
                logprob=_finite(lp),
                bytes=list(bytes_of_token_text(tok)),
                top_logprobs=[TopLogprob(token=t, logprob=_finite(l), bytes=list(bytes_of_token_text(t)))
                              for t, l in top[: self.top_logprobs]],
            )
            for tok, lp, top in logprobs
        ]
        return ChatLogprobs(content=content)

    def _completion_logprobs(self, logprobs: Optional[list[TokenLogprob]],
                             text_offsets: list[int]) -> Optional[CompletionLogprobs]:
        if logprobs is None or self.top_logprobs is None:
            return None
        result = CompletionLogprobs(text_offset=list(text_offsets))
        for tok, lp, top in logprobs:
            result.tokens.append(tok)
            result.token_logprobs.append(_finite(lp))
            # the top `logprobs` tokens and always the sampled one, as OpenAI's completions give (up to logprobs+1);
            # an echoed prompt's first token has none (nothing predicts it)
            result.top_logprobs.append(None if lp is None else {**{t: _finite(l) for t, l in top[: self.top_logprobs]},
                                                                tok: _finite(lp)})
        return result


def _delta_calls(d: ChoiceDelta) -> Optional[list[DeltaToolCall]]:
    calls = [DeltaToolCall(index=c.index, id=c.id, type="function" if c.id else None,
                           function=DeltaFunctionCall(name=c.name, arguments=c.arguments)) for c in d.tool_calls]
    return calls or None


def _finite(logprob: Optional[float]) -> Optional[float]:
    """A token a grammar forbids has logprob -inf (NaN if it forbids them all), which JSON cannot carry: -9999.0, as
    vLLM's server writes it."""
    return logprob if logprob is None or logprob >= -9999.0 else -9999.0
