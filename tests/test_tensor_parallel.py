"""Tensor parallelism on CPU: gloo, 2 ranks (rank 0 in this process, rank 1 spawned).

Reference: the same engine at tensor_parallel_size=1. Each family's TP engine is built once per module and always
shut down (its worker process joined) in the fixture's finally.
"""
import dataclasses
import multiprocessing

import pytest
import torch
from engine_fixtures import PROMPTS, greedy_tokens, run_all
from model_helpers import tiny_checkpoint

from adallm_core.checkpoint.read import Checkpoint
from adallm_core.config import EngineArgs
from adallm_core.distributed.memory import model_weight_bytes
from adallm_core.distributed.sharding import (
    ShardedCheckpoint, check_shardable, kv_head_range, shard_model_config, vocab_range,
)
from adallm_core.engine import LLMEngine
from adallm_core.model_config import ModelConfig
from adallm_core.models.layers import RMSNorm, SparseMoE
from adallm_core.runner import SeqStep
from adallm_core.sampling_params import SamplingParams
from adallm_core.testing import FAMILIES

pytestmark = pytest.mark.timeout(900)
BLOCKS = 256


def make_engine(path, tp: int, **kw) -> LLMEngine:
    args = dict(model=str(path), max_model_len=256, num_gpu_blocks_override=BLOCKS, kv_cache_dtype="bf16",
                max_num_batched_tokens=512, tensor_parallel_size=tp)
    args.update(kw)
    return LLMEngine.from_engine_args(EngineArgs(**args))


@pytest.fixture(scope="class", params=FAMILIES)
def pair(request):
    path = tiny_checkpoint(request.param, "modelopt")
    single = make_engine(path, 1)
    tp = make_engine(path, 2)
    try:
        yield request.param, single, tp
    finally:
        tp.shutdown()
        assert not multiprocessing.active_children(), "a tensor-parallel worker outlived shutdown()"


def replicated_bytes(model) -> int:
    """What every rank keeps whole: RoPE tables, norm vectors, MoE routers (tiny models: ~15% of the bytes)."""
    layers = [obj for layer in model.layers for obj in (layer, layer.self_attn)]
    norms = [v.weight for obj in layers for v in vars(obj).values() if isinstance(v, RMSNorm)] + [model.norm.weight]
    routers = [layer.mlp.router for layer in model.layers if isinstance(layer.mlp, SparseMoE)]
    return sum(t.nbytes for t in [r.cos_sin for r in model.rotary.values()] + norms + routers)


