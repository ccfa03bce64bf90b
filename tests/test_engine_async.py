"""AsyncLLM: background loop, batch admission, streams per output kind, abort, health, shutdown."""
import asyncio
import time

import pytest

from adallm_core.async_engine import AsyncLLM, EngineDeadError
from adallm_core.sampling_params import RequestOutputKind, SamplingParams
from engine_fixtures import PROMPTS, greedy_tokens, make_engine

GREEDY = dict(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def reference():
    return greedy_tokens(make_engine("qwen3"), PROMPTS[:4], max_tokens=8)


@pytest.fixture
def llm():
    engine = AsyncLLM(make_engine("qwen3"))
    yield engine
    engine.shutdown()


class Unencodable(str):
    def encode(self, *args, **kwargs):
        raise RuntimeError("no encoding for this one")


async def collect(stream):
    return [out async for out in stream]


def test_add_requests_admits_a_batch_and_a_bad_item_fails_alone(llm, reference):
    async def main():
        items = [(f"r{i}", p, SamplingParams(**GREEDY)) for i, p in enumerate(PROMPTS[:4])]
        items.insert(2, ("bad", "", SamplingParams(**GREEDY)))
        items.insert(4, ("bad2", {"prompt_token_ids": 7}, SamplingParams(**GREEDY)))  # was a TypeError for all
        items.insert(5, (["r"], PROMPTS[0], SamplingParams(**GREEDY)))  # failed the batch, after queueing r0, r1
        items.insert(6, ("lone", "a\ud800b", SamplingParams(**GREEDY)))  # the tokenizer's TypeError failed them all
        items.insert(7, ("odd", Unencodable("x"), SamplingParams(**GREEDY)))  # any other error fails alone too
        streams = llm.add_requests(items)
        assert isinstance(streams[6], ValueError) and "lone surrogate '\\ud800' at index 1" in str(streams[6])
        assert isinstance(streams[7], RuntimeError) and "no encoding" in str(streams[7])
        assert isinstance(streams[2], ValueError) and "empty" in str(streams[2])
        assert isinstance(streams[5], ValueError) and "request_id must be a string" in str(streams[5])
        assert isinstance(streams[4], ValueError) and "prompt_token_ids must be a list" in str(streams[4])
        good = [s for s in streams if not isinstance(s, Exception)]
        return await asyncio.gather(*(collect(s) for s in good))

    results = asyncio.run(main())
    assert [outs[-1].outputs[0].token_ids for outs in results] == reference
    assert all(outs[-1].finished and not any(o.finished for o in outs[:-1]) for outs in results)
    assert llm.stats()["kv_blocks_used"] == 0


def test_add_requests_from_a_thread_streams_on_the_loop_it_is_given(llm, reference):
    """Servers admit off their event loop (tokenizing, compiling grammars): the loop streams meanwhile."""
    import threading

    async def main():
        loop = asyncio.get_running_loop()
        (first,) = llm.add_requests([("t0", PROMPTS[0], SamplingParams(**GREEDY))])
        gate = threading.Event()

        def admit():  # an admission that takes its time, in a thread
            assert gate.wait(30)
            return llm.add_requests([("t1", PROMPTS[1], SamplingParams(**GREEDY))], loop)

        later = asyncio.create_task(asyncio.to_thread(admit))
        done_first = await collect(first)  # streamed while admit() waits
        gate.set()
        (second,) = await later
        return done_first, await collect(second)

    outs = asyncio.run(main())
    assert [o[-1].outputs[0].token_ids for o in outs] == reference[:2]


@pytest.mark.parametrize("kind", list(RequestOutputKind))
def test_generate_streams_each_output_kind(llm, reference, kind):
    async def main():
        params = SamplingParams(**GREEDY, output_kind=kind)
        return [out async for out in llm.generate(PROMPTS[1], params, request_id=f"k{kind.name}")]

    outs = asyncio.run(main())
    if kind is RequestOutputKind.FINAL_ONLY:
        assert len(outs) == 1
    else:
        assert len(outs) == 8
    if kind is RequestOutputKind.DELTA:
        assert sum((o.outputs[0].token_ids for o in outs), []) == reference[1]
    else:
        assert [len(o.outputs[0].token_ids) for o in outs][-1] == 8
        assert outs[-1].outputs[0].token_ids == reference[1]


def test_abort_ends_the_stream_and_frees_blocks(llm):
    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        gen = llm.generate(PROMPTS[3], params, request_id="long")
        first = await gen.__anext__()
        assert not first.finished and llm.stats()["kv_blocks_used"] > 0
        await llm.abort("long")
        rest = [o async for o in gen]
        return rest

    rest = asyncio.run(main())
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    assert llm.stats()["kv_blocks_used"] == 0 and llm.stats()["num_requests"] == 0



def test_abort_takes_a_list_of_ids_and_a_bad_id_leaves_the_loop_alive(llm):
    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        gens = [llm.generate(PROMPTS[i], params, request_id=f"l{i}") for i in (1, 3)]
        for g in gens:
            await g.__anext__()
        await asyncio.wait_for(llm.abort(["l1", "l3"]), 10)  # as vLLM's; the engine loop died on the list
        with pytest.raises(ValueError, match="request_id must be a string or a list of strings, got 5"):
            await llm.abort(5)
        return [[o async for o in g][-1] for g in gens]

    lasts = asyncio.run(main())
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in lasts)
    llm.check_health()
    assert llm.stats()["kv_blocks_used"] == 0 and llm.stats()["num_requests"] == 0

