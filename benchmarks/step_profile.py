"""Where a decode step's time goes: the engine's whole step against its CUDA graph replay alone (the difference is
host time the GPU waits for), the kernels of one eager step by CUDA time, and the host's hottest Python calls.

    python -m benchmarks.step_profile --shape qwen3-8b --batch 1,16

RANDOM weights of the real shapes (built on the GPU, nothing downloaded): only time means anything.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import torch

from benchmarks.decode import build_engine, reachable, run_batch


def replay_ms(runner, batch: int, reps: int = 50) -> float:
    graphs = runner.graphs
    bucket = next(b for b in graphs.buckets if b >= batch)
    graph = graphs.graphs[bucket]
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
    with torch.inference_mode():
        graphs._forward(batch)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graphs._forward(batch)
            torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if us > 0:
            rows.append((evt.key[:60], us / 1e3, evt.count))
    rows.sort(key=lambda r: -r[1])
    return rows[:top], sum(r[1] for r in rows)


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
