"""Qwen3-MoE: Qwen3's decoder with sparse MoE MLPs (softmax router -> top-k -> renormalize if norm_topk_prob)."""
from __future__ import annotations

from adallm_core.models.layers import SparseMoE
from adallm_core.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def make_mlp(self, index: int, prefix: str, ckpt):
        if self.cfg.moe_layers[index]:
            return SparseMoE(self.cfg, prefix, ckpt, self.ops, self.device, self.dtype)
        return super().make_mlp(index, prefix, ckpt)  # mlp_only_layers / decoder_sparse_step
