import argparse
import math

import pytest

from adallm_core import EngineArgs, SamplingParams
from adallm_core.cli import main as cli_main


def test_numpy_numbers_are_taken_as_the_numbers_they_hold():
    """A value read from a DataFrame or with numpy is a numpy scalar: EngineArgs took them before it checked types."""
    import numpy as np

    args = EngineArgs(max_num_seqs=np.int64(8), gpu_memory_utilization=np.float32(0.5), enforce_eager=np.bool_(True),
                      cpu_kv_cache_gb=np.int32(2))
    got = (args.max_num_seqs, args.gpu_memory_utilization, args.enforce_eager, args.cpu_kv_cache_gb)
    assert got == (8, 0.5, True, 2)
    assert [type(v) for v in (args.max_num_seqs, args.gpu_memory_utilization, args.enforce_eager)] == [int, float, bool]
    with pytest.raises(ValueError, match="max_num_seqs must be an integer, got np.float64"):
        EngineArgs(max_num_seqs=np.float64(8.0))


def test_engine_args_cli_round_trip():
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    ns = parser.parse_args(["--max-model-len", "512", "--kv-cache-dtype", "bf16", "--no-enable-prefix-caching"])
    args = EngineArgs.from_cli_args(ns)
    assert (args.max_model_len, args.kv_cache_dtype, args.enable_prefix_caching) == (512, "bf16", False)
    assert args.max_num_seqs == EngineArgs().max_num_seqs


@pytest.mark.parametrize(
    "field, value",
    [("kv_cache_dtype", "int4"), ("max_num_seqs", 0), ("gpu_memory_utilization", 1.5), ("block_size", 12),
     ("max_num_batched_tokens", 63),  # fewer than max_num_seqs (64): some decodes would wait for others to end
     # these failed only when the engine started: torch's RuntimeError, int(nan), int(inf), manual_seed(None)
     ("device", "gpu"), ("device", "meta"), ("device", "CUDA"), ("cpu_kv_cache_gb", math.nan),
     ("cpu_kv_cache_gb", math.inf), ("cpu_kv_cache_gb", 0.0), ("seed", None), ("seed", 1.5),
     # LLM(**kwargs) and a Serve config's YAML: a quoted number was a TypeError naming no field, "false" was true
     ("max_num_seqs", "4"), ("gpu_memory_utilization", "0.5"), ("num_gpu_blocks_override", "64"),
     ("max_model_len", 2.5), ("enforce_eager", "false"), ("enable_prefix_caching", 0),
     # an OverflowError naming nothing at start-up; a KV group of -1 usable blocks
     ("seed", 2**70), ("num_gpu_blocks_override", 0)],
)
def test_engine_args_reject_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        EngineArgs(**{field: value, **({"max_num_seqs": 64} if field == "max_num_batched_tokens" else {})})


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_engine_args_take_every_documented_device(device):
    assert EngineArgs(device=device).device == device


def test_engine_args_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match="max_len_typo"):
        EngineArgs.from_dict({"max_len_typo": 3})


@pytest.mark.parametrize(
    "field, value",
    [("temperature", -0.1), ("temperature", math.nan), ("top_p", 0.0), ("top_k", -2), ("n", 0),
     ("max_tokens", 0), ("min_p", 1.5), ("presence_penalty", 3.0), ("logprobs", 50), ("stop", [""])],
)
def test_sampling_params_reject_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sampling_params_normalise_stop_and_top_k():
    params = SamplingParams(stop="###", top_k=-1)
    assert params.stop == ["###"] and params.top_k == 0


def test_cli_unknown_command_exits_nonzero():
    with pytest.raises(SystemExit) as exc:
        cli_main(["frobnicate"])
    assert exc.value.code != 0


def test_cli_bench_help_reaches_the_benchmark(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--shape" in out and out.startswith("usage: adallm bench ")


def test_cli_version(capsys):
    from importlib.metadata import version

    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out == f"adallm {version('adallm')}\n"
    cli_main(["--help"])
    assert "--version" in capsys.readouterr().out
