"""Shared model layers. Every hot computation goes through the `ops` table chosen once at start-up.

Layers read their weights from a Checkpoint at construction (`ckpt.linear(prefix)` / `ckpt.tensor(name)`) and keep
NVFP4 weights packed on the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from adallm_core.nvfp4 import NVFP4Weight
from adallm_core.ops import AttentionMetadata, Ops


@dataclass(frozen=True)
class ForwardContext:
    """Per-step inputs every layer may need; built once per step by the runner."""

    positions: torch.Tensor  # [T] int64
    attn: tuple[AttentionMetadata, ...]  # one per KV group
    slot_mapping: tuple[torch.Tensor, ...]  # one [T] int64 per KV group (-1: do not store)


# --- linear layers: a per-linear method object (create -> process after loading -> apply) -----------------
class NVFP4LinearMethod:
    """Packed uint8 codes + E4M3 block scales + per-row fp32 global scales, multiplied by ops.nvfp4_linear."""

    def __init__(self, ops: Ops):
        self.ops = ops

    def process_weights_after_loading(self, parts, device, dtype):
        # Per-row global scales make the fused q|k|v (gate|up) matrix exact.
        weight = parts[0] if len(parts) == 1 else NVFP4Weight.cat(list(parts))
        return self.ops.prepare_nvfp4_weight(weight.to(device))

    def apply(self, weight, x: torch.Tensor) -> torch.Tensor:
        return self.ops.nvfp4_linear(x, weight)

    def apply_gated(self, weight, x: torch.Tensor, activation: str) -> torch.Tensor:
        return self.ops.nvfp4_gated_linear(x, weight, activation)


class DenseLinearMethod:
    """An unquantized linear (excluded from quantization by the checkpoint), kept in the model dtype."""

    def __init__(self, ops: Ops):
        self.ops = ops

    def process_weights_after_loading(self, parts, device, dtype):
        return torch.cat([p.to(dtype) for p in parts]).to(device)

    def apply(self, weight, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def apply_gated(self, weight, x: torch.Tensor, activation: str) -> torch.Tensor:
        return self.ops.gated_activation(activation)(F.linear(x, weight))


def _shape(part) -> tuple[int, int]:
    if isinstance(part, torch.Tensor):
        return tuple(part.shape)
    return (part.out_features, part.in_features)


class Linear:
    """y = x W^T, with W one checkpoint linear or several fused along the output dim (q|k|v, gate|up)."""

    def __init__(self, ckpt, prefixes: Sequence[str], in_features: int, out_features: Sequence[int], ops, device, dtype):
        parts = [ckpt.linear(p) for p in prefixes]
        for prefix, part, n in zip(prefixes, parts, out_features):
            if _shape(part) != (n, in_features):
                raise ValueError(f"checkpoint linear {prefix!r}: shape {_shape(part)}, config expects {(n, in_features)}")
        dense = [isinstance(p, torch.Tensor) for p in parts]
        if any(dense) and not all(dense):
            raise ValueError(f"cannot fuse quantized and unquantized linears: {list(prefixes)}")
        self.method = DenseLinearMethod(ops) if all(dense) else NVFP4LinearMethod(ops)
        self.weight = self.method.process_weights_after_loading(parts, device, dtype)
        self.out_features = sum(out_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self.weight, x)

    def gated(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        """For a fused gate|up: act(x @ gate.T) * (x @ up.T), the activation fused in where the backend can."""
        return self.method.apply_gated(self.weight, x, activation)


# --- norms, rotary, embedding ----------------------------------------------------------------------------
class RMSNorm:
    """weight_offset=1.0 for Gemma, which stores w and scales by (1 + w)."""

    def __init__(self, weight: torch.Tensor, eps: float, ops: Ops, device, dtype, weight_offset: float = 0.0):
        self.weight = weight.to(device=device, dtype=dtype)
        self.eps, self.ops, self.weight_offset = eps, ops, weight_offset

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps, self.weight_offset)

    def add(self, x: torch.Tensor, residual: torch.Tensor):
        """(norm(x + residual), x + residual)."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps, self.weight_offset)


class RotaryEmbedding:
    """NeoX RoPE with a cos|sin cache [max_positions, head_dim] in float32 (attention_factor folded in)."""

    def __init__(self, inv_freq: torch.Tensor, attention_factor: float, max_positions: int, device):
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
        self.cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).mul_(attention_factor).to(device)


def load_embedding(ckpt, name: str, vocab_size: int, hidden_size: int, device, dtype) -> torch.Tensor:
    weight = ckpt.tensor(name)
    if tuple(weight.shape) != (vocab_size, hidden_size):
        raise ValueError(f"checkpoint tensor {name!r}: shape {tuple(weight.shape)}, expected {(vocab_size, hidden_size)}")
    return weight.to(device=device, dtype=dtype)


