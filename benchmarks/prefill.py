"""Prefill time of the real engine on random NVFP4 weights of a real model's shapes: one prompt, one token out.

    python -m benchmarks.prefill --shape qwen3-8b --input-len 16,128,512,2048 [--tiled] [--fp8]

Weights are RANDOM (real shapes, random values; built on the GPU). Each prompt length runs on the engine as it
starts (prompts of up to 512 tokens replay the prefill CUDA graphs, adallm_core/prefill_graphs.py) and on one with
enforce_eager (every launch from the host). --tiled adds the eager engine with the large-M linears on the tiled
kernel alone (nvfp4_gemm.py) instead of the dequantize-once path the op picks (ops/triton/nvfp4_prefill.py).
--fp8 adds the engine with prefill_fp8 (prompt steps of 256+ tokens on FP8 tensor cores, lossy).
--prompt-logprobs N adds the engine scoring the prompt (SamplingParams.prompt_logprobs=N: eager scored steps).
"""
from __future__ import annotations

import argparse
import gc
import sys

import torch

from benchmarks.decode import build_engine, run_batch
from benchmarks.random_checkpoint import SHAPES


def time_prompts(shape: str, lengths: list[int], eager: bool, repeat: int, min_tokens: int | None = None,
                 engine_options: dict | None = None, sampling: dict | None = None) -> list:
    """Best seconds of `repeat` runs for one prompt of each length, on a fresh engine."""
    from adallm_core.ops.triton import nvfp4_prefill

    default_min = nvfp4_prefill.MIN_TOKENS
    engine, runner = build_engine(shape, 1, max(lengths), 1, eager, engine_options=engine_options)
    vocab = runner.model_config.vocab_size
    nvfp4_prefill.MIN_TOKENS = default_min if min_tokens is None else min_tokens
    try:
        best = []
        for n in lengths:
            run_batch(engine, 1, n, 1, vocab, **(sampling or {}))  # warm-up
            best.append(min(run_batch(engine, 1, n, 1, vocab, **(sampling or {}))["seconds"] for _ in range(repeat)))
    finally:
        nvfp4_prefill.MIN_TOKENS = default_min
        engine.shutdown()
    del engine, runner
    gc.collect()
    torch.cuda.empty_cache()
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    p.add_argument("--input-len", default="2048", help="comma-separated prompt lengths")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tiled", action="store_true", help="also time the tiled kernel for the large-M linears")
    p.add_argument("--fp8", action="store_true", help="also time the engine with prefill_fp8 (lossy)")
    p.add_argument("--prompt-logprobs", type=int, default=None, metavar="N",
                   help="also time the engine scoring each prompt (prompt_logprobs=N)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.prefill needs a CUDA GPU", file=sys.stderr)
        return 2
    lengths = [int(n) for n in args.input_len.split(",")]
    columns = {"engine": time_prompts(args.shape, lengths, False, args.repeat),
               "enforce_eager": time_prompts(args.shape, lengths, True, args.repeat)}
    if args.tiled:
        columns["eager, tiled"] = time_prompts(args.shape, lengths, True, args.repeat, min_tokens=1 << 30)
    if args.fp8:
        columns["prefill_fp8"] = time_prompts(args.shape, lengths, False, args.repeat,
                                              engine_options=dict(prefill_fp8=True))
    if args.prompt_logprobs is not None:
        columns[f"prompt_logprobs={args.prompt_logprobs}"] = time_prompts(
            args.shape, lengths, False, args.repeat, sampling=dict(prompt_logprobs=args.prompt_logprobs))
    print(f"{args.shape}: RANDOM NVFP4 weights, one prompt, 1 token out, best of {args.repeat}; "
          f"{torch.cuda.get_device_name()}")
    print(f"{'tokens':>6} " + " ".join(f"{name + ' ms':>17}" for name in columns) + f" {'engine tok/s':>13}")
    for i, n in enumerate(lengths):
        cells = " ".join(f"{secs[i] * 1e3:17.1f}" for secs in columns.values())
        print(f"{n:6d} {cells} {n / columns['engine'][i]:13.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
