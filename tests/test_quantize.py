"""`adallm quantize`: the real command, its output layout, chunked streaming, atomic output and bad input."""
import json
import re
import subprocess
import sys

import pytest
import torch
from model_helpers import interrupted_on_call, tiny_gemma3_multimodal
from safetensors import safe_open

from adallm_core import cli
from adallm_core.checkpoint import quantize as quantize_mod
from adallm_core.checkpoint.quantize import quantize_checkpoint
from adallm_core.checkpoint.read import Checkpoint
from adallm_core.testing import build_tiny_checkpoint

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return build_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("src") / "moe")


def leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_command_converts_with_exclude_and_prints_summary(moe, tmp_path):
    dst = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "adallm_core.cli", "quantize", str(moe), str(dst), "--format", "compressed-tensors",
         "--exclude", "model.layers.1.self_attn.[qkv]_proj", "re:.*layers\\.0\\.self_attn\\.o_proj"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "quantize" in proc.stderr  # the tqdm bar
    assert "69 tensors (52 quantized)" in proc.stdout and "GB/s" in proc.stdout
    for name in SIDE_FILES:
        assert (dst / name).read_bytes() == (moe / name).read_bytes()
    ignore = json.loads((dst / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore[:2] == ["lm_head", "model.layers.0.mlp.gate"]
    assert "model.layers.0.self_attn.o_proj" in ignore and "model.layers.1.self_attn.v_proj" in ignore
    ckpt = Checkpoint(dst)
    src = tensors(moe / "model.safetensors")
    for prefix in ("model.layers.1.self_attn.k_proj", "model.layers.0.self_attn.o_proj"):
        assert torch.equal(ckpt.linear(prefix), src[f"{prefix}.weight"])
    assert ckpt.linear("model.layers.0.mlp.experts.3.down_proj").in_features == 64
    assert leftovers(tmp_path) == []
    from adallm_core import EngineArgs
    from adallm_core.engine import LLMEngine

    engine = LLMEngine.from_engine_args(EngineArgs(model=str(dst), device="cpu", kv_cache_dtype="bf16",
                                                   num_gpu_blocks_override=16, max_model_len=64))
    assert engine.runner.model_config.num_experts == 8  # the engine loads what the exclusions made


def test_compressed_tensors_package_decompresses_our_output(moe, tmp_path):
    """compressed-tensors parses our quantization_config and its own NVFP4 decompressor turns every quantized
    linear (experts included) into exactly the weight this project reads."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig

    dst = quantize_checkpoint(moe, tmp_path / "ct", fmt="compressed-tensors", progress=False)["dst"]
    config = QuantizationConfig.model_validate(json.loads((tmp_path / "ct" / "config.json").read_text())[
        "quantization_config"])
    scheme = config.config_groups["group_0"]
    assert scheme.weights.group_size == 16 and scheme.weights.scale_dtype == torch.float8_e4m3fn
    ckpt = Checkpoint(dst)
    names = [n.removesuffix(".weight_packed") for n in tensors(tmp_path / "ct" / "model.safetensors")
             if n.endswith(".weight_packed")]
    assert len(names) == 56
    for prefix in names:
        parts = {k: ckpt.tensor(f"{prefix}.{k}") for k in ("weight_packed", "weight_scale", "weight_global_scale")}
        theirs = NVFP4PackedCompressor.decompress(parts, scheme)["weight"]
        assert torch.equal(theirs, ckpt.linear(prefix).dequantize(theirs.dtype)), prefix


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # we do on purpose: dequantize=True
def test_transformers_loads_our_compressed_tensors_output(moe, tmp_path):
    """End to end through transformers' own compressed-tensors loader (dense linears; see below for experts)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    dst = quantize_checkpoint(moe, tmp_path / "ct", fmt="compressed-tensors", progress=False)["dst"]
    model = AutoModelForCausalLM.from_pretrained(dst, quantization_config=CompressedTensorsConfig(dequantize=True))
    ckpt = Checkpoint(dst)
    for layer in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            want = ckpt.linear(f"model.layers.{layer}.self_attn.{proj}").dequantize(torch.bfloat16)
            assert torch.equal(getattr(model.model.layers[layer].self_attn, proj).weight, want)
    # transformers 5.24 fuses experts on load (gate_up_proj [E, 2I, H]) and its dequantize path leaves them
    # multiplied by weight_global_scale (off by exactly that factor); compressed-tensors' own decompressor (above)
    # gets them right. Checked here so a fix upstream is noticed.
    gate = ckpt.linear("model.layers.0.mlp.experts.2.gate_proj")
    theirs = model.model.layers[0].mlp.experts.gate_up_proj[2][:64].float()
    torch.testing.assert_close(theirs, gate.dequantize() / gate.global_scale[:, None], rtol=1e-2, atol=1e-3)


def test_chunked_streaming_gives_identical_output(moe, tmp_path, monkeypatch):
    whole = quantize_checkpoint(moe, tmp_path / "whole", progress=False)
    monkeypatch.setattr(quantize_mod, "CHUNK_ELEMENTS", 200)  # 3 rows of 64 per chunk
    monkeypatch.setattr(quantize_mod, "READ_WINDOW", 1000)  # reopen the memory map every few chunks
    chunked = quantize_checkpoint(moe, tmp_path / "chunked", progress=False)
    assert chunked["bytes_out"] == whole["bytes_out"]
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "chunked" / name).read_bytes()


def test_sharded_source(tmp_path):
    from transformers import AutoModelForCausalLM

    single = build_tiny_checkpoint("qwen3", tmp_path / "single")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(single).save_pretrained(sharded, max_shard_size="60KB")
    for name in SIDE_FILES:
        (sharded / name).write_bytes((single / name).read_bytes())
    assert len(list(sharded.glob("*.safetensors"))) >= 3
    quantize_checkpoint(sharded, tmp_path / "q-sharded", fmt="modelopt", progress=False)
    quantize_checkpoint(single, tmp_path / "q-single", fmt="modelopt", progress=False)
    index = json.loads((tmp_path / "q-sharded" / "model.safetensors.index.json").read_text())
    for name, shard in index["weight_map"].items():
        with safe_open(str(tmp_path / "q-sharded" / shard), "pt") as f:
            assert name in f.keys()
    a, b = Checkpoint(tmp_path / "q-sharded"), Checkpoint(tmp_path / "q-single")
    assert len(index["weight_map"]) == len(tensors(tmp_path / "q-single" / "model.safetensors"))
    for prefix in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        assert torch.equal(a.linear(prefix).dequantize(), b.linear(prefix).dequantize())


def test_weights_in_other_formats_are_not_copied_as_side_files(tmp_path):
    """A repo that ships pytorch_model.bin (and its index) beside the safetensors: the output holds the NVFP4
    safetensors and the side files, not a second, BF16 copy of the model under a config that says NVFP4."""
    src = build_tiny_checkpoint("qwen3", tmp_path / "src")
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4)}, src / "pytorch_model.bin")
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"x": "pytorch_model.bin"}}))
    quantize_checkpoint(src, tmp_path / "q", fmt="modelopt", progress=False)
    names = {p.name for p in (tmp_path / "q").iterdir()}
    assert not names & {"pytorch_model.bin", "pytorch_model.bin.index.json"}
    assert set(SIDE_FILES) <= names


