"""Application builder: `serve run deployments.app:build_app model=...`, serve_config.yaml, `adallm serve`.

args is one flat dict: the serving options below plus any EngineArgs field (max_model_len, kv_cache_dtype...).
Unknown keys are an error that names them.
"""
from __future__ import annotations

import logging
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from adallm_core.config import EngineArgs
from adallm_core.model_source import DEMO
from adallm_core.tokenizer import load_chat_template
from deployments.ingress import OpenAiIngress
from deployments.ray_tp import serve_placement_options
from deployments.resources import engine_gpus, missing_accelerator_warning
from deployments.llm_server import DEFAULT_STREAM_INTERVAL_S, USER_CONFIG_KEYS, BatchSize, LLMServer, Seconds

logger = logging.getLogger(__name__)
DEMO_MODEL_NAME = "adallm-tiny-demo"
# Ray Serve's throughput-optimized mode, without its direct ingress (that drops the HTTP proxy and serves each
# ingress replica on a port of its own): user code and the handle's router on the replica's main event loop (no
# thread hop per streamed message), buffered access logs, no log copy to stderr. It roughly halves Serve's CPU cost
# per request (benchmarks/RESULTS.md, serving). Replicas get it through their runtime_env; a local Ray that
# `adallm serve` starts gets it for its proxy and controller too (set_serve_environment).
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
# The ingress replica lives on the head, beside Serve's controller and HTTP proxy: losing a worker must not take it
# along. The proxy answers a request whose ingress replica vanished with a bare 500 and never retries it, and the
# endpoint is down until Serve starts another. "node:__internal_head__" is the resource Ray gives the head node
# (also the only node of a local Ray); serve_config.yaml asks for it too.
ON_HEAD_NODE = {"node:__internal_head__": 0.001}
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class ServeOptions(BaseModel):
    """How the engine is deployed. Every limit not given is derived from the engine's capacity."""

    model_config = ConfigDict(extra="forbid")

    served_model_name: Optional[str] = None  # the `model` clients send; default: the checkpoint folder name
    num_replicas: Optional[int] = Field(None, ge=1)  # fixed count; or autoscale between min/max_replicas
    min_replicas: Optional[int] = Field(None, ge=0)
    max_replicas: Optional[int] = Field(None, ge=1)
    num_gpus: Optional[float] = Field(None, ge=0)  # per replica; None: 1 with an accelerator_type or GPUs, else 0
    accelerator_type: Optional[str] = None  # e.g. "L4", "L40S"; Ray's accelerator_type resource label
    max_batch_size: BatchSize = 32  # @serve.batch: arrivals admitted in one add_requests call
    batch_wait_timeout_s: Seconds = 0.005
    stream_interval_s: Seconds = DEFAULT_STREAM_INTERVAL_S  # streamed tokens within it go as one message
    throughput_optimized: bool = True  # replicas run with SERVE_ENV; False: Ray Serve's defaults
    max_ongoing_requests: Optional[int] = Field(None, ge=1)  # per replica; default: engine max_num_seqs
    max_queued_requests: Optional[int] = Field(None, ge=1)  # per caller; default: 2 x max_ongoing_requests
    reasoning_parser: Optional[Literal["qwen3"]] = None  # chat: <think>...</think> to reasoning_content
    tool_call_parser: Optional[Literal["hermes"]] = None  # chat: <tool_call> blocks to tool_calls
    enable_auto_tool_choice: bool = False  # tool_choice "auto" (the default with tools); needs tool_call_parser

    @model_validator(mode="after")
    def _replicas(self) -> "ServeOptions":
        if self.num_replicas is not None and (self.min_replicas is not None or self.max_replicas is not None):
            raise ValueError("give num_replicas, or min_replicas/max_replicas for autoscaling, not both")
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} is above max_replicas={self.max_replicas}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs a tool_call_parser (hermes) to read the calls")
        return self


def split_args(args: dict[str, Any]) -> tuple[EngineArgs, ServeOptions]:
    engine_keys = {f.name for f in fields(EngineArgs)}
    engine_values = {k: _from_text(k, v) for k, v in args.items() if k not in ServeOptions.model_fields}
    engine = EngineArgs.from_dict(engine_values)
    options = ServeOptions(**{k: v for k, v in args.items() if k not in engine_keys})
    return engine, options


