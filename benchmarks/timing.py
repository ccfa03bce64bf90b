"""GPU timing helpers for the benchmarks: CUDA events, warm-up, median, L2-defeating buffer rotation."""
from __future__ import annotations

import statistics

import torch

COPY_BW_H100 = 3.02e12  # bytes/s, device-to-device copy (read + write), measured: shared/KERNELS.md


def time_rotating(fn, arg_sets: list, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of one fn(*args) call, cycling through arg_sets so consecutive calls miss L2 (50 MB)."""
    for _ in range(warmup):
        for args in arg_sets:
            fn(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for args in arg_sets:
            fn(*args)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3 / len(arg_sets))
    return statistics.median(times)


def time_graph(fn, arg_sets: list, reps: int = 20) -> float:
    """Like time_rotating, but captures one cycle in a CUDA graph so launch gaps of a slow host vanish."""
    for args in arg_sets:
        fn(*args)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in arg_sets:
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in arg_sets:
            fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3 / len(arg_sets))
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth, bytes read + written per second."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_()
    t = time_rotating(lambda: b.copy_(a), [()], reps=10)
    return a.numel() * 2 / t
