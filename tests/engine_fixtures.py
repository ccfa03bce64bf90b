"""Tiny checkpoints and engines shared by the engine tests (built once per test session)."""
from __future__ import annotations

from adallm_core.config import EngineArgs
from adallm_core.engine import LLMEngine
from model_helpers import tiny_checkpoint

# Mixed lengths; the longer ones are well past Gemma3's tiny sliding window (16 tokens).
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time, there was a small model that could still tell a story about numbers: 1, 2, 3, 4, 5.",
    "你好，世界",
    "for i in range(10):\n    print(i * 2)\n# and then the loop ends, and the program prints nothing more",
    "A",
    "Numbers: 3.14159 2.71828 1.41421 and the words that go with them, one after the other, in order.",
]


def tiny_model(family: str = "qwen3", fmt: str | None = "modelopt") -> str:
    return str(tiny_checkpoint(family, fmt))  # built once per session, shared with the model tests


def make_engine(family: str = "qwen3", fmt: str | None = "modelopt", **kw) -> LLMEngine:
    # the CPU path unless a test asks for CUDA: its fp32 bounds are the point of the CPU tests, on any machine
    args = dict(model=tiny_model(family, fmt), max_model_len=256, num_gpu_blocks_override=256,
                kv_cache_dtype="bf16", max_num_batched_tokens=512, device="cpu")
    args.update(kw)
    return LLMEngine.from_engine_args(EngineArgs(**args))


def run_all(engine: LLMEngine, max_steps: int = 10_000) -> dict:
    """Step until idle; returns request_id -> final RequestOutput."""
    done = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return done
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    raise AssertionError("engine did not finish")


def greedy_tokens(engine: LLMEngine, prompts, max_tokens: int = 24) -> list[list[int]]:
    from adallm_core.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [f"g{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    done = run_all(engine)
    return [done[r].outputs[0].token_ids for r in ids]
