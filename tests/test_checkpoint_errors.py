"""Every bad checkpoint gets a CheckpointError (a ValueError) that names the file and the tensor or field."""
import json
import re
import shutil

import pytest
import torch
from engine_fixtures import greedy_tokens, make_engine
from model_helpers import tiny_gemma3_multimodal
from safetensors import safe_open
from safetensors.torch import save_file

from adallm_core.checkpoint.files import CheckpointError, load_config
from adallm_core.checkpoint.quantize import quantize_checkpoint
from adallm_core.checkpoint.read import Checkpoint
from adallm_core.testing import build_tiny_checkpoint

Q_SCALE = "model.layers.0.self_attn.q_proj.weight_scale"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    bf16 = build_tiny_checkpoint("qwen3", root / "bf16")
    for fmt in ("modelopt", "compressed-tensors"):
        quantize_checkpoint(bf16, root / fmt, fmt=fmt, progress=False)
    return root


def copy(good, name, tmp_path):
    return shutil.copytree(good / name, tmp_path / name)


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def rewrite_tensor(folder, name, new):
    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = new
    save_file(tensors, str(path))


def test_good_checkpoints_load(good):
    for fmt in ("modelopt", "compressed-tensors"):
        assert Checkpoint(good / fmt).quant_format == fmt


def test_truncated_safetensors(good, tmp_path):
    folder = copy(good, "modelopt", tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        Checkpoint(folder)


def test_corrupt_safetensors_header(good, tmp_path):
    folder = copy(good, "compressed-tensors", tmp_path)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        Checkpoint(folder)


def test_missing_shard_named_in_index(good, tmp_path):
    folder = copy(good, "bf16", tmp_path)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / shard))
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert Checkpoint(folder).has(names[-1])  # the sharded form is fine
    (folder / "model-00002-of-00002.safetensors").unlink()
    missing = r"index\.json: shard 'model-00002-of-00002\.safetensors' \(holding e.g. tensor '.*'\) is missing"
    with pytest.raises(CheckpointError, match=missing):
        Checkpoint(folder)


def test_missing_numbered_shard_without_an_index(good, tmp_path):
    """No index (not downloaded, or not copied), but the shards' own names say how many there are: a missing one
    was reported as the first tensor it held, 'is missing'."""
    folder = copy(good, "modelopt", tmp_path)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    names = sorted(tensors)
    for i, keys in enumerate((names[:10], names[10:20], names[20:]), 1):
        save_file({k: tensors[k] for k in keys}, str(folder / f"model-{i:05d}-of-00003.safetensors"))
    (folder / "model.safetensors").unlink()
    assert Checkpoint(folder).has(names[-1])  # all three: fine without an index
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors: missing \(the folder holds "
                                              r"model-00001-of-00003\.safetensors and no model\.safetensors\.index"):
        Checkpoint(folder)


def test_shard_the_index_does_not_list_is_named_when_a_tensor_is_missing(good, tmp_path):
    """An index that forgot a shard: the shard stays unread (stale copies are common), but the missing-tensor error
    names it, so the fix (the index) is in the message."""
    folder = copy(good, "compressed-tensors", tmp_path)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    moved = {k for k in tensors if ".layers.1." in k and k.endswith(".weight_scale")}
    save_file({k: tensors[k] for k in tensors if k not in moved}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in moved}, str(folder / "model-00002-of-00002.safetensors"))
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {k: "model-00001-of-00002.safetensors" for k in tensors if k not in moved}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    missing = (r"tensor 'model\.layers\.1\..*\.weight_scale' is missing \(model\.safetensors\.index\.json does not "
               r"list model-00002-of-00002\.safetensors, which the folder also holds\)")
    with pytest.raises(CheckpointError, match=missing):
        Checkpoint(folder)


LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 1503300328\n")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_git_lfs_pointer_instead_of_the_file(good, tmp_path, name):
    """A model repo cloned without git-lfs: each large file is a 3-line text pointer. safetensors called it a
    'header too large', JSON 'Expecting value': named as the pointer it is, with the command that fetches it."""
    folder = copy(good, "modelopt", tmp_path)
    (folder / name).write_text(LFS_POINTER)
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)}: a Git LFS pointer, not the file itself.*"
                                              rf"git lfs pull"):
        Checkpoint(folder)


def test_index_that_maps_a_tensor_to_no_file_name(good, tmp_path):
    folder = copy(good, "bf16", tmp_path)
    index = {"weight_map": {"model.norm.weight": "model.safetensors", "model.embed_tokens.weight": None}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index\.json: weight_map maps tensor 'model\.embed_tokens\.weight' "
                                              r"to None, not a shard file name"):
        Checkpoint(folder)


@pytest.mark.parametrize(
    "fmt,name,new,match",
    [
        ("modelopt", Q_SCALE, torch.zeros(64, 2).to(torch.float8_e4m3fn), r"has shape \[64, 2\], expected \[64, 4\]"),
        ("modelopt", Q_SCALE, torch.zeros(64, 4), r"has dtype torch.float32, expected torch.float8_e4m3fn"),
        ("compressed-tensors", "model.layers.1.mlp.down_proj.weight_packed", torch.zeros(64, 32, dtype=torch.uint8),
         r"has shape \[64, 32\], expected \[64, 64\]"),
        ("compressed-tensors", "model.layers.0.self_attn.k_proj.weight_global_scale", torch.ones(2),
         r"has shape \[2\], expected a single value"),
    ],
)
def test_tensor_of_wrong_shape_or_dtype(good, tmp_path, fmt, name, new, match):
    folder = copy(good, fmt, tmp_path)
    rewrite_tensor(folder, name, new)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}' {match}"):
        Checkpoint(folder)


@pytest.mark.parametrize("fmt,name", [("modelopt", "model.layers.0.self_attn.q_proj.weight"),
                                      ("compressed-tensors", "model.layers.0.self_attn.q_proj.weight_packed")])
def test_packed_weight_of_wrong_dtype(good, tmp_path, fmt, name):
    """A packed weight stored as int8 is named with its dtype, not taken for a dense weight (which compressed-tensors
    reported as '...q_proj.weight' missing, ModelOpt as a dense weight that should be BF16)."""
    folder = copy(good, fmt, tmp_path)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        packed = f.get_tensor(name)
    rewrite_tensor(folder, name, packed.view(torch.int8))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has dtype torch.int8, expected torch.uint8"):
        Checkpoint(folder)


@pytest.mark.parametrize("fmt,name,value", [
    ("compressed-tensors", "model.layers.1.mlp.up_proj.weight_global_scale", torch.zeros(1)),
    ("modelopt", "model.layers.1.mlp.up_proj.weight_scale_2", torch.tensor(float("nan"))),
    ("modelopt", "model.layers.1.mlp.up_proj.weight_scale_2", torch.tensor(-0.5)),
])
def test_global_scale_that_is_not_finite_and_positive(good, tmp_path, fmt, name, value):
    """A zero compressed-tensors global scale divides into Inf/NaN weights; a NaN one poisons every logit."""
    folder = copy(good, fmt, tmp_path)
    rewrite_tensor(folder, name, value)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}' = .*must be finite and > 0"):
        Checkpoint(folder).linear("model.layers.1.mlp.up_proj")