class TestSameAsOneRank:
    """Module-wide engines would outlive the failure tests below: the class scope ends them first."""

    def test_greedy_tokens_match_single_rank(self, pair):
        family, single, tp = pair
        assert type(tp.runner).__name__ == "TensorParallelRunner"
        assert greedy_tokens(tp, PROMPTS, max_tokens=16) == greedy_tokens(single, PROMPTS, max_tokens=16), family

    def test_logits_match_single_rank(self, pair):
        """A prefill past Gemma3's sliding window, then two decode steps, in blocks the engine did not use."""
        family, single, tp = pair
        tokens = torch.randint(3, 384, (40,), generator=torch.Generator().manual_seed(1)).tolist()
        groups = len(single.runner.kv_groups)
        table = [list(range(BLOCKS - 4, BLOCKS))] * groups
        steps = [SeqStep(tokens[:38], 0, table), SeqStep(tokens[38:39], 38, table), SeqStep(tokens[39:], 39, table)]
        for step in steps:
            want, got = single.runner.execute([step]), tp.runner.execute([step])
            assert got.shape == want.shape == (1, single.vocab_size)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=family)
            assert got.argmax() == want.argmax()

    def test_prompt_logprobs_match_single_rank(self, pair):
        """Scored prompts (execute_scored) run on every rank: the vocabulary-parallel logits are gathered first."""
        family, single, tp = pair
        params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3)
        outs = []
        for engine in (single, tp):
            for i, prompt in enumerate(PROMPTS[3:6]):
                engine.add_request(f"pl{i}", prompt, params)
            done = run_all(engine)
            outs.append([done[f"pl{i}"].prompt_logprobs for i in range(3)])
        for want, got in zip(*outs):
            assert got[0] is None and len(got) == len(want), family
            for w, g in zip(want[1:], got[1:]):
                assert set(g) == set(w) and g == pytest.approx(w, abs=1e-4), family

    def test_logits_are_as_wide_as_the_vocabulary_on_every_rank(self, pair):
        """A rank's model holds half the vocabulary's rows, but the logits it gathers (and the CUDA graphs' shared
        logits buffer, sized from runner.vocab_size) span all of it: a buffer of the shard's width failed the
        graphs' warm-up on every rank."""
        family, single, tp = pair
        assert tp.runner.runner.model_config.vocab_size < single.vocab_size  # rank 0's shard, in this process
        assert tp.runner.vocab_size == single.runner.vocab_size == single.vocab_size, family

    def test_each_rank_holds_half_the_sharded_weights(self, pair):
        family, single, tp = pair
        full = model_weight_bytes(single.runner)
        replicated = replicated_bytes(single.runner.model)
        per_rank = tp.runner.weight_bytes_per_rank()  # measured inside each rank's process
        assert len(per_rank) == 2 and replicated < 0.2 * full
        for b in per_rank:
            # the rest is sharded, except the per-row global scales of row-parallel layers (a few hundred bytes)
            assert 0.49 < (b - replicated) / (full - replicated) < 0.52, (family, per_rank, full, replicated)

    def test_start_up_memory_step_matches_single_rank(self, pair):
        """The largest step the engine measures at start-up on a GPU (adallm_core/memory_profile.py) runs on every
        rank, each on a temporary cache that every rank frees: the same logits as one rank, and the caches
        allocated afterwards serve as before. Last in the class: it replaces the engines' caches."""
        from adallm_core.memory_profile import run_largest_step

        family, single, tp = pair
        want, got = run_largest_step(single.runner, 70, 3), run_largest_step(tp.runner, 70, 3)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=family)
        assert single.runner.kv_caches == [] and tp.runner.kv_caches == []
        for engine in (single, tp):
            engine.runner.allocate_kv_cache([BLOCKS] * len(engine.runner.kv_groups))
        test_tokens = torch.randint(3, 384, (9,), generator=torch.Generator().manual_seed(2)).tolist()
        step = SeqStep(test_tokens, 0, [[1, 2, 3]] * len(single.runner.kv_groups))
        torch.testing.assert_close(tp.runner.execute([step]), single.runner.execute([step]), rtol=1e-4, atol=1e-4)


