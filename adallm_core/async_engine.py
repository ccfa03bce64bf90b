"""AsyncLLM: the LLMEngine's step loop on a background thread, with one async stream per request.

    asyncio callers ── add_requests / abort ──▶ pending lists ──▶ engine thread: admit, abort, step()
          ▲                  (validated and tokenized by the caller)            │
          └──── RequestStream (asyncio.Queue) ◀── loop.call_soon_threadsafe ────┘

Only the engine thread touches the LLMEngine, so a caller never waits for a step to end: admissions and
aborts are picked up between two steps.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import AsyncIterator, Optional, Union

from adallm_core.config import EngineArgs
from adallm_core.engine import LLMEngine, request_ids_of
from adallm_core.outputs import RequestOutput
from adallm_core.sampling_params import SamplingParams
from adallm_core.sequence import Request

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; every request in flight fails with this, and so do new ones."""


class RequestStream:
    """Async iterator over one request's outputs; ends after the finished one."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, request: Optional[Request] = None):
        self.request_id = request_id
        self.request = request  # the engine's request: an abort names it, not its id, which a later one may reuse
        self.finished = False
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: Union[RequestOutput, BaseException]) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            pass

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item


class AsyncLLM:
    """Engine for servers: submit requests from asyncio code, stream their outputs, abort them by id."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.engine_args: EngineArgs = engine.engine_args
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size
        self.sampling_defaults = engine.sampling_defaults
        self.kernel_backend = engine.kernel_backend
        self._cond = threading.Condition()  # guards everything below
        self._streams: dict[str, RequestStream] = {}
        self._pending: list[Request] = []
        self._pending_aborts: list[tuple[Optional[Request], Optional[asyncio.Future]]] = []
        self._stats = engine.stats()
        self._error: Optional[BaseException] = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run_loop, name="adallm-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "AsyncLLM":
        return cls(LLMEngine.from_engine_args(engine_args))

    # --- requests ---------------------------------------------------------------------------------
    def add_requests(self, items: list[tuple[str, Union[str, list[int]], Optional[SamplingParams]]],
                     loop: Optional[asyncio.AbstractEventLoop] = None) -> list[Union[RequestStream, Exception]]:
        """Admit many requests in one go (they join the same next step). A bad item gets its ValueError (any other
        error its making raised, too): the others are admitted all the same. Called off the event loop (making a
        request tokenizes, and compiles a grammar), it takes the loop its streams are read on."""
        self.check_health()
        loop = loop or asyncio.get_running_loop()
        results: list = []
        for request_id, prompt, params in items:
            try:
                results.append(self.engine.make_request(request_id, prompt, params))
            except Exception as e:
                results.append(e)
        with self._cond:
            if self._error is not None or self._stopping:  # the loop ended while these were made: none would run
                self.check_health()
            for i, req in enumerate(results):
                if isinstance(req, Exception):
                    continue
                if req.request_id in self._streams:
                    results[i] = ValueError(f"request_id {req.request_id!r} is already in use")
                    continue
                results[i] = self._streams[req.request_id] = RequestStream(req.request_id, loop, req)
                self._pending.append(req)
            self._cond.notify()
        return results

    async def generate(self, prompt: Union[str, list[int]], sampling_params: Optional[SamplingParams],
                       request_id: str) -> AsyncIterator[RequestOutput]:
        (stream,) = self.add_requests([(request_id, prompt, sampling_params)])
        if isinstance(stream, Exception):
            raise stream
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:  # the caller went away (disconnect, cancel): free its blocks now
                self._queue_abort(stream.request, None)

    async def abort(self, request_id: Union[str, list[str]]) -> None:
        """Abort a request, or a list of them; returns once their blocks are free (at the latest after the step in
        flight). A bad id is refused here: in the engine loop it would end the loop."""
        loop = asyncio.get_running_loop()
        done = [(rid, loop.create_future()) for rid in request_ids_of(request_id)]
        with self._cond:  # the requests that hold these ids now (None: none does; the abort just waits a step)
            requests = [stream.request if (stream := self._streams.get(rid)) else None for rid, _ in done]
        for req, (_, future) in zip(requests, done):
            self._queue_abort(req, future)
        await asyncio.gather(*(future for _, future in done))

    def _queue_abort(self, request: Optional[Request], done: Optional[asyncio.Future]) -> None:
        with self._cond:
            if self._error is None and not self._stopping:
                self._pending_aborts.append((request, done))
                self._cond.notify()
                return
        if done is not None:  # the loop has ended and failed every stream: nothing holds blocks any more
            _set_done(done)

    # --- the loop (the only thread that touches the engine) ---------------------------------------
    def _run_loop(self) -> None:
        aborts: list = []
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._pending or self._pending_aborts
                               or self.engine.has_unfinished_requests()):
                        self._cond.wait()
                    if self._stopping:
                        break
                    admit, self._pending = self._pending, []
                    aborts, self._pending_aborts = self._pending_aborts, []
                for req in admit:
                    self.engine.admit(req)
                outputs = self._abort(aborts)
                if self.engine.has_unfinished_requests():
                    outputs += self.engine.step()
                self._deliver(outputs, aborts)
        except BaseException as e:  # noqa: BLE001 - everything that kills the loop must reach the callers
            logger.exception("engine loop died")
            with self._cond:
                self._error = e
                self._pending_aborts[:0] = aborts  # taken by the iteration that died: their callers still wait
            self._end_streams(EngineDeadError(f"engine loop died: {e!r}"))
            return
        self._end_streams(EngineDeadError("engine is shut down"))

    def _abort(self, aborts) -> list[RequestOutput]:
        """Abort each request that is still in the engine, itself: an abort left by a stream whose request ended
        (final output unread) must not hit a later request that took the same id."""
        return [self.engine.abort_request(req.request_id) for req, _ in aborts
                if req is not None and self.engine.requests.get(req.request_id) is req]

    def _end_streams(self, error: EngineDeadError) -> None:
        """The loop has ended: every open stream fails with `error`, and every waiting abort returns."""
        with self._cond:
            streams, self._streams = list(self._streams.values()), {}
            aborts, self._pending_aborts = self._pending_aborts, []
            self._pending = []
        for stream in streams:
            stream.put(error)
        self._deliver([], aborts)

    def _deliver(self, outputs: list[RequestOutput], aborts) -> None:
        with self._cond:
            self._stats = self.engine.stats()
            deliveries = []
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    deliveries.append((stream, out))
                    if out.finished:
                        del self._streams[out.request_id]
        for stream, out in deliveries:
            stream.put(out)
        for _, done in aborts:
            if done is not None:
                _set_done_threadsafe(done)

    def check_health(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"engine loop died: {self._error!r}") from self._error
        if self._stopping or not self._thread.is_alive():
            raise EngineDeadError("engine is shut down")

    def stats(self) -> dict:
        """The engine's stats after the last step, plus requests not yet admitted."""
        with self._cond:
            return {**self._stats, "num_waiting": self._stats["num_waiting"] + len(self._pending)}

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.engine.shutdown()


def _set_done_threadsafe(future: asyncio.Future) -> None:
    """Called from the engine thread."""
    try:
        future.get_loop().call_soon_threadsafe(_set_done, future)
    except RuntimeError:  # the caller's event loop is closed: nobody waits for this abort any more
        pass


def _set_done(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
