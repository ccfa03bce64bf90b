"""LLMServer: the Serve replica that owns one AsyncLLM.

Arrivals are admitted together: every request goes through `_admit`, a `@serve.batch` method that hands
all requests arriving within `batch_wait_timeout_s` to `AsyncLLM.add_requests` in one call. The engine's
continuous batching runs across admissions, so a request never waits for an earlier one to finish.
Each request then streams its own deltas back to the ingress; a cancelled stream (client gone) aborts
its engine requests, which frees their KV blocks at once.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Annotated, AsyncIterator, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from adallm_core.config import EngineArgs
from adallm_core.outputs import RequestOutput
from adallm_core.sampling_params import ContextLengthError, SamplingParams
from deployments.echo import Echo
from deployments.reasoning import END_THINK, MESSAGE_START, THINK, ThinkSplitter
from deployments.metrics import EngineMetrics
from deployments.tool_calls import ToolCallDelta, ToolCallPlan, ToolCallReader

logger = logging.getLogger("ray.serve")

Prompt = Union[str, list[int]]
USER_CONFIG_KEYS = ("max_batch_size", "batch_wait_timeout_s", "stream_interval_s")
DEFAULT_STREAM_INTERVAL_S = 0.1  # at most ~10 messages a second per request; the tokens between are merged
# One token's logprobs: (token text, logprob, [(top token text, logprob), ...]); an echoed prompt's first token has
# no logprob (None) and no top list
TokenLogprob = tuple[str, Optional[float], list[tuple[str, float]]]


# The user_config values' bounds, for the app's options (deployments/app.py) and for live changes alike.
BatchSize = Annotated[int, Field(ge=1)]
Seconds = Annotated[float, Field(ge=0)]


class UserConfig(BaseModel):
    """LLMServer's user_config (USER_CONFIG_KEYS), changeable live."""

    model_config = ConfigDict(extra="forbid")
    max_batch_size: Optional[BatchSize] = None
    batch_wait_timeout_s: Optional[Seconds] = None
    stream_interval_s: Optional[Seconds] = None


@dataclass
class GenerateRequest:
    request_id: str
    params: SamplingParams
    prompts: Optional[list[Prompt]] = None  # /v1/completions
    messages: Optional[list[dict]] = None  # /v1/chat/completions: rendered by the chat template
    echo: bool = False  # /v1/completions: each choice starts with its prompt (deployments/echo.py)
    prompt_only: bool = False  # with echo: the prompt alone, what is generated is dropped (max_tokens 0)
    structure_field: str = "structured_outputs"  # or response_format: the field a grammar error names
    template_options: Optional[dict] = None  # chat: apply_chat_template's keyword arguments (chat_template_options)
    reasoning_parser: Optional[str] = None  # chat: split the thinking from the answer (deployments/reasoning.py)
    tool_plan: Optional[ToolCallPlan] = None  # chat: read tool calls out of the answer (deployments/tool_calls.py)
    prompt_logprobs: Optional[int] = None  # vLLM's prompt_logprobs field: N, each prompt token's logprob, rank, top N
    # or chat's max_completion_tokens: the field a length error names; None: the request sent none (max_tokens is
    # then the model's recommended one, which the engine caps at what the prompt leaves, as vLLM does)
    max_tokens_field: Optional[str] = "max_tokens"


@dataclass
class ChoiceDelta:
    """What one choice produced since the last chunk. index = prompt index * n + sample index."""

    index: int
    prompt_tokens: int
    text: str
    num_tokens: int
    logprobs: Optional[list[TokenLogprob]]
    finish_reason: Optional[str]
    reasoning: str = ""  # chat with a reasoning parser: the thinking, split from `text` (deployments/reasoning.py)
    tool_calls: list[ToolCallDelta] = field(default_factory=list)  # chat with tools: calls read out of `text`
    # vLLM's prompt_logprobs of this choice's prompt, once: per token None or {id: (logprob, rank, token text)}
    prompt_logprobs: Optional[list[Optional[dict[int, tuple[float, int, str]]]]] = None


@dataclass
class RequestError:
    """Yielded instead of output when a request is refused; the ingress turns it into an HTTP error."""

    message: str
    status: int = 400
    param: Optional[str] = None
    code: Optional[str] = None  # OpenAI's error code (e.g. context_length_exceeded)


