"""A tensor-parallel worker (rank >= 1): builds the ModelRunner for its shard, then replays what rank 0 does.

Each step rank 0 broadcasts one (method, args) message on the CPU group; every rank then calls the same
ModelRunner method, so the collectives inside the forward pass line up. Input checks (ValueError) run before any
collective and fail the same way on every rank, so a bad step costs an error on rank 0 and nothing here; any
other error may be this rank's alone and ends the worker.
"""
from __future__ import annotations

import logging
import signal
import threading

from adallm_core.distributed.memory import model_weight_bytes
from adallm_core.distributed.parallel_state import DEFAULT_TIMEOUT_S, destroy_tensor_parallel, init_tensor_parallel, rank_device

logger = logging.getLogger(__name__)

COMMANDS = ("allocate_kv_cache", "free_kv_cache", "execute", "execute_scored")
WEIGHT_BYTES = "weight_bytes"  # every rank answers with its model's resident weight bytes (all-gather)
SHUTDOWN = "shutdown"


def worker_main(rank: int, world_size: int, init_method: str, engine_args: dict, model_path: str,
                timeout_s: float = DEFAULT_TIMEOUT_S, num_threads: int | None = None, checkpoint_factory=None) -> None:
    import torch

    from adallm_core.config import EngineArgs
    from adallm_core.runner import ModelRunner

    if num_threads:
        torch.set_num_threads(num_threads)
    if threading.current_thread() is threading.main_thread():
        # a terminal's Ctrl-C reaches every process of its group; rank 0 stops the workers between two steps
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    args = EngineArgs.from_dict(engine_args)
    device = rank_device(args.device, rank, world_size, args.distributed_executor_backend)
    group = init_tensor_parallel(rank, world_size, init_method, device, timeout_s)
    runner = None
    try:
        checkpoint = (checkpoint_factory or open_checkpoint)(model_path, group.device)
        runner = ModelRunner(args, checkpoint, group.device, parallel=group)
        serve_forever(runner, group)
    finally:
        if runner is not None:
            runner.release_graphs()  # before the group they captured collectives of
        destroy_tensor_parallel()


def open_checkpoint(model_path: str, device):
    """The default checkpoint_factory: the folder's safetensors (benchmarks pass random weights of real shapes)."""
    from adallm_core.checkpoint.read import Checkpoint

    return Checkpoint(model_path)


def serve_forever(runner, group) -> None:
    while True:
        method, payload = group.broadcast_object()
        if method == SHUTDOWN:
            return
        if method == WEIGHT_BYTES:
            group.all_gather_object(model_weight_bytes(runner))
            continue
        if method not in COMMANDS:
            raise RuntimeError(f"tensor-parallel worker {group.rank}: unknown command {method!r}")
        # An input check (ValueError) fails before any collective, on every rank: rank 0 raised it to its caller.
        # Anything else (an OOM on this GPU alone, say) ends this worker: its group closes, so rank 0's collective
        # fails now instead of waiting for this rank until the timeout.
        try:
            getattr(runner, method)(*payload)
        except ValueError as e:
            logger.debug("rank %d: %s failed like rank 0: %s", group.rank, method, e)