def test_dense_weight_of_wrong_shape(good, tmp_path):
    folder = copy(good, "bf16", tmp_path)
    rewrite_tensor(folder, "model.layers.1.mlp.up_proj.weight", torch.zeros(100, 64, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' has shape \[100, 64\]"):
        Checkpoint(folder)


@pytest.mark.parametrize(("name", "new", "match"), [
    ("model.layers.0.input_layernorm.weight", torch.ones(7, dtype=torch.bfloat16), r"has shape \[7\], expected \[64\]"),
    ("model.layers.1.self_attn.k_norm.weight", torch.ones(64, dtype=torch.bfloat16), r"has shape \[64\], expected \[16\]"),
    ("model.embed_tokens.weight", torch.zeros(384, 64, dtype=torch.int32), r"has dtype torch.int32"),
])
def test_norm_or_embedding_of_wrong_shape_or_dtype(good, tmp_path, name, new, match):
    """Named at load, not at the first step's shape mismatch (or never, for an integer embedding table)."""
    folder = copy(good, "modelopt", tmp_path)
    rewrite_tensor(folder, name, new)
    with pytest.raises(CheckpointError, match=f"tensor '{re.escape(name)}' {match}"):
        Checkpoint(folder)


@pytest.mark.parametrize(("name", "new", "match"), [
    ("lm_head.weight", torch.zeros(384, 64, dtype=torch.int8), r"has dtype torch.int8"),
    ("lm_head.weight", torch.zeros(300, 64, dtype=torch.bfloat16), r"has shape \[300, 64\], expected \[384, 64\]"),
    ("model.layers.1.mlp.gate.weight", torch.zeros(8, 64, dtype=torch.int32), r"has dtype torch.int32"),
    ("model.layers.1.mlp.gate.weight", torch.zeros(8, 32, dtype=torch.bfloat16),
     r"has shape \[8, 32\], expected \[8, 64\]"),
])
def test_dense_lm_head_or_router_of_wrong_shape_or_dtype(tmp_path, name, new, match):
    """The dense linears no projection rule covers: an integer lm_head or router was cast to float at load and ran,
    giving logits or routing from raw integers without a word."""
    folder = build_tiny_checkpoint("qwen3_moe", tmp_path / "moe")
    rewrite_tensor(folder, name, new)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{re.escape(name)}' {match}"):
        Checkpoint(folder)


def test_unknown_quant_algo(good, tmp_path):
    folder = copy(good, "modelopt", tmp_path)
    edit_json(folder / "hf_quant_config.json", lambda d: d["quantization"].update(quant_algo="W4A8_AWQ"))
    with pytest.raises(CheckpointError, match=r"hf_quant_config\.json: field 'quant_algo' = 'W4A8_AWQ'"):
        Checkpoint(folder)
    (folder / "hf_quant_config.json").unlink()  # config.json's own quantization_config is read then
    edit_json(folder / "config.json", lambda d: d["quantization_config"].update(quant_algo="FP8"))
    with pytest.raises(CheckpointError, match=r"config\.json quantization_config: field 'quant_algo' = 'FP8'"):
        Checkpoint(folder)


def test_hf_quant_config_and_config_json_must_agree(good, tmp_path):
    """Both files (newer ModelOpt exports write both): a stale one of either kind is named, never half-believed."""
    folder = copy(good, "modelopt", tmp_path)
    Checkpoint(folder)  # ours agree
    edit_json(folder / "config.json", lambda d: d["quantization_config"].update(quant_algo="FP8"))
    with pytest.raises(CheckpointError, match=r"hf_quant_config\.json says ModelOpt NVFP4 but .*config\.json "
                                              r"quantization_config says quant_method='modelopt' quant_algo='FP8'"):
        Checkpoint(folder)
    ct = copy(good, "compressed-tensors", tmp_path)
    shutil.copy(folder / "hf_quant_config.json", ct / "hf_quant_config.json")  # left over from another export
    with pytest.raises(CheckpointError, match=r"quant_method='compressed-tensors'"):
        Checkpoint(ct)


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_quantized_tensors_without_a_quantization_config(good, tmp_path, fmt):
    """An NVFP4 export whose config.json lost its quantization_config (and hf_quant_config.json was not copied):
    named as such, not as a dense '.weight' that is missing (compressed-tensors) or has dtype uint8 (ModelOpt)."""
    folder = copy(good, fmt, tmp_path)
    edit_json(folder / "config.json", lambda d: d.pop("quantization_config"))
    (folder / "hf_quant_config.json").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.down_proj\."
                                              r"weight_\w+' belongs to a quantized checkpoint, but .*config\.json "
                                              r"has no quantization_config and there is no hf_quant_config\.json"):
        Checkpoint(folder)


@pytest.mark.parametrize("weights,configs,other", [("compressed-tensors", "modelopt", "compressed-tensors"),
                                                   ("modelopt", "compressed-tensors", "modelopt")])
def test_config_files_of_the_other_layout(good, tmp_path, weights, configs, other):
    """config.json (+ hf_quant_config.json) from another NVFP4 export of the same model: the layouts' global scales
    are reciprocals, so the mismatch is named, not a dense '.weight' that is missing or uint8."""
    folder = copy(good, weights, tmp_path)
    (folder / "hf_quant_config.json").unlink(missing_ok=True)
    for name in ("config.json", "hf_quant_config.json"):
        if (good / configs / name).exists():
            shutil.copy(good / configs / name, folder / name)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '.*' is in the {other} layout, but the "
                                              rf"quantization config says {configs}"):
        Checkpoint(folder)