# --- attention ---------------------------------------------------------------------------------------------
class PagedAttention:
    """A layer's paged cache and attention settings: the runner binds the cache, ops.qk_norm_rope_attention reads it."""

    def __init__(self, num_heads, num_kv_heads, head_dim, scale, sliding_window: Optional[int], kv_group: int, ops):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.sliding_window, self.kv_group, self.ops = scale, sliding_window, kv_group, ops
        self.k_cache = self.v_cache = None
        self.k_scale = self.v_scale = 1.0

    def bind_cache(self, k_cache, v_cache, k_scale: float, v_scale: float) -> None:
        self.k_cache, self.v_cache, self.k_scale, self.v_scale = k_cache, v_cache, k_scale, v_scale

    def check_bound(self) -> None:
        if self.k_cache is None:
            raise RuntimeError("KV cache not allocated: call ModelRunner.allocate_kv_cache first")


class QKNormAttention:
    """Qwen3 / Gemma3 self-attention: fused qkv -> per-head RMSNorm on q and k -> RoPE -> paged attention -> o."""

    def __init__(self, cfg, layer: int, prefix: str, ckpt, ops, device, dtype, rotary: RotaryEmbedding,
                 kv_group: int, scale: float, norm_offset: float = 0.0):
        hq, hk, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.q_size, self.kv_size, self.head_dim = hq * d, hk * d, d
        qkv = [f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"]
        self.qkv_proj = Linear(ckpt, qkv, h, [hq * d, hk * d, hk * d], ops, device, dtype)
        self.o_proj = Linear(ckpt, [f"{prefix}.o_proj"], hq * d, [h], ops, device, dtype)
        eps = cfg.rms_norm_eps
        self.q_norm = RMSNorm(ckpt.tensor(f"{prefix}.q_norm.weight"), eps, ops, device, dtype, norm_offset)
        self.k_norm = RMSNorm(ckpt.tensor(f"{prefix}.k_norm.weight"), eps, ops, device, dtype, norm_offset)
        self.rotary = rotary
        window = cfg.sliding_window if cfg.layer_types[layer] == "sliding_attention" else None
        self.attn = PagedAttention(hq, hk, d, scale, window, kv_group, ops)

    def __call__(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        attn, t = self.attn, x.shape[0]
        attn.check_bound()
        # QK-norm per head, RoPE, k/v into the cache, attention: one op (one kernel for a decode step on the GPU)
        out = attn.ops.qk_norm_rope_attention(
            self.qkv_proj(x), self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, self.q_norm.weight_offset,
            ctx.positions, self.rotary.cos_sin, attn.k_cache, attn.v_cache, ctx.slot_mapping[attn.kv_group],
            attn.k_scale, attn.v_scale, attn.num_heads, attn.num_kv_heads, ctx.attn[attn.kv_group], attn.scale,
            attn.sliding_window)
        return self.o_proj(out.reshape(t, -1))


# --- MLPs --------------------------------------------------------------------------------------------------
class GatedMLP:
    """down(act(gate(x)) * up(x)) with gate|up fused into one linear."""

    def __init__(self, ckpt, prefix: str, hidden: int, intermediate: int, activation: str, ops, device, dtype):
        gate_up = [f"{prefix}.gate_proj", f"{prefix}.up_proj"]
        self.gate_up_proj = Linear(ckpt, gate_up, hidden, [intermediate, intermediate], ops, device, dtype)
        self.down_proj = Linear(ckpt, [f"{prefix}.down_proj"], intermediate, [hidden], ops, device, dtype)
        ops.gated_activation(activation)  # an unknown name is refused at load, not in the first step
        self.activation = activation

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.gated(x, self.activation))


class SparseMoE:
    """Qwen3-MoE block: dense router [E, H] + NVFP4 experts stacked as w13 [E, 2I, H] and w2 [E, H, I]."""

    def __init__(self, cfg, prefix: str, ckpt, ops, device, dtype):
        h, inter, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        router = ckpt.linear(f"{prefix}.gate")
        if not isinstance(router, torch.Tensor) or tuple(router.shape) != (e, h):
            raise ValueError(f"checkpoint {prefix}.gate: expected an unquantized router [{e}, {h}]")
        self.router = router.to(device=device, dtype=dtype)
        w13, w2 = [], []
        for i in range(e):
            ex = f"{prefix}.experts.{i}"
            parts = [ckpt.linear(f"{ex}.gate_proj"), ckpt.linear(f"{ex}.up_proj"), ckpt.linear(f"{ex}.down_proj")]
            if any(isinstance(p, torch.Tensor) for p in parts):
                raise ValueError(f"checkpoint {ex}: MoE experts must be NVFP4-quantized (convert a BF16 checkpoint "
                                 f"with `adallm quantize`)")
            for p, shape, name in zip(parts, [(inter, h), (inter, h), (h, inter)], ["gate_proj", "up_proj", "down_proj"]):
                if _shape(p) != shape:
                    raise ValueError(f"checkpoint linear {ex}.{name}: shape {_shape(p)}, config expects {shape}")
            w13.append(NVFP4Weight.cat(parts[:2]))
            w2.append(parts[2])
        self.w13 = ops.prepare_nvfp4_weight(NVFP4Weight.stack(w13).to(device))
        self.w2 = ops.prepare_nvfp4_weight(NVFP4Weight.stack(w2).to(device))
        self.top_k, self.renormalize, self.ops = cfg.num_experts_per_tok, cfg.norm_topk_prob, ops

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        router_logits = F.linear(x, self.router)
        return self.ops.moe(x, router_logits, self.w13, self.w2, self.top_k, self.renormalize)
