"""How the ranks 1..N-1 of a tensor-parallel group start. Rank 0 is the engine's own process.

"mp": local processes (torch.multiprocessing, spawn). "ray": Ray actors inside the caller's placement group,
registered by deployments/ray_tp.py (adallm_core imports no Ray). A launcher starts worker_main(rank, ...) in
each worker, can tell which workers died, and stops them all. checkpoint_factory(model_path, device) -> a
Checkpoint-like object (picklable; None: the folder's safetensors).
"""
from __future__ import annotations

import logging
from typing import Callable, Protocol

logger = logging.getLogger(__name__)


class WorkerLauncher(Protocol):
    def start(self, world_size: int, init_method: str, engine_args: dict, model_path: str,
              checkpoint_factory=None) -> None: ...

    def dead_workers(self) -> list[str]: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...


_LAUNCHERS: dict[str, Callable[[], WorkerLauncher]] = {}


def register_launcher(name: str, factory: Callable[[], WorkerLauncher]) -> None:
    _LAUNCHERS[name] = factory


def get_launcher(name: str) -> WorkerLauncher:
    if name not in _LAUNCHERS:
        hint = " (import deployments.ray_tp in the Ray process first)" if name == "ray" else ""
        raise ValueError(f"distributed_executor_backend {name!r} is not available{hint}; "
                         f"registered: {sorted(_LAUNCHERS)}")
    return _LAUNCHERS[name]()


class MultiprocessingLauncher:
    """Ranks 1..N-1 as spawned daemon processes of this one (they die with it)."""

    def __init__(self):
        self.procs = []

    def start(self, world_size: int, init_method: str, engine_args: dict, model_path: str,
              checkpoint_factory=None) -> None:
        import torch
        import torch.multiprocessing as mp

        from adallm_core.distributed.worker import worker_main

        ctx = mp.get_context("spawn")
        for rank in range(1, world_size):
            # same CPU thread count as this process (tests pin 1 thread per process on a shared machine)
            p = ctx.Process(target=worker_main, args=(rank, world_size, init_method, engine_args, model_path),
                            kwargs={"num_threads": torch.get_num_threads(), "checkpoint_factory": checkpoint_factory}, name=f"adallm-tp-rank{rank}", daemon=True)
            p.start()
            self.procs.append(p)

    def dead_workers(self) -> list[str]:
        return [f"{p.name} (exit code {p.exitcode})" for p in self.procs if not p.is_alive()]

    def shutdown(self, timeout: float = 10.0) -> None:
        for p in self.procs:
            p.join(timeout)
        for p in self.procs:
            if p.is_alive():
                logger.warning("%s did not stop in %.0fs: terminating", p.name, timeout)
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs = []


register_launcher("mp", MultiprocessingLauncher)
