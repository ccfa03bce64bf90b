"""A simulated Ray cluster on one machine, and a failover benchmark on it.

    python -m benchmarks.cluster_failover [--requests 48] [--concurrency 8] [--max-tokens 16]

The cluster is cluster.yaml's shape in miniature: a CPU-only head and worker nodes that each declare one
(fake) GPU and the resource "accelerator_type:L4". Engines run on the CPU (EngineArgs.device="cpu"); Ray
only accounts for the GPU. Measured:
  * requests/s with one replica against two. On a CPU-only machine the replicas share the same cores, so
    this shows that Serve routes over both nodes, not how a second GPU scales.
  * the time from removing a worker node to the endpoint answering again: with two replicas (the other one
    keeps answering) and with one (Serve must start a replacement on a node that joins, as the
    autoscaler's would, and the engine must load again).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import json
import os
import shutil
import socket
import tempfile
import time
from typing import Callable, Optional

import ray
from ray.cluster_utils import Cluster

ACCELERATOR = "L4"
APP = "adallm"
# Small engines: several share this machine's memory and two cores.
ENGINE = {"device": "cpu", "max_model_len": 128, "max_num_seqs": 16, "cpu_kv_cache_gb": 0.05}


class SimulatedCluster:
    """A CPU-only head plus fake-GPU workers, each a real raylet on this machine (ray.cluster_utils)."""

    def __init__(self, num_workers: int = 2, worker_cpus: int = 2):
        self.worker_cpus = worker_cpus
        self.num_workers = num_workers
        self.workers: dict[str, object] = {}  # Ray node id -> cluster_utils node

    def __enter__(self) -> "SimulatedCluster":
        # A private temp dir keeps this cluster's address file and sockets apart from any other local Ray.
        self._saved_tmpdir = os.environ.get("RAY_TMPDIR")
        self.tmpdir = tempfile.mkdtemp(prefix="adallm-mn-", dir="/tmp")
        os.environ["RAY_TMPDIR"] = self.tmpdir
        self.cluster = Cluster()
        try:
            with patient_node_startup():
                # The head: no GPU. Its agent gets a free port, not Ray's fixed default, which another local
                # Ray on this machine may hold (cluster_utils already picks one for workers).
                self.cluster.add_node(
                    num_cpus=2, num_gpus=0, include_dashboard=False, dashboard_agent_listen_port=free_port()
                )
            for _ in range(self.num_workers):
                self.add_worker()
            ray.init(address=self.cluster.address, log_to_driver=False)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        from ray import serve

        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            self._record_threads()
            # Ray objects left in garbage cycles (a lost actor's streaming generators) free themselves through
            # Ray; collected after ray.shutdown(), in whatever thread the collector then runs, Ray ends the process
            gc.collect()
            ray.shutdown()
            self.cluster.shutdown()
            if self._saved_tmpdir is None:
                os.environ.pop("RAY_TMPDIR", None)
            else:
                os.environ["RAY_TMPDIR"] = self._saved_tmpdir
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _record_threads(self) -> None:
        """Once, a driver thread that called into Ray after ray.shutdown() made Ray end this process (its "core
        worker has already been shutdown" exit, rc 1, in CI). The threads alive at shutdown and their stacks go to
        a file in this cluster's temp dir, which is removed only when the process gets past the teardown."""
        import sys
        import threading
        import traceback

        frames = sys._current_frames()
        with open(os.path.join(self.tmpdir, "threads-at-shutdown.txt"), "w") as out:
            for thread in threading.enumerate():
                out.write(f"--- {thread.name} (daemon={thread.daemon}, ident={thread.native_id})\n")
                if thread.ident in frames:
                    out.writelines(traceback.format_stack(frames[thread.ident]))

    def add_worker(self) -> str:
        """A node like cluster.yaml's `l4` type; the autoscaler's role when a replica is pending."""
        with patient_node_startup():
            node = self.cluster.add_node(
                num_cpus=self.worker_cpus, num_gpus=1, resources={f"accelerator_type:{ACCELERATOR}": 1}
            )
        self.workers[node.node_id] = node
        return node.node_id

    @property
    def head(self) -> str:
        return self.cluster.head_node.node_id

    def remove_worker(self, node_id: str) -> None:
        """Kill every process of that node at once, as when a machine is lost."""
        self.cluster.remove_node(self.workers.pop(node_id), allow_graceful=False)


@contextlib.contextmanager
def patient_node_startup(limit_s: float = 120):
    """Ray gives a starting node 30 s to appear in the GCS (ray/_private/node.py), and its raylet registers
    only once its Python agents are up: on two cores busy with other work that can take longer. Wait for
    the node's registration up to limit_s instead; nothing else about the node changes."""
    services = ray._private.services
    lookup = services.get_node

    def patient_lookup(gcs_address, node_id):
        deadline = time.monotonic() + limit_s
        while True:
            try:
                return lookup(gcs_address, node_id)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    services.get_node = patient_lookup
    try:
        yield
    finally:
        services.get_node = lookup


def alive_actor_nodes(class_fragment: str) -> list[str]:
    """Node ids of the live actors whose class name contains class_fragment (one entry per actor).

    Read from the GCS actor table: Ray's public state API needs the dashboard, which this cluster omits."""
    return [
        a["Address"]["NodeID"]
        for a in ray._private.state.actors().values()
        if class_fragment in a["ActorClassName"] and a["State"] == "ALIVE"
    ]


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(port: int, num_replicas: int, **engine) -> str:
    """The project's Serve app with replicas asking for one GPU of type L4; returns the OpenAI base URL."""
    from ray import serve

    from deployments.app import build_app

    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    args = {**ENGINE, **engine, "num_gpus": 1, "accelerator_type": ACCELERATOR, "num_replicas": num_replicas}
    serve.run(build_app(args), name=APP, route_prefix="/")
    return f"http://127.0.0.1:{port}/v1"


def replica_nodes() -> list[str]:
    return alive_actor_nodes(f"ServeReplica:{APP}:LLMServer")


def ingress_nodes() -> list[str]:
    return alive_actor_nodes(f"ServeReplica:{APP}:OpenAiIngress")


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or "LLMServer" not in app.deployments:
        return 0
    return app.deployments["LLMServer"].replica_states.get("RUNNING", 0)


def complete(client, prompt: str, max_tokens: int) -> str:
    out = client.completions.create(model="adallm-tiny-demo", prompt=prompt, max_tokens=max_tokens, temperature=0)
    return out.choices[0].text


def throughput(base_url: str, prompts: list[str], concurrency: int, max_tokens: int) -> float:
    """Requests/s of `prompts` sent by `concurrency` clients at once."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
    complete(client, "warm up", max_tokens)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda p: complete(client, p, max_tokens), prompts))
    return len(prompts) / (time.perf_counter() - start)


def time_to_answer(base_url: str, timeout: float = 300) -> tuple[float, int]:
    """Seconds until a request succeeds, and how many failed before it."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=30)
    start, failures = time.perf_counter(), 0
    while time.perf_counter() - start < timeout:
        try:
            complete(client, "are you there", 4)
            return time.perf_counter() - start, failures
        except openai.OpenAIError:
            failures += 1
            time.sleep(0.05)
    raise TimeoutError(f"the endpoint did not answer within {timeout:.0f}s of the node's removal")


def measure_failover(sim: SimulatedCluster, base_url: str, replicas: int) -> dict:
    """Remove the node of one replica; time until the endpoint answers, and until `replicas` run again."""
    victim = replica_nodes()[0]
    start = time.perf_counter()
    sim.remove_worker(victim)
    if replicas == 1:
        sim.add_worker()  # nothing else could host the replacement
    _, failures = time_to_answer(base_url)
    answer_s = time.perf_counter() - start  # from the removal, not from the first try
    if replicas > 1:
        sim.add_worker()
    wait_until(lambda: running_replicas() == replicas and victim not in replica_nodes(), 300, "replacement replica")
    return {
        "replicas": replicas,
        "answering_again_s": round(answer_s, 2),
        "failed_requests": failures,
        "back_to_full_strength_s": round(time.perf_counter() - start, 2),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster_failover", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--failover-only", action="store_true", help="only the one-replica failover")
    args = parser.parse_args(argv)
    prompts = [f"Request {i}: tell me about node {i % 7}" for i in range(args.requests)]

    results: dict = {"throughput_rps": {}, "failover": []}
    with SimulatedCluster(num_workers=2) as sim:
        port = free_port()
        for replicas in () if args.failover_only else (1, 2):
            url = deploy(port, replicas)
            wait_until(lambda: running_replicas() == replicas, 300, f"{replicas} replicas")
            nodes = replica_nodes()
            rps = throughput(url, prompts, args.concurrency, args.max_tokens)
            results["throughput_rps"][replicas] = round(rps, 2)
            print(f"{replicas} replica(s) on {len(set(nodes))} node(s): {rps:.2f} requests/s", flush=True)
        if not args.failover_only:
            results["failover"].append(measure_failover(sim, url, replicas=2))
            print(json.dumps(results["failover"][-1]), flush=True)
        url = deploy(port, 1)
        wait_until(lambda: running_replicas() == 1, 300, "1 replica")
        results["failover"].append(measure_failover(sim, url, replicas=1))
        print(json.dumps(results["failover"][-1]), flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
