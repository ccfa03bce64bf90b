"""Both NVFP4 layouts of each tiny model load, and every weight equals the source weight quantized by an
independent formula written here (the published recipe, vectorized, sharing no code with adallm_core.nvfp4)."""
import pytest
import torch
from safetensors import safe_open

from adallm_core.checkpoint.quantize import quantize_checkpoint
from adallm_core.checkpoint.read import Checkpoint
from adallm_core.nvfp4 import NVFP4Weight
from adallm_core.testing import build_tiny_checkpoint

GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def reference_dequantized(w: torch.Tensor, divides: bool) -> torch.Tensor:
    """NVFP4.md's recipe: global = 448*6/amax (compressed-tensors; ModelOpt stores amax/(448*6) and multiplies),
    block scale = e4m3(amax(block)/6 scaled by the global), value = nearest E2M1 (ties to even), saturate at 6."""
    w = w.float()
    amax = w.abs().max()
    g = 2688.0 / amax if divides else amax / 2688.0
    blocks = w.reshape(w.shape[0], -1, 16)
    block_max = blocks.abs().amax(-1, keepdim=True)
    s = (block_max / 6 * g if divides else block_max / (6 * g)).clamp(max=448).to(torch.float8_e4m3fn).float()
    eff = s / g if divides else s * g
    x = torch.where(eff > 0, blocks / eff, torch.zeros_like(blocks))
    dist = (x.abs().clamp(max=6).unsqueeze(-1) - GRID).abs()
    nearest = dist == dist.amin(-1, keepdim=True)
    even = nearest & (torch.arange(8) % 2 == 0)
    pick = torch.where(even.any(-1), even.int().argmax(-1), nearest.int().argmax(-1))
    return (torch.sign(x) * GRID[pick] * eff).reshape(w.shape)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for family in ("qwen3", "qwen3_moe", "gemma3"):
        out[family, None] = build_tiny_checkpoint(family, root / family)
        for fmt in ("modelopt", "compressed-tensors"):  # quantize_checkpoint is what build_tiny_checkpoint(fmt=) runs
            out[family, fmt] = root / f"{family}-{fmt}"
            quantize_checkpoint(out[family, None], out[family, fmt], fmt=fmt, progress=False)
    return out


def source_tensors(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "gemma3"])
def test_every_weight_matches_the_independent_formula(checkpoints, family, fmt):
    src = source_tensors(checkpoints[family, None])
    ckpt = Checkpoint(checkpoints[family, fmt])
    assert ckpt.quant_format == fmt
    n_quantized = 0
    for name, w in src.items():
        prefix = name.removesuffix(".weight")
        if prefix.rsplit(".", 1)[-1] in LINEARS:
            q = ckpt.linear(prefix)
            assert isinstance(q, NVFP4Weight), name
            assert (q.out_features, q.in_features) == tuple(w.shape)
            want = reference_dequantized(w, divides=fmt == "compressed-tensors")
            if fmt == "modelopt":
                assert torch.equal(q.dequantize(), want), name
            else:  # the reader turns the dividing global scale into a multiplying one: 1 ulp apart at most
                torch.testing.assert_close(q.dequantize(), want, rtol=2e-7, atol=0, msg=name)
            n_quantized += 1
        else:  # embeddings, norms, router, lm_head: stored as is
            assert torch.equal(ckpt.tensor(name), w), name
            if name.endswith("mlp.gate.weight") or name == "lm_head.weight":
                assert torch.equal(ckpt.linear(prefix), w)
    experts = sum(".experts." in n for n in src)
    assert n_quantized == {"qwen3": 14, "qwen3_moe": 8 + 2 * 8 * 3, "gemma3": 28}[family]
    assert experts == (2 * 8 * 3 if family == "qwen3_moe" else 0)


def test_fused_qkv_keeps_each_part_exact(checkpoints):
    ckpt = Checkpoint(checkpoints["qwen3", "compressed-tensors"])
    parts = [ckpt.linear(f"model.layers.1.self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj")]
    fused = NVFP4Weight.cat(parts)
    assert fused.out_features == 64 + 32 + 32
    assert len(set(fused.global_scale.tolist())) == 3  # three different global scales, kept per row
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))


def test_stacked_experts_from_checkpoint(checkpoints):
    ckpt = Checkpoint(checkpoints["qwen3_moe", "modelopt"])
    experts = [ckpt.linear(f"model.layers.0.mlp.experts.{e}.down_proj") for e in range(8)]
    stacked = NVFP4Weight.stack(experts)
    assert tuple(stacked.packed.shape) == (8, 64, 32)
    assert torch.equal(stacked.dequantize()[5], experts[5].dequantize())


def test_unquantized_checkpoint_loads_dense(checkpoints):
    ckpt = Checkpoint(checkpoints["gemma3", None])
    assert ckpt.quant_format is None
    w = ckpt.linear("model.layers.0.mlp.down_proj")
    assert w.dtype == torch.bfloat16 and tuple(w.shape) == (64, 128)
    assert not ckpt.has("lm_head.weight")  # Gemma3 ties lm_head to the embeddings
    assert ckpt.hf_config.sliding_window == 16
    assert ckpt.kv_scales() == {}


def test_config_and_ignore_lists(checkpoints):
    moe = Checkpoint(checkpoints["qwen3_moe", "modelopt"])
    assert moe.ignore == ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert moe.config["quantization_config"]["quant_method"] == "modelopt"
    ct = Checkpoint(checkpoints["qwen3_moe", "compressed-tensors"])
    assert ct.ignore == moe.ignore
    qc = ct.config["quantization_config"]
    assert (qc["format"], qc["config_groups"]["group_0"]["weights"]["group_size"]) == ("nvfp4-pack-quantized", 16)
