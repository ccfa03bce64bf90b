"""Gemma3 text: scaled embeddings, (1 + w) RMSNorms (four per layer), QK-norm, query_pre_attn_scalar,
sliding-window and global layers with their own RoPE bases, GELU-tanh gated MLP, tied lm_head."""
from __future__ import annotations

import torch

from adallm_core.models.base import CausalLM
from adallm_core.models.layers import GatedMLP, QKNormAttention, RMSNorm

NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


class Gemma3DecoderLayer:
    def __init__(self, model: CausalLM, index: int, prefix: str, ckpt, kv_group: int):
        cfg, ops, dev, dt = model.cfg, model.ops, model.device, model.dtype
        for name in NORMS:
            setattr(self, name, RMSNorm(ckpt.tensor(f"{prefix}.{name}.weight"), cfg.rms_norm_eps, ops, dev, dt, 1.0))
        rotary = model.rotary[cfg.layer_types[index]]
        self.self_attn = QKNormAttention(
            cfg, index, f"{prefix}.self_attn", ckpt, ops, dev, dt, rotary, kv_group,
            scale=cfg.query_pre_attn_scalar**-0.5, norm_offset=1.0,
        )
        self.mlp = GatedMLP(ckpt, f"{prefix}.mlp", cfg.hidden_size, cfg.intermediate_size, cfg.activation, ops, dev, dt)

    def __call__(self, x, residual, ctx):
        # residual + post_norm(sublayer(pre_norm(residual))), twice; the adds are fused into the next norm.
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm.add(x, residual)
        x = self.post_attention_layernorm(self.self_attn(x, ctx))
        x, residual = self.pre_feedforward_layernorm.add(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma3ForCausalLM(CausalLM):
    norm_offset = 1.0

    def __init__(self, cfg, ckpt, ops, device, dtype, max_positions: int, **options):
        if dtype == torch.float16:  # refused before the weights load, as vLLM refuses it
            raise ValueError("dtype float16 is not supported for Gemma3: its activations overflow float16's range "
                             "(inf, then NaN logits); use bfloat16 or float32")
        super().__init__(cfg, ckpt, ops, device, dtype, max_positions, **options)
        # HF multiplies by sqrt(hidden) rounded to the embedding dtype.
        self.embed_scale = torch.tensor(cfg.hidden_size**0.5, dtype=dtype, device=device)

    def make_layer(self, index: int, prefix: str, ckpt, kv_group: int):
        return Gemma3DecoderLayer(self, index, prefix, ckpt, kv_group)

    def embed(self, input_ids):
        return self.ops.embedding(input_ids, self.embed_tokens) * self.embed_scale
