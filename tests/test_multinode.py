"""A multi-node Ray cluster on this one machine: a CPU-only head and two workers that each declare one
(fake) GPU and the resource "accelerator_type:L4", as cluster.yaml's `l4` nodes do. Engines run on the
CPU (device="cpu"); Ray only accounts for the GPU. Checked against the offline LLM API's greedy text:
  * Serve with two replicas puts one on each worker and the ingress on the head; losing a worker fails no
    request, and Serve replaces the replica on the node that joins (the autoscaler's part, played by the test);
  * the bulk job spreads its engine actors over both workers, and its output is complete, each row
    once, after a worker is lost mid-job;
  * a replica on a node without the model folder fails with an error naming the host and the path.
"""
from __future__ import annotations

import socket
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray.data import DataContext

from benchmarks.cluster_failover import (
    ENGINE,
    SimulatedCluster,
    alive_actor_nodes,
    complete,
    deploy,
    free_port,
    ingress_nodes,
    replica_nodes,
    running_replicas,
    time_to_answer,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

MAX_TOKENS = 8
SERVE_PROMPTS = ["Hello from the head", "Which node am I on?", "Ada has FP8 tensor cores", "one more"]
JOB_PROMPTS = [f"row {i}: {'word ' * (i % 9)}the end" for i in range(32)]


@pytest.fixture(scope="module")
def reference() -> dict[str, str]:
    """Greedy text of every prompt from the offline LLM API, same engine arguments, in this process."""
    from adallm_core import LLM, SamplingParams

    llm = LLM(**ENGINE)
    prompts = SERVE_PROMPTS + JOB_PROMPTS
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    return {p: o.outputs[0].text for p, o in zip(prompts, outs)}


@pytest.fixture(scope="module")
def sim(reference):
    # `reference` first: it builds the demo model into the cache before replicas on every node look for it.
    with SimulatedCluster(num_workers=2) as cluster:
        yield cluster


def two_workers(sim: SimulatedCluster) -> None:
    while len(sim.workers) < 2:
        sim.add_worker()
    wait_until(lambda: sum(n["Alive"] for n in ray.nodes()) == 3, 60, "the head and 2 live workers")


def openai_client(base_url: str):
    import openai

    return openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=60)


def test_serve_replica_per_worker_survives_node_loss(sim, reference):
    from ray import serve

    two_workers(sim)
    url = deploy(free_port(), num_replicas=2)
    try:
        wait_until(lambda: running_replicas() == 2, 300, "2 running replicas")
        assert sorted(replica_nodes()) == sorted(sim.workers)  # one on each worker, none on the head
        # The ingress beside the proxy: on a worker, its loss was a bare 500 from Serve's proxy (1 run in 3).
        assert ingress_nodes() == [sim.head]
        client = openai_client(url)
        for prompt in SERVE_PROMPTS:
            assert complete(client, prompt, MAX_TOKENS) == reference[prompt]

        lost = replica_nodes()[0]
        sim.remove_worker(lost)
        _, failures = time_to_answer(url, timeout=60)  # the other replica answers; no engine has to load
        assert failures == 0  # a request sent to the lost replica is sent again by the ingress
        for prompt in SERVE_PROMPTS:
            assert complete(client, prompt, MAX_TOKENS) == reference[prompt]

        joined = sim.add_worker()
        wait_until(lambda: running_replicas() == 2 and joined in replica_nodes(), 300, "the replacement replica")
        assert sorted(replica_nodes()) == sorted(sim.workers) and lost not in replica_nodes()
        for prompt in SERVE_PROMPTS:
            assert complete(client, prompt, MAX_TOKENS) == reference[prompt]
    finally:
        serve.delete("adallm")


def test_bulk_job_spreads_over_workers_and_survives_node_loss(sim, reference, tmp_path):
    from jobs import bulk_generate, resume

    two_workers(sim)
    source = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"row_id": list(range(len(JOB_PROMPTS))), "prompt": JOB_PROMPTS}), source)
    out = tmp_path / "out"
    argv = [
        "--input", str(source), "--output", str(out), "--prompt-column", "prompt", "--id-column", "row_id",
        "--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--batch-size", "4", "--max-concurrent-batches", "1",
        "--concurrency", "2", "--num-gpus", "1", "--accelerator-type", "L4",
        "--device", "cpu", "--max-model-len", "128", "--max-num-seqs", "16", "--cpu-kv-cache-gb", "0.05",
    ]  # fmt: skip
    result: dict = {}

    def run_job():
        try:
            result["rc"] = bulk_generate.main(argv)
        except BaseException as e:  # reported by the assertion below
            result["error"] = e

    # Rows flow only once both engines are up, so each worker gets work however slowly this machine
    # loads them, and the job is still going when a worker is lost.
    context = DataContext.get_current()
    saved_wait, context.wait_for_min_actors_s = context.wait_for_min_actors_s, 600
    try:
        job = threading.Thread(target=run_job, daemon=True)
        job.start()
        # Both engines up, one per worker; then lose a worker while the job is still going.
        wait_until(lambda: sorted(alive_actor_nodes("EngineActor")) == sorted(sim.workers), 600, "an engine per worker")
        first_part = f"{resume.PART_PREFIX}*.parquet"
        wait_until(lambda: list(out.glob(first_part)) or not job.is_alive(), 600, "the first output file")
        assert job.is_alive(), f"the job ended before a node could be removed mid-job: {result}"
        sim.remove_worker(alive_actor_nodes("EngineActor")[0])
        job.join(timeout=600)
    finally:
        context.wait_for_min_actors_s = saved_wait
    assert not job.is_alive(), "the job did not finish after losing a worker"
    assert result.get("rc") == 0, result

    # the lost worker's half-written temp file (if the loss caught one) is gone; the folder reads as users read it
    assert not list(out.glob(f"{resume.TEMP_PREFIX}*")), sorted(p.name for p in out.iterdir())
    table = pq.read_table(out).to_pydict()
    assert sorted(table["row_id"]) == list(range(len(JOB_PROMPTS)))  # every row, exactly once
    assert table["error"] == [None] * len(JOB_PROMPTS)
    got = dict(zip(table["prompt"], table["generated_text"]))
    assert got == {p: reference[p] for p in JOB_PROMPTS}


def test_missing_model_on_a_node_names_the_host_and_the_path(sim):
    # The bulk job's engine actor, placed like the job places it, on a worker without the model folder.
    from adallm_core.config import EngineArgs
    from jobs.processor import EngineActor
    from jobs.rows import RowSpec

    two_workers(sim)
    missing = "/models/not-provisioned-on-this-node"
    engine_args = EngineArgs(**{**ENGINE, "model": missing}).to_dict()
    actor = (
        ray.remote(EngineActor)
        .options(num_gpus=1, num_cpus=1, accelerator_type="L4", max_restarts=0)
        .remote(engine_args, RowSpec())
    )
    with pytest.raises(ray.exceptions.RayActorError) as failure:
        ray.get(actor.__ray_ready__.remote(), timeout=600)
    message = str(failure.value)
    assert f"model {missing!r}: no such folder on host {socket.gethostname()!r}" in message
    assert "ip=" in message, message  # Ray adds the node's address
