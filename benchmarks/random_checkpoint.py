"""Random NVFP4 checkpoints of real model shapes, built directly on the GPU (no download, no disk).

RandomCheckpoint duck-types adallm_core.checkpoint.read.Checkpoint: the model classes ask it for linears and
tensors by name and get random NVFP4Weight / BF16 tensors of the shapes the config implies. Values are random, so
the generated text is noise; speed and memory are those of the real model.
"""
from __future__ import annotations

import torch

from adallm_core.nvfp4 import NVFP4Weight

# name -> (transformers config class, architecture, config kwargs)
SHAPES = {
    "qwen3-8b": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
        tie_word_embeddings=False, rope_theta=1e6)),
    "gemma3-27b": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=262208, hidden_size=5376, intermediate_size=21504, num_hidden_layers=62, num_attention_heads=32,
        num_key_value_heads=16, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-6,
        query_pre_attn_scalar=168, sliding_window=1024, tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 8.0})),
    "gemma3-12b": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(  # 256-dim heads, like Gemma3-4B
        vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, max_position_embeddings=131072, rms_norm_eps=1e-6,
        query_pre_attn_scalar=256, sliding_window=1024, tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 8.0})),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
        tie_word_embeddings=False, rope_theta=1e6)),
}
STD = 0.02  # weight standard deviation of the random linears (typical of trained LLMs)


def hf_config(shape: str, overrides: dict | None = None):
    import transformers

    cls_name, arch, kwargs = SHAPES[shape]
    cfg = getattr(transformers, cls_name)(**{**kwargs, **(overrides or {})})
    cfg.architectures = [arch]
    return cfg


class RandomCheckpoint:
    """The Checkpoint interface over random tensors of `shape`'s sizes, made on `device`."""

    quant_format = "modelopt"
    path = None

    def __init__(self, shape: str, device="cuda", seed: int = 0, overrides: dict | None = None):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
        self.hf_config = hf_config(shape, overrides)  # overrides: smaller sizes for tests
        self.config = self.hf_config.to_dict()
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        t = self.hf_config
        h, d = t.hidden_size, t.head_dim
        inter = getattr(t, "moe_intermediate_size", None) if getattr(t, "num_experts", 0) else None
        self.shapes = {
            "q_proj": (t.num_attention_heads * d, h), "k_proj": (t.num_key_value_heads * d, h),
            "v_proj": (t.num_key_value_heads * d, h), "o_proj": (h, t.num_attention_heads * d),
            "gate_proj": (t.intermediate_size, h), "up_proj": (t.intermediate_size, h),
            "down_proj": (h, t.intermediate_size),
        }
        self.expert_shapes = {"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)} if inter else {}

    def has(self, name: str) -> bool:
        if name.startswith("lm_head"):
            return not self.hf_config.tie_word_embeddings and name == "lm_head.weight"
        return name.startswith("model.") and name.endswith(".weight")

    def kv_scales(self) -> dict:
        return {}

    def _randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.device, dtype=torch.bfloat16)

    def tensor(self, name: str, index=None) -> torch.Tensor:
        t = self.hf_config
        if name.endswith("embed_tokens.weight"):  # index: a tensor-parallel rank's rows, made at that size only
            return self._randn(*_sliced((t.vocab_size, t.hidden_size), index)).mul_(STD)
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            return 1.0 + 0.1 * self._randn(t.head_dim)
        if name.endswith("norm.weight"):
            return 1.0 + 0.1 * self._randn(t.hidden_size)
        raise ValueError(f"RandomCheckpoint has no tensor {name!r}")

    def linear(self, prefix: str, rows: slice | None = None, cols: slice | None = None):
        """rows / cols: a tensor-parallel shard; the random weight is made at the shard's size only."""
        t = self.hf_config
        last = prefix.rsplit(".", 1)[-1]
        index = (rows or slice(None), cols or slice(None))
        if prefix == "lm_head":
            return self._randn(*_sliced((t.vocab_size, t.hidden_size), index)).mul_(STD)
        if last == "gate" and getattr(t, "num_experts", 0):
            return self._randn(t.num_experts, t.hidden_size).mul_(STD)
        shapes = self.expert_shapes if ".experts." in prefix else self.shapes
        if last not in shapes:
            raise ValueError(f"RandomCheckpoint has no linear {prefix!r}")
        return self.random_nvfp4(*_sliced(shapes[last], index))

    def random_nvfp4(self, n: int, k: int) -> NVFP4Weight:
        packed = torch.randint(0, 256, (n, k // 2), generator=self.gen, device=self.device, dtype=torch.uint8)
        # E4M3 block scales in [1, 2); uniform random codes have rms 2.93, so this global scale gives rms ~STD
        scale = (1.0 + torch.rand(n, k // 16, generator=self.gen, device=self.device)).to(torch.float8_e4m3fn)
        g = torch.full((n,), STD / (2.93 * 1.5), device=self.device)
        return NVFP4Weight(packed, scale, g)


def _sliced(shape, index) -> tuple[int, ...]:
    return tuple(torch.empty(shape, device="meta")[index].shape) if index is not None else tuple(shape)


def open_random(shape: str, overrides: dict | None, model_path, device) -> RandomCheckpoint:
    """checkpoint_factory for tensor-parallel ranks (functools.partial(open_random, shape, overrides))."""
    return RandomCheckpoint(shape, device, overrides=overrides)
