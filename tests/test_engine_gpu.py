"""The whole engine on CUDA (Triton kernels, decode CUDA graphs, BF16 activations) against transformers' own model
class in fp32 on the dequantized weights, with vLLM's check for models run at different precisions: greedy tokens
agree until the first position where they differ, and there each side's token is among the other's top 5; and
most positions agree, transformers fed our tokens."""
import dataclasses

import pytest
import torch

from adallm_core.checkpoint.read import Checkpoint
from adallm_core.sampling_params import SamplingParams
from engine_fixtures import PROMPTS, make_engine, run_all
from model_helpers import hf_on_dequantized, tiny_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NEW_TOKENS = 32
TOP = 5
# MoE: where BF16 and fp32 route a token to different experts (a near-tied router score), that position's logits
# move far more than rounding would move a dense model's; there the check is each side's token among the other's
# top 20 of 384.
TOP_MOE = 20


@pytest.mark.parametrize("kv", ["bf16", "fp8"])
@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "gemma3"])
def test_gpu_engine_greedy_tokens_agree_with_transformers(family, kv):
    engine = make_engine(family, "modelopt", kv_cache_dtype=kv, device="cuda", max_num_seqs=8)
    assert engine.kernel_backend == "triton" and engine.runner.graphs is not None
    # embedding_on_host (the default): an untied table stays in pinned host memory, a tied one (Gemma) on the GPU
    table = engine.runner.model.embed_tokens
    assert (table.device.type, table.is_pinned()) == (("cuda", False) if family == "gemma3" else ("cpu", True))
    # the Triton backend keeps every NVFP4 weight in its kernels' word order, linears of whole 16 x 128 chunks
    # tile-major (ops.prepare_nvfp4_weight): here down_proj (K = 128); the rest have K = 64, MoE experts are stacks
    layer = engine.runner.model.layers[0]
    mlp = [layer.mlp.w13, layer.mlp.w2] if family == "qwen3_moe" else [layer.mlp.gate_up_proj.weight,
                                                                       layer.mlp.down_proj.weight]
    weights = [layer.self_attn.qkv_proj.weight, layer.self_attn.o_proj.weight] + mlp
    assert all(w.kernel_order and w.tile_major == w.fits_tile_major for w in weights)
    assert any(w.tile_major for w in weights) == (family != "qwen3_moe")
    hf = hf_on_dequantized(family, Checkpoint(tiny_checkpoint(family, "modelopt")))
    check_against_transformers(engine, hf, family, kv)


def test_gpu_engine_with_a_quantized_lm_head_agrees_with_transformers():
    """Gemma3 ties the lm_head to the embedding; quantize_lm_head unties them, so the table moves to the host."""
    engine = make_engine("gemma3", "modelopt", kv_cache_dtype="bf16", device="cuda", max_num_seqs=8,
                         quantize_lm_head=True)
    assert engine.runner.model.embed_tokens.is_pinned() and engine.runner.model.lm_head.weight.kernel_order
    hf = hf_on_dequantized("gemma3", Checkpoint(tiny_checkpoint("gemma3", "modelopt")))
    # the engine's own NVFP4 head (tests/test_lm_head_options.py checks it against compressed-tensors on the CPU;
    # that package is not on the GPU machine)
    hf.lm_head.weight = torch.nn.Parameter(engine.runner.model.lm_head.weight.dequantize().cpu())
    check_against_transformers(engine, hf, "gemma3", "bf16")


def test_gpu_engine_one_sequence_at_a_time_takes_the_cuda_decode_kernel():
    """Batch 1: one-token decode steps send the linears whose K is a multiple of 128 (here down_proj) to
    csrc/nvfp4_gemv.cu; the tokens still agree with transformers."""
    from adallm_core.ops import cuda_gemv

    engine = make_engine("qwen3", "modelopt", kv_cache_dtype="fp8", device="cuda", max_num_seqs=8)
    down = engine.runner.model.layers[0].mlp.down_proj.weight
    assert cuda_gemv.takes(torch.zeros(1, down.in_features, dtype=torch.bfloat16, device="cuda"), down)
    hf = hf_on_dequantized("qwen3", Checkpoint(tiny_checkpoint("qwen3", "modelopt")))
    check_against_transformers(engine, hf, "qwen3", "fp8", one_at_a_time=True)


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "gemma3"])
def test_gpu_engine_on_adas_launch_path_agrees_with_transformers(family, monkeypatch):
    """What an Ada card runs, short of its instructions: no programmatic dependent launch (sm_90+ only) and the
    Triton ops' tiles, K splits and MoE routing chunks for an RTX 4090's SMs (the CUDA decode kernel still picks
    its variant by this GPU's). The decode graphs are captured that way; the tokens still agree with transformers."""
    from adallm_core.ops.triton import nvfp4_gemm
    from benchmarks.compile_report import GPUS

    monkeypatch.setenv("ADALLM_DISABLE_PDL", "1")
    monkeypatch.setattr(nvfp4_gemm, "sm_figures", lambda device: GPUS[89]["RTX 4090"])
    engine = make_engine(family, "modelopt", kv_cache_dtype="fp8", device="cuda", max_num_seqs=8)
    assert engine.runner.graphs is not None
    hf = hf_on_dequantized(family, Checkpoint(tiny_checkpoint(family, "modelopt")))
    check_against_transformers(engine, hf, family, "fp8")