def test_unknown_quant_method_and_ct_format(good, tmp_path):
    folder = copy(good, "compressed-tensors", tmp_path)
    edit_json(folder / "config.json", lambda d: d["quantization_config"].update(format="pack-quantized"))
    with pytest.raises(CheckpointError, match=r"config\.json quantization_config: field 'format'.*pack-quantized"):
        Checkpoint(folder)
    edit_json(folder / "config.json", lambda d: d["quantization_config"].update(quant_method="gptq"))
    with pytest.raises(CheckpointError, match=r"field 'quant_method' = 'gptq'"):
        Checkpoint(folder)


@pytest.mark.parametrize("fmt,file,change,match", [
    ("modelopt", "hf_quant_config.json", lambda d: d.update(quantization=None),
     r"hf_quant_config\.json: field 'quantization' is None, expected a JSON object"),
    ("compressed-tensors", "config.json", lambda d: d.update(quantization_config="nvfp4"),
     r"config\.json: field 'quantization_config' is 'nvfp4', expected a JSON object"),
    ("compressed-tensors", "config.json", lambda d: d["quantization_config"].update(config_groups=["group_0"]),
     r"config\.json quantization_config: field 'config_groups' is \['group_0'\], expected a JSON object"),
    ("compressed-tensors", "config.json", lambda d: d["quantization_config"]["config_groups"].update(group_0="nvfp4"),
     r"config\.json quantization_config: field config_groups\.group_0 is 'nvfp4', expected a JSON object"),
    ("compressed-tensors", "config.json",
     lambda d: d["quantization_config"]["config_groups"]["group_0"].update(weights="nvfp4"),
     r"config\.json quantization_config: field config_groups\.group_0\.weights is 'nvfp4', expected a JSON object"),
])
def test_quantization_config_that_is_not_an_object(good, tmp_path, fmt, file, change, match):
    folder = copy(good, fmt, tmp_path)
    edit_json(folder / file, change)
    for load in (load_config, Checkpoint):  # the engine's load_config, before its tokenizer reads config.json
        with pytest.raises(CheckpointError, match=match):
            load(folder)


