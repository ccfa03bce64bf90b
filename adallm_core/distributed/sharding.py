"""Which slice of each weight a tensor-parallel rank loads (Megatron layout, vLLM's names).

    q_proj, k_proj, v_proj, gate_proj, up_proj   column-parallel: rows (output features) split by head / column
    o_proj, down_proj                            row-parallel: cols (input features) split; outputs all-reduced
    embed_tokens, lm_head                        vocab-parallel: rows split by token id; logits all-gathered
    MoE experts                                  every expert's gate/up rows and down cols split (all experts on
                                                 every rank, 1/N of each), one all-reduce after the block
    norms, router, k/v scales                    replicated

KV heads: with fewer KV heads than ranks each head is replicated on world_size / num_kv_heads ranks.
NVFP4: a row-parallel cut must fall on whole 16-element scale groups (checked up front with a clear error).
Each rank reads only its slices from the safetensors memory maps (Checkpoint.linear(rows=, cols=)).
"""
from __future__ import annotations

import dataclasses
import math

from adallm_core.nvfp4 import BLOCK_SIZE

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


def vocab_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Token ids [start, end) whose embedding rows / logits live on `rank` (ceil split; the last may be short)."""
    per = math.ceil(vocab_size / world_size)
    return min(rank * per, vocab_size), min((rank + 1) * per, vocab_size)


def kv_head_range(num_kv_heads: int, rank: int, world_size: int) -> tuple[int, int]:
    if num_kv_heads >= world_size:
        n = num_kv_heads // world_size
        return rank * n, (rank + 1) * n
    head = rank * num_kv_heads // world_size  # ranks 0..w/hk-1 share head 0, and so on
    return head, head + 1


def check_shardable(cfg, world_size: int, quantized: bool) -> None:
    """Refuse a tensor_parallel_size the model cannot be split by, naming the field."""
    w = world_size
    problems = []
    if cfg.num_heads % w:
        problems.append(f"num_attention_heads {cfg.num_heads} is not divisible by it")
    if cfg.num_kv_heads >= w and cfg.num_kv_heads % w or cfg.num_kv_heads < w and w % cfg.num_kv_heads:
        problems.append(f"num_key_value_heads {cfg.num_kv_heads} neither divides nor is divisible by it")
    if math.ceil(cfg.vocab_size / w) * (w - 1) >= cfg.vocab_size:
        problems.append(f"vocab_size {cfg.vocab_size} leaves a rank without tokens")
    cuts = {"num_attention_heads * head_dim (o_proj input)": cfg.num_heads * cfg.head_dim}
    if cfg.intermediate_size:
        cuts["intermediate_size (down_proj input)"] = cfg.intermediate_size
    if cfg.num_experts:
        cuts["moe_intermediate_size (expert down_proj input)"] = cfg.moe_intermediate_size
    for name, k in cuts.items():
        if k % w:
            problems.append(f"{name} {k} is not divisible by it")
        elif quantized and (k // w) % BLOCK_SIZE:
            problems.append(f"{name} {k} / {w} = {k // w} is not a multiple of {BLOCK_SIZE}: NVFP4 row-parallel "
                            f"shards must hold whole {BLOCK_SIZE}-element scale groups")
    if problems:
        raise ValueError(f"tensor_parallel_size={w} cannot split this model: " + "; ".join(problems))


def shard_model_config(cfg, rank: int, world_size: int, quantized: bool):
    """This rank's ModelConfig: its heads, MLP columns and vocab rows. head_dim and hidden_size stay."""
    check_shardable(cfg, world_size, quantized)
    kv0, kv1 = kv_head_range(cfg.num_kv_heads, rank, world_size)
    v0, v1 = vocab_range(cfg.vocab_size, rank, world_size)
    return dataclasses.replace(
        cfg,
        num_heads=cfg.num_heads // world_size,
        num_kv_heads=kv1 - kv0,
        intermediate_size=cfg.intermediate_size // world_size,
        moe_intermediate_size=cfg.moe_intermediate_size // world_size,
        vocab_size=v1 - v0,
    )


class ShardedCheckpoint:
    """A Checkpoint seen by one rank: linear() and tensor() return this rank's slices; the rest is delegated."""

    def __init__(self, checkpoint, cfg, rank: int, world_size: int):
        self._ckpt, self._cfg, self.rank, self.world_size = checkpoint, cfg, rank, world_size

    def __getattr__(self, name):  # path, config, hf_config, quant_format, has, kv_scales
        return getattr(self._ckpt, name)

    def _split(self, total: int) -> slice:
        n = total // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)

    def linear(self, prefix: str):
        cfg, leaf = self._cfg, prefix.rsplit(".", 1)[-1]
        d = cfg.head_dim
        inter = cfg.moe_intermediate_size if ".experts." in prefix else cfg.intermediate_size
        if leaf == "q_proj":
            return self._ckpt.linear(prefix, rows=self._split(cfg.num_heads * d))
        if leaf in ("k_proj", "v_proj"):
            h0, h1 = kv_head_range(cfg.num_kv_heads, self.rank, self.world_size)
            return self._ckpt.linear(prefix, rows=slice(h0 * d, h1 * d))
        if leaf == "o_proj":
            return self._ckpt.linear(prefix, cols=self._split(cfg.num_heads * d))
        if leaf in ("gate_proj", "up_proj"):
            return self._ckpt.linear(prefix, rows=self._split(inter))
        if leaf == "down_proj":
            return self._ckpt.linear(prefix, cols=self._split(inter))
        if leaf == "lm_head":
            return self._ckpt.linear(prefix, rows=slice(*vocab_range(cfg.vocab_size, self.rank, self.world_size)))
        return self._ckpt.linear(prefix)  # the MoE router and anything unknown: replicated

    def tensor(self, name: str):
        if name.endswith("embed_tokens.weight"):
            v0, v1 = vocab_range(self._cfg.vocab_size, self.rank, self.world_size)
            return self._ckpt.tensor(name, (slice(v0, v1),))
        return self._ckpt.tensor(name)
