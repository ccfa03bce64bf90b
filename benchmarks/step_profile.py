"""Where a decode step's time goes: the engine's whole step against its CUDA graph replay alone (the difference is
host time the GPU waits for), the kernels of one eager step by CUDA time, and the host's hottest Python calls.
--replay-trace adds the kernels of one graph replay by their share of its span: with programmatic dependent launch
kernels start before their predecessor ends, so their own durations overlap and no longer add up to the step.

    python -m benchmarks.step_profile --shape qwen3-8b --batch 1,16 [--replay-trace]

RANDOM weights of the real shapes (built on the GPU, nothing downloaded): only time means anything.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from collections import defaultdict

import torch

from benchmarks.decode import build_engine, reachable, run_batch


def bucket_graph(runner, batch: int):
    """The decode CUDA graph that served `batch` sequences (the engine's own choice of bucket and context bound)."""
    graphs = runner.graphs
    return graphs.graphs[graphs.most_replayed(batch)]


def replay_ms(runner, batch: int, reps: int = 50) -> float:
    graph = bucket_graph(runner, batch)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def kernel_table(runner, batch: int, top: int = 14) -> list[tuple[str, float, int]]:
    """CUDA time per kernel name over one eager decode step (the same code the graph captured)."""
    from torch.profiler import ProfilerActivity, profile

    graphs = runner.graphs
    bucket, bound = graphs.most_replayed(batch)
    with torch.inference_mode():
        graphs._forward(bucket, bound)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graphs._forward(bucket, bound)
            torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if us > 0:
            rows.append((evt.key[:60], us / 1e3, evt.count))
    rows.sort(key=lambda r: -r[1])
    return rows[:top], sum(r[1] for r in rows)


def span_shares(kernels: list[dict]) -> tuple[list[tuple[str, float, float, int]], float]:
    """Chrome-trace kernel events (ts, dur in us; name; args.grid) -> rows (kernel and grid, share, summed duration,
    count) by share, and the span. A kernel's share is how far it moves the running end of everything before it (an
    idle gap counts to the kernel that ends it), so the shares add up to the span however the kernels overlap."""
    kernels = sorted(kernels, key=lambda e: e["ts"])
    share, dur, count = defaultdict(float), defaultdict(float), defaultdict(int)
    end = kernels[0]["ts"]
    for e in kernels:
        key = f"{e['name'][:48]} grid {tuple(e.get('args', {}).get('grid', ()))}"
        stop = e["ts"] + e["dur"]
        share[key] += max(0.0, stop - end)
        dur[key] += e["dur"]
        count[key] += 1
        end = max(end, stop)
    rows = sorted(((k, share[k], dur[k], count[k]) for k in share), key=lambda r: -r[1])
    return rows, end - kernels[0]["ts"]


def replay_trace(runner, batch: int, path: str) -> tuple[list, float]:
    """One graph replay of the bucket serving `batch` under the profiler (CUPTI sees the graph's kernels)."""
    from torch.profiler import ProfilerActivity, profile

    graph = bucket_graph(runner, batch)
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    prof.export_chrome_trace(path)
    with open(path) as f:
        return span_shares([e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel"])


def host_profile(engine, batch: int, vocab: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    run_batch(engine, batch, 128, 64, vocab)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
    return buf.getvalue()


def _tensors(model) -> list:
    """Every distinct CUDA tensor reachable from the model (weights, scales, the caches its layers are bound to)."""
    found = {}
    for obj in reachable(model):
        if isinstance(obj, torch.Tensor) and obj.is_cuda:
            found[obj.untyped_storage().data_ptr()] = obj
    return list(found.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-8b")
    p.add_argument("--batch", default="1,16")
    p.add_argument("--replay-trace", action="store_true", help="also the kernels of one graph replay by their share "
                   "of its span (the Chrome trace is left in the working directory)")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    engine, runner = build_engine(args.shape, max(batches), 128, 128, enforce_eager=False)
    vocab = runner.model_config.vocab_size
    resident = torch.cuda.memory_allocated() / 1e9
    kv = sum(c.numel() * c.element_size() for c in runner.kv_caches) / 1e9
    # the attention layers hold views of the KV caches: storages are counted once, then the KV taken out
    weights = sum(t.untyped_storage().nbytes() for t in _tensors(runner.model)) / 1e9 - kv
    print(f"memory after start-up: {resident:.2f} GB allocated (weights {weights:.2f}, KV {kv:.2f}, "
          f"peak so far {torch.cuda.max_memory_allocated() / 1e9:.2f})")
    summary = []
    for b in batches:
        run_batch(engine, b, 128, 4, vocab)
        step = run_batch(engine, b, 128, 128, vocab)["decode_ms_step"]
        graph = replay_ms(runner, b)
        kernels, eager_gpu = kernel_table(runner, b)
        print(f"\n== batch {b}: kernels of one eager decode step (CUDA ms, calls) ==")
        for name, ms, n in kernels:
            print(f"{ms:8.3f} {n:5d}  {name}")
        print(f"{eager_gpu:8.3f}        total CUDA time of the eager step")
        if args.replay_trace:
            path = f"replay_trace_{args.shape}_b{b}.json"
            rows, span = replay_trace(runner, b, path)
            print(f"\n== batch {b}: one graph replay, span {span / 1e3:.3f} ms ({path}): share ms, duration ms, "
                  "calls ==")
            for key, share, dur, n in rows[:16]:
                print(f"{share / 1e3:8.3f} {dur / 1e3:8.3f} {n:5d}  {key}")
        t0 = time.perf_counter()
        print(host_profile(engine, b, vocab))
        print(f"(host profile run {time.perf_counter() - t0:.2f} s, slowed by cProfile)")
        summary.append((b, step, graph, eager_gpu))
        print(f"peak so far {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")
    print(f"\n{args.shape} (RANDOM weights), {torch.cuda.get_device_name()}")
    print(f"{'batch':>5} {'engine ms/step':>15} {'graph replay ms':>16} {'host gap ms':>12} {'eager CUDA ms':>14}")
    for b, step, graph, eager in summary:
        print(f"{b:5d} {step:15.3f} {graph:16.3f} {step - graph:12.3f} {eager:14.3f}")
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