async def _pump(prompt_index: int, stream, queue: asyncio.Queue) -> None:
    """Moves one engine stream into the request's shared queue; None marks its end."""
    try:
        async for out in stream:
            queue.put_nowait((prompt_index, out))
        queue.put_nowait((prompt_index, None))
    except asyncio.CancelledError:
        raise
    except Exception as e:  # the engine failed this request: report it, don't hang the client
        queue.put_nowait((prompt_index, e))


async def _gather_until(queue: asyncio.Queue, deadline: float) -> list:
    """The next item, then whatever else arrives before `deadline` (loop time), stopping when a stream ends.

    Tokens that arrive within one stream interval travel as one message: per-message cost (pickling, the hop to
    the ingress, an SSE event) is what Serve adds over the engine, so fewer messages keep the overhead small.
    The first token after a pause and the last one of a request go out at once."""
    items = [await queue.get()]
    loop = asyncio.get_running_loop()
    while not _ends(items[-1][1]):
        if not queue.empty():
            items.append(queue.get_nowait())
            continue
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            items.append(await asyncio.wait_for(queue.get(), remaining))
        except asyncio.TimeoutError:
            break
    return items


def _ends(out) -> bool:
    return out is None or isinstance(out, Exception) or out.finished


def _merge(deltas: list[ChoiceDelta]) -> list[ChoiceDelta]:
    """One delta per choice: outputs coalesced from several engine steps are joined in order."""
    merged: dict[int, ChoiceDelta] = {}
    for d in deltas:
        m = merged.get(d.index)
        if m is None:
            merged[d.index] = d
            continue
        m.text += d.text
        m.reasoning += d.reasoning
        for call in d.tool_calls:  # a call's pieces join into one delta
            if m.tool_calls and m.tool_calls[-1].index == call.index:
                m.tool_calls[-1].arguments += call.arguments
            else:
                m.tool_calls.append(call)
        m.prompt_logprobs = m.prompt_logprobs or d.prompt_logprobs
        m.num_tokens += d.num_tokens
        if d.logprobs is not None:
            m.logprobs = (m.logprobs or []) + d.logprobs
        m.finish_reason = d.finish_reason or m.finish_reason
    return list(merged.values())


def _answer_params(params: SamplingParams, prompt_tail: Optional[str]) -> SamplingParams:
    """With a reasoning parser (a prompt tail was read), a grammar constrains the answer, not the thinking (vLLM's):
    it waits for </think> unless the prompt closed the thinking already (Qwen3's enable_thinking false)."""
    structure = params.structured_outputs
    if prompt_tail is None or structure is None or prompt_tail.rfind(END_THINK) > prompt_tail.rfind(THINK):
        return params
    return dataclasses.replace(params, structured_outputs=dataclasses.replace(structure, start_after=END_THINK))


def _code_of(error: Exception) -> Optional[str]:
    """OpenAI's code for a prompt (or prompt + max_tokens) past the context window, which clients match on."""
    return "context_length_exceeded" if isinstance(error, ContextLengthError) else None


def in_request_terms(message: str, structure_field: str) -> str:
    """An engine message about structured_outputs, in the words of the field the client sent (response_format, or
    tools for a forced tool call, which the server turns into structured_outputs)."""
    if structure_field == "structured_outputs":
        return message
    return re.sub(r"(sampling parameter )?structured_outputs(\.\w+)?", structure_field, message)


def _param_named_in(message: str) -> Optional[str]:
    fields = ("chat_template_kwargs", "max_completion_tokens", "max_tokens", "messages", "prompt")
    return next((p for p in fields if p in message), None)