# --- sharding rules, without processes -----------------------------------------------------------------------------
def test_kv_heads_split_or_replicated():
    assert [kv_head_range(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [kv_head_range(2, r, 4) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]  # replicated x2
    assert [vocab_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]


def dense(w) -> torch.Tensor:
    return w if isinstance(w, torch.Tensor) else w.dequantize()


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors", None])
def test_shards_are_exact_slices_of_the_checkpoint(fmt):
    ckpt = Checkpoint(tiny_checkpoint("qwen3_moe", fmt))
    cfg = ModelConfig.from_hf_config(ckpt.hf_config, ckpt.path)
    d = cfg.head_dim
    layer = "model.layers.0"
    full = {name: dense(ckpt.linear(f"{layer}.{name}")) for name in
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.experts.3.up_proj", "mlp.experts.3.down_proj")}
    embed = ckpt.tensor("model.embed_tokens.weight")
    for world in (2, 4):  # 4 ranks: tiny's 2 KV heads are replicated, each rank holds one q head
        for rank in range(world):
            shard = ShardedCheckpoint(ckpt, cfg, rank, world)
            local = shard_model_config(cfg, rank, world, quantized=fmt is not None)
            q = slice(rank * local.num_heads * d, (rank + 1) * local.num_heads * d)
            kv0, _ = kv_head_range(cfg.num_kv_heads, rank, world)
            inter = slice(rank * local.moe_intermediate_size, (rank + 1) * local.moe_intermediate_size)
            expect = {
                "self_attn.q_proj": full["self_attn.q_proj"][q],
                "self_attn.k_proj": full["self_attn.k_proj"][kv0 * d:(kv0 + local.num_kv_heads) * d],
                "self_attn.o_proj": full["self_attn.o_proj"][:, q],
                "mlp.experts.3.up_proj": full["mlp.experts.3.up_proj"][inter],
                "mlp.experts.3.down_proj": full["mlp.experts.3.down_proj"][:, inter],
            }
            for name, want in expect.items():
                assert torch.equal(dense(shard.linear(f"{layer}.{name}")), want), (fmt, world, rank, name)
            v0, v1 = vocab_range(cfg.vocab_size, rank, world)
            assert torch.equal(shard.tensor("model.embed_tokens.weight"), embed[v0:v1])
            assert torch.equal(shard.tensor(f"{layer}.input_layernorm.weight"),
                               ckpt.tensor(f"{layer}.input_layernorm.weight"))


def test_cuts_inside_a_scale_group_are_refused():
    cfg = ModelConfig.from_hf_config(Checkpoint(tiny_checkpoint("qwen3", "modelopt")).hf_config)
    with pytest.raises(ValueError, match=r"intermediate_size \(down_proj input\) 96 / 4 = 24 is not a multiple of 16"):
        check_shardable(dataclasses.replace(cfg, intermediate_size=96), 4, quantized=True)
    check_shardable(dataclasses.replace(cfg, intermediate_size=96), 4, quantized=False)  # BF16: any column
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible"):
        check_shardable(cfg, 8, quantized=False)
    with pytest.raises(ValueError, match="cut a 16-element scale group"):
        Checkpoint(tiny_checkpoint("qwen3", "modelopt")).linear("model.layers.0.mlp.down_proj", cols=slice(0, 24))


def test_unsplittable_size_is_refused_before_any_worker_starts():
    with pytest.raises(ValueError, match="tensor_parallel_size=8 cannot split"):
        make_engine(tiny_checkpoint("qwen3", "modelopt"), 8)
    assert not multiprocessing.active_children()


def test_failed_start_stops_the_workers():
    """Every rank refuses max_model_len past the model's positions after the group formed: all processes go."""
    with pytest.raises(ValueError, match="max_model_len"):
        make_engine(tiny_checkpoint("qwen3", "modelopt"), 2, max_model_len=10**6)
    assert not multiprocessing.active_children()
    # the runner is up on every rank and the engine around it refuses (a cache that cannot hold one sequence)
    with pytest.raises(ValueError, match="max_model_len") as held:
        make_engine(tiny_checkpoint("qwen3", "modelopt"), 2, num_gpu_blocks_override=2)
    # stopped at once: the error (its frames hold the runner) may be kept, in a notebook say
    assert not multiprocessing.active_children(), held.value


def test_ctrl_c_waits_for_the_call_every_rank_is_in():
    """Rank 0's calls to the ranks run whole: a SIGINT during one is raised when it returns, not between two of its
    collectives (where the other ranks would wait for rank 0 forever)."""
    import os
    import signal

    from adallm_core.distributed.executor import interrupts_deferred

    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            finished.append("the rest of the call")
    assert finished == ["the rest of the call"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


CTRL_C_SCRIPT = """
import sys
import torch
from adallm_core import EngineArgs, SamplingParams
from adallm_core.engine import LLMEngine
torch.set_num_threads(1)  # short steps: a signal often lands between two collectives
engine = LLMEngine.from_engine_args(EngineArgs(model=sys.argv[1], tensor_parallel_size=2, max_model_len=256,
                                               num_gpu_blocks_override=64, kv_cache_dtype="bf16"))
print("ready", flush=True)
params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
try:
    for i in range(10**6):
        engine.add_request(str(i), [5, 6, 7, 8], params)
        while engine.has_unfinished_requests():
            engine.step()
except KeyboardInterrupt:
    engine.shutdown()
    print("interrupted", flush=True)
"""


def test_ctrl_c_mid_generation_stops_every_rank():
    """Ctrl-C reaches every process of the terminal's group. The workers leave it to rank 0, which finishes the
    step in flight on every rank before raising: with gloo, ranks out of step wait for each other forever."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT, str(tiny_checkpoint("qwen3", "modelopt"))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(2)  # generating
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert "interrupted" in out, out[-2000:]
        def left() -> str:  # processes of the script's group (its spawned ranks included)
            return subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout

        deadline = time.monotonic() + 20
        while left() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- 2 GPUs: NCCL (the same checks; not run on a machine without two CUDA devices) --------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("family", FAMILIES)
def test_two_gpus_match_one(family):
    """fp32 reference ops over NCCL: the same tokens and logits as one GPU. Then the default path (Triton kernels,
    BF16, decode CUDA graphs captured per rank): logits within BF16 noise."""
    path = tiny_checkpoint(family, "modelopt")
    for kw, tol in ((dict(kernel_backend="reference", dtype="float32"), 1e-4), (dict(), 5e-2)):
        single, tp = make_engine(path, 1, device="cuda", **kw), make_engine(path, 2, device="cuda", **kw)
        try:
            assert tp.runner.device == torch.device("cuda:0") and tp.runner.group.device_group is not None
            steps = [SeqStep(list(range(3, 41)), 0, [list(range(BLOCKS - 4, BLOCKS))] * len(single.runner.kv_groups))]
            torch.testing.assert_close(tp.runner.execute(steps), single.runner.execute(steps), rtol=tol, atol=tol)
            if tol < 1e-3:
                assert greedy_tokens(tp, PROMPTS, 16) == greedy_tokens(single, PROMPTS, 16)
            else:  # decode steps replay the captured graphs
                assert greedy_tokens(tp, PROMPTS[:2], 4)[0][:1] == greedy_tokens(single, PROMPTS[:2], 4)[0][:1]
        finally:
            tp.shutdown()
        assert not multiprocessing.active_children()


# --- one rank fails alone: the step fails at once, not after the collectives' timeout -----------------------------
FAULT_TIMEOUT_S = 60  # the group's collective timeout in these tests (the engine's default is 300 s)


def rank1_fails_its_third_step(model_path, device):
    """checkpoint_factory: rank 1's third execute() raises an error that only it hit (an OOM on its GPU, say)."""
    import multiprocessing as mp

    from adallm_core.runner import ModelRunner

    if mp.current_process().name == "adallm-tp-rank1":
        execute, calls = ModelRunner.execute, []

        def failing(self, steps, input_ids=None):
            calls.append(1)
            if len(calls) == 3:
                raise torch.OutOfMemoryError("rank 1 alone: out of memory")
            return execute(self, steps, input_ids)

        ModelRunner.execute = failing
    return Checkpoint(model_path)


def fault_runner(checkpoint_factory=None):
    from adallm_core.distributed.executor import TensorParallelRunner

    path = tiny_checkpoint("qwen3", "modelopt")
    args = EngineArgs(model=str(path), max_model_len=256, kv_cache_dtype="bf16", tensor_parallel_size=2, device="cpu")
    runner = TensorParallelRunner(args, path, checkpoint_factory=checkpoint_factory, timeout_s=FAULT_TIMEOUT_S)
    runner.allocate_kv_cache(16)
    return runner, SeqStep(list(range(3, 20)), 0, [[0, 1]] * len(runner.kv_groups))


def test_an_error_on_one_worker_fails_the_step_at_once():
    """Rank 1 alone raises in the middle of a step while rank 0 waits for it in a collective: the worker used to
    swallow the error and wait for the next command, rank 0 waited FAULT_TIMEOUT_S (300 s by default) for it."""
    import time

    runner, step = fault_runner(rank1_fails_its_third_step)
    try:
        want = runner.execute([step])
        torch.testing.assert_close(runner.execute([step]), want)
        start = time.monotonic()
        with pytest.raises(RuntimeError) as failed:
            runner.execute([step])
        assert time.monotonic() - start < FAULT_TIMEOUT_S / 3, failed.value
    finally:
        runner.shutdown()
    assert not multiprocessing.active_children()


def test_an_error_on_rank_0_alone_stops_every_rank():
    """Rank 0 alone raises between two collectives of a step (its lm_head: an OOM on its GPU, say) while rank 1
    waits in the logits' all-gather. The next call used to broadcast into that out-of-step group and wait
    FAULT_TIMEOUT_S; now the first error stops every rank and the next call says so at once."""
    import time

    runner, step = fault_runner()
    try:
        runner.execute([step])
        model = runner.runner.model

        def lm_head(hidden):
            raise torch.OutOfMemoryError("rank 0 alone: out of memory")

        model.lm_head, gather = lm_head, model.lm_head
        with pytest.raises(torch.OutOfMemoryError):
            runner.execute([step])
        model.lm_head = gather
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="shut down"):
            runner.execute([step])
        assert time.monotonic() - start < FAULT_TIMEOUT_S / 3
        deadline = time.monotonic() + FAULT_TIMEOUT_S / 3
        while multiprocessing.active_children() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not multiprocessing.active_children()
    finally:
        runner.shutdown()


UNGUARDED_SCRIPT = """
import sys
from adallm_core import EngineArgs
from adallm_core.engine import LLMEngine
# no `if __name__ == "__main__":` guard: each spawned rank imports this file again and dies trying to spawn its own
LLMEngine.from_engine_args(EngineArgs(model=sys.argv[1], tensor_parallel_size=2, max_model_len=256,
                                      num_gpu_blocks_override=64, kv_cache_dtype="bf16", device="cpu"))
print("started", flush=True)
"""


def test_a_worker_that_dies_before_joining_fails_the_start_at_once(tmp_path):
    """A script that builds the engine at import time (no __main__ guard, a common first script) kills every
    spawned rank before it joins the group: rank 0 used to wait for them until the rendezvous timeout (300 s)."""
    import os
    import signal
    import subprocess
    import sys

    import adallm_core

    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(adallm_core.__file__)))  # the code under test
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_checkpoint("qwen3", "modelopt"))], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"rank 0 still waited for its dead worker after 90 s:\n{out[-2000:]}")
    assert proc.returncode != 0 and "started" not in out
    assert "tensor-parallel workers failed to start: adallm-tp-rank1 (exit code 1)" in out, out[-2000:]


