"""Shared by the model/runner tests: tiny checkpoints built once per session, HF reference models run on the
dequantized NVFP4 weights, and a trivial block allocator to drive ModelRunner directly."""
from __future__ import annotations

import atexit
import math
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from adallm_core.testing import build_tiny_checkpoint


def _fp8_kv_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention on keys/values rounded to E4M3 (scale 1, saturating): what an fp8 KV cache does."""
    def e4m3(t):
        return t.clamp(-448, 448).to(torch.float8_e4m3fn).to(t.dtype)

    return sdpa_attention_forward(module, query, e4m3(key), e4m3(value), attention_mask, **kwargs)


AttentionInterface.register("fp8_kv_sdpa", _fp8_kv_sdpa)
AttentionMaskInterface.register("fp8_kv_sdpa", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])

_ROOT = Path(tempfile.mkdtemp(prefix="adallm-model-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
_BUILT: dict = {}


def tiny_checkpoint(family: str, fmt) -> Path:
    key = (family, fmt)
    if key not in _BUILT:
        _BUILT[key] = build_tiny_checkpoint(family, _ROOT / f"{family}-{fmt or 'bf16'}", fmt=fmt, seed=0)
    return _BUILT[key]


def hf_on_dequantized(family: str, ckpt) -> torch.nn.Module:
    """transformers' own model class, loaded from the BF16 checkpoint in fp32, with every linear that the NVFP4
    checkpoint quantized replaced by its dequantized weight."""
    from transformers import AutoModelForCausalLM

    bf16 = tiny_checkpoint(family, None)
    model = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32, attn_implementation="sdpa").eval()
    replaced = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and (ckpt.has(f"{name}.weight") or ckpt.has(f"{name}.weight_packed")):
                w = ckpt.linear(name)
                if not isinstance(w, torch.Tensor):
                    module.weight.copy_(w.dequantize(torch.float32))
                    replaced += 1
            elif type(module).__name__.endswith("Experts"):  # transformers 5 fuses experts: [E, 2I, H], [E, H, I]
                for e in range(module.gate_up_proj.shape[0]):
                    gate, up, down = (ckpt.linear(f"{name}.{e}.{p}").dequantize(torch.float32)
                                      for p in ("gate_proj", "up_proj", "down_proj"))
                    module.gate_up_proj[e].copy_(torch.cat([gate, up]))
                    module.down_proj[e].copy_(down)
                    replaced += 3
    assert replaced > 0, "no quantized linear found: the reference would not test NVFP4"
    return model


def _cache_kwarg(res) -> dict:
    """transformers renamed past_key_values to cache (5.2x); the GPU machine may have the older name."""
    if "cache" in type(res).__dataclass_fields__:
        return {"cache": res.cache}
    return {"past_key_values": res.past_key_values}


def hf_greedy(model, token_ids: list[int], n: int) -> list[int]:
    """n greedy tokens from transformers with its own KV cache (no eos stop)."""
    out = []
    with torch.no_grad():
        res = model(torch.tensor([token_ids]), use_cache=True)
        for _ in range(n):
            out.append(int(res.logits[0, -1].argmax()))
            res = model(torch.tensor([[out[-1]]]), use_cache=True, **_cache_kwarg(res))
    return out


def hf_last_logits(model, token_ids: list[int]) -> torch.Tensor:
    """Logits for the last token from a fresh full-sequence forward (no cache: independent of HF's cache code)."""
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0, -1].float()


class Blocks:
    """Hands out block ids 1, 2, 3, ... as sequences grow (0 is the engine's null block); same ids in every group."""

    def __init__(self, block_size: int, num_groups: int):
        self.block_size, self.num_groups = block_size, num_groups
        self.tables: dict = {}
        self.next = 1

    def tables_for(self, seq, num_tokens: int) -> list[list[int]]:
        table = self.tables.setdefault(seq, [])
        while len(table) < math.ceil(num_tokens / self.block_size):
            table.append(self.next)
            self.next += 1
        return [list(table) for _ in range(self.num_groups)]


def compressed_tensors_nvfp4(w: torch.Tensor) -> torch.Tensor:
    """W quantized to NVFP4 and back by the compressed-tensors package (one global scale, groups of 16), fp32."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    args = QuantizationArgs(num_bits=4, type=QuantizationType.FLOAT, strategy=QuantizationStrategy.TENSOR_GROUP,
                            group_size=16, symmetric=True, scale_dtype=torch.float8_e4m3fn)
    w = w.float()
    g = generate_gparam(w.min(), w.max())
    groups = w.unflatten(-1, (-1, 16))
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=g)
    return fake_quantize(w, scale, zero_point, args, global_scale=g).float()


def tiny_gemma3_multimodal(out_dir: Path, **text) -> Path:
    """A tiny random Gemma3ForConditionalGeneration (SigLIP vision tower + projector), saved by transformers in BF16.
    `text` overrides the text config; unset, heads / KV heads / head_dim are transformers' defaults (8, 4, 256)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(**{"vocab_size": 384, "hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 2, "sliding_window": 16, **text})
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          image_token_index=383, boi_token_index=381, eoi_token_index=382)
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(out_dir)
    return Path(out_dir)


def interrupted_on_call(real, call: int):
    """`real`, except that its call number `call` raises KeyboardInterrupt instead (a Ctrl-C mid-work)."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return wrapped
