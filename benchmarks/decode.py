"""End-to-end decode throughput of the real engine on random NVFP4 weights of a real model's shapes, beside HF BF16.

    python -m benchmarks.decode --shape qwen3-8b --batch 1,2,4,8,16,32 --input-len 128 --output-len 128

Weights are RANDOM (real shapes, random values; built on the GPU, nothing downloaded), so the text is noise and
only speed and memory mean anything. Per batch size: total generated tokens, seconds (prefill included, as the
reference runtime reports), tok/s, decode ms/step, prefill ms (from the start until every request has its first
token), peak GPU memory, and % of the bandwidth roofline (bytes a decode
step must read: NVFP4 linears, the lm_head (BF16; NVFP4 with --quantize-lm-head), the KV cache at mid-generation, over the measured copy bandwidth).
Then Hugging Face transformers BF16 on the same shapes (static cache, torch.compile) and the ratio. Each side's
figure is the fastest of --repeats timed runs (3) after a warm-up.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

import adallm_core
from adallm_core.ops import cuda_gemv, pdl
from benchmarks.random_checkpoint import SHAPES, RandomCheckpoint, hf_config
from benchmarks.timing import copy_bandwidth


class RandomTokenizer:
    """Stands in for a tokenizer: prompts are token ids and the text of random weights is noise anyway."""

    eos_token_id = None
    eos_token_ids = ()
    vocab_size = 0

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return ""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise ValueError("the decode benchmark sends token ids, not text")


def build_engine(shape: str, max_batch: int, input_len: int, output_len: int, enforce_eager: bool, device="cuda",
                 overrides: dict | None = None, tensor_parallel_size: int = 1, engine_options: dict | None = None):
    """overrides: HF config fields of the random model; engine_options: more EngineArgs (quantize_lm_head...)."""
    from adallm_core.config import EngineArgs
    from adallm_core.engine import LLMEngine
    from adallm_core.runner import ModelRunner

    ckpt = RandomCheckpoint(shape, device, overrides=overrides) if tensor_parallel_size == 1 else None
    block_size = 16
    options = dict(engine_options or {})
    max_model_len = options.pop("max_model_len", None) or input_len + output_len
    blocks = max_batch * math.ceil((input_len + output_len) / block_size) + 8  # what the batch needs, no more
    blocks = max(blocks, math.ceil(max_model_len / block_size) + 8)  # and one sequence of the bound must fit
    args = EngineArgs(model="random", max_model_len=max_model_len, max_num_seqs=max_batch,
                      max_num_batched_tokens=max(2048, max_batch * input_len), num_gpu_blocks_override=blocks,
                      kv_cache_dtype="fp8", enforce_eager=enforce_eager, enable_prefix_caching=False,
                      block_size=block_size, tensor_parallel_size=tensor_parallel_size, **options)
    if tensor_parallel_size > 1:  # every rank makes only its own shard of the random weights
        import functools

        from adallm_core.distributed.executor import TensorParallelRunner
        from benchmarks.random_checkpoint import open_random

        runner = TensorParallelRunner(args, "random", checkpoint_factory=functools.partial(open_random, shape, overrides))
        return LLMEngine(args, runner, RandomTokenizer()), runner
    runner = ModelRunner(args, ckpt, device)
    return LLMEngine(args, runner, RandomTokenizer()), runner


def reachable(root):
    """Every object reachable from root through attributes, lists, tuples and dicts, each once; tensors are leaves
    (the op table and config are skipped: they hold no weights)."""
    seen, stack = set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, torch.Tensor):
            continue
        if isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif hasattr(obj, "__dict__"):
            stack.extend(v for k, v in vars(obj).items() if k not in ("ops", "cfg"))


def step_bytes(runner, batch: int, ctx: int) -> int:
    """Bytes one decode step must read: every NVFP4 linear, the lm_head, and the batch's KV cache."""
    from adallm_core.models.base import NVFP4LMHead
    from adallm_core.nvfp4 import NVFP4Weight

    objects = list(reachable(runner.model))
    cfg = getattr(runner, "runner", runner).model_config  # tensor parallel: rank 0's shard (bytes per GPU)
    total = 0.0
    for w in (obj for obj in objects if isinstance(obj, NVFP4Weight)):  # a quantized lm_head among them
        if w.packed.dim() == 3:  # stacked MoE experts: a step reads those its tokens route to (expected count)
            e, k = w.packed.shape[0], cfg.num_experts_per_tok
            total += w.nbytes * (1 - (1 - k / e) ** batch)
        else:
            total += w.nbytes
    if not any(isinstance(obj, NVFP4LMHead) for obj in objects):
        total += cfg.vocab_size * cfg.hidden_size * 2  # lm_head (tied or not), BF16
    kv_layers = sum(min(ctx, g.sliding_window or ctx) * len(g.layers) for g in runner.kv_groups)
    total += batch * kv_layers * 2 * cfg.num_kv_heads * cfg.head_dim * runner.kv_cache_dtype.itemsize
    return int(total)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_batch(engine, batch: int, input_len: int, output_len: int, vocab: int, **sampling) -> dict:
    from adallm_core.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, **sampling)
    gen = torch.Generator().manual_seed(batch)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", torch.randint(0, vocab, (input_len,), generator=gen).tolist(), params)
    _sync()
    start = time.perf_counter()
    generated: dict[str, int] = {}
    first_decode = None  # (time, steps) once every request has its first token: decode steps follow
    steps = 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            generated[o.request_id] = len(o.outputs[0].token_ids)
        steps += 1
        if first_decode is None and len(generated) == batch and min(generated.values()) >= 1:
            _sync()
            first_decode = (time.perf_counter(), steps)
    _sync()
    end = time.perf_counter()
    tokens = sum(generated.values())
    decode_steps = steps - first_decode[1]
    return dict(batch=batch, total_tokens=tokens, seconds=end - start, tok_s=tokens / (end - start),
                decode_ms_step=1e3 * (end - first_decode[0]) / max(1, decode_steps),
                prefill_ms=1e3 * (first_decode[0] - start))  # counted in seconds too: the reference's tok/s does


