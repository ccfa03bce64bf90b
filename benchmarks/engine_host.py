"""Host (CPU/Python) time of the engine's decode step: the time a GPU would sit idle between two graph replays.

    python -m benchmarks.engine_host [--batch 1,16,32] [--tokenizer silent,tiny] [--profile]
    python -m benchmarks.engine_host --gpu-shape qwen3-8b --batch 1,16,32     (on a GPU: see gpu_breakdown)

A benchmark, not a test: it measures HOST TIME ONLY. The real LLMEngine (scheduler, KV block manager, sampler,
incremental detokenizer, outputs) is driven by a runner stand-in whose execute() returns precomputed logits
instantly, so what is timed is everything the engine does around the model. The vocabulary is small (384, the
tiny test tokenizer's) on purpose: on a GPU the logits work (argmax over [B, 151936], the sampling race) is
device work, while here it would be CPU arithmetic that swamps the bookkeeping; with a small vocab each torch op
costs about its dispatch overhead, which the host pays on the GPU too. The stand-in's own cost (handing back a
view of a precomputed tensor) is not part of the engine and is a few microseconds.

Load: 128-token prompts, 128 new tokens, ignore_eos, one prefill step then decode steps; greedy (temperature 0)
and seeded sampling (temperature 1, one seed per request). Tokenizers: 'silent' decodes every token to ''
(the detokenizer's floor), 'tiny' is the byte-level BPE of the test models (real text, multi-byte characters).
Prints the median host ms per decode step: wall-clock and this thread's CPU time (steadier on a shared machine).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch

VOCAB = 384
PROMPT_LEN = 128
OUTPUT_LEN = 128
LOGITS_CYCLE = 61  # distinct precomputed logits tensors, so greedy tokens vary from step to step


class InstantRunner:
    """ModelRunner stand-in: no model, no KV tensors; execute() returns precomputed logits at once."""

    kernel_backend = "instant"
    kv_groups = (SimpleNamespace(sliding_window=None),)

    def __init__(self, vocab: int, max_num_seqs: int, max_model_len: int):
        self.device = torch.device("cpu")
        self.max_model_len = max_model_len
        self.vocab_size = vocab
        self.model_config = SimpleNamespace(vocab_size=vocab, eos_token_ids=(0,))
        gen = torch.Generator().manual_seed(0)
        self.logits = torch.randn(LOGITS_CYCLE, max_num_seqs, vocab, generator=gen)
        self.calls = 0

    def kv_block_bytes(self) -> list[int]:
        return [1]

    def allocate_kv_cache(self, counts) -> None:
        pass

    def execute(self, steps):
        self.calls += 1
        n = sum(1 for s in steps if s.sample)
        return self.logits[self.calls % LOGITS_CYCLE, :n]


class SilentTokenizer:
    """Decodes every token to '': the detokenizer's cheapest case."""

    eos_token_id = 0
    eos_token_ids = (0,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1 + ord(c) % (VOCAB - 1) for c in text]

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return ""


def tiny_tokenizer():
    from adallm_core.testing import build_tokenizer
    from adallm_core.tokenizer import Tokenizer

    path = tempfile.mkdtemp(prefix="engine_host_tok_")
    build_tokenizer("qwen").save_pretrained(path)
    return Tokenizer(path)


def make_engine(tokenizer, max_num_seqs: int):
    from adallm_core.config import EngineArgs
    from adallm_core.engine import LLMEngine

    max_len = PROMPT_LEN + OUTPUT_LEN + 16
    args = EngineArgs(model="unused", max_model_len=max_len, max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=max_num_seqs * PROMPT_LEN, num_gpu_blocks_override=4096,
                      device="cpu")
    return LLMEngine(args, InstantRunner(VOCAB, max_num_seqs, max_len), tokenizer)


def decode_step_ms(engine, batch: int, mode: str, rep: int) -> list[tuple[float, float]]:
    """(wall ms, thread CPU ms) of each pure-decode step of one batch (the prefill step and the last, finishing
    step excluded). CPU time is what the step costs; wall time also counts waiting for a busy machine's cores."""
    from adallm_core.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(batch * 100 + rep)
    vocab = engine.vocab_size
    for i in range(batch):
        params = SamplingParams(temperature=0.0 if mode == "greedy" else 1.0, seed=None if mode == "greedy" else i,
                                max_tokens=OUTPUT_LEN, ignore_eos=True)
        engine.add_request(f"{mode}-{batch}-{rep}-{i}", torch.randint(1, vocab, (PROMPT_LEN,), generator=gen).tolist(),
                           params)
    engine.step()  # the prefill (one step: max_num_batched_tokens holds every prompt)
    times = []
    while engine.has_unfinished_requests():
        wall, cpu = time.perf_counter(), time.thread_time()
        engine.step()
        times.append((1e3 * (time.perf_counter() - wall), 1e3 * (time.thread_time() - cpu)))
    return times[:-1]