def build_app(args: Optional[dict[str, Any]] = None) -> serve.Application:
    engine, options = split_args(dict(args or {}))
    if engine.chat_template is not None:  # the file is read here: a replica's node may not have it
        engine.chat_template = load_chat_template(engine.chat_template)
    num_gpus = options.num_gpus if options.num_gpus is not None else engine_gpus(engine.device,
                                                                                options.accelerator_type)
    if num_gpus and (warning := missing_accelerator_warning(options.accelerator_type)):
        logger.warning(warning)
    serve_env = {"runtime_env": {"env_vars": dict(SERVE_ENV)}} if options.throughput_optimized else {}
    actor_options: dict[str, Any] = {"num_cpus": 1, "num_gpus": num_gpus, **serve_env}
    if num_gpus and options.accelerator_type:
        actor_options["accelerator_type"] = options.accelerator_type
    if not num_gpus and engine.device == "auto":
        engine.device = "cpu"  # a replica without a GPU must not grab one it was not given
    # Tensor parallel: one STRICT_PACK placement group per replica; the replica (rank 0) takes bundle 0, one GPU,
    # and starts its workers as Ray actors in the other bundles (deployments/ray_tp.py).
    tp_options = serve_placement_options(engine.tensor_parallel_size, num_gpus, actor_options["num_cpus"],
                                         options.accelerator_type)
    if tp_options:
        engine.distributed_executor_backend = "ray"
        actor_options["num_gpus"] = 1 if num_gpus else 0

    max_ongoing = options.max_ongoing_requests or engine.max_num_seqs
    max_queued = options.max_queued_requests or 2 * max_ongoing
    scaling: dict[str, Any] = {"num_replicas": options.num_replicas or 1}
    most_replicas = options.num_replicas or 1
    if options.min_replicas is not None or options.max_replicas is not None:
        low = options.min_replicas if options.min_replicas is not None else 1  # 0: scale to zero when idle
        high = options.max_replicas or max(1, low)
        target = max(1, int(0.75 * max_ongoing))
        scaling = {"autoscaling_config": {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": target}}
        most_replicas = high

    llm = LLMServer.options(
        ray_actor_options=actor_options,
        max_ongoing_requests=max_ongoing,
        max_queued_requests=max_queued,
        **tp_options,
        user_config={k: getattr(options, k) for k in USER_CONFIG_KEYS},
        **scaling,
    ).bind(engine.to_dict())
    # The ingress never queues itself: LLMServer's queue is where overload is detected and answered in
    # OpenAI's shape, so the ingress admits everything that queue can hold, plus room for cheap requests.
    ingress = OpenAiIngress.options(
        ray_actor_options={"num_cpus": 0.5, "resources": dict(ON_HEAD_NODE), **serve_env},
        max_ongoing_requests=most_replicas * max_ongoing + max_queued + 64,
    )
    return ingress.bind(llm, options.served_model_name or served_name(engine.model), options.reasoning_parser,
                        options.tool_call_parser, options.enable_auto_tool_choice)


def set_serve_environment() -> None:
    """SERVE_ENV for a Ray that this process is about to start (its proxy and controller inherit it); values the
    user already set win."""
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)


def _from_text(name: str, value: Any) -> Any:
    """`serve run deployments.app:build_app max_model_len=256` passes strings; type them like the field."""
    kind = {f.name: str(f.type) for f in fields(EngineArgs)}.get(name, "str")
    if not isinstance(value, str):
        return value
    if value.lower() == "none" and kind.startswith("Optional"):
        return None
    if kind in ("str", "Optional[str]"):
        return value
    if "bool" in kind:
        if value.lower() not in TRUE_WORDS + FALSE_WORDS:
            raise ValueError(f"{name}={value!r}: expected one of {', '.join(TRUE_WORDS + FALSE_WORDS)}")
        return value.lower() in TRUE_WORDS
    try:
        return float(value) if "float" in kind else int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected {'a number' if 'float' in kind else 'an integer'}") from None


def served_name(model: Optional[str]) -> str:
    if model is None or (model == DEMO and not Path(DEMO).is_dir()):  # `adallm serve demo` loads the demo model too
        return DEMO_MODEL_NAME
    path = Path(model)
    return path.name if path.exists() else model  # a local folder's name, or the hub id as given