@pytest.mark.parametrize("fmt,file,change,match", [
    ("compressed-tensors", "config.json",  # llm-compressor's INT8 KV cache: the FP8 cache would misread its scales
     lambda d: d["quantization_config"].update(kv_cache_scheme={"num_bits": 8, "type": "int", "strategy": "tensor"}),
     r"field 'kv_cache_scheme' is num_bits=8 type='int'; only an FP8 KV cache"),
    ("compressed-tensors", "config.json",  # 2:4 sparse weights are stored compressed: their tensors are no NVFP4's
     lambda d: d["quantization_config"].update(sparsity_config={"format": "sparse-24-bitmask", "targets": ["Linear"]}),
     r"field sparsity_config\.format = 'sparse-24-bitmask': sparse \(e\.g\. 2:4\) weights are not supported"),
    ("compressed-tensors", "config.json", lambda d: d["quantization_config"].update(ignore="lm_head"),
     r"field 'ignore' is 'lm_head', expected a list of module names"),
    ("modelopt", "hf_quant_config.json", lambda d: d["quantization"].update(exclude_modules="lm_head"),
     r"field 'exclude_modules' is 'lm_head', expected a list of module names"),
])
def test_quantization_fields_that_would_be_misread(good, tmp_path, fmt, file, change, match):
    folder = copy(good, fmt, tmp_path)
    edit_json(folder / file, change)
    for load in (load_config, Checkpoint):
        with pytest.raises(CheckpointError, match=match):
            load(folder)


def test_fp8_kv_cache_scheme_and_dense_sparsity_config_load(good, tmp_path):
    folder = copy(good, "compressed-tensors", tmp_path)
    edit_json(folder / "config.json", lambda d: d["quantization_config"].update(
        kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True},
        sparsity_config={"format": "dense"}))
    assert Checkpoint(folder).kv_cache_fp8


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_kv_scale_that_is_not_finite_and_positive(good, tmp_path, value):
    """The FP8 cache stores k / k_scale: a zero, negative or NaN scale would fill it with inf or NaN, silently."""
    folder = copy(good, "modelopt", tmp_path)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(value)
    tensors["model.layers.0.self_attn.v_scale"] = torch.tensor(0.5)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.self_attn\.k_scale' is .*; a k/v scale "
                                              r"must be finite and > 0"):
        Checkpoint(folder).kv_scales()


def test_group_size_other_than_16(good, tmp_path):
    mo = copy(good, "modelopt", tmp_path)
    edit_json(mo / "hf_quant_config.json", lambda d: d["quantization"].update(group_size=32))
    with pytest.raises(CheckpointError, match=r"hf_quant_config\.json: field 'group_size' = 32"):
        Checkpoint(mo)
    ct = copy(good, "compressed-tensors", tmp_path)
    edit_json(ct / "config.json", lambda d: d["quantization_config"]["config_groups"]["group_0"]["weights"].update(
        group_size=32))
    with pytest.raises(CheckpointError, match=r"field config_groups\.group_0\.weights\.group_size = 32"):
        Checkpoint(ct)


def test_unsupported_architecture(good, tmp_path):
    folder = copy(good, "modelopt", tmp_path)
    edit_json(folder / "config.json", lambda d: d.update(architectures=["LlamaForCausalLM"]))
    with pytest.raises(CheckpointError, match=r"config\.json: field 'architectures' = \['LlamaForCausalLM'\]"):
        Checkpoint(folder)


def test_the_first_supported_architecture_is_built(good, tmp_path):
    """architectures lists several (a fine-tune's own class first): the first one adallm builds is used, as vLLM
    picks; the list passed load_config's check, so the model build must not take the unsupported first entry."""
    folder = copy(good, "modelopt", tmp_path)
    prompt = [[5, 6, 7, 8]]
    want = greedy_tokens(make_engine(model=str(folder)), prompt)
    edit_json(folder / "config.json", lambda d: d.update(architectures=["MyTunedQwen3", "Qwen3ForCausalLM"]))
    assert greedy_tokens(make_engine(model=str(folder)), prompt) == want


