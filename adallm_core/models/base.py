"""The decoder-only skeleton every family shares: embed -> decoder layers -> final norm -> lm_head."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from adallm_core.model_config import ModelConfig
from adallm_core.models.layers import ForwardContext, Linear, RMSNorm, RotaryEmbedding, load_embedding
from adallm_core.nvfp4 import NVFP4Weight

# Where the decoder's weights live: text-only checkpoints, then multimodal wrappers (transformers 5, then 4).
DECODER_PREFIXES = ("model", "model.language_model", "language_model.model")
LM_HEAD_NAMES = ("lm_head", "language_model.lm_head")


# quantize_lm_head converts this many rows at a time (each chunk gets its own global scale: the NVFP4 weight keeps
# one per row), so a 262k-row vocabulary never needs an fp32 copy of the whole matrix.
LM_HEAD_CHUNK_ROWS = 16384


class _TiedLMHead:
    def __init__(self, embedding: torch.Tensor):
        self.weight = embedding

    def __call__(self, x):
        return F.linear(x, self.weight)


class NVFP4LMHead:
    """quantize_lm_head: the BF16 lm_head quantized to NVFP4 at load (ModelOpt recipe), 3.6x fewer bytes a step."""

    def __init__(self, dense: torch.Tensor, ops, device):
        chunks = [
            NVFP4Weight.quantize(dense[i : i + LM_HEAD_CHUNK_ROWS].to(device=device, dtype=torch.float32), "lm_head")
            for i in range(0, dense.shape[0], LM_HEAD_CHUNK_ROWS)
        ]
        self.weight, self.ops = ops.prepare_nvfp4_weight(NVFP4Weight.cat(chunks)), ops

    def __call__(self, x):
        return self.ops.nvfp4_linear(x, self.weight)


def _pinned(table: torch.Tensor) -> torch.Tensor:
    try:
        return table.to("cpu").pin_memory()
    except RuntimeError as exc:  # page-locked memory is limited on some hosts (ulimit -l, containers)
        raise RuntimeError(f"embedding_on_host: could not pin {table.nbytes / 1e9:.2f} GB of host memory ({exc}); "
                           "pass --no-embedding-on-host to keep the table on the GPU") from exc


class CausalLM:
    """A family subclasses this and implements make_layer(); layers take and return (hidden, residual)."""

    norm_offset = 0.0  # Gemma: 1.0

    def __init__(self, cfg: ModelConfig, ckpt, ops, device, dtype, max_positions: int, *,
                 embedding_on_host: bool = False, quantize_lm_head: bool = False):
        """embedding_on_host (CUDA): keep the input embedding table in pinned host memory when the GPU's lm_head
        does not need it; quantize_lm_head: turn a BF16 lm_head into NVFP4 at load."""
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
        if quantize_lm_head and isinstance(self.lm_head.weight, torch.Tensor):  # already NVFP4 in the checkpoint: kept
            self.lm_head = NVFP4LMHead(self.lm_head.weight, ops, device)
        if embedding_on_host and torch.device(device).type == "cuda" and not isinstance(self.lm_head, _TiedLMHead):
            # only lookups read it now: a step needs a few rows, which the GPU reads over PCIe (ops.embedding)
            self.embed_tokens = _pinned(self.embed_tokens)

    def make_layer(self, index: int, prefix: str, ckpt, kv_group: int):
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.ops.embedding(input_ids, self.embed_tokens)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, H]."""
        x, residual = self.embed(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, ctx)
        return self.norm.add(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits [tokens, vocab], into `out` when given (the decode graphs' one shared buffer)."""
        logits = self.lm_head(hidden)
        logits = logits.float() if out is None else out.copy_(logits)
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            logits = logits.div_(cap).tanh_().mul_(cap)
        return logits

    def attention_layers(self) -> list:
        """Every layer's PagedAttention, in layer order (the runner binds their caches)."""
        return [layer.self_attn.attn for layer in self.layers]
