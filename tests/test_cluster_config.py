"""cluster.yaml passes the validation `ray up` runs (prepare_config + validate_config against the
ray-schema.json shipped inside the ray package), and says what the cluster needs: a CPU-only head,
autoscaled Ada GPU workers that declare GPUs and an accelerator-type resource Ray recognises."""
from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from ray._common.utils import resources_from_ray_options
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for
from ray.autoscaler._private.util import prepare_config, validate_config
from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager
from ray.util.accelerators import accelerators

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
ACCEL_PREFIX = "accelerator_type:"
PROVISIONED_MODEL = "/models/Qwen3-8B-NVFP4"


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_up_validate(config: dict) -> dict:
    """What `ray up` does before it talks to a cloud: fill in the provider's defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def worker_types(config: dict) -> dict:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def accelerator_of(node_type: dict) -> str:
    names = [r[len(ACCEL_PREFIX):] for r in node_type["resources"] if r.startswith(ACCEL_PREFIX)]
    assert len(names) == 1, f"one accelerator_type resource expected, got {names}"
    return names[0]


def test_cluster_yaml_passes_ray_validation():
    prepared = ray_up_validate(load())
    assert prepared["provider"]["type"] == "aws"
    # prepare_config merged the common setup commands in front of the per-role ones.
    assert prepared["worker_setup_commands"][0] == load()["setup_commands"][0]


def test_head_is_cpu_only_and_never_hosts_an_engine():
    config = load()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["GPU"] == 0
    assert head["resources"]["CPU"] >= 4  # Serve controller, proxy, ingress and job drivers run here
    assert head["max_workers"] == 0
    assert any("--num-gpus=0" in c for c in config["head_start_ray_commands"])
    # The head needs no CUDA torch.
    assert any("torch" in c and "/whl/cpu" in c for c in config["head_setup_commands"])


def test_gpu_workers_are_ada_autoscaled_from_zero():
    config = load()
    workers = worker_types(config)
    # Ray's own names for the cards; L4 and L40S nodes must exist.
    accel = {name: accelerator_of(t) for name, t in workers.items()}
    assert {accelerators.NVIDIA_L4, accelerators.NVIDIA_L40S} <= set(accel.values())
    for name, node_type in workers.items():
        res = node_type["resources"]
        assert res["GPU"] >= 1, name
        assert res[ACCEL_PREFIX + accel[name]] == 1, name
        assert node_type["min_workers"] == 0, name
        assert node_type["max_workers"] <= config["max_workers"], name
    one_gpu = [t for t in workers.values() if t["resources"]["GPU"] == 1]
    assert all(t["max_workers"] >= 2 for t in one_gpu)
    assert sum(t["max_workers"] for t in one_gpu) >= config["max_workers"] // 2
    # A multi-GPU node type for tensor parallelism (2 GPUs of one node, or more), off by default.
    (tp,) = [t for t in workers.values() if t["resources"]["GPU"] >= 2]
    assert tp["max_workers"] == 0


def test_instance_types_match_declared_gpus():
    # The declared resources must describe the real machine, or the autoscaler launches the wrong one.
    # AWS: g6 = L4, g6e = L40S; the xlarge..16xlarge sizes carry 1 GPU, 12xlarge/24xlarge 4, 48xlarge 8.
    family_accel = {"g6": "L4", "g6e": "L40S"}
    size_gpus = {"12xlarge": 4, "24xlarge": 4, "48xlarge": 8}
    for name, node_type in worker_types(load()).items():
        family, size = node_type["node_config"]["InstanceType"].split(".")
        assert family_accel[family] == accelerator_of(node_type), name
        assert size_gpus.get(size, 1) == node_type["resources"]["GPU"], name


def test_every_node_boots_an_image_new_enough_for_the_setup():
    """Without an ImageId Ray picks its default AMI, Ubuntu 18.04: Python 3.6, too old for Ray 2.60 and torch 2.13
    (the pip installs in setup_commands would find no wheel). Every node type names an Ubuntu 22.04 GPU image."""
    for name, node_type in load()["available_node_types"].items():
        image = node_type["node_config"].get("ImageId", "")
        assert image.startswith("resolve:ssm:/aws/service/deeplearning/") and "ubuntu-22.04" in image, name


def test_workers_install_cuda_torch_the_project_and_the_model():
    config = load()
    cmds = config["worker_setup_commands"]
    torch_cmds = [c for c in cmds if re.search(r"pip install .*torch==", c)]
    assert torch_cmds and not any("/whl/cpu" in c for c in torch_cmds)
    assert any("torch.cuda.is_available()" in c for c in cmds)
    assert any('install -q -e "$HOME/adallm[serve]"' in c for c in cmds)
    assert config["file_mounts"]["~/adallm"] == "."
    assert any(PROVISIONED_MODEL in c and "snapshot_download" in c for c in cmds)
    # Same Ray on every node as the one that validated this file.
    import ray

    assert any(f"=={ray.__version__}" in c for c in config["setup_commands"])


def test_4090_label_is_the_one_ray_detects():
    detected = NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type("NVIDIA GeForce RTX 4090")
    assert f'accelerator_type: "{detected}"' in CLUSTER_YAML.read_text()
    for card, label in [("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S")]:
        assert NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(card) == label


def autoscaler_plan(demands: list[dict], config: dict | None = None) -> tuple[dict, list]:
    """The node types Ray's autoscaler (v1, the one `ray up` starts) would launch for these pending
    demands on a cluster of just the head."""
    config = prepare_config(config or load())
    scorer = functools.partial(
        _default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary(node_availabilities={})
    )
    to_add, unmet = get_nodes_for(
        config["available_node_types"], {config["head_node_type"]: 1}, config["head_node_type"],
        config["max_workers"], demands, scorer,
    )  # fmt: skip
    return dict(to_add), unmet


@pytest.mark.parametrize(
    "options, launched",
    [
        ({"num_gpus": 1, "num_cpus": 1, "accelerator_type": "L4"}, {"l4_worker": 1}),
        ({"num_gpus": 1, "num_cpus": 1, "accelerator_type": "L40S"}, {"l40s_worker": 1}),
        ({"num_gpus": 1, "num_cpus": 1}, {"l4_worker": 1}),  # no type named: the cheaper card
    ],
)
def test_pending_replica_launches_the_matching_node_type(options, launched):
    # Ray's own translation of a replica's/actor's options into the demand the autoscaler sees.
    demand = resources_from_ray_options(options)
    assert autoscaler_plan([demand]) == (launched, [])
    assert autoscaler_plan([demand, demand]) == ({k: 2 * v for k, v in launched.items()}, [])


def test_serve_config_on_gpus_launches_an_l4_worker_with_the_provisioned_model():
    # deployments/serve_config.yaml switched to GPUs as its comments say, pointed at the model path that
    # cluster.yaml provisions on every GPU worker; it must pass Serve's schema and ask for an L4 node.
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load((CLUSTER_YAML.parent / "deployments" / "serve_config.yaml").read_text())
    (app,) = serve_config["applications"]
    app["args"].update(device="cuda", num_gpus=1, accelerator_type="L4", model=PROVISIONED_MODEL)
    ServeDeploySchema.model_validate(serve_config)
    from deployments.app import build_app

    llm = build_app(app["args"])._bound_deployment.init_args[0]._bound_deployment
    options = {k: v for k, v in llm.ray_actor_options.items() if k != "runtime_env"}
    demand = resources_from_ray_options(options)
    assert autoscaler_plan([demand]) == ({"l4_worker": 1}, [])
    assert any(PROVISIONED_MODEL in c for c in load()["worker_setup_commands"])


def test_tensor_parallel_node_launches_only_once_enabled():
    # A STRICT_PACK placement group of two 1-GPU bundles is one demand for 2 GPUs of one node.
    demand = {"GPU": 2, "CPU": 2, "accelerator_type:L4": 0.001}
    assert autoscaler_plan([demand]) == ({}, [demand])
    enabled = load()
    enabled["available_node_types"]["l4_x4_tp_worker"]["max_workers"] = 2
    assert autoscaler_plan([demand], enabled) == ({"l4_x4_tp_worker": 1}, [])
    # Why it is off by default: once allowed, it wins over two 1-GPU nodes for two 1-GPU replicas.
    one_gpu = resources_from_ray_options({"num_gpus": 1, "num_cpus": 1, "accelerator_type": "L4"})
    assert autoscaler_plan([one_gpu] * 2, enabled) == ({"l4_x4_tp_worker": 1}, [])


def test_unknown_accelerator_type_launches_nothing():
    demand = resources_from_ray_options({"num_gpus": 1, "accelerator_type": "H100"})
    assert autoscaler_plan([demand]) == ({}, [demand])


def local_provider_config() -> dict:
    """cluster.yaml switched to the on-premises provider exactly as its comments say."""
    text = CLUSTER_YAML.read_text()
    block = re.search(r"# --- local provider: begin\n(.*?)# --- local provider: end", text, re.S)
    assert block, "the commented local-provider block is missing from cluster.yaml"
    local = yaml.safe_load("\n".join(line[2:] for line in block.group(1).splitlines()))
    config = load()
    config.update(local)
    del config["available_node_types"], config["head_node_type"]
    return config


def test_local_provider_block_passes_ray_validation():
    prepared = ray_up_validate(local_provider_config())
    assert prepared["provider"]["type"] == "local"
    workers = prepared["provider"]["worker_ips"]
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["max_workers"] == len(workers) >= 1
    assert any("--num-gpus=0" in c for c in prepared["head_start_ray_commands"])


def broken(mutate) -> dict:
    config = load()
    mutate(config)
    return config


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        # a resource count must be an integer
        (lambda c: c["available_node_types"]["l4_worker"]["resources"].update(GPU="one"), jsonschema.ValidationError,
         "'one' is not of type 'integer'"),
        # a misspelt key in a node type
        (lambda c: c["available_node_types"]["l4_worker"].update(min_worker=0), jsonschema.ValidationError, "min_worker"),
        # a node type without resources
        (lambda c: c["available_node_types"]["l40s_worker"].pop("resources"), jsonschema.ValidationError,
         "'resources' is a required property"),
        # an unknown top-level key
        (lambda c: c.update(worker_nodes_typo={}), jsonschema.ValidationError, "worker_nodes_typo"),
        # the head type must be one of the node types
        (lambda c: c.update(head_node_type="cpu_head"), ValueError, "head_node_type"),
        # more minimum workers than the global maximum allows
        (lambda c: c["available_node_types"]["l4_worker"].update(min_workers=99), ValueError, "max_workers"),
    ],
    ids=["gpu-not-int", "misspelt-key", "no-resources", "unknown-top-level", "bad-head-type", "min-over-max"],
)
def test_broken_copies_fail_validation(mutate, error, match):
    with pytest.raises(error, match=match):
        ray_up_validate(broken(mutate))


def _downloaded_files(command: str, files: list[str]) -> list[str]:
    """The files a setup command's snapshot_download(..., allow_patterns=[...]) would fetch (all without patterns)."""
    import fnmatch

    found = re.search(r"allow_patterns=(\[[^\]]*\])", command)
    patterns = eval(found.group(1)) if found else ["*"]  # a list of string literals, from this repository's file
    return [f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns)]


