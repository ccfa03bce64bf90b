"""One tensor-parallel group: rank/world info and the collectives the engine uses.

Two groups: `device_group` (NCCL on CUDA, gloo on CPU) carries activations (all-reduce, all-gather);
`cpu_group` (always gloo) carries the per-step inputs that rank 0 broadcasts as Python objects, so step
metadata never round-trips through GPU memory. Workers wait on `cpu_group` for as long as the engine is idle.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlparse

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0
JOINED = "adallm/joined/"  # + rank: set in rank 0's store by each worker before it joins the group
# cpu_group's collectives: a worker waits there for the next command while a server has no requests, for hours;
# a rank that dies closes its connections, which fails them at once
COMMAND_TIMEOUT = timedelta(days=3650)


def create_rendezvous(timeout_s: float = DEFAULT_TIMEOUT_S):
    """Rank 0's store on a port the OS picks and this process holds from now on, and the init_method that reaches
    it. One node (STRICT_PACK): loopback reaches every rank."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timeout)
    return store, f"tcp://127.0.0.1:{store.port}"


def wait_for_workers(store, world_size: int, dead_workers, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Rank 0: return once every worker has reached the store. A worker that dies on the way (a script without a
    __main__ guard, a missing GPU) never joins: raise at once rather than wait for it until the timeout."""
    keys = [f"{JOINED}{r}" for r in range(1, world_size)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        if dead_workers():
            raise RuntimeError("a tensor-parallel worker died before joining the group")
        if time.monotonic() > deadline:
            raise TimeoutError(f"tensor-parallel workers did not join the group in {timeout_s:.0f} s")
        time.sleep(0.1)


def rank_device(device: str, rank: int, world_size: int, backend: str) -> torch.device:
    """The device of one rank. Local processes ('mp') see every GPU: rank r takes cuda:r. A Ray actor ('ray') sees
    only the GPU Ray gave it (CUDA_VISIBLE_DEVICES), so cuda:0."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if device not in ("auto", "cuda"):
        raise ValueError(f"tensor_parallel_size>1 needs device 'auto', 'cuda' or 'cpu' (one GPU per rank), got {device!r}")
    count = torch.cuda.device_count()
    if count >= world_size:
        return torch.device(f"cuda:{rank}")
    if count == 1 and backend == "ray":
        return torch.device("cuda:0")
    raise ValueError(f"tensor_parallel_size={world_size} needs one GPU per rank but this process sees {count} GPU"
                     f"{'s' if count != 1 else ''} (distributed_executor_backend {backend!r})")


@dataclass
class TPGroup:
    """This process's place in the tensor-parallel group."""

    rank: int
    world_size: int
    device: torch.device
    device_group: Any
    cpu_group: Any

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's partial x (row-parallel outputs), in place."""
        dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate every rank's x [..., sizes[r]] along the last dim. Shards may differ in width (a vocab not
        divisible by the world size): each is padded to the widest, gathered, then trimmed."""
        width = max(sizes)
        if x.shape[-1] < width:
            x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
        x = x.contiguous()
        if self.device.type == "cuda":  # NCCL: one output tensor, no list (also safe inside CUDA graph capture)
            out = torch.empty((self.world_size, *x.shape), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x, group=self.device_group)
            parts = out.unbind(0)
        else:
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            dist.all_gather(parts, x, group=self.device_group)
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0 sends obj; every rank returns it."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def all_gather_object(self, obj: Any) -> list:
        """Every rank's obj, in rank order, on every rank."""
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    # hooks the ModelRunner calls (adallm_core.runner): this rank's config and checkpoint view, then the collectives
    def shard(self, cfg, checkpoint):
        from adallm_core.distributed.sharding import ShardedCheckpoint, shard_model_config

        plan_cfg = shard_model_config(cfg, self.rank, self.world_size, quantized=checkpoint.quant_format is not None)
        return plan_cfg, ShardedCheckpoint(checkpoint, cfg, self.rank, self.world_size)

    def wrap_model(self, model, full_cfg) -> None:
        from adallm_core.distributed.tp_layers import apply_tensor_parallel

        apply_tensor_parallel(model, self, full_cfg)


def init_tensor_parallel(rank: int, world_size: int, init_method: str, device: torch.device,
                         timeout_s: float = DEFAULT_TIMEOUT_S, store=None) -> TPGroup:
    """Join the group (blocks until every rank has joined, or raises after timeout_s). Rank 0 passes the store of
    create_rendezvous(); a worker reaches it through init_method and says it has arrived (wait_for_workers)."""
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group already exists in this process; "
                           "one tensor-parallel engine per process")
    if device.type == "cuda":
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off: it fails on some hosts and Ada has no NVLink
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    timeout = timedelta(seconds=timeout_s)
    if store is None:
        url = urlparse(init_method)
        store = dist.TCPStore(url.hostname, url.port, is_master=False, timeout=timeout)
        store.set(f"{JOINED}{rank}", "1")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    cpu_group = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
    return TPGroup(rank, world_size, device, dist.group.WORLD, cpu_group)


def destroy_tensor_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