@pytest.mark.parametrize("change,match", [
    (lambda d: d.update(hidden_size=None), r"hidden_size.*expected int, got NoneType"),
    (lambda d: d.update(num_attention_heads="4"), r"num_attention_heads.*expected int, got str"),
    (lambda d: d.pop("num_hidden_layers"), r"num_hidden_layers.* \(32\) must be equal to the number of .*layer_types"),
])
def test_config_field_transformers_refuses(good, tmp_path, change, match):
    """transformers 5 validates config.json (huggingface_hub's strict dataclasses, whose errors are no ValueError):
    named as config.json's, before the tokenizer (which reads it too) or the weights are tried."""
    folder = copy(good, "modelopt", tmp_path)
    edit_json(folder / "config.json", change)
    for load in (load_config, Checkpoint):
        with pytest.raises(CheckpointError, match=rf"config\.json: transformers cannot read it: .*{match}"):
            load(folder)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        Checkpoint(tmp_path)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_kv_scales_found_by_suffix(good, tmp_path):
    folder = copy(good, "modelopt", tmp_path)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(0.5)
    tensors["model.layers.0.self_attn.v_scale"] = torch.tensor(0.25)
    tensors["model.layers.1.self_attn.k_proj.k_scale"] = torch.tensor([2.0])  # older ModelOpt names
    tensors["model.layers.1.self_attn.v_proj.v_scale"] = torch.tensor([4.0])
    save_file(tensors, str(folder / "model.safetensors"))
    edit_json(folder / "hf_quant_config.json", lambda d: d["quantization"].update(kv_cache_quant_algo="FP8"))
    ckpt = Checkpoint(folder)
    assert ckpt.kv_cache_fp8 and ckpt.kv_scales() == {0: (0.5, 0.25), 1: (2.0, 4.0)}


def test_per_head_kv_scales_are_refused(good, tmp_path):
    """compressed-tensors' kv_cache_scheme strategy 'attn_head' stores k/v scales [num_kv_heads, 1, 1]; the cache
    has one scale per layer, so using the first head's for all would be silently wrong."""
    folder = copy(good, "compressed-tensors", tmp_path)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.1.self_attn.k_scale"] = torch.tensor([[[0.5]], [[2.0]]], dtype=torch.bfloat16)
    tensors["model.layers.1.self_attn.v_scale"] = torch.tensor([[[0.5]], [[2.0]]], dtype=torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.1\.self_attn\.[kv]_scale' "
                                              r"has shape \[2, 1, 1\]: per-head"):
        Checkpoint(folder).kv_scales()


def test_gemma3_multimodal_names_resolve_to_the_text_model(good, tmp_path):
    """Gemma3ForConditionalGeneration keeps the language model under model.language_model.* (transformers 5)."""
    folder = copy(good, "compressed-tensors", tmp_path)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        tensors = {k.replace("model.", "model.language_model.", 1): f.get_tensor(k) for k in f.keys()}
    tensors["model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 32, dtype=torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    text = {k: config.pop(k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                        "intermediate_size")}
    config.update(architectures=["Gemma3ForConditionalGeneration"], text_config=text)
    (folder / "config.json").write_text(json.dumps(config))
    ckpt = Checkpoint(folder)
    q = ckpt.linear("model.layers.0.self_attn.q_proj")
    assert (q.out_features, q.in_features) == (64, 64)
    assert ckpt.tensor("model.embed_tokens.weight").shape == (384, 64)
    assert ckpt.linear("model.vision_tower.encoder.layers.0.self_attn.q_proj").dtype == torch.bfloat16


def test_gemma3_multimodal_config_that_omits_default_fields(tmp_path):
    """google/gemma-3-4b-it's config.json leaves out the text_config fields that equal transformers' defaults
    (num_attention_heads 8, num_key_value_heads 4, head_dim 256): the shape checks read them as the model build does."""
    tiny_gemma3_multimodal(tmp_path / "bf16")
    edit_json(tmp_path / "bf16" / "config.json", lambda d: [
        d["text_config"].pop(k) for k in ("num_attention_heads", "num_key_value_heads", "head_dim")])
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "nvfp4", fmt="modelopt", progress=False)
    for folder in ("bf16", "nvfp4"):
        q = Checkpoint(tmp_path / folder).linear("model.layers.0.self_attn.q_proj")
        assert tuple(q.shape if isinstance(q, torch.Tensor) else (q.out_features, q.in_features)) == (8 * 256, 64)