def test_more_local_ranks_than_gpus_is_refused(monkeypatch):
    """Local processes ('mp') each take the GPU of their rank: with one GPU, tensor_parallel_size=2 put both ranks
    on cuda:0 (NCCL then fails on its first collective, a duplicate GPU). A Ray actor sees only its own GPU, so it
    takes cuda:0."""
    from adallm_core.distributed.parallel_state import rank_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 .*1 GPU"):
        make_engine(tiny_checkpoint("qwen3", "modelopt"), 2, device="cuda")
    assert not multiprocessing.active_children()
    assert rank_device("cuda", 1, 2, "ray") == torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [rank_device("auto", r, 2, "mp") for r in range(2)] == [torch.device("cuda:0"), torch.device("cuda:1")]


IDLE_TIMEOUT_S = 2.0


def idle_worker(init_method, results):
    """Rank 1 of test_an_idle_worker_waits_past_the_timeout: waits for one command, then sums a tensor with rank 0."""
    from adallm_core.distributed.parallel_state import destroy_tensor_parallel, init_tensor_parallel

    group = init_tensor_parallel(1, 2, init_method, torch.device("cpu"), IDLE_TIMEOUT_S)
    try:
        results.put(group.broadcast_object())
        results.put(group.all_reduce(torch.ones(3)).tolist())
    except Exception as e:  # noqa: BLE001 - the test reads what happened here
        results.put(repr(e))
    finally:
        destroy_tensor_parallel()


