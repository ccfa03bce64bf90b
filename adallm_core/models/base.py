"""The decoder-only skeleton every family shares: embed -> decoder layers -> final norm -> lm_head."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from adallm_core.model_config import ModelConfig
from adallm_core.models.layers import ForwardContext, Linear, RMSNorm, RotaryEmbedding, load_embedding

# Where the decoder's weights live: text-only checkpoints, then multimodal wrappers (transformers 5, then 4).
DECODER_PREFIXES = ("model", "model.language_model", "language_model.model")
LM_HEAD_NAMES = ("lm_head", "language_model.lm_head")


class _TiedLMHead:
    def __init__(self, embedding: torch.Tensor):
        self.weight = embedding

    def __call__(self, x):
        return F.linear(x, self.weight)


class CausalLM:
    """A family subclasses this and implements make_layer(); layers take and return (hidden, residual)."""

    norm_offset = 0.0  # Gemma: 1.0

    def __init__(self, cfg: ModelConfig, ckpt, ops, device, dtype, max_positions: int):
        self.cfg, self.ops, self.device, self.dtype = cfg, ops, device, dtype
        prefix = next((p for p in DECODER_PREFIXES if ckpt.has(f"{p}.embed_tokens.weight")), None)
        if prefix is None:
            raise ValueError(f"checkpoint has no embed_tokens.weight under any of {DECODER_PREFIXES}")
        h, v = cfg.hidden_size, cfg.vocab_size
        self.embed_tokens = load_embedding(ckpt, f"{prefix}.embed_tokens.weight", v, h, device, dtype)
        self.rotary = {
            t: RotaryEmbedding(*cfg.rope_inv_freq(t), max_positions, device) for t in sorted(set(cfg.layer_types))
        }
        group_of = {layer: g for g, group in enumerate(cfg.kv_groups) for layer in group.layers}
        self.layers = [
            self.make_layer(i, f"{prefix}.layers.{i}", ckpt, group_of[i]) for i in range(cfg.num_layers)
        ]
        self.norm = RMSNorm(ckpt.tensor(f"{prefix}.norm.weight"), cfg.rms_norm_eps, ops, device, dtype, self.norm_offset)
        if cfg.tie_word_embeddings:
            self.lm_head = _TiedLMHead(self.embed_tokens)
        else:
            name = next((n for n in LM_HEAD_NAMES if ckpt.has(f"{n}.weight") or ckpt.has(f"{n}.weight_packed")), None)
            if name is None:
                raise ValueError(f"checkpoint has no lm_head (tried {LM_HEAD_NAMES}) and tie_word_embeddings is false")
            self.lm_head = Linear(ckpt, [name], h, [v], ops, device, dtype)

    def make_layer(self, index: int, prefix: str, ckpt, kv_group: int):
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_tokens)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, H]."""
        x, residual = self.embed(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, ctx)
        return self.norm.add(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def attention_layers(self) -> list:
        """Every layer's PagedAttention, in layer order (the runner binds their caches)."""
        return [layer.self_attn.attn for layer in self.layers]
