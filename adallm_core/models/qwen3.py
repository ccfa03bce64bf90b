"""Qwen3 (dense): pre-norm decoder, QK-norm attention, SwiGLU MLP."""
from __future__ import annotations

from adallm_core.models.base import CausalLM
from adallm_core.models.layers import GatedMLP, QKNormAttention, RMSNorm


class Qwen3DecoderLayer:
    def __init__(self, model: CausalLM, index: int, prefix: str, ckpt, kv_group: int, mlp):
        cfg, ops, dev, dt = model.cfg, model.ops, model.device, model.dtype
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(ckpt.tensor(f"{prefix}.input_layernorm.weight"), eps, ops, dev, dt)
        self.post_attention_layernorm = RMSNorm(ckpt.tensor(f"{prefix}.post_attention_layernorm.weight"), eps, ops, dev, dt)
        rotary = model.rotary[cfg.layer_types[index]]
        self.self_attn = QKNormAttention(
            cfg, index, f"{prefix}.self_attn", ckpt, ops, dev, dt, rotary, kv_group, scale=cfg.head_dim**-0.5
        )
        self.mlp = mlp

    def __call__(self, x, residual, ctx):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm.add(x, residual)
        x = self.self_attn(x, ctx)
        x, residual = self.post_attention_layernorm.add(x, residual)
        return self.mlp(x), residual


class Qwen3ForCausalLM(CausalLM):
    def make_mlp(self, index: int, prefix: str, ckpt):
        cfg = self.cfg
        return GatedMLP(ckpt, prefix, cfg.hidden_size, cfg.intermediate_size, cfg.activation, self.ops, self.device, self.dtype)

    def make_layer(self, index: int, prefix: str, ckpt, kv_group: int):
        return Qwen3DecoderLayer(self, index, prefix, ckpt, kv_group, self.make_mlp(index, f"{prefix}.mlp", ckpt))
