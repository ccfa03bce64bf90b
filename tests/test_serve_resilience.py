"""Overload, client disconnect, a killed replica and a dead engine, on real Ray Serve with small limits."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from adallm_core.testing import demo_model_path
from tests.serve_helpers import app_name, llm_stats, serve_apps, wait_until

pytestmark = pytest.mark.slow

# Two running sequences and two queued requests per caller: the 5th concurrent request is over the limit.
LIMITS = dict(max_model_len=2048, max_num_seqs=2, num_gpu_blocks_override=160, max_ongoing_requests=2, max_queued_requests=2)
LONG = 2000  # tokens (seconds even on an idle machine): a request still running while the test acts on it


@pytest.fixture(scope="module")
def server():
    with serve_apps({"/": dict(model=str(demo_model_path()), **LIMITS)}) as url:
        yield url


@pytest.fixture(scope="module")
def served_name(server) -> str:
    return requests.get(f"{server}/v1/models", timeout=30).json()["data"][0]["id"]


def completion(server, served_name, **kw) -> requests.Response:
    body = {"model": served_name, "prompt": "Hello", "max_tokens": 4, "temperature": 0, **kw}
    return requests.post(f"{server}/v1/completions", json=body, timeout=120)


def test_overload_gets_fast_503_and_the_rest_complete(server, served_name):
    async def one(client: openai.AsyncOpenAI, i: int):
        start = time.monotonic()
        try:
            stream = await client.completions.create(
                model=served_name, prompt=f"Story {i}:", max_tokens=48, temperature=0, stream=True
            )
            chunks = [c async for c in stream]
            return "ok", chunks[-1].choices[0].finish_reason, time.monotonic() - start
        except openai.APIStatusError as e:
            return e.status_code, e.body, time.monotonic() - start

    async def burst():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300) as c:
            return await asyncio.gather(*(one(c, i) for i in range(12)))

    results = asyncio.run(burst())
    done = [r for r in results if r[0] == "ok"]
    rejected = [r for r in results if r[0] != "ok"]
    # Room for 4 (2 running, 2 queued), but on a loaded host Serve's router has turned away a request the queue still
    # had room for (1 run in ~6): the running slots, at least, must complete
    assert len(done) >= LIMITS["max_ongoing_requests"], results
    assert all(reason in ("length", "stop") for _, reason, _ in done), results
    assert rejected, f"12 concurrent requests against room for 4 were all admitted: {results}"
    for status, body, seconds in rejected:
        assert status in (503, 429) and body["code"] == "overloaded", (status, body)
        assert seconds < 5.0, f"a rejection took {seconds:.1f}s: it must not wait for capacity"
    assert completion(server, served_name).status_code == 200  # the app stays up


def test_client_disconnect_aborts_and_frees_kv_blocks(server, served_name):
    idle = llm_stats("/")
    assert idle["num_requests"] == 0
    body = {"model": served_name, "prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0, "stream": True}
    with requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=120) as reply:
        assert reply.status_code == 200
        # Held in a name: a line iterator that is dropped closes the connection (urllib3), which is the disconnect.
        lines = reply.iter_lines()
        for line in lines:  # the first chunk goes out at once; the engine runs ahead of a slow reader
            if line.startswith(b"data: {"):
                assert json.loads(line[6:])["choices"][0]["finish_reason"] is None
                break
        running = llm_stats("/")
        assert running["num_requests"] == 1 and running["kv_blocks_used"] > idle["kv_blocks_used"]
    # The connection is closed: the request must be aborted and its blocks freed, long before LONG tokens.
    after = wait_until(lambda: (s := llm_stats("/"))["num_requests"] == 0 and s, timeout_s=20)
    assert after["kv_blocks_used"] == idle["kv_blocks_used"] and after["kv_usage"] == idle["kv_usage"]
    assert after["aborted_requests"] == idle["aborted_requests"] + 1


def test_client_that_stops_waiting_for_a_whole_answer_aborts_and_frees_kv_blocks(server, served_name):
    """The same without streaming: a client that times out closes the connection before any byte came back."""
    idle = llm_stats("/")
    body = {"model": served_name, "prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0}
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{server}/v1/completions", json=body, timeout=(10, 2))
    after = wait_until(lambda: (s := llm_stats("/"))["num_requests"] == 0 and s, timeout_s=20)
    assert after["kv_blocks_used"] == idle["kv_blocks_used"]
    assert after["aborted_requests"] == idle["aborted_requests"] + 1


def test_client_that_leaves_while_its_request_is_admitted_aborts_it(server, served_name):
    """A client gone while its request is still being admitted (tokenizing, compiling a grammar: seconds for a deep
    schema): what the admission let in is aborted once it is in, not run to max_tokens for nobody."""
    import ray

    def slow_admission(replica_actor, delay_s: float) -> None:  # runs inside the replica actor
        llm_server = replica_actor._replica_impl._user_callable_wrapper.user_callable  # Serve internals (Ray 2.60)
        engine = llm_server.engine
        engine.__dict__.pop("add_requests", None)  # the class's own method again
        if delay_s:
            add_requests = engine.add_requests

            def slow(*args, **kwargs):
                time.sleep(delay_s)
                return add_requests(*args, **kwargs)

            engine.add_requests = slow

    (replica,) = _replica_actors(app_name("/"))
    actor = ray.get_actor(*replica)
    idle = llm_stats("/")
    ray.get(actor.__ray_call__.remote(slow_admission, 3.0))
    try:
        body = {"model": served_name, "prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0}
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(f"{server}/v1/completions", json=body, timeout=(10, 1))
        # counted once its engine request is aborted and its blocks are free; before, it ran all LONG tokens
        after = wait_until(lambda: (s := llm_stats("/"))["aborted_requests"] > idle["aborted_requests"] and s,
                           timeout_s=30)
    finally:
        ray.get(actor.__ray_call__.remote(slow_admission, 0))
    assert after["aborted_requests"] == idle["aborted_requests"] + 1
    assert after["num_requests"] == 0 and after["kv_blocks_used"] == idle["kv_blocks_used"]


def _stream_until(stop: threading.Event, started: threading.Event, server, served_name) -> None:
    """A long stream that holds one of the replica's request slots until `stop` (closing it aborts the request)."""
    body = {"model": served_name, "prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0, "stream": True}
    with requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=120) as reply:
        for line in reply.iter_lines():
            started.set()
            if stop.is_set():
                return


