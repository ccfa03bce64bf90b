"""The Ray-actor launcher on CPU (gloo): an engine actor in bundle 0 of a STRICT_PACK placement group runs
tensor_parallel_size=2 with distributed_executor_backend='ray'; rank 1 is a TPWorkerActor in bundle 1.
Reference: the same prompts on a single-rank engine in this process."""
import pytest
from engine_fixtures import PROMPTS, greedy_tokens, make_engine, tiny_model

pytestmark = pytest.mark.timeout(900)


def start_ray(ray, attempts: int = 3) -> None:
    """A local Ray; on a machine shared by several test runs the raylet can miss Ray's fixed 30 s start window."""
    for attempt in range(attempts):
        try:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
            return
        except Exception as e:  # Ray raises a bare Exception for "The current node timed out during startup"
            ray.shutdown()
            if "timed out during startup" not in str(e) or attempt == attempts - 1:
                raise


def test_ray_actor_workers_give_the_single_rank_tokens():
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from deployments.ray_tp import tp_bundles

    model = tiny_model("qwen3")
    want = greedy_tokens(make_engine("qwen3", tensor_parallel_size=1), PROMPTS[:4], max_tokens=12)

    @ray.remote
    class EngineDriver:
        def generate(self, model, prompts):
            import torch

            import deployments.ray_tp  # noqa: F401  registers distributed_executor_backend="ray"
            from adallm_core.config import EngineArgs
            from adallm_core.engine import LLMEngine
            from adallm_core.sampling_params import SamplingParams

            torch.set_num_threads(1)
            engine = LLMEngine.from_engine_args(EngineArgs(
                model=model, max_model_len=256, num_gpu_blocks_override=256, kv_cache_dtype="bf16",
                max_num_batched_tokens=512, tensor_parallel_size=2, distributed_executor_backend="ray"))
            try:
                params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
                for i, p in enumerate(prompts):
                    engine.add_request(str(i), p, params)
                done = {}
                while engine.has_unfinished_requests():
                    done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
                return [done[str(i)] for i in range(len(prompts))], type(engine.runner).__name__
            finally:
                engine.shutdown()

    start_ray(ray)
    try:
        pg = placement_group(tp_bundles(2, num_gpus=0), strategy="STRICT_PACK")
        ray.get(pg.ready(), timeout=120)
        driver = EngineDriver.options(num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)).remote()
        got, runner = ray.get(driver.generate.remote(model, PROMPTS[:4]), timeout=600)
        assert runner == "TensorParallelRunner"
        assert got == want
        # shutdown killed the worker actor: its bundle's CPU is free again for a task that needs all of it
        ping = ray.remote(num_cpus=1)(lambda: "free")
        assert ray.get(ping.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=1)).remote(), timeout=120) == "free"
        remove_placement_group(pg)
    finally:
        ray.shutdown()


def test_serve_replica_reserves_one_node_for_its_ranks():
    """build_app with tensor_parallel_size=2: the replica asks for a STRICT_PACK group of 2 one-GPU bundles
    (with the accelerator label, which Ray checks in bundle 0), holds one GPU itself, and uses the Ray launcher."""
    from deployments.app import build_app

    app = build_app({"tensor_parallel_size": 2, "num_gpus": 1, "accelerator_type": "L4", "device": "cuda"})
    replica = app._bound_deployment.init_args[0]._bound_deployment  # ingress -> LLMServer
    bundle = {"CPU": 1, "GPU": 1, "accelerator_type:L4": 0.001}
    assert replica._replica_config.placement_group_bundles == [bundle, bundle]
    assert replica._replica_config.placement_group_strategy == "STRICT_PACK"
    assert replica.ray_actor_options["num_gpus"] == 1
    engine_args = replica.init_args[0]
    assert engine_args["tensor_parallel_size"] == 2 and engine_args["distributed_executor_backend"] == "ray"