def test_head_holds_what_the_bulk_job_driver_checks(tmp_path):
    """`ray job submit ... python -m jobs.bulk_generate --model /models/Qwen3-8B-NVFP4` runs its driver on the head,
    and the driver checks the model (jobs/bulk_generate.check_model: config, tokenizer and every shard's header)
    before any engine starts. The head's download must hold all that, or every documented job stops at once with
    '--model /models/Qwen3-8B-NVFP4: cannot read it'."""
    import shutil

    from engine_fixtures import tiny_model

    from adallm_core.config import EngineArgs
    from jobs.bulk_generate import check_model

    (command,) = [c for c in load()["head_setup_commands"] if PROVISIONED_MODEL in c and "snapshot_download" in c]
    source = Path(tiny_model("qwen3"))
    head = tmp_path / "head-model"
    head.mkdir()
    for name in _downloaded_files(command, sorted(p.name for p in source.iterdir() if p.is_file())):
        shutil.copy(source / name, head / name)
    check_model(EngineArgs(model=str(head)), chat=True)


def test_model_downloads_are_skipped_only_once_finished():
    """Each node's model download is skipped when a marker written after it succeeded exists. Keyed on config.json
    (the first file a download writes), a download cut short or a head set up with the small files alone was never
    completed by a later `ray up`."""
    config = load()
    commands = [c for key in ("head_setup_commands", "worker_setup_commands") for c in config[key]
                if PROVISIONED_MODEL in c and "snapshot_download" in c]
    assert len(commands) == 2, commands
    for command in commands:
        guarded = re.fullmatch(r"test -f (\S+) \|\| \((.+) && touch (\S+)\)", command)
        assert guarded and guarded.group(1) == guarded.group(3), command
        assert Path(guarded.group(1)).parent == Path(PROVISIONED_MODEL), command
