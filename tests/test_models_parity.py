"""ModelRunner (reference ops, CPU, fp32) against transformers' own model classes run on the dequantized weights.

For each tiny family and both NVFP4 layouts: the logits of a mixed step (a chunked prefill, whole prefills) and of
every decode step, and 32-token greedy continuations of 8 prompts. Prompts are longer than Gemma3's sliding window
(16). Bounds:
  unquantized KV ('bf16', kept at the fp32 activations' precision here): |diff| <= 1e-4 (float32 round-off).
  fp8 KV (E4M3, scale 1.0): against transformers whose attention sees keys/values rounded to E4M3 (the same
     rounding, model_helpers._fp8_kv_sdpa): |diff| <= 1e-3 (a key a float32 ulp away may round the other way).
     Against plain transformers the fp8 cache itself moves these random tiny models' logits by up to ~12% of the
     largest logit (37% for Qwen3-MoE, whose top-k routing flips); that is the format, not this code. The looser
     bound FP8_VS_EXACT_REL checks that much.
"""
import dataclasses
import json
import shutil

import pytest
import torch
from model_helpers import Blocks, hf_greedy, hf_last_logits, hf_on_dequantized, tiny_checkpoint

from adallm_core.checkpoint.read import Checkpoint
from adallm_core.config import EngineArgs
from adallm_core.runner import ModelRunner, SeqStep
from adallm_core.testing import FAMILIES

FORMATS = ("modelopt", "compressed-tensors")
PROMPT_LENS = (37, 20, 9)
CHUNK = 16  # prompt 0 is prefilled in two chunks: 16 tokens, then 21
DECODE_STEPS = 5
BLOCK_SIZE = 4
FP8_VS_EXACT_REL = 0.45  # of the largest |logit|; measured worst 0.37 (qwen3_moe), 0.12 (dense families)


def make_runner(ckpt, kv_cache_dtype: str, kernel_backend: str = "auto") -> ModelRunner:
    args = EngineArgs(model=str(ckpt.path), dtype="float32", kv_cache_dtype=kv_cache_dtype,
                      block_size=BLOCK_SIZE, max_model_len=256, kernel_backend=kernel_backend)
    runner = ModelRunner(args, ckpt, "cpu")
    runner.allocate_kv_cache([128] * len(runner.kv_groups))
    return runner


def prompts(vocab: int, lens, seed: int = 7) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def mixed_then_decode(runner, hf, seqs):
    """Yield (ours, reference) logits for the prefill steps and each decode step; HF's greedy token is fed back."""
    blocks = Blocks(BLOCK_SIZE, len(runner.kv_groups))
    p0, p1, p2 = seqs
    out = runner.execute([
        SeqStep(p0[:CHUNK], 0, blocks.tables_for(0, CHUNK), sample=False),
        SeqStep(p1, 0, blocks.tables_for(1, len(p1))),
        SeqStep(p2, 0, blocks.tables_for(2, len(p2))),
    ])
    assert out.shape == (2, hf.config.get_text_config().vocab_size) and out.dtype == torch.float32
    last = [None, out[0], out[1]]
    last[0] = runner.execute([SeqStep(p0[CHUNK:], CHUNK, blocks.tables_for(0, len(p0)))])[0]
    for _ in range(DECODE_STEPS + 1):
        refs = [hf_last_logits(hf, s) for s in seqs]
        yield from zip(last, refs)
        for s, r in zip(seqs, refs):
            s.append(int(r.argmax()))
        last = list(runner.execute([
            SeqStep([s[-1]], len(s) - 1, blocks.tables_for(i, len(s))) for i, s in enumerate(seqs)
        ]))


@pytest.fixture(scope="module", params=[(f, fmt) for f in FAMILIES for fmt in FORMATS], ids=lambda p: f"{p[0]}-{p[1]}")
def model_pair(request):
    family, fmt = request.param
    ckpt = Checkpoint(tiny_checkpoint(family, fmt))
    assert ckpt.quant_format == fmt
    return family, ckpt, hf_on_dequantized(family, ckpt)