def _timed(fn, key: str, acc: dict):
    def run(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        acc[key] += time.perf_counter() - start
        return out
    return run


def _graph_gpu_ms(graphs, batch: int, reps: int = 30) -> float:
    """One replay of the batch's graph, replays back to back: the launches queue up, so this is GPU time."""
    graph = graphs.graphs[graphs.most_replayed(batch)]
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / reps


def gpu_breakdown(shape: str, batches: list[int]) -> None:
    """On a GPU, the real engine on RANDOM weights of a real shape: a decode step's wall time beside its graph's
    GPU time, and the host time of staging the inputs, launching the graph, and sampling (which waits for the GPU).
    Async scheduling is off here: it hides this host time behind the next step, and this splits what it hides."""
    from adallm_core.sampling_params import SamplingParams
    from benchmarks.decode import build_engine

    engine, runner = build_engine(shape, max(batches), PROMPT_LEN, OUTPUT_LEN, enforce_eager=False,
                                  engine_options=dict(async_scheduling=False))
    acc = dict(stage=0.0, launch=0.0, sample=0.0)
    graphs = runner.graphs
    graphs.inputs.stage = _timed(graphs.inputs.stage, "stage", acc)
    for graph in graphs.graphs.values():
        graph.replay = _timed(graph.replay, "launch", acc)
    engine.sampler = _timed(engine.sampler, "sample", acc)
    vocab = runner.model_config.vocab_size
    print(f"\n{shape} (RANDOM weights) on {torch.cuda.get_device_name()}: ms per decode step")
    print(f"{'batch':>5} {'step':>7} {'graph GPU':>9} {'idle':>6} {'stage':>6} {'launch':>7} {'sample+wait':>11}"
          f" {'rest':>6}")
    for b in batches:
        for rep in range(2):  # the first is a warm-up
            params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, ignore_eos=True)
            gen = torch.Generator().manual_seed(b)
            for i in range(b):
                engine.add_request(f"gpu-{b}-{rep}-{i}", torch.randint(0, vocab, (PROMPT_LEN,), generator=gen).tolist(),
                                   params)
            engine.step()
            engine.step()  # the first decode step
            for k in acc:
                acc[k] = 0.0
            steps, start = 0, time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step()
                steps += 1
            step = 1e3 * (time.perf_counter() - start) / steps
        graph = _graph_gpu_ms(graphs, b)
        stage, launch, sample = (1e3 * acc[k] / steps for k in ("stage", "launch", "sample"))
        print(f"{b:5d} {step:7.3f} {graph:9.3f} {step - graph:6.3f} {stage:6.3f} {launch:7.3f} {sample:11.3f}"
              f" {step - stage - launch - sample:6.3f}", flush=True)
    engine.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,16,32")
    p.add_argument("--tokenizer", default="silent,tiny")
    p.add_argument("--mode", default="greedy,seeded")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="cProfile the decode steps of the largest batch")
    p.add_argument("--gpu-shape", help="instead: the real engine on a GPU with random weights of this shape "
                   "(qwen3-8b, ...), host time per phase of a decode step")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    batches = [int(b) for b in args.batch.split(",")]
    if args.gpu_shape:
        gpu_breakdown(args.gpu_shape, batches)
        return 0
    print(f"host time per decode step (stand-in runner, vocab {VOCAB}, prompt {PROMPT_LEN}, {OUTPUT_LEN} new tokens,"
          f" ignore_eos; {args.reps} reps)")
    print(f"{'tokenizer':>9} {'mode':>7} {'batch':>5} {'wall ms':>8} {'cpu ms':>7} {'cpu us/seq':>10}  (medians)")
    for tok_name in args.tokenizer.split(","):
        tokenizer = SilentTokenizer() if tok_name == "silent" else tiny_tokenizer()
        for mode in args.mode.split(","):
            for b in batches:
                engine = make_engine(tokenizer, max(batches))
                decode_step_ms(engine, b, mode, -1)  # warm-up
                times = [t for rep in range(args.reps) for t in decode_step_ms(engine, b, mode, rep)]
                wall, cpu = (statistics.median(t[k] for t in times) for k in (0, 1))
                print(f"{tok_name:>9} {mode:>7} {b:5d} {wall:8.3f} {cpu:7.3f} {1e3 * cpu / b:10.1f}", flush=True)
    if args.profile:
        b, tokenizer = max(batches), (SilentTokenizer() if "silent" in args.tokenizer else tiny_tokenizer())
        engine = make_engine(tokenizer, b)
        mode = args.mode.split(",")[0]
        decode_step_ms(engine, b, mode, -1)
        prof = cProfile.Profile()
        prof.enable()
        decode_step_ms(engine, b, mode, 0)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        print(buf.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
