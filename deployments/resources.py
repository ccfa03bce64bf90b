"""What one engine replica asks Ray for: its GPUs, and a node with the accelerator type it names."""
from __future__ import annotations

from typing import Optional

import ray

ACCELERATOR_PREFIX = "accelerator_type:"


def engine_gpus(device: str, accelerator_type: Optional[str], tensor_parallel_size: int = 1) -> float:
    """The GPUs one engine takes when the user set none: one a rank on a GPU, none on the CPU."""
    if device == "cpu":
        return 0.0
    # an accelerator type asks for a GPU node, which an autoscaling cluster may not have started yet
    # (cluster.yaml: every GPU type starts at 0 nodes), so the cluster is not asked
    if device.startswith("cuda") or accelerator_type:
        return float(tensor_parallel_size)
    if ray.is_initialized():
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    else:
        import torch

        has_gpus = torch.cuda.is_available()
    return float(tensor_parallel_size) if has_gpus else 0.0


def accelerator_types_now() -> set[str]:
    """The accelerator types of the live nodes (Ray labels each GPU node with its card: L4, L40S, H100...)."""
    return {key.removeprefix(ACCELERATOR_PREFIX) for node in ray.nodes() if node.get("Alive")
            for key in node.get("Resources", {}) if key.startswith(ACCELERATOR_PREFIX)}


def missing_accelerator_warning(accelerator_type: Optional[str]) -> Optional[str]:
    """A warning when no live node has the accelerator type: Ray would leave the replicas pending, silently, until
    an autoscaler starts such a node, and forever when the name is misspelt. None when a node has it (or Ray is
    not up)."""
    if not accelerator_type or not ray.is_initialized():
        return None
    present = accelerator_types_now()
    if accelerator_type in present:
        return None
    return (f"no node of the Ray cluster has accelerator type {accelerator_type!r} now (its nodes have: "
            f"{', '.join(sorted(present)) or 'none'}); the replicas wait until an autoscaler starts one. Ray labels "
            f"a node by its card's name, e.g. L4, L40S, GeForce-RTX-4090: check the spelling")
