"""TensorParallelRunner: rank 0 of a tensor-parallel group, with the ModelRunner interface the engine uses.

The engine (scheduler, sampler, detokenizer) lives in rank 0's process only. Each call that touches the model
(allocate_kv_cache, free_kv_cache, execute) is broadcast once to the workers as one (method, args) message, then
run here too:

    rank 0:  engine.step -> schedule -> broadcast(("execute", steps)) -> runner.execute -> sample
    rank k:                             broadcast() --------------------> runner.execute (logits dropped)

Every rank computes the full logits (the lm_head all-gather), rank 0 samples from its copy.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import weakref
from typing import Optional, Sequence

import torch

from adallm_core.distributed.launcher import WorkerLauncher, get_launcher
from adallm_core.distributed.parallel_state import (
    DEFAULT_TIMEOUT_S, create_rendezvous, destroy_tensor_parallel, init_tensor_parallel, rank_device,
    wait_for_workers,
)
from adallm_core.distributed.memory import model_weight_bytes
from adallm_core.distributed.sharding import check_shardable
from adallm_core.distributed.worker import SHUTDOWN, WEIGHT_BYTES, open_checkpoint

logger = logging.getLogger(__name__)
STUCK_WORKER_WAIT_S = 1.0  # after a failed call: how long a worker may take to exit before it is terminated


class TensorParallelRunner:
    """Starts ranks 1..N-1 through a launcher, joins the group as rank 0 and drives every step."""

    accepts_device_input_ids = False  # every rank needs the step's ids from the host: no async scheduling

    def __init__(self, engine_args, model_path, launcher: Optional[WorkerLauncher] = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, checkpoint_factory=None):
        from adallm_core.model_config import ModelConfig
        from adallm_core.runner import ModelRunner

        world = engine_args.tensor_parallel_size
        device = rank_device(engine_args.device, 0, world, engine_args.distributed_executor_backend)
        checkpoint = (checkpoint_factory or open_checkpoint)(model_path, device)
        # The model as a whole (full vocab for the sampler); the local runner holds this rank's shard.
        self.model_config = ModelConfig.from_hf_config(checkpoint.hf_config, checkpoint.path)
        check_shardable(self.model_config, world, quantized=checkpoint.quant_format is not None)  # before any spawn
        self.launcher = launcher if launcher is not None else get_launcher(engine_args.distributed_executor_backend)
        store, init_method = create_rendezvous(timeout_s)
        self.group = None
        self.launcher.start(world, init_method, engine_args.to_dict(), str(model_path), checkpoint_factory)
        try:
            wait_for_workers(store, world, self.launcher.dead_workers, timeout_s)
            self.group = init_tensor_parallel(0, world, init_method, device, timeout_s, store)
            self.runner = ModelRunner(engine_args, checkpoint, device, parallel=self.group)
        except BaseException as e:
            dead = self.launcher.dead_workers()
            self._stop(send=False)
            if dead:
                raise RuntimeError(f"tensor-parallel workers failed to start: {', '.join(dead)}") from e
            raise
        # runs once: on shutdown(), when the runner is collected, or at interpreter exit
        self._finalizer = weakref.finalize(self, TensorParallelRunner._stop_all, self.group, self.launcher,
                                           self.runner)
        logger.info("tensor parallel: %d ranks on %s (backend %s)", world, device,
                    "nccl" if device.type == "cuda" else "gloo")

    # --- the ModelRunner interface -------------------------------------------------------------
    def __getattr__(self, name):  # device, kernel_backend, max_model_len, kv_groups, block_size, model ...
        if name == "runner":
            raise AttributeError(name)
        return getattr(self.runner, name)

    def kv_block_bytes(self) -> list[int]:
        return self.runner.kv_block_bytes()  # per rank: each GPU holds its own KV heads

    def allocate_kv_cache(self, num_blocks, capture_graphs: bool = True) -> None:
        self._everywhere("allocate_kv_cache", num_blocks, capture_graphs)

    def free_kv_cache(self) -> None:
        """Every rank's (the start-up memory step's temporary cache: adallm_core/memory_profile.py). Rank 0's
        device measures the step: its peak is the largest, with the sampler's on top of what every rank holds."""
        self._everywhere("free_kv_cache")

    def execute(self, steps: Sequence) -> torch.Tensor:
        return self._everywhere("execute", list(steps))

    def execute_scored(self, steps: Sequence):
        return self._everywhere("execute_scored", list(steps))

    def weight_bytes_per_rank(self) -> list[int]:
        """Each rank's resident weight bytes, measured in its own process (rank order)."""
        self._check_open()
        self.group.broadcast_object((WEIGHT_BYTES, ()))
        return self.group.all_gather_object(model_weight_bytes(self.runner))

    def _check_open(self) -> None:
        if self.group is None:
            raise RuntimeError("tensor-parallel runner is shut down")

    def _everywhere(self, method: str, *args):
        self._check_open()
        with interrupts_deferred():  # every rank runs the whole call, or they fall out of step and hang
            try:
                self.group.broadcast_object((method, args))
                return getattr(self.runner, method)(*args)
            except ValueError:  # an input check, before any collective: every rank refused the call alike
                raise
            except BaseException:  # this rank left the call partway (or a worker is gone): the ranks are out of step
                self._abandon()
                raise

    def _abandon(self) -> None:
        """Stop every rank without a message: a broadcast into an out-of-step group waits until the timeout, and a
        worker left in a collective never returns, so it is ended at once. Later calls say the runner is shut down."""
        if self._finalizer.detach() is not None:
            TensorParallelRunner._stop_all(None, self.launcher, self.runner, stuck_workers=True)
        self.group = None

    # --- shutdown ---------------------------------------------------------------------------------
    def shutdown(self) -> None:
        self._finalizer()
        self.group = None

    def _stop(self, send: bool) -> None:
        TensorParallelRunner._stop_all(self.group if send else None, self.launcher)
        self.group = None

    @staticmethod
    def _stop_all(group, launcher, runner=None, stuck_workers: bool = False) -> None:
        try:
            if group is not None:
                group.broadcast_object((SHUTDOWN, ()))
        except Exception as e:  # a worker already gone: stop the rest anyway
            logger.warning("tensor parallel shutdown message failed: %s", e)
        finally:
            if runner is not None:
                runner.release_graphs()  # graphs holding NCCL all-reduces block the group's destruction
            destroy_tensor_parallel()
            launcher.shutdown(timeout=STUCK_WORKER_WAIT_S if stuck_workers else 10.0)


@contextlib.contextmanager
def interrupts_deferred():
    """Ctrl-C during the block is raised when it ends. A KeyboardInterrupt between two collectives would leave rank 0
    out of step with ranks already waiting in the next one: with gloo, every rank then waits forever."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread gets signals
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