@pytest.mark.parametrize("kv_cache_dtype,hf_attention,atol,rel", [
    ("bf16", "sdpa", 1e-4, None),  # unquantized KV
    ("fp8", "fp8_kv_sdpa", 1e-3, None),  # fp8 KV against the same E4M3 rounding
    ("fp8", "sdpa", None, FP8_VS_EXACT_REL),  # fp8 KV against exact attention: the documented looser bound
])
def test_logits_match_transformers(model_pair, kv_cache_dtype, hf_attention, atol, rel):
    family, ckpt, hf = model_pair
    hf.set_attn_implementation(hf_attention)
    runner = make_runner(ckpt, kv_cache_dtype)
    vocab = runner.model_config.vocab_size
    n = 0
    for ours, ref in mixed_then_decode(runner, hf, prompts(vocab, PROMPT_LENS)):
        assert ref.abs().max() > 0.5  # logits with some spread: a zero model would pass anything
        if rel is None:
            torch.testing.assert_close(ours, ref, rtol=0, atol=atol)
        else:
            assert (ours - ref).abs().max() <= rel * ref.abs().max()
        n += 1
    assert n == 3 * (DECODE_STEPS + 1)


def test_greedy_32_tokens_match_transformers(model_pair):
    family, ckpt, hf = model_pair
    hf.set_attn_implementation("sdpa")
    runner = make_runner(ckpt, "bf16")
    seqs = prompts(runner.model_config.vocab_size, (3, 30, 17, 8, 25, 1, 12, 40), seed=11)
    expected = [hf_greedy(hf, s, 32) for s in seqs]
    blocks = Blocks(BLOCK_SIZE, len(runner.kv_groups))
    got = [[] for _ in seqs]
    steps = [SeqStep(s, 0, blocks.tables_for(i, len(s))) for i, s in enumerate(seqs)]
    for _ in range(32):
        for i, tok in enumerate(runner.execute(steps).argmax(-1).tolist()):
            got[i].append(tok)
        lens = [len(s) + len(g) for s, g in zip(seqs, got)]
        steps = [SeqStep([g[-1]], n - 1, blocks.tables_for(i, n)) for i, (g, n) in enumerate(zip(got, lens))]
    assert got == expected


def test_yarn_context_past_max_position_embeddings_matches_transformers(tmp_path):
    """Qwen3's long-context recipe: yarn with factor 4 over original_max_position_embeddings. vLLM takes a
    max_model_len up to original x factor (here 128, past max_position_embeddings 40), and positions past 40 give
    transformers' logits. BF16 linears: this is about the positions, not the format."""
    path = tmp_path / "qwen3-yarn"
    shutil.copytree(tiny_checkpoint("qwen3", None), path)
    config = json.loads((path / "config.json").read_text())
    config.update(max_position_embeddings=40, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 1e6})
    (path / "config.json").write_text(json.dumps(config))
    args = EngineArgs(model=str(path), dtype="float32", kv_cache_dtype="bf16", block_size=BLOCK_SIZE,
                      max_model_len=128)
    runner = ModelRunner(args, Checkpoint(path), "cpu")
    runner.allocate_kv_cache([32] * len(runner.kv_groups))
    seq = prompts(runner.model_config.vocab_size, (100,))[0]
    ours = runner.execute([SeqStep(seq, 0, Blocks(BLOCK_SIZE, len(runner.kv_groups)).tables_for(0, len(seq)))])[0]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    ref = hf_last_logits(hf, seq)
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="max_model_len 129 exceeds the model's context length 128"):
        ModelRunner(dataclasses.replace(args, max_model_len=129), Checkpoint(path), "cpu")


def test_gemma3_in_float16_is_refused_as_vllm_does():
    """vLLM refuses float16 for Gemma3 (_FLOAT16_NOT_SUPPORTED_MODELS: numerical instability, its activations pass
    float16's range); it was taken, and a real checkpoint's logits would turn to inf and NaN."""
    ckpt = Checkpoint(tiny_checkpoint("gemma3", "modelopt"))
    args = EngineArgs(model=str(ckpt.path), dtype="float16", kv_cache_dtype="bf16", max_model_len=64)
    with pytest.raises(ValueError, match="dtype float16 is not supported for Gemma3.*use bfloat16 or float32"):
        ModelRunner(args, ckpt, "cpu")
    assert ModelRunner(dataclasses.replace(args, dtype="bfloat16"), ckpt, "cpu").dtype == torch.bfloat16
    qwen3 = Checkpoint(tiny_checkpoint("qwen3", "modelopt"))  # other families take float16, as in vLLM
    assert ModelRunner(dataclasses.replace(args, model=str(qwen3.path)), qwen3, "cpu").dtype == torch.float16
