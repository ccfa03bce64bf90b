"""Run the tiny models through the 'triton' kernel backend on the CPU (TRITON_INTERPRET=1, set by the caller) and
print, as JSON, each family's largest |logit difference| against transformers and the largest |logit|.

The backend refuses a device without CUDA (ops._load_triton); under the interpreter its kernels run on CPU tensors,
so this script hands the module over itself. Activations are fp32 and the KV cache unquantized: the interpreter has
no BF16 arithmetic and rounds FP8 differently from the GPU (tests/test_kernels_interpret.py says more). The CUDA
decode kernel is not built here, so the Triton kernels take every step. Run by tests/test_triton_backend_interpret.py.
"""
from __future__ import annotations

import json
import os

import torch
from model_helpers import hf_on_dequantized, tiny_checkpoint
from test_models_parity import PROMPT_LENS, make_runner, mixed_then_decode, prompts

import adallm_core.ops
import adallm_core.ops.triton
from adallm_core.checkpoint.read import Checkpoint
from adallm_core.testing import FAMILIES


def family_errors(family: str) -> dict:
    ckpt = Checkpoint(tiny_checkpoint(family, "modelopt"))
    hf = hf_on_dequantized(family, ckpt)
    hf.set_attn_implementation("sdpa")
    runner = make_runner(ckpt, "bf16", kernel_backend="triton")
    diff = largest = 0.0
    steps = 0
    for ours, ref in mixed_then_decode(runner, hf, prompts(runner.model_config.vocab_size, PROMPT_LENS)):
        diff = max(diff, (ours - ref).abs().max().item())
        largest = max(largest, ref.abs().max().item())
        steps += 1
    triton_ops = sorted(name for name, module in runner.ops.sources.items() if ".triton" in module)
    return dict(diff=diff, largest=largest, steps=steps, backend=runner.ops.name, triton_ops=triton_ops)


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    adallm_core.ops._load_triton = lambda device: adallm_core.ops.triton
    torch.manual_seed(0)
    print(json.dumps({family: family_errors(family) for family in FAMILIES}))


if __name__ == "__main__":
    main()
