"""Tiny random checkpoints of each supported family, built with transformers' own classes (no download).

Every test and the built-in demo model use these. They are tiny but real: GQA, QK-norm, untied (Qwen3) and tied
(Gemma3) embeddings, MoE routing with norm_topk_prob, Gemma3's sliding window (16, shorter than the test prompts)
with both layer kinds and different local/global RoPE (global with linear scaling, as Gemma3 4B+), a byte-level BPE
tokenizer trained on the spot (multi-byte characters included), a chat template and generation_config.json with a
list of EOS ids (as the published models have).

What transformers 5 does with MoE experts: in memory Qwen3MoeExperts holds fused 3D parameters (gate_up_proj
[E, 2I, H], down_proj [E, H, I]), but save_pretrained converts them back to the published per-expert names
(model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight, each [out, in]). So the BF16 checkpoint written here, and
the NVFP4 one quantized from it, already follow the published layout. Its config.json however says
num_local_experts; it is renamed to num_experts as in the published Qwen3-MoE configs (transformers reads both).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

FAMILIES = ("qwen3", "qwen3_moe", "gemma3")
VOCAB_SIZE = 384
DEMO_FORMAT = "modelopt"
DEMO_NAME = "demo-qwen3-nvfp4-v2"  # bump the suffix when the demo model's recipe changes

# Training text for the tokenizer: English, code, numbers and non-ASCII (multi-byte UTF-8) scripts.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still tell a story: once upon a time, there was
a tiny engine that served many requests at once. It kept its weights in four bits and its cache in eight.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris is the capital.
def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * 2)\n
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2048 3.14159 -7 1e-6.
Café, naïve, façade, Größe, Straße, jalapeño, smörgåsbord, déjà vu.
Привет, мир! Как дела? Спасибо.
日本語のテキストです。東京は日本の首都です。中文：你好，世界。
한국어 문장입니다. 🙂 🚀 ✓ → ∑ π ≈ 3.14 € £ ¥
"""

# ChatML with Qwen3's tool format: the tools in a system turn, an assistant's calls as <tool_call> blocks, a tool's
# answer as a user turn's <tool_response>. Without tools or calls it renders plain ChatML.
_CHATML = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions.\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each call, return a JSON object within <tool_call></tool_call> tags:\\n<tool_call>\\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set messages = messages[1:] %}{%- endif %}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{%- for call in message['tool_calls'] or [] %}"
    "{{ '\\n<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' "
    "+ (call['function']['arguments'] | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Gemma's template: no system role (a system message is folded into the first user turn), 'model' for assistant.
_GEMMA_CHAT = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set prefix = messages[0]['content'] + '\\n\\n' %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set prefix = '' %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}"
)

# family -> special tokens (ids 0.. in this order), token roles, chat template, generation EOS tokens
_TOKENS = {
    "qwen": {
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "roles": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None},
        "config_bos": "<|endoftext|>",
        "template": _CHATML,
        "generation_eos": ["<|im_end|>", "<|endoftext|>"],
    },
    "gemma": {
        "special": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        "roles": {"eos_token": "<eos>", "pad_token": "<pad>", "bos_token": "<bos>", "unk_token": "<unk>"},
        "config_bos": "<bos>",
        "template": _GEMMA_CHAT,
        "generation_eos": ["<eos>", "<end_of_turn>"],
    },
}


def build_tokenizer(kind: str):
    """A byte-level BPE tokenizer trained on _CORPUS, as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = _TOKENS[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=spec["special"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    if spec["roles"]["bos_token"]:  # Gemma prepends <bos> when encoding, as the published tokenizer does
        bos = spec["roles"]["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    roles = {k: v for k, v in spec["roles"].items() if v is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **roles)
    fast.chat_template = spec["template"]
    return fast


def _model_config(family: str, token_ids: dict):
    """transformers config for a tiny model of the family (bf16, max_position_embeddings 2048)."""
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        initializer_range=0.08,  # larger than the 0.02 default so random logits are not all ties
        **token_ids,
    )
    if family == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(
            num_hidden_layers=2, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            **common,
        )
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            num_hidden_layers=2, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True, **common,
        )
    if family == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            num_hidden_layers=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
            sliding_window=16,
            query_pre_attn_scalar=24,  # != head_dim, so the attention scale is not head_dim ** -0.5
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            },
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
            **common,
        )
    raise ValueError(f"unknown model family {family!r}; choose from {', '.join(FAMILIES)}")


def _model_class(family: str):
    import transformers

    name = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "gemma3": "Gemma3ForCausalLM"}[family]
    return getattr(transformers, name)


def _save_bf16_checkpoint(family: str, out_dir: Path, seed: int) -> None:
    from transformers import GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose from {', '.join(FAMILIES)}")
    kind = "gemma" if family == "gemma3" else "qwen"
    tokenizer = build_tokenizer(kind)
    spec = _TOKENS[kind]
    ids = {
        "bos_token_id": tokenizer.convert_tokens_to_ids(spec["config_bos"]),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = _model_config(family, ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model_class(family)(config).to(torch.bfloat16).eval()
        with torch.no_grad():  # transformers starts every norm at one scale (Gemma: at 0, scaled by 1 + w), which
            for name, param in model.named_parameters():  # would hide a norm applied with another norm's weight
                if name.endswith("norm.weight"):
                    param.add_(torch.randn_like(param) * 0.2)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token_id"],
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in spec["generation_eos"]],
        pad_token_id=ids["pad_token_id"],
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if family == "qwen3_moe":  # transformers 5 writes num_local_experts; published Qwen3-MoE configs say num_experts
        path = out_dir / "config.json"
        config = json.loads(path.read_text())
        config["num_experts"] = config.pop("num_local_experts")
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_tiny_checkpoint(family: str, out_dir, fmt: str | None = None, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of `family` to out_dir: BF16 (fmt None) or NVFP4 ('modelopt' |
    'compressed-tensors', quantized from the BF16 one with this project's converter). Returns out_dir."""
    out_dir = Path(out_dir)
    if fmt is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        _save_bf16_checkpoint(family, out_dir, seed)
        return out_dir
    from adallm_core.checkpoint.quantize import quantize_checkpoint

    with tempfile.TemporaryDirectory(prefix="adallm-bf16-") as bf16_dir:
        _save_bf16_checkpoint(family, Path(bf16_dir), seed)
        quantize_checkpoint(bf16_dir, out_dir, fmt=fmt, progress=False)
    return out_dir


def cache_dir() -> Path:
    """$ADALLM_CACHE, else $XDG_CACHE_HOME/adallm, else ~/.cache/adallm."""
    if os.environ.get("ADALLM_CACHE"):
        return Path(os.environ["ADALLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adallm"


def demo_model_path() -> Path:
    """The built-in demo model (tiny Qwen3, NVFP4 ModelOpt layout), built deterministically on first use.

    Built in a temporary folder next to the final one and renamed into place, so concurrent first uses are safe:
    the loser of the rename race discards its copy and uses the winner's (identical) one."""
    final = cache_dir() / DEMO_NAME
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=final.parent))
    try:
        build_tiny_checkpoint("qwen3", tmp / "model", fmt=DEMO_FORMAT, seed=0)
        try:
            os.rename(tmp / "model", final)
        except OSError:
            if not (final / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