def test_cancelled_consumer_aborts_its_request(llm):
    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)  # runs to max_model_len
        started = asyncio.Event()

        async def consume():
            async for _ in llm.generate(PROMPTS[5], params, request_id="gone"):
                started.set()

        task = asyncio.ensure_future(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    deadline = time.monotonic() + 10  # the abort is queued by the cancelled generator: picked up between steps
    while llm.stats()["num_requests"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert llm.stats()["num_requests"] == 0 and llm.stats()["kv_blocks_used"] == 0


def test_dead_loop_fails_streams_and_health(llm):
    def broken(steps):
        raise RuntimeError("device lost")

    llm.engine.runner.execute = broken  # a real failure inside the step, as a dying device would give

    async def main():
        with pytest.raises(EngineDeadError, match="device lost"):
            async for _ in llm.generate("Hello", SamplingParams(**GREEDY), request_id="x"):
                pass

    asyncio.run(main())
    with pytest.raises(EngineDeadError):
        llm.check_health()
    # a server's clean-up aborts its requests after the death: that returns (bounded here), never waits forever
    asyncio.run(asyncio.wait_for(llm.abort("x"), timeout=10))



def test_an_abort_taken_by_the_iteration_whose_step_kills_the_loop_still_returns():
    llm = AsyncLLM(make_engine("qwen3", async_scheduling=False))  # the step right after the abort executes
    real, seen = llm.engine.runner.execute, []

    def dies_once_b_is_aborted(*args, **kwargs):
        if "b" in llm.engine.requests:
            seen.append(True)
        elif seen:  # the same loop iteration took b's abort, then stepped
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    llm.engine.runner.execute = dies_once_b_is_aborted

    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        gens = [llm.generate(PROMPTS[i], params, request_id=r) for i, r in ((1, "a"), (3, "b"))]
        for g in gens:
            await g.__anext__()
        await asyncio.wait_for(llm.abort("b"), 10)  # waited forever: the dying loop dropped the abort it took

    try:
        asyncio.run(main())
        with pytest.raises(EngineDeadError, match="device lost"):
            llm.check_health()
    finally:
        llm.shutdown()

def test_shutdown_stops_the_loop_and_ends_open_streams(llm):
    llm.check_health()

    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
        stream = llm.generate(PROMPTS[0], params, request_id="long")
        await stream.__anext__()  # running
        await asyncio.get_running_loop().run_in_executor(None, llm.shutdown)
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(collect(stream), timeout=10)
        await asyncio.wait_for(llm.abort("long"), timeout=10)

    asyncio.run(main())
    with pytest.raises(EngineDeadError, match="shut down"):
        llm.check_health()


def test_a_request_id_in_flight_cannot_be_reused(llm):
    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
        (first,) = llm.add_requests([("dup", PROMPTS[2], params)])
        (again,) = llm.add_requests([("dup", PROMPTS[3], params)])
        await llm.abort("dup")
        return first, again, [o async for o in first]

    first, again, outs = asyncio.run(main())
    assert isinstance(again, ValueError) and "already in use" in str(again)
    assert outs[-1].outputs[0].finish_reason == "abort"


def test_an_abort_left_by_a_closed_stream_misses_a_new_request_with_its_id(llm, reference):
    """A consumer that stops reading after its request finished in the engine (the final output still queued)
    leaves an abort behind; a new request reusing the id, admitted in the same loop iteration, was aborted by it."""
    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        old = llm.generate(PROMPTS[0], params, request_id="same")
        await old.__anext__()  # the first token; the second one ends the request in the engine
        deadline = time.monotonic() + 10
        while llm.stats()["num_requests"] and time.monotonic() < deadline:
            time.sleep(0.01)
        with llm._cond:  # the abort and the admission below reach the loop in one iteration
            await old.aclose()  # its final output was never read: it queues an abort of "same"
            new = llm.generate(PROMPTS[1], SamplingParams(**GREEDY), request_id="same")
            task = asyncio.ensure_future(collect(new))
            await asyncio.sleep(0)  # the generator admits its request
        return await asyncio.wait_for(task, 30)

    outs = asyncio.run(main())
    assert outs[-1].outputs[0].finish_reason == "length"
    assert outs[-1].outputs[0].token_ids == reference[1]



def test_an_abort_whose_event_loop_closed_leaves_the_engine_loop_alive(llm, reference):
    """An abort() whose caller's event loop ended before the engine loop answered it (a timed-out wait, a script's
    asyncio.run that returned) made the engine loop's call_soon_threadsafe raise, which killed the loop."""
    async def abort_without_waiting():
        asyncio.ensure_future(llm.abort("gone"))
        await asyncio.sleep(0)  # queued; asyncio.run then cancels it and closes its loop

    with llm._cond:  # the engine loop takes the abort only once that loop is closed
        asyncio.run(abort_without_waiting())

    async def main():
        return await collect(llm.generate(PROMPTS[1], SamplingParams(**GREEDY), request_id="after"))

    assert asyncio.run(main())[-1].outputs[0].token_ids == reference[1]
    llm.check_health()


class Gated(str):
    """A prompt whose tokenization waits for a gate: an admission still being made when the loop dies."""
    gate = None

    def encode(self, *args, **kwargs):
        assert self.gate.wait(30)
        return str(self).encode(*args, **kwargs)


def test_a_request_made_while_the_loop_dies_fails_instead_of_waiting_forever(llm):
    """add_requests checked the engine's health before making its requests (tokenizing, compiling grammars) and
    then queued them for a loop that might have died meanwhile: nobody ever ended their streams."""
    import threading

    Gated.gate = threading.Event()

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    async def main():
        loop = asyncio.get_running_loop()
        late = asyncio.create_task(asyncio.to_thread(llm.add_requests, [("late", Gated("Hello"), None)], loop))
        await asyncio.sleep(0.2)  # add_requests is past its health check, tokenizing
        llm.engine.runner.execute = broken
        with pytest.raises(EngineDeadError):
            await collect(llm.generate("Hi", SamplingParams(**GREEDY), request_id="dies"))
        Gated.gate.set()
        try:
            results = await late
        except EngineDeadError:
            return "refused"
        if isinstance(results[0], Exception):
            return results[0]
        return await asyncio.wait_for(collect(results[0]), 10)

    result = asyncio.run(main())
    assert result == "refused"
