"""EngineArgs.prefill_fp8 through ModelRunner (reference ops, CPU, fp32) against transformers on the dequantized weights.

A prompt step of 300 tokens runs its linears on E4M3 operands (reference.nvfp4_linear_fp8); the last position's
logits must stay within the fp8 bound of transformers' exact ones, and move off the exact runner's by more than
float32 round-off (the option is engaged). The op's own values are checked in test_ops_reference.py (by hand) and
test_kernels_gpu.py (the GPU path against the reference).
"""
import pytest
import torch
from model_helpers import Blocks, hf_last_logits, hf_on_dequantized, tiny_checkpoint

from adallm_core.checkpoint.read import Checkpoint
from adallm_core.config import EngineArgs
from adallm_core.ops import reference
from adallm_core.runner import ModelRunner, SeqStep
from adallm_core.testing import FAMILIES

PROMPT_LEN = 300  # one step past reference.FP8_PREFILL_MIN_TOKENS
BLOCK_SIZE = 16
FP8_VS_EXACT_REL = 0.25  # of the largest |logit|; measured 0.05-0.12 (3 prompts a family; fp8 KV: 0.12)


def prefill_logits(ckpt, prompt: list[int], prefill_fp8: bool) -> torch.Tensor:
    args = EngineArgs(model=str(ckpt.path), dtype="float32", kv_cache_dtype="bf16", block_size=BLOCK_SIZE,
                      max_model_len=512, max_num_batched_tokens=512, prefill_fp8=prefill_fp8)
    runner = ModelRunner(args, ckpt, "cpu")
    assert (runner.ops.nvfp4_linear is reference.nvfp4_linear_fp8) == prefill_fp8
    runner.allocate_kv_cache([64] * len(runner.kv_groups))
    blocks = Blocks(BLOCK_SIZE, len(runner.kv_groups))
    return runner.execute([SeqStep(prompt, 0, blocks.tables_for(0, len(prompt)))])[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_fp8_logits_stay_near_transformers(family):
    ckpt = Checkpoint(tiny_checkpoint(family, "modelopt"))
    hf = hf_on_dequantized(family, ckpt)
    hf.set_attn_implementation("sdpa")
    vocab = hf.config.get_text_config().vocab_size
    prompt = torch.randint(3, vocab, (PROMPT_LEN,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = hf_last_logits(hf, prompt)
    assert ref.abs().max() > 0.5  # logits with some spread: a zero model would pass anything
    exact, fp8 = prefill_logits(ckpt, prompt, False), prefill_logits(ckpt, prompt, True)
    torch.testing.assert_close(exact, ref, rtol=0, atol=1e-4)
    assert (fp8 - exact).abs().max() > 1e-3 * ref.abs().max()  # E4M3 operands moved them: the path ran
    assert (fp8 - ref).abs().max() <= FP8_VS_EXACT_REL * ref.abs().max()


@pytest.mark.parametrize(("capability", "version", "named"), [((8, 6), "2.13.0", "compute capability 8.9"),
                                                               ((8, 9), "2.6.0", "torch 2.7 or newer")])
def test_prefill_fp8_refused_where_the_gpu_or_torch_cannot_run_it(monkeypatch, capability, version, named):
    """Ampere has no FP8 tensor cores; torch before 2.7 has no row-wise scaled FP8 GEMM on Ada. Both are told at
    start-up, naming what is missing (the device's answers are stubbed: this machine has no GPU)."""
    from adallm_core import ops

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a test GPU")
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(ValueError, match=named):
        ops._check_fp8(torch.device("cuda"))
    monkeypatch.setattr(torch, "__version__", "2.7.0")
    if capability >= (8, 9):
        ops._check_fp8(torch.device("cuda"))  # a new enough torch on Ada runs it
