"""Bulk job throughput against the offline LLM API on the same rows, in the same run.

    .venv/bin/python -m benchmarks.bulk_job --rows 256 --max-tokens 32 --replicas 1,2

Prints generated tokens/s of `LLM.generate` over all rows at once (the ceiling one engine reaches, model
load excluded) and of the Ray Data job at each replica count (end to end: Ray Data start-up, replica
start-up and model load, reading, writing), with the job's overhead against the offline figure.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "Grüße", "世界", "zeta", "eta", "theta"]


def make_prompts(rows: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(2 + i % 24)) for i in range(rows)]


def offline(prompts: list[str], max_tokens: int, engine_flags: dict) -> dict:
    from adallm_core import LLM, SamplingParams

    llm = LLM(**engine_flags)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"mode": "offline LLM.generate", "replicas": 1, "generated_tokens": tokens, "wall_s": wall}


def job(input_file: Path, out_dir: Path, replicas: int, max_tokens: int, batch_size: int, engine_argv: list) -> dict:
    from jobs import bulk_generate

    parser = argparse.ArgumentParser()
    bulk_generate.add_arguments(parser)
    args = parser.parse_args(["--input", str(input_file), "--output", str(out_dir), "--max-tokens", str(max_tokens),
                              "--temperature", "0", "--concurrency", str(replicas), "--batch-size", str(batch_size),
                              *engine_argv])
    summary = bulk_generate.run(bulk_generate.plan_job(args))
    assert summary.rows_failed == 0, summary
    return {"mode": "bulk job (Ray Data)", "replicas": replicas, "generated_tokens": summary.generated_tokens,
            "wall_s": summary.wall_time_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--replicas", default="1,2", help="comma-separated replica counts for the job")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    args = parser.parse_args()
    replica_counts = [int(r) for r in args.replicas.split(",")]

    import ray

    # One CPU per replica plus one for Ray Data's read and write tasks (see Processor._check_cpus).
    for attempt in range(3):  # Ray's start-up waits are fixed (30 s); a loaded machine can miss them
        try:
            ray.init(num_cpus=max(replica_counts) + 1, include_dashboard=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    prompts = make_prompts(args.rows)
    work = Path(tempfile.mkdtemp(prefix="bulk_bench_"))
    pq.write_table(pa.table({"prompt": prompts}), work / "prompts.parquet")

    results = [offline(prompts, args.max_tokens, {"max_num_seqs": args.max_num_seqs})]
    for r in replica_counts:
        results.append(job(work / "prompts.parquet", work / f"out{r}", r, args.max_tokens, args.batch_size,
                           ["--max-num-seqs", str(args.max_num_seqs)]))
    base = results[0]["generated_tokens"] / results[0]["wall_s"]
    print(f"\n{args.rows} rows, max_tokens {args.max_tokens}, greedy, tiny demo model on CPU")
    print(f"{'mode':<24}{'replicas':>9}{'gen tokens':>12}{'wall s':>9}{'gen tok/s':>11}{'vs offline':>12}")
    for row in results:
        row["tokens_per_s"] = row["generated_tokens"] / row["wall_s"]
        row["vs_offline"] = row["tokens_per_s"] / base
        print(f"{row['mode']:<24}{row['replicas']:>9}{row['generated_tokens']:>12}{row['wall_s']:>9.1f}"
              f"{row['tokens_per_s']:>11.1f}{row['vs_offline']:>11.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