def test_health_is_ok_while_every_request_slot_is_busy(server, served_name):
    """/health asked the engine through the replicas' request queue: with every slot generating it waited behind
    them (seconds, past a load balancer's probe timeout), and with the queue full too it was refused and answered
    503 "engine unhealthy", so a busy server was taken out of service."""
    def health() -> tuple[int, float]:
        start = time.monotonic()
        return requests.get(f"{server}/health", timeout=60).status_code, time.monotonic() - start

    stop, started = threading.Event(), [threading.Event() for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        try:
            runs = [pool.submit(_stream_until, stop, started[i], server, served_name) for i in range(2)]
            assert all(e.wait(60) for e in started[:2])  # max_ongoing_requests=2: both slots generate
            slots_full = health()
            runs += [pool.submit(_stream_until, stop, started[i], server, served_name) for i in (2, 3)]
            time.sleep(1)  # the two more wait in the queue (max_queued_requests=2), which is full now
            queue_full = health()
        finally:
            stop.set()
        for run in runs:
            run.result()
    assert slots_full[0] == 200 and slots_full[1] < 5, slots_full
    assert queue_full[0] == 200 and queue_full[1] < 5, queue_full
    wait_until(lambda: llm_stats("/")["num_requests"] == 0, timeout_s=60)


def test_models_with_the_queue_full_is_an_openai_error(server, served_name):
    """/v1/models asks the engine its max_model_len (and sampling defaults) once: with the queue full, the answer is
    OpenAI's 503, which clients retry (it was Serve's plain-text 503)."""
    import ray

    def forget_engine_info(replica_actor) -> None:  # runs inside the ingress replica: as a fresh one
        replica_actor._replica_impl._user_callable_wrapper.user_callable._model_info = None

    (ingress,) = {(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{app_name('/')}#OpenAiIngress#")}
    stop, started = threading.Event(), [threading.Event() for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        try:
            runs = [pool.submit(_stream_until, stop, started[i], server, served_name) for i in range(2)]
            assert all(e.wait(60) for e in started[:2])
            runs += [pool.submit(_stream_until, stop, started[i], server, served_name) for i in (2, 3)]
            time.sleep(1)  # two generate, two wait in the full queue
            # after the generations, which fetched the engine's info for their sampling defaults
            ray.get(ray.get_actor(*ingress).__ray_call__.remote(forget_engine_info))
            models = requests.get(f"{server}/v1/models", timeout=60)
        finally:
            stop.set()
        for run in runs:
            run.result()
    assert models.status_code == 503 and models.json()["error"]["code"] == "overloaded", models.text
    wait_until(lambda: llm_stats("/")["num_requests"] == 0, timeout_s=60)
    assert requests.get(f"{server}/v1/models", timeout=60).json()["data"][0]["max_model_len"] == LIMITS["max_model_len"]


def test_a_long_prompt_being_tokenized_leaves_the_replica_responsive(server, served_name):
    """Megabytes of prompt take seconds to tokenize (~0.8 s a MB): on the replica's event loop that stalled its other
    streams and its health check, which Serve fails after 30 s and then restarts the replica for one request."""
    import ray

    def slow_tokenizer(replica_actor, delay_s: float) -> None:  # runs inside the replica actor
        tokenizer = replica_actor._replica_impl._user_callable_wrapper.user_callable.engine.tokenizer
        tokenizer.__dict__.pop("encode", None)  # the class's own method again
        if delay_s:
            encode = tokenizer.encode

            def slow(text, *args, **kwargs):
                if text.startswith("SLOW"):
                    time.sleep(delay_s)
                return encode(text, *args, **kwargs)

            tokenizer.encode = slow

    (replica,) = _replica_actors(app_name("/"))
    actor = ray.get_actor(*replica)
    ray.get(actor.__ray_call__.remote(slow_tokenizer, 4.0))
    try:
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(completion, server, served_name, prompt="SLOW to tokenize")
            time.sleep(1)  # it is being tokenized
            start = time.monotonic()
            stats = llm_stats("/")  # a call into the replica, as Serve's health check is
            waited = time.monotonic() - start
            assert slow.result().status_code == 200
    finally:
        ray.get(actor.__ray_call__.remote(slow_tokenizer, 0))
    assert stats["num_requests"] == 0 and waited < 1.5, waited  # was: ~3 s, until the prompt was tokenized


def _replica_actors(app: str) -> set[tuple[str, str]]:
    import ray

    # Serve names each replica actor "SERVE_REPLICA::<app>#<deployment>#<replica id>".
    actors = ray.util.list_named_actors(all_namespaces=True)
    return {(a["name"], a["namespace"]) for a in actors if a["name"].startswith(f"SERVE_REPLICA::{app}#LLMServer#")}


def test_killed_replica_is_replaced(server, served_name):
    import ray

    (old,) = _replica_actors(app_name("/"))
    ray.kill(ray.get_actor(*old), no_restart=True)
    wait_until(lambda: _replica_actors(app_name("/")) - {old}, timeout_s=180, interval_s=1)
    reply = wait_until(lambda: (r := completion(server, served_name)).status_code == 200 and r, timeout_s=180, interval_s=1)
    assert reply.json()["usage"]["completion_tokens"] >= 1


def test_request_whose_replica_is_killed_is_answered_by_the_replacement(server, served_name):
    """Nothing reached the client when its replica died: the ingress sends the request again, and the replica Serve
    starts in its place answers it (before, the client got a 500)."""
    import ray

    (old,) = _replica_actors(app_name("/"))
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(completion, server, served_name, max_tokens=300)
        wait_until(lambda: llm_stats("/")["num_requests"] == 1, timeout_s=60, interval_s=0.05)
        ray.kill(ray.get_actor(*old), no_restart=True)
        reply = pending.result(timeout=300)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] >= 1
    assert _replica_actors(app_name("/")) - {old}


def test_stream_whose_replica_is_killed_ends_with_an_error_event(server, served_name):
    import ray

    (old,) = _replica_actors(app_name("/"))
    body = {"model": served_name, "prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0, "stream": True}
    with requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=120) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        for line in lines:  # the first chunk: the request runs on `old`
            if line.startswith(b"data: {"):
                break
        ray.kill(ray.get_actor(*old), no_restart=True)
        rest = [line[6:] for line in lines if line.startswith(b"data: ")]
    errors = [json.loads(x)["error"] for x in rest if x.startswith(b'{"error"')]
    assert errors and errors[0]["code"] == "replica_lost", rest[-3:]
    assert rest[-1] == b"[DONE]"
    wait_until(lambda: _replica_actors(app_name("/")) - {old}, timeout_s=180, interval_s=1)
    assert wait_until(lambda: completion(server, served_name).status_code == 200, timeout_s=180, interval_s=1)


def test_engine_dying_in_a_replica_turns_health_503_and_serve_replaces_it(server, served_name):
    import ray

    def make_the_next_step_fail(replica_actor) -> None:  # runs inside the replica actor
        llm_server = replica_actor._replica_impl._user_callable_wrapper.user_callable  # Serve internals (Ray 2.60)

        def step():
            raise RuntimeError("injected engine fault")

        llm_server.engine.engine.step = step

    (old,) = _replica_actors(app_name("/"))
    ray.get(ray.get_actor(*old).__ray_call__.remote(make_the_next_step_fail))
    failed = completion(server, served_name)  # its first step raises: the engine loop dies
    assert failed.status_code == 500 and "injected engine fault" in failed.json()["error"]["message"], failed.text
    health = requests.get(f"{server}/health", timeout=30)
    assert health.status_code == 503 and health.json()["error"]["code"] == "unhealthy", health.text
    # Serve's own health check (every 5 s) calls check_health, which raises: the replica is replaced.
    wait_until(lambda: _replica_actors(app_name("/")) - {old}, timeout_s=180, interval_s=1)
    reply = wait_until(lambda: (r := completion(server, served_name)).status_code == 200 and r, timeout_s=180, interval_s=1)
    assert reply.json()["usage"]["completion_tokens"] >= 1
    assert requests.get(f"{server}/health", timeout=30).json() == {"status": "ok"}


def test_dead_engine_fails_the_health_check():
    """Serve replaces a replica whose check_health raises; a dead engine must make it raise, and refuse work."""
    from adallm_core.async_engine import EngineDeadError
    from adallm_core.sampling_params import SamplingParams
    from deployments.llm_server import GenerateRequest, LLMServer, RequestError

    server = LLMServer.func_or_class(dict(model=str(demo_model_path()), device="cpu", **{
        k: v for k, v in LIMITS.items() if k not in ("max_ongoing_requests", "max_queued_requests")}))

    async def scenario():
        await server.check_health()  # alive: no error
        server.engine.shutdown()
        with pytest.raises(EngineDeadError):
            await server.check_health()
        request = GenerateRequest("r1", SamplingParams(max_tokens=4), prompts=["Hello"])
        return [item async for item in server.generate(request)]

    (refusal,) = asyncio.run(scenario())
    assert isinstance(refusal, RequestError) and refusal.status == 503