def check_against_transformers(engine, hf, family: str, kv: str, one_at_a_time: bool = False) -> None:
    top = TOP_MOE if family == "qwen3_moe" else TOP
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=top)
    prompt_ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    done = {}
    for i, ids in enumerate(prompt_ids):
        engine.add_request(str(i), ids, params)
        if one_at_a_time:
            done.update(run_all(engine))
    done.update(run_all(engine))
    assert engine.stats()["kv_blocks_used"] == 0

    # an fp8 KV cache rounds keys and values to E4M3: so does the reference then
    hf.config._attn_implementation = "fp8_kv_sdpa" if kv == "fp8" else "sdpa"
    first_splits, agreed = [], 0
    for i, ids in enumerate(prompt_ids):
        out = done[str(i)].outputs[0]
        ours = out.token_ids
        with torch.no_grad():  # teacher-forced: transformers' next-token logits at each of our positions
            logits = hf(torch.tensor([ids + ours[:-1]])).logits[0, len(ids) - 1:].float()
        theirs = logits.argmax(dim=-1).tolist()
        agreed += sum(a == b for a, b in zip(ours, theirs))
        first = next((j for j in range(NEW_TOKENS) if ours[j] != theirs[j]), NEW_TOKENS)
        first_splits.append(first)
        if first < NEW_TOKENS:
            hf_top = logits[first].topk(top).indices.tolist()
            assert ours[first] in hf_top, f"prompt {i} token {first}: ours {ours[first]} not in HF top {hf_top}"
            assert theirs[first] in out.logprobs[first], (
                f"prompt {i} token {first}: HF's {theirs[first]} not in our top {list(out.logprobs[first])}")
    # Near-ties split BF16 from fp32 now and then: the tiny models' top two logits are often within 0.1-0.2% of
    # the largest, under one BF16 step, so where the first split falls is a matter of luck (the reference ops
    # themselves in BF16 on the CPU, no kernel of ours, split after 82 of 256 tokens on the tiny Qwen3 with an FP8
    # cache). Every position is compared instead: transformers is fed our tokens, so both sides see the same
    # prefix at each, and most positions agree (that reference run: 240 of 256; Gemma3 255, Qwen3-MoE 233). Not so
    # for the MoE model with an FP8 cache on the GPU (H100: 27 of 256 tokens before the first split): E4M3 rounding
    # turns BF16-sized differences in k/v into whole E4M3 steps now and then, and the router amplifies them.
    if not (family == "qwen3_moe" and kv == "fp8"):
        assert agreed >= 0.8 * NEW_TOKENS * len(PROMPTS), (
            f"{agreed} of {NEW_TOKENS * len(PROMPTS)} positions agree; first splits per prompt: {first_splits}")


def test_gpu_async_scheduling_gives_the_same_tokens():
    """The step ahead takes its input ids from the previous step's argmax on the device (the graphs' input
    buffer): the same greedy tokens as reading every step first."""
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    got = []
    for on in (False, True):
        engine = make_engine("qwen3", "modelopt", kv_cache_dtype="fp8", device="cuda", max_num_seqs=8,
                             async_scheduling=on)
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"r{i}", prompt, params)
        done = run_all(engine)
        got.append(({rid: out.outputs[0].token_ids for rid, out in done.items()},
                     engine.stats()["num_steps_run_ahead"]))
        assert engine.stats()["kv_blocks_used"] == 0
    assert got[0][0] == got[1][0]
    assert got[0][1] == 0 and got[1][1] > 10


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_gpu_prompt_logprobs_agree_with_transformers(family):
    """Prompts scored (execute_scored: eager, beside decoding sequences that run in graphs, chunked by a small
    token budget) give transformers' fp32 logprobs to BF16 precision, and its top token is among our top 5."""
    engine = make_engine(family, "modelopt", kv_cache_dtype="bf16", device="cuda", max_num_seqs=8,
                         max_num_batched_tokens=32)
    hf = hf_on_dequantized(family, Checkpoint(tiny_checkpoint(family, "modelopt")))
    for i, prompt in enumerate(PROMPTS):  # decoding neighbours
        engine.add_request(f"n{i}", prompt, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    scored = [engine.tokenizer.encode(p) for p in (PROMPTS[3], PROMPTS[5], PROMPTS[7])]
    for i, ids in enumerate(scored):
        engine.add_request(f"s{i}", ids, SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=TOP))
    done = run_all(engine)
    assert engine.stats()["kv_blocks_used"] == 0
    for i, ids in enumerate(scored):
        got = done[f"s{i}"].prompt_logprobs
        assert got[0] is None and len(got) == len(ids)
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
        ours = torch.tensor([got[j][ids[j]] for j in range(1, len(ids))])
        torch.testing.assert_close(ours, ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])], atol=0.1, rtol=0.02)
        for j in range(1, len(ids)):
            assert int(ref[j - 1].argmax()) in got[j], (i, j)


