"""Tensor parallelism on Ray: ranks 1..N-1 run as Ray actors inside the caller's placement group.

A Serve replica (or a bulk-job actor) with tensor_parallel_size N is scheduled in bundle 0 of a placement group of N
bundles, one GPU each, STRICT_PACK (one node: the ranks rendezvous on loopback, NCCL stays intra-node). Its engine
is rank 0; this launcher starts one TPWorkerActor per remaining bundle. Importing this module registers the
launcher as distributed_executor_backend="ray" (adallm_core itself imports no Ray). NCCL_NVLS_ENABLE=0 is set
by adallm_core.distributed.parallel_state in every rank before NCCL starts.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import ray
from ray.util.placement_group import get_current_placement_group, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from adallm_core.distributed.launcher import register_launcher

logger = logging.getLogger(__name__)
STRATEGY = "STRICT_PACK"


def tp_bundles(tensor_parallel_size: int, num_gpus: float, num_cpus: float = 1,
               accelerator_type: Optional[str] = None) -> list[dict[str, float]]:
    """One bundle per rank, one GPU each (none on CPU); bundle 0 is the replica's own, so its ray_actor_options
    (accelerator_type included: Ray asks for "accelerator_type:X": 0.001) must fit in it."""
    bundle = {"CPU": num_cpus, "GPU": 1} if num_gpus else {"CPU": num_cpus}
    if num_gpus and accelerator_type:
        bundle[f"accelerator_type:{accelerator_type}"] = 0.001
    return [dict(bundle) for _ in range(tensor_parallel_size)]


def serve_placement_options(tensor_parallel_size: int, num_gpus: float, num_cpus: float = 1,
                            accelerator_type: Optional[str] = None) -> dict[str, Any]:
    """Extra serve.deployment options for a tensor-parallel replica ({} for one rank)."""
    if tensor_parallel_size <= 1:
        return {}
    return {"placement_group_bundles": tp_bundles(tensor_parallel_size, num_gpus, num_cpus, accelerator_type),
            "placement_group_strategy": STRATEGY}


def job_remote_args_fn(tensor_parallel_size: int, num_gpus: float, num_cpus: float = 1,
                       accelerator_type: Optional[str] = None):
    """For Ray Data's map_batches(ray_remote_args_fn=...): a fresh STRICT_PACK placement group per engine actor,
    which the actor (bundle 0) and the workers it starts are scheduled into."""
    def remote_args() -> dict[str, Any]:
        bundles = tp_bundles(tensor_parallel_size, num_gpus, num_cpus, accelerator_type)
        pg = placement_group(bundles, strategy=STRATEGY)
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0,
                                                    placement_group_capture_child_tasks=True)
        return {"scheduling_strategy": strategy}
    return remote_args


@ray.remote
class TPWorkerActor:
    """One tensor-parallel rank >= 1: runs the engine's worker loop until rank 0 says shutdown."""

    def run(self, rank: int, world_size: int, init_method: str, engine_args: dict, model_path: str,
            checkpoint_factory=None) -> None:
        from adallm_core.distributed.worker import worker_main

        worker_main(rank, world_size, init_method, engine_args, model_path, checkpoint_factory=checkpoint_factory)


class RayActorLauncher:
    """WorkerLauncher for ranks 1..N-1 as actors in bundles 1..N-1 of the current placement group."""

    def __init__(self):
        self.actors, self.runs = [], []

    def start(self, world_size: int, init_method: str, engine_args: dict, model_path: str,
              checkpoint_factory=None) -> None:
        pg = get_current_placement_group()
        if pg is None or len(pg.bundle_specs) < world_size:
            raise ValueError(
                f"tensor_parallel_size={world_size} on Ray: the engine must run inside a placement group of "
                f"{world_size} bundles ({STRATEGY}); use serve_placement_options() / job_remote_args_fn()")
        for rank in range(1, world_size):
            spec = pg.bundle_specs[rank]
            actor = TPWorkerActor.options(
                num_cpus=spec.get("CPU", 0), num_gpus=spec.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            ).remote()
            self.actors.append(actor)
            self.runs.append(actor.run.remote(rank, world_size, init_method, engine_args, model_path,
                                              checkpoint_factory))

    def dead_workers(self) -> list[str]:
        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0) if self.runs else ([], [])
        return [f"TPWorkerActor rank {self.runs.index(ref) + 1}" for ref in done]

    def shutdown(self, timeout: float = 10.0) -> None:
        if self.runs:
            ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout)
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.runs = [], []


register_launcher("ray", RayActorLauncher)
