"""Prefill time of the real engine on random NVFP4 weights of a real model's shapes: one prompt, one token out.

    python -m benchmarks.prefill --shape qwen3-8b --input-len 2048

Weights are RANDOM (real shapes, random values; built on the GPU). Times the large-M linears both ways: the
dequantize-once path the op picks (ops/triton/nvfp4_prefill.py) and the tiled kernel alone (nvfp4_gemm.py).
"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.decode import build_engine, run_batch
from benchmarks.random_checkpoint import SHAPES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    p.add_argument("--input-len", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.prefill needs a CUDA GPU", file=sys.stderr)
        return 2
    from adallm_core.ops.triton import nvfp4_prefill

    engine, runner = build_engine(args.shape, 1, args.input_len, 1, False)
    vocab = runner.model_config.vocab_size
    default_min = nvfp4_prefill.MIN_TOKENS
    results = {}
    for name, min_tokens in (("dequantize-once", default_min), ("tiled kernel", 1 << 30)):
        nvfp4_prefill.MIN_TOKENS = min_tokens
        run_batch(engine, 1, args.input_len, 1, vocab)  # warm-up
        results[name] = min(run_batch(engine, 1, args.input_len, 1, vocab)["seconds"] for _ in range(args.repeat))
    nvfp4_prefill.MIN_TOKENS = default_min
    engine.shutdown()
    print(f"{args.shape}: RANDOM NVFP4 weights, one prompt of {args.input_len} tokens, 1 token out; "
          f"{torch.cuda.get_device_name()}")
    for name, secs in results.items():
        print(f"{name:16} {secs * 1e3:8.1f} ms  {args.input_len / secs:9.0f} prompt tok/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