@serve.deployment(name="LLMServer", health_check_period_s=5, health_check_timeout_s=30)
class LLMServer:
    def __init__(self, engine_args: dict):
        import deployments.ray_tp  # noqa: F401  registers the "ray" tensor-parallel launcher
        from adallm_core.engine import AsyncLLM  # torch and the model load in the replica only

        self.engine = AsyncLLM.from_engine_args(EngineArgs.from_dict(engine_args))
        self.counters = {"admission_batches": 0, "admitted_requests": 0, "largest_admission": 0, "aborted_requests": 0}
        self.metrics = EngineMetrics()
        self._metrics_task: Optional[asyncio.Task] = None  # started on the replica's event loop, first request
        self.stream_interval_s = DEFAULT_STREAM_INTERVAL_S

    def reconfigure(self, user_config: dict) -> None:
        """Serve user_config (USER_CONFIG_KEYS); changes apply without a restart."""
        try:
            config = UserConfig(**user_config)
        except ValidationError as e:  # names each bad key; unknown keys too
            raise ValueError(f"invalid LLMServer user_config (known keys: {USER_CONFIG_KEYS}): {e}") from None
        if config.stream_interval_s is not None:
            self.stream_interval_s = config.stream_interval_s
        if config.max_batch_size is not None:
            self._admit.set_max_batch_size(config.max_batch_size)
        if config.batch_wait_timeout_s is not None:
            self._admit.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _admit(self, items: list[tuple[str, Prompt, SamplingParams]]) -> list:
        self.counters["admission_batches"] += 1
        self.counters["admitted_requests"] += len(items)
        self.counters["largest_admission"] = max(self.counters["largest_admission"], len(items))
        # a stream per item, or the error that refused it; in a thread: tokenizing and compiling a grammar (seconds
        # for a deeply nested schema) would stall every stream of this replica and its health check
        return await asyncio.to_thread(self.engine.add_requests, items, asyncio.get_running_loop())

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Union[list[ChoiceDelta], RequestError]]:
        """Yields lists of ChoiceDelta (all that is ready), or one RequestError and stops."""
        if self._metrics_task is None:
            self._metrics_task = asyncio.create_task(self._report_engine_stats())
        try:
            # in a thread: megabytes of prompt take seconds to tokenize, which on this loop would stall every stream
            # of the replica and its health check (Serve restarts a replica whose check takes 30 s)
            prompts = await asyncio.to_thread(self._prompts, request)
        except ValueError as e:
            yield RequestError(str(e), param=_param_named_in(str(e)), code=_code_of(e))
            return
        ids = [f"{request.request_id}-{i}" for i in range(len(prompts))]
        # with a reasoning parser, the prompt's last think tag says where a chat answer starts (read once)
        tail = self._prompt_tail(prompts[0]) if request.reasoning_parser and request.messages is not None else None
        params = _answer_params(request.params, tail)
        admission = asyncio.gather(*(self._admit((rid, p, params)) for rid, p in zip(ids, prompts)))
        try:
            # shielded: a caller gone during admission (seconds with a grammar to compile) leaves it running
            admitted = await asyncio.shield(admission)
        except asyncio.CancelledError:  # what got in would run to max_tokens for nobody: abort it once it is in
            await self._abort_admitted(admission, ids)
            raise
        except Exception as e:  # the engine is dead: check_health fails too, and Serve replaces this replica
            yield RequestError(f"engine unavailable: {e}", status=503)
            return
        refused = [r for r in admitted if isinstance(r, Exception)]
        if refused:
            await self._abort([rid for rid, r in zip(ids, admitted) if not isinstance(r, Exception)])
            if not isinstance(refused[0], ValueError):  # not the request's fault: a 500 that says what failed
                yield RequestError(f"the request could not be admitted: {type(refused[0]).__name__}: {refused[0]}",
                                   status=500)
                return
            message = str(refused[0])
            prompt_param = "messages" if request.messages is not None else "prompt"
            param = ("logit_bias" if message.startswith("logit_bias") else
                     request.structure_field if "structured_outputs" in message else prompt_param)
            yield RequestError(in_request_terms(message, request.structure_field), param=param,
                               code=_code_of(refused[0]))
            return
        echo = self._echo(request, prompts) if request.echo else None
        thinking = collections.defaultdict(lambda: ThinkSplitter(tail)) if tail is not None else None  # per choice
        tools = collections.defaultdict(request.tool_plan.reader) if request.tool_plan is not None else None
        scored: dict[int, list] = {}  # prompt index -> its prompt logprobs, until a delta of that prompt carries them
        queue: asyncio.Queue = asyncio.Queue()
        pumps = [asyncio.create_task(_pump(i, s, queue)) for i, s in enumerate(admitted)]
        running = set(range(len(prompts)))
        loop, last_yield = asyncio.get_running_loop(), 0.0
        try:
            while running:
                items = await _gather_until(queue, last_yield + self.stream_interval_s)
                deltas = []
                for prompt_index, out in items:
                    if out is None:
                        running.discard(prompt_index)
                    elif isinstance(out, Exception):
                        yield RequestError(f"engine error: {out}", status=500)
                        return
                    else:
                        new = self._deltas(prompt_index, out, request.params.n, echo, thinking, tools)
                        if request.prompt_logprobs is not None and out.prompt_logprobs is not None:
                            scored[prompt_index] = self._ranked_prompt_logprobs(out, request.prompt_logprobs)
                        if new and prompt_index in scored:
                            new[0].prompt_logprobs = scored.pop(prompt_index)
                        deltas.extend(new)
                if deltas:
                    yield _merge(deltas)
                    last_yield = loop.time()
        finally:
            for task in pumps:
                task.cancel()
            if running:  # the caller went away (client disconnect): free the blocks now
                self.counters["aborted_requests"] += 1
                await self._abort([ids[i] for i in running])

    async def _abort_admitted(self, admission: asyncio.Future, ids: list[str]) -> None:
        try:
            admitted = await admission
        except Exception:  # the engine is dead: it holds no blocks
            return
        await self._abort([rid for rid, r in zip(ids, admitted) if not isinstance(r, Exception)])
        self.counters["aborted_requests"] += 1

    async def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            await self.engine.abort(rid)

    def _prompts(self, request: GenerateRequest) -> list[Prompt]:
        """Token ids of each prompt; a prompt plus max_tokens over max_model_len is refused, as vLLM does."""
        tokenizer = self.engine.tokenizer
        if request.messages is not None:
            # As LLM.chat does: the template already wrote bos, so no special tokens are added again.
            prompts = [tokenizer.encode_chat(request.messages, **(request.template_options or {}))]
        else:  # tokenized as the engine would, to know each prompt's length before admission
            prompts = [tokenizer.encode(p) if isinstance(p, str) else p for p in request.prompts or []]
        limit, max_tokens = self.engine.max_model_len, request.params.max_tokens
        for ids in prompts:
            # A prompt of max_model_len tokens or more is the engine's error (it names the prompt); max_tokens
            # None means "up to the limit", which the engine applies, as it caps one the request did not send.
            sent = max_tokens is not None and request.max_tokens_field is not None
            if sent and len(ids) < limit and len(ids) + max_tokens > limit:
                raise ContextLengthError.of(limit, f"and the prompt has {len(ids)} tokens: {request.max_tokens_field}="
                                            f"{max_tokens} is too large, at most {limit - len(ids)} tokens can be "
                                            "generated")
        return prompts

    def _echo(self, request: GenerateRequest, prompts: list[list[int]]) -> Echo:
        # a text prompt echoes as given; token ids as they decode (vLLM's)
        decode = self.engine.tokenizer.decode
        texts = [p if isinstance(p, str) else decode(ids, skip_special_tokens=False)
                 for p, ids in zip(request.prompts, prompts)]
        return Echo(texts, with_logprobs=request.params.logprobs is not None, prompt_only=request.prompt_only)

    def _prompt_tail(self, ids: list[int]) -> str:
        # The prompt's last think tag says where the answer starts. It is most often in the last few tokens (the
        # generation prompt), but a continued message (continue_final_message) may have opened <think> long before
        # its end: the window grows until it holds a tag, or the whole prompt.
        # Only that last message (or the generation prompt) counts: a tag in an earlier one is text a user wrote
        # ("put your reasoning in <think> tags"), which opened no thinking.
        size = 16
        while True:
            prompt_text = self.engine.tokenizer.decode(ids[-size:], skip_special_tokens=False)
            if size >= len(ids) or any(tag in prompt_text for tag in (THINK, END_THINK, MESSAGE_START)):
                return prompt_text[max(prompt_text.rfind(MESSAGE_START), 0):]
            size *= 16

    def _deltas(self, prompt_index: int, out: RequestOutput, n: int, echo: Optional[Echo] = None,
                thinking: Optional[dict[int, ThinkSplitter]] = None,
                tools: Optional[dict[int, ToolCallReader]] = None) -> list[ChoiceDelta]:
        deltas = self._choice_deltas(prompt_index, out, n)
        if echo is not None:
            if out.prompt_logprobs is not None:
                echo.record(prompt_index, self._prompt_logprobs(out.prompt_token_ids, out.prompt_logprobs))
            for d in deltas:
                echo.prefix(prompt_index, d)
        for d in deltas if thinking is not None else ():
            d.reasoning, d.text = thinking[d.index].feed(d.text, final=d.finish_reason is not None)
        for d in deltas if tools is not None else ():
            reader = tools[d.index]
            d.text, d.tool_calls = reader.feed(d.text, final=d.finish_reason is not None)
            if d.finish_reason == "stop" and reader.called and reader.finish_reason:
                d.finish_reason = reader.finish_reason
        return deltas

    def _choice_deltas(self, prompt_index: int, out: RequestOutput, n: int) -> list[ChoiceDelta]:
        return [
            ChoiceDelta(
                index=prompt_index * n + c.index,
                prompt_tokens=len(out.prompt_token_ids),
                text=c.text,
                num_tokens=len(c.token_ids),
                logprobs=self._logprobs(c.token_ids, c.logprobs) if c.logprobs is not None else None,
                finish_reason=c.finish_reason,
            )
            for c in out.outputs
        ]

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]]) -> list[TokenLogprob]:
        text = self.engine.tokenizer.token_text
        result = []
        for tid, top in zip(token_ids, logprobs):
            ranked = sorted(top.items(), key=lambda kv: -kv[1])
            result.append((text(tid), top[tid], [(text(t), lp) for t, lp in ranked]))
        return result

    def _ranked_prompt_logprobs(self, out: RequestOutput, top: int) -> list:
        """vLLM's prompt_logprobs: the prompt token with its rank (the engine's), and the `top` likeliest, ranked by
        their place (the engine may have scored more: echo's logprobs ask for their own count)."""
        text = self.engine.tokenizer.token_text
        result: list = [None]
        for tid, entry, rank in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:], out.prompt_token_ranks[1:]):
            ranked = {tid: (entry[tid], rank, text(tid))}
            # the entry lists the prompt token first, then the top tokens in order without it (sampler.logprob_entry)
            for place, t in enumerate((t for t in entry if t != tid), start=1):
                place += place >= rank  # the prompt token's own place comes first
                if place <= top:
                    ranked[t] = (entry[t], place, text(t))
            result.append(ranked)
        return result

    def _prompt_logprobs(self, token_ids: list[int], scored: list) -> list[TokenLogprob]:
        first = (self.engine.tokenizer.token_text(token_ids[0]), None, [])
        return [first] + self._logprobs(token_ids[1:], scored[1:])

    async def tokenize(self, prompt: Optional[str], messages: Optional[list[dict]], add_special_tokens: bool,
                       template_options: dict, return_token_strs: bool) -> Union[dict, RequestError]:
        """vLLM's /tokenize: the ids the engine would see for this prompt (or these messages, templated)."""
        tokenizer = self.engine.tokenizer
        try:
            text = prompt if messages is None else tokenizer.apply_chat_template(messages, **template_options)
        except ValueError as e:
            return RequestError(str(e), param="messages")
        ids = await asyncio.to_thread(tokenizer.encode, text, add_special_tokens)  # in a thread, as generate's
        return {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids,
                "token_strs": tokenizer.hf.convert_ids_to_tokens(ids) if return_token_strs else None}

    async def detokenize(self, tokens: list[int]) -> Union[str, RequestError]:
        vocab = self.engine.vocab_size
        bad = next((t for t in tokens if t >= vocab), None)
        if bad is not None:
            return RequestError(f"tokens: {bad} is not a token id in [0, {vocab})", param="tokens")
        return self.engine.tokenizer.decode(tokens, skip_special_tokens=False)

    async def model_info(self) -> dict:
        return {"max_model_len": self.engine.max_model_len, "sampling_defaults": self.engine.sampling_defaults}

    async def stats(self) -> dict:
        """Engine stats plus how @serve.batch grouped arrivals (tests and operators read this)."""
        return {**self.engine.stats(), **self.counters}

    async def check_health(self) -> None:
        # Raises when the engine loop died; Serve then replaces this replica.
        self.engine.check_health()

    async def _report_engine_stats(self) -> None:
        while True:
            try:
                self.metrics.record_engine_stats(self.engine.stats())
            except Exception:  # a dead engine is reported by check_health, not here
                logger.debug("engine stats unavailable", exc_info=True)
            await asyncio.sleep(1.0)

    def __del__(self) -> None:
        task = getattr(self, "_metrics_task", None)
        if task is not None:
            task.cancel()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
