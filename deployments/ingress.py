"""OpenAiIngress: the HTTP face (FastAPI through serve.ingress). Validates, then streams from LLMServer."""

import asyncio
import dataclasses
import json
import re
import time
from typing import AsyncIterator, Optional, Union

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from adallm_core.cli import version
from deployments.errors import (
    REPLICA_LOST, SERVE_REJECTIONS, OpenAIError, error_body, install_error_handlers, overloaded, replica_lost,
)
from deployments.llm_server import GenerateRequest, RequestError, in_request_terms
from deployments.metrics import RequestMetrics, install_status_counter
from deployments.openai_api import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    new_id,
)
from deployments.responses import ResponseBuilder

app = FastAPI(
    title="adallm",
    description="OpenAI-compatible API for NVFP4 models on Ray Serve",
    responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)

_metrics: Optional[RequestMetrics] = None


def request_metrics() -> RequestMetrics:
    # Created inside the replica (Serve tags come from its context), once per process.
    global _metrics
    if _metrics is None:
        _metrics = RequestMetrics()
    return _metrics


install_error_handlers(app, lambda route, status: request_metrics().record_status(route, status))
# the generation routes record their status with their tokens (ingress._record); the others' successes here
install_status_counter(app, lambda route, status: request_metrics().record_status(route, status),
                       ("/v1/completions", "/v1/chat/completions"))


