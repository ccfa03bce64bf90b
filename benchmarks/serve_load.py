"""Load test of the Serve endpoint, and its overhead over calling the engine directly, in one run.

    python -m benchmarks.serve_load --concurrency 16 --requests-per-client 4 --max-tokens 32

The Serve phase deploys the app on a local Ray (with the environment `adallm serve` gives it) and runs N
concurrent streaming clients over HTTP (aiohttp, SSE). The direct phase, before and after it, runs the same requests
against an AsyncLLM in this process, with the same engine options and thread count as a replica, also streaming
(one delta per engine step). All at temperature 0, so all generate the same tokens; all are timed the same way, in
the client. Overhead = Serve + HTTP share of the mean end-to-end latency (against the mean of the direct runs).

Each phase also reports the CPU milliseconds per request of every process taking part (HTTP proxy, ingress
replica, LLM server replica, this client, Ray's daemons), and the CPU time of processes outside the benchmark
(a quiet machine shows ~0). On a machine with few cores that is where Serve's overhead comes from.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import time
import uuid
from dataclasses import dataclass

import psutil


@dataclass
class Sample:
    ttft: float  # seconds to the first token
    e2e: float  # seconds to the last one
    tokens: int
    messages: int  # stream messages that carried tokens (SSE events, or engine deltas)


async def http_request(session, url: str, model: str, prompt: str, max_tokens: int) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens, messages = None, 0, 0
    async with session.post(f"{url}/v1/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                messages += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return Sample(ttft or 0.0, time.perf_counter() - start, tokens, messages)


async def engine_request(engine, prompt: str, max_tokens: int) -> Sample:
    from adallm_core.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA)
    start = time.perf_counter()
    ttft, tokens, messages = None, 0, 0
    async for out in engine.generate(prompt, params, uuid.uuid4().hex):
        tokens += len(out.outputs[0].token_ids)
        messages += 1
        if ttft is None and tokens:
            ttft = time.perf_counter() - start
    return Sample(ttft or 0.0, time.perf_counter() - start, tokens, messages)


async def run_clients(one, prompts: list[list[str]]) -> tuple[list[Sample], float, dict[str, float]]:
    """One task per client; each sends its prompts one after another. Returns samples, wall seconds, CPU by role."""

    async def client(mine: list[str]) -> list[Sample]:
        return [await one(p) for p in mine]

    meter = CpuMeter()
    start = time.perf_counter()
    per_client = await asyncio.gather(*(client(mine) for mine in prompts))
    wall = time.perf_counter() - start
    return [s for samples in per_client for s in samples], wall, meter.seconds()


class CpuMeter:
    """CPU seconds each process spent since the meter was made, by role: descendants of this process by their
    Ray actor name, everything else as 'outside' (another user's work on the same cores)."""

    ROLES = (("proxy", "ray::ProxyActor"), ("ingress", "OpenAiIngress"), ("llm_server", "LLMServer"))

    def __init__(self) -> None:
        self._start = self._snapshot()

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        me = os.getpid()
        ours = {me, *(c.pid for c in psutil.Process(me).children(recursive=True))}
        result = {}
        for p in psutil.process_iter():
            try:
                times = p.cpu_times()
                result[p.pid] = (self._role(p, me, ours), times.user + times.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return result

    def _role(self, p: psutil.Process, me: int, ours: set[int]) -> str:
        if p.pid not in ours:
            return "outside"
        if p.pid == me:
            return "this process"  # the client; in the engine-direct phase, the client and the engine
        cmd = " ".join(p.cmdline())
        return next((role for role, fragment in self.ROLES if fragment in cmd), "ray_other")

    def seconds(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for pid, (role, cpu) in self._snapshot().items():
            totals[role] = totals.get(role, 0.0) + cpu - self._start.get(pid, (role, 0.0))[1]
        return totals


def summarize(name: str, samples: list[Sample], wall: float, cpu: dict[str, float]) -> dict:
    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    ttfts = [s.ttft for s in samples]
    tpots = [(s.e2e - s.ttft) / (s.tokens - 1) for s in samples if s.tokens > 1]
    return {
        "path": name,
        "requests": len(samples),
        "req_per_s": len(samples) / wall,
        "output_tok_per_s": sum(s.tokens for s in samples) / wall,
        "ttft_p50_ms": 1e3 * pct(ttfts, 0.50),
        "ttft_p99_ms": 1e3 * pct(ttfts, 0.99),
        "tpot_mean_ms": 1e3 * statistics.fmean(tpots) if tpots else float("nan"),
        "e2e_mean_ms": 1e3 * statistics.fmean(s.e2e for s in samples),
        "msgs_per_req": statistics.fmean(s.messages for s in samples),
        "cpu_ms_per_req": {role: 1e3 * seconds / len(samples) for role, seconds in sorted(cpu.items())},
    }


def make_prompts(concurrency: int, per_client: int) -> list[list[str]]:
    return [[f"Client {c} asks question {r}: what is the next number after {c * 100 + r}?" for r in range(per_client)]
            for c in range(concurrency)]


async def serve_phase(args, prompts):
    import aiohttp

    limits = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=limits, timeout=aiohttp.ClientTimeout(total=600)) as session:
        async with session.get(f"{args.url}/v1/models") as reply:
            model = (await reply.json())["data"][0]["id"]
        await http_request(session, args.url, model, "warm up", 4)
        return await run_clients(lambda p: http_request(session, args.url, model, p, args.max_tokens), prompts)


async def engine_phase(args, engine_args, prompts):
    from adallm_core.engine import AsyncLLM

    engine = AsyncLLM.from_engine_args(engine_args)
    try:
        await engine_request(engine, "warm up", 4)
        return await run_clients(lambda p: engine_request(engine, p, args.max_tokens), prompts)
    finally:
        engine.shutdown()


def print_rows(rows: list[dict]) -> None:
    keys = [k for k in rows[0] if k != "cpu_ms_per_req"]
    print(" | ".join(f"{k:>15}" for k in keys))
    for row in rows:
        print(" | ".join(f"{row[k]:>15.2f}" if isinstance(row[k], float) else f"{row[k]:>15}" for k in keys))
    print("CPU ms per request, by process (this run's processes; 'outside' = other work on the machine):")
    for row in rows:
        parts = ", ".join(f"{role} {ms:.1f}" for role, ms in row["cpu_ms_per_req"].items())
        ours = sum(ms for role, ms in row["cpu_ms_per_req"].items() if role != "outside")
        # CPU time of this run over what the cores could give in its wall time: ~100% means CPU-bound.
        busy = ours * row["req_per_s"] / 1e3 / psutil.cpu_count()
        print(f"  {row['path']:>13}: {parts}; total of this run {ours:.1f} ({100 * busy:.0f}% of the "
              f"{psutil.cpu_count()} cores while it ran)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint; default: the built-in tiny demo model")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stream-interval-s", type=float, default=None, help="LLMServer option; default: the app's")
    parser.add_argument("--ray-serve-defaults", action="store_true",
                        help="Ray Serve's default environment instead of the app's throughput-optimized one")
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    from adallm_core.config import EngineArgs
    from deployments.app import build_app, set_serve_environment

    engine_args = EngineArgs(model=args.model, device=args.device, max_model_len=512, max_num_seqs=args.max_num_seqs,
                             num_gpu_blocks_override=1024)
    prompts = make_prompts(args.concurrency, args.requests_per_client)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args.url = f"http://127.0.0.1:{port}"
    # Ray gives a replica with num_cpus=1 one OpenMP thread; the direct engine gets the same. It runs before and
    # after the Serve phase: on a shared machine the speed drifts, and the mean of the two is the fairer reference.
    torch.set_num_threads(1)
    direct = [asyncio.run(engine_phase(args, engine_args, prompts))]
    if not args.ray_serve_defaults:
        set_serve_environment()  # as `adallm serve` does, before Ray starts: its proxy and controller read it
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app_args = engine_args.to_dict()
        if args.stream_interval_s is not None:
            app_args["stream_interval_s"] = args.stream_interval_s
        app_args["throughput_optimized"] = not args.ray_serve_defaults
        serve.run(build_app(app_args), name="bench", route_prefix="/")
        time.sleep(2)  # let the deployment's start-up work settle before the meter starts
        serve_samples, serve_wall, serve_cpu = asyncio.run(serve_phase(args, prompts))
    finally:
        serve.shutdown()
        ray.shutdown()
    direct.append(asyncio.run(engine_phase(args, engine_args, prompts)))

    rows = [summarize("serve+http", serve_samples, serve_wall, serve_cpu),
            *(summarize(f"direct {when}", *run) for when, run in zip(("before", "after"), direct))]
    if any(sorted(s.tokens for s in serve_samples) != sorted(s.tokens for s in run[0]) for run in direct):
        print("WARNING: the two paths generated different token counts; latencies are not comparable")
    print(f"{args.concurrency} concurrent streams x {args.requests_per_client} requests, max_tokens={args.max_tokens}, "
          f"device={args.device}, model={args.model or 'built-in demo'}, {psutil.cpu_count()} CPUs, "
          f"{'Ray Serve defaults' if args.ray_serve_defaults else 'throughput-optimized Serve'}")
    print_rows(rows)
    serve_e2e, direct_e2e = rows[0]["e2e_mean_ms"], (rows[1]["e2e_mean_ms"] + rows[2]["e2e_mean_ms"]) / 2
    print(f"Serve + HTTP overhead: {100 * (serve_e2e - direct_e2e) / serve_e2e:.1f}% of mean end-to-end latency "
          f"({serve_e2e - direct_e2e:.1f} ms per request)")


if __name__ == "__main__":
    main()