def test_gpu_structured_outputs_follow_their_grammar():
    """The grammar's mask applied to logits on the device (xgrammar's CUDA path), beside graph-decoded neighbours."""
    pytest.importorskip("xgrammar")
    import re

    engine = make_engine("qwen3", "modelopt", kv_cache_dtype="fp8", device="cuda", max_num_seqs=8)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"n{i}", prompt, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    for t in (0.0, 1.0):
        engine.add_request(f"r{t}", PROMPTS[1], SamplingParams(temperature=t, seed=2, max_tokens=24,
                                                              structured_outputs=dict(regex=r"[a-c]{2,5}-\d\d")))
    done = run_all(engine)
    for t in (0.0, 1.0):
        out = done[f"r{t}"].outputs[0]
        assert out.finish_reason == "stop" and re.fullmatch(r"[a-c]{2,5}-\d\d", out.text), out.text
    assert engine.stats()["kv_blocks_used"] == 0


def test_gpu_kv_budget_leaves_room_for_the_largest_step():
    """Without a block count the engine measures its largest step first (adallm_core/memory_profile.py) and takes
    that from the KV budget. Then a real step of that size, sampled the costliest way, peaks within the measured
    figure, and the tokens are those of an engine given its blocks outright."""
    from adallm_core.memory_profile import WORST_CASE_SAMPLING

    tokens, seqs = 4096, 16
    kw = dict(kv_cache_dtype="fp8", device="cuda", max_num_seqs=seqs, max_model_len=512,
              max_num_batched_tokens=tokens)
    measured = make_engine("qwen3", "modelopt", num_gpu_blocks_override=None, gpu_memory_utilization=0.05, **kw)
    assert measured.step_peak_bytes > 2**20, measured.step_peak_bytes
    given = make_engine("qwen3", "modelopt", num_gpu_blocks_override=512, **kw)  # every prompt at once here too
    assert given.step_peak_bytes == 0
    vocab = measured.runner.model_config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (tokens // seqs,), generator=g).tolist() for _ in range(seqs)]
    params = dataclasses.replace(WORST_CASE_SAMPLING, max_tokens=4, ignore_eos=True)
    outputs = []
    for engine in (measured, given):
        for i, ids in enumerate(prompts):
            engine.add_request(str(i), ids, params)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        engine.step()  # every prompt whole: the largest step
        torch.cuda.synchronize()
        if engine is measured:
            assert torch.cuda.max_memory_allocated() - before <= measured.step_peak_bytes * 1.05 + 2**20
        done = run_all(engine)
        outputs.append({rid: out.outputs[0].token_ids for rid, out in done.items()})
        assert engine.stats()["kv_blocks_used"] == 0
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("max_num_seqs,max_model_len", [(16, 512), (2, 64)])  # the second: padding fills the bucket
def test_gpu_kv_budget_leaves_room_for_the_prefill_graphs(max_num_seqs, max_model_len):
    """The prefill graphs keep a memory pool for good; the engine measures their largest step eagerly, on the
    capture stream, and takes that from the KV budget too. The pools a capture then reserves (prefill and decode
    graphs share one) fit in that step's figure, allowing for the allocator's 2 MiB segments: the tiny model's
    steps take less than one (H100: 4.28 MB reserved against 0.67 MB measured), so four are allowed. A capture
    adds no cuBLAS workspace either: every capture runs on one stream (a fresh stream each time added 32 MiB)."""
    from adallm_core.cuda_graphs import capture_stream
    from adallm_core.memory_profile import graph_step_seqs, step_peak_bytes
    from adallm_core.prefill_graphs import token_buckets

    engine = make_engine("qwen3", "modelopt", num_gpu_blocks_override=None, gpu_memory_utilization=0.05,
                         kv_cache_dtype="fp8", device="cuda", max_num_seqs=max_num_seqs,
                         max_model_len=max_model_len, max_num_batched_tokens=1024)
    runner = engine.runner
    assert runner.prefill_graphs is not None
    counts = [cache.shape[2] for cache in runner.kv_caches]
    runner.free_kv_cache()
    with torch.cuda.stream(capture_stream(runner.device)):  # its workspace exists now: the step's own memory
        bucket = token_buckets(1024)[-1]
        step = step_peak_bytes(runner, bucket, graph_step_seqs(bucket, max_num_seqs, max_model_len))
    assert 0 < step <= engine.graph_pool_bytes * 1.05 + 2**20
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    runner.allocate_kv_cache(counts)  # captures the graphs again
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    pools = torch.cuda.memory_reserved() - before - sum(c.nbytes for c in runner.kv_caches)
    pools -= runner.prefill_graphs.logits.nbytes  # the shared logits buffer lives outside the pool
    print(f"pools {pools} bytes, the step {step}, budgeted {engine.graph_pool_bytes}")
    assert 0 < pools <= step * 1.05 + 4 * 2 * 2**20, (pools, step, engine.graph_pool_bytes)
