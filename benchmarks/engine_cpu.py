"""CPU tokens/s of the whole engine (scheduler + reference ops + sampler) on the tiny test models.

    python -m benchmarks.engine_cpu [--families qwen3 qwen3_moe gemma3] [--threads 1]

Prefill: 8 prompts of 224 tokens, max_tokens=1. Decode: 8 and 32 sequences, 64 greedy tokens each (prompt 16).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def bench(family: str, fmt: str) -> dict:
    from adallm_core import LLM, SamplingParams
    from adallm_core.testing import build_tiny_checkpoint

    path = build_tiny_checkpoint(family, Path(tempfile.mkdtemp()) / "m", fmt)
    llm = LLM(str(path), max_model_len=512, num_gpu_blocks_override=1024, max_num_batched_tokens=2048)
    engine = llm.llm_engine
    vocab = engine.vocab_size
    prompt = lambda n, s: [(7 * i + 13 * s) % (vocab - 10) + 5 for i in range(n)]  # noqa: E731
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompt(224, 99)}], one, use_tqdm=False)  # warm-up
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt(224, s)} for s in range(8)], one, use_tqdm=False)
    result = {"prefill_tok_s": 8 * 224 / (time.perf_counter() - t)}
    for batch in (8, 32):
        prompts = [{"prompt_token_ids": prompt(16, 100 + s)} for s in range(batch)]
        llm.generate(prompts, one, use_tqdm=False)  # the prompts are now in the prefix cache: time the decode
        params = SamplingParams(temperature=0.0, max_tokens=65, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        result[f"decode_b{batch}_tok_s"] = batch * 64 / (time.perf_counter() - t)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=["qwen3", "qwen3_moe", "gemma3"])
    p.add_argument("--fmt", default="modelopt")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for fam in args.families:
        r = bench(fam, args.fmt)
        print(f"{fam:10s} {args.fmt}: " + "  ".join(f"{k} {v:8.0f}" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