def test_transformers5_fused_experts_are_refused_by_name(moe, tmp_path):
    """save_pretrained(save_original_format=False) writes Qwen3-MoE experts as mlp.experts.gate_up_proj [E, 2I, H]:
    quantize copied them as BF16 (most of the model left unquantized), then the engine missed experts.0.gate_proj."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(moe).save_pretrained(tmp_path / "fused", save_original_format=False)
    refused = r"tensor 'model\.layers\.\d\.mlp\.experts\.(gate_up|down)_proj' is transformers 5's fused MoE expert"
    with pytest.raises(ValueError, match=refused):
        quantize_checkpoint(tmp_path / "fused", tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match=refused):
        Checkpoint(tmp_path / "fused")


def test_interrupted_run_leaves_nothing(moe, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize_mod.nvfp4, "quantize", interrupted_on_call(quantize_mod.nvfp4.quantize, 5))
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(moe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def run_cli(capsys, *args):
    rc = cli.main(["quantize", *map(str, args)])
    return rc, capsys.readouterr().err


def test_bad_inputs_exit_non_zero_and_leave_nothing(moe, tmp_path, capsys):
    rc, err = run_cli(capsys, tmp_path / "missing", tmp_path / "o1")
    assert rc == 1 and "not a checkpoint folder" in err
    (tmp_path / "exists").mkdir()
    rc, err = run_cli(capsys, moe, tmp_path / "exists")
    assert rc == 1 and "destination already exists" in err
    rc, err = run_cli(capsys, tmp_path / "exists", tmp_path / "o2")  # a folder with no config.json
    assert rc == 1 and "config.json: file not found" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(("exclude", "named"), [
    (["*.self_attn.q_proj"], "keeps model.layers.0.self_attn.q_proj dense but not model.layers.0.self_attn.k_proj, "
                             "model.layers.0.self_attn.v_proj: the engine runs them as one fused linear"),
    (["*.experts.*.down_proj"], "keeps MoE expert model.layers.0.mlp.experts.0.down_proj dense"),
    (["*.o_proj", "typo.*"], "--exclude 'typo.*' matches no quantizable linear"),
    (["re:("], "--exclude 're:(': not a valid regular expression"),
])
def test_exclusions_the_engine_could_not_load_are_refused(moe, tmp_path, capsys, exclude, named):
    rc, err = run_cli(capsys, moe, tmp_path / "out", "--exclude", *exclude)
    assert rc == 1 and named in err, err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_bad_device_or_a_file_in_the_way_is_an_error_line(moe, tmp_path, capsys):
    rc, err = run_cli(capsys, moe, tmp_path / "out", "--device", "nonsense")
    assert rc == 1 and "--device 'nonsense'" in err
    (tmp_path / "afile").write_text("")
    rc, err = run_cli(capsys, moe, tmp_path / "afile" / "out")
    assert rc == 1 and "afile" in err and leftovers(tmp_path) == []


def test_sigterm_leaves_nothing(moe, tmp_path):
    """A killed conversion (SIGTERM, as from a job scheduler) cleans up like Ctrl-C: no DST, no temporary folder."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from adallm_core import nvfp4; real = nvfp4.quantize\n"
        "def slow(*a, **k):\n    time.sleep(0.5); return real(*a, **k)\n"
        "nvfp4.quantize = slow\n"
        "from adallm_core.cli import main; print('started', flush=True); sys.exit(main(sys.argv[1:]))"),
        "quantize", str(moe), str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    deadline = time.monotonic() + 60
    while not leftovers(tmp_path) and time.monotonic() < deadline:  # the temporary folder exists: mid-run
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "nothing was written" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_nan_weight_and_unsupported_architecture(tmp_path):
    src = build_tiny_checkpoint("gemma3", tmp_path / "src")
    st = tensors(src / "model.safetensors")
    st["model.layers.2.mlp.up_proj.weight"][3, 7] = float("nan")
    from safetensors.torch import save_file

    save_file(st, str(src / "model.safetensors"))
    proc = subprocess.run(
        [sys.executable, "-m", "adallm_core.cli", "quantize", str(src), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    assert "model.layers.2.mlp.up_proj.weight" in proc.stderr and "NaN or Inf" in proc.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    assert cli.main(["quantize", str(src), str(tmp_path / "out")]) == 1
    with pytest.raises(ValueError, match=r"field 'architectures' = \['MistralForCausalLM'\] is not supported"):
        quantize_checkpoint(src, tmp_path / "out")


def test_already_quantized_source_is_refused(moe, tmp_path):
    dst = quantize_checkpoint(moe, tmp_path / "q", progress=False)["dst"]
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(dst, tmp_path / "qq")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    del config["quantization_config"]  # older ModelOpt exports describe the format in hf_quant_config.json alone
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"hf_quant_config.json exists; source is already quantized"):
        quantize_checkpoint(dst, tmp_path / "qq")
    (tmp_path / "q" / "hf_quant_config.json").unlink()
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized"}  # FP8
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: field 'quantization_config' is set; source is already quant"):
        quantize_checkpoint(dst, tmp_path / "qq")


@pytest.mark.gpu
def test_cuda_conversion_writes_the_same_bytes(moe, tmp_path):
    quantize_checkpoint(moe, tmp_path / "cpu", fmt="compressed-tensors", progress=False)
    quantize_checkpoint(moe, tmp_path / "cuda", fmt="compressed-tensors", progress=False, device="cuda")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "cpu" / name).read_bytes() == (tmp_path / "cuda" / name).read_bytes()


def test_gemma3_multimodal_vision_side_is_excluded_in_each_layouts_own_pattern_syntax(tmp_path):
    """The vision tower and projector stay BF16 and the quantization config must say so in the syntax its readers
    use: compressed-tensors ignore takes 're:' regexes, ModelOpt exclude_modules takes '*' wildcards (vLLM matches
    re.escape(pattern) with '*' -> '.*'; a 're:' entry there excludes nothing, and the BF16 vision linears would be
    loaded as NVFP4)."""
    src = tiny_gemma3_multimodal(tmp_path / "bf16")
    quantize_checkpoint(src, tmp_path / "mo", fmt="modelopt", progress=False)
    exclude = json.loads((tmp_path / "mo" / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    vision = {k.rsplit(".", 1)[0] for k in tensors(tmp_path / "mo" / "model.safetensors")
              if ("vision_tower" in k or "multi_modal_projector" in k) and k.endswith(".weight")}
    assert vision and not [e for e in exclude if e.startswith("re:")]
    wildcards = [re.escape(p).replace(r"\*", ".*") for p in exclude]
    assert all(any(re.fullmatch(w, m) for w in wildcards) for m in vision)
    assert Checkpoint(tmp_path / "mo").quant_format == "modelopt"
