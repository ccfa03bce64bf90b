"""One local Ray + Serve per test module: the real app on 127.0.0.1 at a free port."""
from __future__ import annotations

import contextlib
import gc
import os
import socket
import time
from typing import Iterator, Optional

import requests

# Small and fast on 2 CPU cores; the same options build the offline reference LLM.
ENGINE_ARGS = dict(max_model_len=128, max_num_seqs=64, num_gpu_blocks_override=512, max_num_batched_tokens=512)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_apps(apps: dict[str, dict], metrics_export_port: Optional[int] = None) -> Iterator[str]:
    """Deploy build_app(args) for each route prefix -> args; yields http://127.0.0.1:PORT.

    metrics_export_port: where Ray serves its Prometheus metrics (reported every second instead of every 10)."""
    import ray
    from ray import serve

    from deployments.app import SERVE_ENV, build_app

    port = free_port()
    saved = {k: os.environ.get(k) for k in SERVE_ENV}
    os.environ.update(SERVE_ENV)  # the environment `adallm serve` gives the Ray it starts; restored below
    # Logical CPUs: room for every replica plus a replacement, although the machine has 2 cores.
    metrics = {} if metrics_export_port is None else {
        "_metrics_export_port": metrics_export_port, "_system_config": {"metrics_report_interval_ms": 1000}}
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, **metrics)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for prefix, args in apps.items():
            serve.run(build_app(args), name=app_name(prefix), route_prefix=prefix)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: requests.get(f"{url}/-/healthz", timeout=5).ok, 60)
        yield url
    finally:
        serve.shutdown()
        gc.collect()  # Ray objects in garbage cycles free through Ray: after ray.shutdown() that ends the process
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def app_name(prefix: str) -> str:
    return prefix.strip("/") or "default"


def llm_stats(prefix: str) -> dict:
    """LLMServer.stats() of the app at prefix (one replica): engine stats plus admission counters."""
    from ray import serve

    return serve.get_deployment_handle("LLMServer", app_name(prefix)).stats.remote().result(timeout_s=60)


def wait_until(predicate, timeout_s: float, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - polling: the last error is reported on timeout
            last_error = e
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s (last error: {last_error!r})")
