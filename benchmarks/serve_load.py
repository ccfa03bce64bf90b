"""Load test of the Serve endpoint, and its overhead over calling the engine directly, in one run.

    python -m benchmarks.serve_load --concurrency 16 --requests-per-client 4 --max-tokens 32

Phase 1 deploys the app on a local Ray and runs N concurrent streaming clients over HTTP (aiohttp, SSE).
Phase 2 runs the same requests against an AsyncLLM in this process, with the same engine options and thread
count as a replica. Both at temperature 0, so both generate the same tokens. Overhead = Serve + HTTP share of
the mean end-to-end latency.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import time
import uuid
from dataclasses import dataclass


@dataclass
class Sample:
    ttft: float  # seconds to the first token
    e2e: float  # seconds to the last one
    tokens: int


async def http_request(session, url: str, model: str, prompt: str, max_tokens: int) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with session.post(f"{url}/v1/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and ttft is None:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return Sample(ttft or 0.0, time.perf_counter() - start, tokens)


async def engine_request(engine, prompt: str, max_tokens: int) -> Sample:
    from adallm_core.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA)
    start = time.perf_counter()
    ttft, tokens = None, 0
    async for out in engine.generate(prompt, params, uuid.uuid4().hex):
        tokens += len(out.outputs[0].token_ids)
        if ttft is None and tokens:
            ttft = time.perf_counter() - start
    return Sample(ttft or 0.0, time.perf_counter() - start, tokens)


async def run_clients(one, prompts: list[list[str]]) -> tuple[list[Sample], float]:
    """One task per client; each sends its prompts one after another. Returns samples and wall seconds."""

    async def client(mine: list[str]) -> list[Sample]:
        return [await one(p) for p in mine]

    start = time.perf_counter()
    per_client = await asyncio.gather(*(client(mine) for mine in prompts))
    return [s for samples in per_client for s in samples], time.perf_counter() - start


def summarize(name: str, samples: list[Sample], wall: float) -> dict:
    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    ttfts = [s.ttft for s in samples]
    tpots = [(s.e2e - s.ttft) / (s.tokens - 1) for s in samples if s.tokens > 1]
    row = {
        "path": name,
        "requests": len(samples),
        "req_per_s": len(samples) / wall,
        "output_tok_per_s": sum(s.tokens for s in samples) / wall,
        "ttft_p50_ms": 1e3 * pct(ttfts, 0.50),
        "ttft_p99_ms": 1e3 * pct(ttfts, 0.99),
        "tpot_mean_ms": 1e3 * statistics.fmean(tpots) if tpots else float("nan"),
        "e2e_mean_ms": 1e3 * statistics.fmean(s.e2e for s in samples),
    }
    return row


def make_prompts(concurrency: int, per_client: int) -> list[list[str]]:
    return [[f"Client {c} asks question {r}: what is the next number after {c * 100 + r}?" for r in range(per_client)]
            for c in range(concurrency)]


async def serve_phase(args, prompts) -> tuple[list[Sample], float]:
    import aiohttp

    limits = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=limits, timeout=aiohttp.ClientTimeout(total=600)) as session:
        async with session.get(f"{args.url}/v1/models") as reply:
            model = (await reply.json())["data"][0]["id"]
        await http_request(session, args.url, model, "warm up", 4)
        return await run_clients(lambda p: http_request(session, args.url, model, p, args.max_tokens), prompts)


async def engine_phase(args, engine_args, prompts) -> tuple[list[Sample], float]:
    from adallm_core.engine import AsyncLLM

    engine = AsyncLLM.from_engine_args(engine_args)
    try:
        await engine_request(engine, "warm up", 4)
        return await run_clients(lambda p: engine_request(engine, p, args.max_tokens), prompts)
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint; default: the built-in tiny demo model")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stream-interval-s", type=float, default=None, help="LLMServer option; default: the app's")
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    from adallm_core.config import EngineArgs
    from deployments.app import build_app

    engine_args = EngineArgs(model=args.model, device=args.device, max_model_len=512, max_num_seqs=args.max_num_seqs,
                             num_gpu_blocks_override=1024)
    prompts = make_prompts(args.concurrency, args.requests_per_client)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args.url = f"http://127.0.0.1:{port}"
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app_args = engine_args.to_dict()
        if args.stream_interval_s is not None:
            app_args["stream_interval_s"] = args.stream_interval_s
        serve.run(build_app(app_args), name="bench", route_prefix="/")
        serve_samples, serve_wall = asyncio.run(serve_phase(args, prompts))
    finally:
        serve.shutdown()
        ray.shutdown()
    # Ray gives a replica with num_cpus=1 one OpenMP thread; the direct engine gets the same.
    torch.set_num_threads(1)
    direct_samples, direct_wall = asyncio.run(engine_phase(args, engine_args, prompts))

    rows = [summarize("serve+http", serve_samples, serve_wall), summarize("engine direct", direct_samples, direct_wall)]
    if sorted(s.tokens for s in serve_samples) != sorted(s.tokens for s in direct_samples):
        print("WARNING: the two paths generated different token counts; latencies are not comparable")
    print(f"{args.concurrency} concurrent streams x {args.requests_per_client} requests, max_tokens={args.max_tokens}, "
          f"device={args.device}, model={args.model or 'built-in demo'}")
    keys = list(rows[0])
    print(" | ".join(f"{k:>15}" for k in keys))
    for row in rows:
        print(" | ".join(f"{v:>15.2f}" if isinstance(v, float) else f"{v:>15}" for v in row.values()))
    serve_e2e, direct_e2e = rows[0]["e2e_mean_ms"], rows[1]["e2e_mean_ms"]
    print(f"Serve + HTTP overhead: {100 * (serve_e2e - direct_e2e) / serve_e2e:.1f}% of mean end-to-end latency "
          f"({serve_e2e - direct_e2e:.1f} ms per request)")


if __name__ == "__main__":
    main()