def _sse(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


def _error_event(status: int, message: str, code: Optional[str] = None) -> str:
    return f"data: {json.dumps(error_body(status, message, code=code))}\n\n"


# A request whose replica dies before the client got a byte is sent again (Serve's router drops a dead replica once
# it sees the death; a node that just vanished may take a few tries), with backoff: 0.25, 0.5, 1 s.
RETRIES_ON_REPLICA_LOSS = 3


# /health asks the engine through the replicas' request queue, where a busy server's generations come first (or the
# queue is full and refuses it): past this wait, Serve's own health check (every 5 s, never queued) answers. An idle
# replica answers in milliseconds, or near a second right after its engine died.
HEALTH_WAIT_S = 2.0


def _llm_replicas_running() -> bool:
    """Whether Serve's own health checks keep an LLMServer replica of this app running."""
    deployment = serve.status().applications[serve.get_replica_context().app_name].deployments["LLMServer"]
    return any(state == "RUNNING" and count for state, count in deployment.replica_states.items())


def _as_openai_error(error: RequestError) -> OpenAIError:
    return OpenAIError(error.status, error.message, error.param, error.code)


async def _next(outputs: DeploymentResponseGenerator):
    # Module helpers sit above the class: Serve pickles the class when it is decorated.
    try:
        return await outputs.__anext__()
    except StopAsyncIteration:
        return None


@serve.deployment(name="OpenAiIngress")
@serve.ingress(app)
class OpenAiIngress:
    def __init__(self, llm_server: DeploymentHandle, served_model_name: str, reasoning_parser: Optional[str] = None,
                 tool_call_parser: Optional[str] = None, enable_auto_tool_choice: bool = False):
        self.llm = llm_server
        self.stream = llm_server.options(stream=True)
        self.model = served_model_name
        self.created = int(time.time())  # the model card's; one clock read, so list and retrieve agree
        self.reasoning_parser = reasoning_parser
        self.auto_tool_choice = enable_auto_tool_choice and tool_call_parser is not None
        self._model_info: Optional[dict] = None  # the engine's max_model_len and sampling defaults, asked once

    @app.get("/health")
    async def health(self) -> JSONResponse:
        try:
            await asyncio.wait_for(self.llm.check_health.remote(), HEALTH_WAIT_S)
        except (BackPressureError, asyncio.TimeoutError):  # every request slot is busy: busy is not unhealthy
            if not await asyncio.to_thread(_llm_replicas_running):
                raise OpenAIError(503, "engine unhealthy: no LLMServer replica is running", code="unhealthy")
        except Exception as e:
            raise OpenAIError(503, f"engine unhealthy: {type(e).__name__}", code="unhealthy")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        max_model_len = (await self._engine_info())["max_model_len"]
        return ModelList(data=[ModelCard(id=self.model, created=self.created, max_model_len=max_model_len)])

    @app.get("/v1/models/{model:path}", response_model=ModelCard)  # :path: a hub id has a slash
    async def model(self, model: str) -> ModelCard:
        """OpenAI's models.retrieve: the served model's card; any other name is a 404 model_not_found."""
        self._check_model(model)
        return (await self.models()).data[0]

    @app.get("/version")
    async def version(self) -> dict:
        return {"version": version()}  # vLLM's /version

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(self, body: CompletionRequest):
        self._check_model(body.model)
        request = GenerateRequest(new_id("cmpl"), await self._params(body), prompts=body.prompts(),
                                  structure_field=body.structure_field, echo=bool(body.echo),
                                  prompt_only=body.prompt_only, prompt_logprobs=body.prompt_logprobs,
                                  max_tokens_field=body.max_tokens_field)
        return await self._serve("/v1/completions", body, request, lambda: ResponseBuilder(
            request.request_id, self.model, False, body.logprobs, body.n, len(request.prompts)))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(self, body: ChatCompletionRequest):
        self._check_model(body.model)
        tool_plan = body.tool_plan()
        if tool_plan is not None and tool_plan.mode == "auto" and not self.auto_tool_choice:
            raise OpenAIError(400, 'tool_choice "auto" (the default with tools) needs a server started with '
                              "--enable-auto-tool-choice --tool-call-parser hermes; \"none\", \"required\" or a "
                              "named function work without", "tool_choice")
        messages = [m.as_template_input() for m in body.messages]
        request = GenerateRequest(new_id("chatcmpl"), await self._params(body), messages=messages,
                                  structure_field=body.structure_field, template_options=body.template_options(),
                                  reasoning_parser=self.reasoning_parser, tool_plan=tool_plan,
                                  prompt_logprobs=body.prompt_logprobs, max_tokens_field=body.max_tokens_field)
        top = (body.top_logprobs or 0) if body.logprobs else None
        return await self._serve("/v1/chat/completions", body, request,
                                 lambda: ResponseBuilder(request.request_id, self.model, True, top, body.n, 1))

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        """vLLM's: the prompt's (or the templated messages') token ids, and max_model_len."""
        self._check_model(body.model or self.model)
        messages = [m.as_template_input() for m in body.messages] if body.messages is not None else None
        result = await self._call("tokenize", body.prompt, messages, body.special_tokens, body.template_options(),
                                  bool(body.return_token_strs))
        return TokenizeResponse(**result)

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self._check_model(body.model or self.model)
        return DetokenizeResponse(prompt=await self._call("detokenize", body.tokens))

    # ---- shared path ---------------------------------------------------------------------------
    async def _call(self, method: str, *args):
        """One LLMServer method's answer; its RequestError as the OpenAI error it stands for."""
        try:
            result = await getattr(self.llm, method).remote(*args)
        except SERVE_REJECTIONS as e:
            raise overloaded(e) from e
        except REPLICA_LOST as e:
            raise replica_lost(e) from e
        if isinstance(result, RequestError):
            raise _as_openai_error(result)
        return result

    async def _engine_info(self) -> dict:
        if self._model_info is None:
            # through _call: a full queue is OpenAI's 503 "overloaded" (it was Serve's plain-text answer)
            self._model_info = await self._call("model_info")
        return self._model_info

    def _check_model(self, model: str) -> None:
        if model != self.model:
            raise OpenAIError(404, f"model '{model}' does not exist; this server serves '{self.model}'", "model", "model_not_found")

    async def _params(self, body: Union[CompletionRequest, ChatCompletionRequest]):
        """The request's SamplingParams; fields it left out take the model's recommended values, as in vLLM."""
        defaults = (await self._engine_info())["sampling_defaults"]
        try:
            return body.to_sampling_params(defaults)
        except ValueError as e:  # SamplingParams' own checks, beyond the schema's: "invalid sampling parameter x=..."
            named = re.match(r"invalid sampling parameter (\w+)", str(e))
            param = named.group(1) if named else None
            field = body.structure_field
            raise OpenAIError(400, in_request_terms(str(e), field), field if param == "structured_outputs" else param)

    async def _serve(self, route: str, body, request: GenerateRequest, make_builder):
        for attempt in range(RETRIES_ON_REPLICA_LOSS + 1):
            # each try under its own engine id: a replica only presumed lost may still be running the last one
            sent = dataclasses.replace(request, request_id=f"{request.request_id}-{attempt}") if attempt else request
            outputs: DeploymentResponseGenerator = self.stream.generate.remote(sent)
            builder = make_builder()
            try:
                first = await _next(outputs)
                if isinstance(first, RequestError):
                    raise _as_openai_error(first)
                if body.stream:  # from here on the client has bytes: no more retries
                    events = self._events(route, body, builder, first, outputs)
                    return StreamingResponse(events, media_type="text/event-stream")
                deltas = first
                while deltas is not None:
                    if isinstance(deltas, RequestError):
                        raise _as_openai_error(deltas)
                    builder.add(deltas)
                    deltas = await _next(outputs)
            except SERVE_REJECTIONS as e:  # the replicas' queues are full: answer at once
                raise overloaded(e) from e
            except REPLICA_LOST as e:
                if attempt == RETRIES_ON_REPLICA_LOSS:
                    raise replica_lost(e) from e
                await asyncio.sleep(0.25 * 2**attempt)
                continue
            self._record(route, builder)
            return builder.response()

    async def _events(self, route, body, builder, first, outputs) -> AsyncIterator[str]:
        finished = False
        status = 200  # a failure after the 200 went out is still a failure: its error event's status, for the metrics

        def sse(chunk) -> str:
            if body.continuous_usage:  # the usage so far on every chunk
                chunk.usage = builder.usage()
            return _sse(chunk)

        try:
            if builder.chat:  # before any token: with continuous usage, the prompt's alone (vLLM's)
                builder.count_prompts(first)
                yield sse(builder.role_chunk())
            deltas = first
            while deltas is not None:
                if isinstance(deltas, RequestError):  # the engine failed mid-stream
                    status = deltas.status
                    yield _error_event(deltas.status, deltas.message)
                    break
                builder.add(deltas)
                yield sse(builder.chunk(deltas))
                try:
                    deltas = await _next(outputs)
                except REPLICA_LOST as e:  # the client has part of the answer: say why the rest is missing
                    lost = replica_lost(e)
                    status = lost.status
                    yield _error_event(lost.status, lost.message, lost.code)
                    break
            if body.include_usage:
                yield _sse(builder.usage_chunk())
            yield "data: [DONE]\n\n"
            finished = True
            self._record(route, builder, status)
        finally:
            if not finished:  # client went away: stop the replica's generator, which aborts the request
                outputs.cancel()

    def _record(self, route: str, builder: ResponseBuilder, status: int = 200) -> None:
        usage = builder.usage()
        metrics = request_metrics()
        metrics.record_status(route, status)
        total = time.perf_counter() - builder.start
        metrics.record_generation(route, builder.first_token_s, total, usage.prompt_tokens, usage.completion_tokens,
                                  max(c.num_tokens for c in builder.choices))