def bench_engine(shape, batches, input_len, output_len, enforce_eager, bw, tensor_parallel_size=1,
                 engine_options=None, repeats: int = 1) -> list[dict]:
    torch.cuda.reset_peak_memory_stats()
    engine, runner = build_engine(shape, max(batches), input_len, output_len, enforce_eager,
                                  tensor_parallel_size=tensor_parallel_size, engine_options=engine_options)
    vocab = runner.model_config.vocab_size
    kinds = (("decode", "graphs"), ("prefill", "prefill_graphs"))
    capture = {kind: round(graphs.capture_seconds, 1) for kind, attr in kinds
               if (graphs := getattr(runner, attr, None)) is not None}  # none under tensor parallelism or eager
    rows = []
    for b in batches:
        run_batch(engine, b, input_len, 4, vocab)  # warm-up: kernels compiled for this batch's shapes
        torch.cuda.reset_peak_memory_stats()
        runs = [run_batch(engine, b, input_len, output_len, vocab) for _ in range(repeats)]
        row = min(runs, key=lambda r: r["seconds"])
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        need = step_bytes(runner, b, input_len + output_len // 2)
        row["roofline_ms_step"] = need / bw * 1e3
        row["pct_roofline"] = 100 * row["roofline_ms_step"] / row["decode_ms_step"]
        row["graph_capture_s"] = capture
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    engine.shutdown()
    del engine, runner
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def bench_hf(shape, batches, input_len, output_len, compile_model: bool, repeats: int = 1) -> dict:
    """transformers BF16, random weights of the same shapes, static cache, compiled: generated tok/s per batch, the
    fastest of `repeats` timed runs."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(shape)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    out = {}
    for b in batches:
        ids = torch.randint(0, cfg.vocab_size, (b, input_len), device="cuda")
        # a static cache makes generate() compile the decode step itself (transformers' compile_config)
        kw = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                  cache_implementation="static", pad_token_id=0, disable_compile=not compile_model)
        for _ in range(2):  # compile, then settle
            model.generate(ids, **kw)
        secs = float("inf")
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            res = model.generate(ids, **kw)
            torch.cuda.synchronize()
            secs = min(secs, time.perf_counter() - start)
        out[b] = dict(hf_tok_s=b * (res.shape[1] - input_len) / secs, hf_seconds=secs,
                      hf_peak_gb=torch.cuda.max_memory_allocated() / 1e9)
        print(json.dumps({"hf_batch": b, **out[b]}), file=sys.stderr, flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    p.add_argument("--batch", default="1,2,4,8,16,32")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--hf-batch", default=None, help="batch sizes for transformers (default: --batch; '' skips)")
    p.add_argument("--no-hf-compile", action="store_true", help="run transformers eagerly (static cache only)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs in the engine")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per engine (rank 0 on cuda:0)")
    p.add_argument("--quantize-lm-head", action="store_true", help="the engine's lm_head in NVFP4 (lossy)")
    p.add_argument("--no-embedding-on-host", action="store_true", help="keep the input embedding table on the GPU")
    p.add_argument("--no-async-scheduling", action="store_true", help="read each step's tokens before the next")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the engine's length bound (default input + output); serving uses far longer ones, which "
                        "the decode graphs pass to attention as its bound")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs a batch, for the engine and transformers alike; the fastest is reported (transformers' "
                        "single runs moved by up to a quarter between calls)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if not torch.cuda.is_available():
        print("benchmarks.decode needs a CUDA GPU", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batch.split(",") if b]
    hf_batches = batches if args.hf_batch is None else [int(b) for b in args.hf_batch.split(",") if b]
    bw = copy_bandwidth()
    options = dict(quantize_lm_head=args.quantize_lm_head, embedding_on_host=not args.no_embedding_on_host,
                   async_scheduling=not args.no_async_scheduling, max_model_len=args.max_model_len)
    rows = bench_engine(args.shape, batches, args.input_len, args.output_len, args.enforce_eager, bw,
                        args.tensor_parallel_size, options, args.repeats)
    hf = (bench_hf(args.shape, hf_batches, args.input_len, args.output_len, not args.no_hf_compile, args.repeats)
          if hf_batches else {})
    for r in rows:
        r.update(hf.get(r["batch"], {}))
        if "hf_tok_s" in r:
            r["ratio_vs_hf"] = r["tok_s"] / r["hf_tok_s"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=args.shape, device=torch.cuda.get_device_name(), copy_TBps=bw / 1e12, rows=rows), f,
                      indent=1)
    print(f"\n{args.shape}: RANDOM NVFP4 weights of the real shapes, {args.input_len} in / {args.output_len} out, "
          f"FP8 KV, CUDA graphs {'off' if args.enforce_eager else 'on'}, tensor_parallel_size "
          f"{args.tensor_parallel_size}, lm_head {'NVFP4' if args.quantize_lm_head else 'BF16'}, embedding on "
          f"{'GPU' if args.no_embedding_on_host else 'host'}, async scheduling "
          f"{'off' if args.no_async_scheduling else 'on'}, max_model_len "
          f"{args.max_model_len or args.input_len + args.output_len}, decode linears of 1-"
          f"{cuda_gemv.DECODE_TOKENS} tokens on {'CUDA' if cuda_gemv.load() else 'Triton'}, programmatic dependent "
          f"launch {f'on up to {pdl.MAX_TOKENS} tokens' if pdl.enabled(torch.device('cuda')) else 'off'}, fastest of "
          f"{args.repeats} runs; "
          f"{torch.cuda.get_device_name()}, copy "
          f"{bw / 1e12:.2f} TB/s; HF = transformers BF16 static cache{'' if args.no_hf_compile else ' compiled'}; "
          f"adallm_core from {Path(adallm_core.__file__).parent}")  # which tree ran: A/B runs of two trees
    print(f"{'batch':>5} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'ms/step':>8} {'prefill ms':>10} {'peak GB':>8} "
          f"{'%roof':>6} {'HF tok/s':>9} {'ratio':>6}")
    for r in rows:
        hf_s = f"{r['hf_tok_s']:9.1f} {r['ratio_vs_hf']:6.2f}" if "hf_tok_s" in r else f"{'':9} {'':6}"
        print(f"{r['batch']:5d} {r['total_tokens']:7d} {r['seconds']:8.2f} {r['tok_s']:8.1f} {r['decode_ms_step']:8.2f} "
              f"{r['prefill_ms']:10.1f} {r['peak_gb']:8.2f} {r['pct_roofline']:5.0f}% {hf_s}")
    if rows and rows[0]["graph_capture_s"]:
        print("CUDA graph capture at start-up, s (Triton compiles included where the cache was cold): "
              + ", ".join(f"{kind} {s}" for kind, s in rows[0]["graph_capture_s"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
