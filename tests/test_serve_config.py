"""The application builder, `adallm serve` flags and serve_config.yaml, without starting Ray."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

import deployments
from deployments import cli
from deployments.app import ON_HEAD_NODE, SERVE_ENV, build_app, served_name

CONFIG = Path(deployments.__file__).parent / "serve_config.yaml"


def deployments_of(app) -> dict:
    ingress = app._bound_deployment
    llm = ingress.init_args[0]._bound_deployment
    return {"ingress": ingress, "llm": llm}


def test_cpu_replicas_ask_for_no_gpu_and_limits_come_from_engine_capacity():
    d = deployments_of(build_app({"max_num_seqs": 8, "device": "cpu", "num_replicas": 2}))
    llm = d["llm"]
    assert llm.ray_actor_options == {"num_cpus": 1, "num_gpus": 0, "runtime_env": {"env_vars": SERVE_ENV}}
    assert d["ingress"].ray_actor_options["runtime_env"] == {"env_vars": SERVE_ENV}
    assert d["ingress"].ray_actor_options["resources"] == ON_HEAD_NODE  # a lost worker never takes it along
    assert llm.max_ongoing_requests == 8 and llm._deployment_config.max_queued_requests == 16
    assert llm.num_replicas == 2
    assert llm.user_config == {"max_batch_size": 32, "batch_wait_timeout_s": 0.005, "stream_interval_s": 0.1}
    assert llm.init_args[0]["device"] == "cpu" and llm.init_args[0]["max_num_seqs"] == 8
    # The ingress admits all the engines can run and queue, so overload is answered by the app in OpenAI shape.
    assert d["ingress"].max_ongoing_requests >= 2 * 8 + 16


def test_a_chat_template_file_is_read_where_the_app_is_built(tmp_path):
    """The replicas get --chat-template's text, not its path: their nodes may not have the file; a bad one stops
    the app before any replica starts."""
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    llm = deployments_of(build_app({"device": "cpu", "chat_template": str(template)}))["llm"]
    assert llm.init_args[0]["chat_template"] == template.read_text()
    with pytest.raises(ValueError, match="chat_template '/no/such.jinja': not a Jinja template"):
        build_app({"device": "cpu", "chat_template": "/no/such.jinja"})


def test_gpu_replicas_ask_for_one_gpu_and_the_accelerator_type():
    args = {"num_gpus": 1, "accelerator_type": "L4", "min_replicas": 1, "max_replicas": 4, "max_num_seqs": 64}
    llm = deployments_of(build_app(args))["llm"]
    assert llm.ray_actor_options == {"num_cpus": 1, "num_gpus": 1, "accelerator_type": "L4",
                                     "runtime_env": {"env_vars": SERVE_ENV}}
    scaling = llm._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 4)
    assert llm.init_args[0]["device"] == "auto"  # the replica's engine takes the GPU Ray gives it


@pytest.mark.parametrize(
    "args, fragment",
    [
        ({"max_num_seqz": 4}, "max_num_seqz"),
        ({"num_replicas": 2, "max_replicas": 3}, "not both"),
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas=3"),
        ({"kv_cache_dtype": "int4"}, "kv_cache_dtype"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"enforce_eager": "ture"}, "enforce_eager='ture': expected one of"),  # serve run's string args
        ({"max_model_len": "8k"}, "max_model_len='8k': expected an integer"),
    ],
)
def test_bad_app_args_are_named(args, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_app(args)


def test_serve_run_style_string_args_are_typed():
    # `serve run deployments.app:build_app max_model_len=256 model=None` passes every value as a string.
    llm = deployments_of(build_app({"max_model_len": "256", "model": "None", "enforce_eager": "true"}))["llm"]
    engine = llm.init_args[0]
    assert (engine["max_model_len"], engine["model"], engine["enforce_eager"]) == (256, None, True)


def test_cli_flags_map_onto_the_app():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    ns = parser.parse_args(
        ["--max-num-seqs", "16", "--min-replicas", "1", "--max-replicas", "3", "--num-gpus", "1",
         "--accelerator-type", "L40S", "--max-batch-size", "8", "--batch-wait-timeout-s", "0.01", "--stream-interval-s", "0", "--port", "9000"]
    )
    assert ns.model is None and ns.host == "127.0.0.1" and ns.port == 9000
    llm = deployments_of(build_app(cli.app_args(ns)))["llm"]
    assert llm.ray_actor_options["accelerator_type"] == "L40S" and llm.max_ongoing_requests == 16
    assert llm.user_config == {"max_batch_size": 8, "batch_wait_timeout_s": 0.01, "stream_interval_s": 0.0}
    assert llm._deployment_config.autoscaling_config.max_replicas == 3
    with pytest.raises(SystemExit):  # a fixed count and autoscaling bounds exclude each other
        parser.parse_args(["--num-replicas", "2", "--min-replicas", "1"])


def test_serve_config_yaml_is_valid_and_names_the_app_deployments():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(CONFIG.read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    built = deployments_of(build_app(app["args"]))
    assert {d["name"] for d in app["deployments"]} == {built["ingress"].name, built["llm"].name}
    llm = next(d for d in app["deployments"] if d["name"] == "LLMServer")
    assert llm["max_ongoing_requests"] == app["args"]["max_num_seqs"]
    assert set(llm["user_config"]) == {"max_batch_size", "batch_wait_timeout_s", "stream_interval_s"}
    # Serve replaces the code's ray_actor_options with any the file gives: it gives none, so the app's own apply
    # (SERVE_ENV, the ingress on the head, the GPU and accelerator from args; tensor-parallel bundles below).
    assert all("ray_actor_options" not in d for d in app["deployments"]) and "runtime_env" not in app
    assert built["ingress"].ray_actor_options["resources"] == ON_HEAD_NODE
    assert built["llm"].ray_actor_options["runtime_env"] == {"env_vars": SERVE_ENV}
    gpu = deployments_of(build_app({**app["args"], "device": "cuda", "num_gpus": 1, "accelerator_type": "L4",
                                    "tensor_parallel_size": 2}))["llm"]
    assert gpu.ray_actor_options["accelerator_type"] == "L4"
    assert gpu._replica_config.placement_group_bundles == [
        {"CPU": 1, "GPU": 1, "accelerator_type:L4": 0.001}] * 2
    off = deployments_of(build_app({**app["args"], "throughput_optimized": False}))
    assert "runtime_env" not in off["llm"].ray_actor_options and "runtime_env" not in off["ingress"].ray_actor_options


def test_an_accelerator_type_asks_for_a_gpu_before_any_gpu_node_exists():
    """An autoscaling cluster starts with no GPU node: --accelerator-type alone must still ask for one GPU (and
    so make the autoscaler start a node of that type), never a CPU replica on the head."""
    llm = deployments_of(build_app({"accelerator_type": "L4", "min_replicas": 0, "max_replicas": 8}))["llm"]
    assert llm.ray_actor_options["num_gpus"] == 1 and llm.ray_actor_options["accelerator_type"] == "L4"
    assert llm.init_args[0]["device"] == "auto"
    scaling = llm._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (0, 8)  # 0 kept: scale to zero when idle


def test_served_model_name_defaults(tmp_path):
    assert served_name(None) == "adallm-tiny-demo"
    assert served_name(str(tmp_path)) == tmp_path.name
    assert served_name("Qwen/Qwen3-8B-NVFP4") == "Qwen/Qwen3-8B-NVFP4"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-replicas", "0"], "--num-replicas=0: Input should be greater than or equal to 1"),
        (["--num-replicas", "2", "--max-replicas", "4"], "give --num-replicas, or --min-replicas/--max-replicas"),
        (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas=3 is above --max-replicas=2"),
        (["--enable-auto-tool-choice"], "--enable-auto-tool-choice needs a --tool-call-parser"),
        (["--max-num-seqs", "0"], "--max-num-seqs must be >= 1"),
        (["--kv-cache-dtype", "fp16"], "--kv-cache-dtype must be one of"),
    ],
)
def test_serve_bad_flag_values_are_an_error_naming_the_flag_not_a_traceback(flags, message):
    # The check runs before Ray starts: a bad value costs no Ray start-up, and exits 2 as argparse's errors do.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "adallm_core.cli", "serve", *flags], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"adallm serve: error: {message}" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("port", ["0", "70000", "-1", "http"])
def test_serve_port_out_of_range_is_refused_by_the_parser(port, capsys):
    # Not Ray's OverflowError traceback from the HTTP proxy, after Ray and the app started.
    parser = argparse.ArgumentParser(prog="adallm serve")
    cli.add_arguments(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--port", port])
    assert exit_info.value.code == 2
    assert "argument --port" in capsys.readouterr().err
    assert parser.parse_args(["--port", "65535"]).port == 65535


def test_serve_num_gpus_help_says_what_build_app_does():
    # --accelerator-type alone asks for a GPU (an autoscaling cluster has none yet); --device cpu asks for none.
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    (action,) = [a for a in parser._actions if "--num-gpus" in a.option_strings]
    assert "--accelerator-type" in action.help and "--device" in action.help
    for flags, gpus in [(["--accelerator-type", "L4"], 1), (["--device", "cuda"], 1), (["--device", "cpu"], 0)]:
        llm = deployments_of(build_app(cli.app_args(parser.parse_args(flags))))["llm"]
        assert llm.ray_actor_options["num_gpus"] == gpus, flags


def test_demo_model_named_on_the_command_line_is_served_as_the_demo(tmp_path, monkeypatch):
    # `adallm serve demo` loads the built-in demo model (adallm_core.model_source), as `adallm serve` does: clients
    # send the same name for it, adallm-tiny-demo, not "demo" taken for a hub id.
    monkeypatch.chdir(tmp_path)
    assert served_name("demo") == "adallm-tiny-demo"
    (tmp_path / "demo").mkdir()  # a folder of that name is a checkpoint folder like any other
    assert served_name("demo") == "demo"