def test_an_idle_worker_waits_past_the_timeout():
    """A worker waits for rank 0's next command for as long as the engine has nothing to do (a server, for hours).
    That wait used the group's collective timeout (300 s by default): an engine idle for 5 minutes lost its workers,
    and its next request failed."""
    import time

    from adallm_core.distributed.parallel_state import (
        create_rendezvous, destroy_tensor_parallel, init_tensor_parallel, wait_for_workers,
    )

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    store, init_method = create_rendezvous(IDLE_TIMEOUT_S)
    worker = ctx.Process(target=idle_worker, args=(init_method, results), daemon=True)
    worker.start()
    try:
        wait_for_workers(store, 2, lambda: not worker.is_alive(), 60)
        group = init_tensor_parallel(0, 2, init_method, torch.device("cpu"), IDLE_TIMEOUT_S, store)
        time.sleep(2 * IDLE_TIMEOUT_S)  # idle
        group.broadcast_object(("execute", ()))
        assert results.get(timeout=30) == ("execute", ())
        assert group.all_reduce(torch.ones(3) * 2).tolist() == [3.0, 3.0, 3.0]
        assert results.get(timeout=30) == [3.0, 3.0, 3.0]
    finally:
        destroy_tensor_parallel()
        worker.join(10)
        if worker.is_alive():
            worker.kill()
