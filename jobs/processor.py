"""The reusable generation processor: apply an adallm engine to any ray.data.Dataset.

    rows = RowSpec(prompt_column="prompt", sampling_defaults={"max_tokens": 64})
    processor = build_processor(ProcessorConfig(engine_args=EngineArgs(model=...), rows=rows, concurrency=2))
    ds = processor(ray.data.read_parquet(...))    # every input column + generated_text, finish_reason, ...

Each replica is one Ray actor owning one engine (one GPU with an accelerator_type, device cuda, or when the cluster
has GPUs; none with device cpu).
A batch is handed to the engine in one `add_requests` call, and several batches may be in flight per replica, so
continuous batching keeps the device busy across batch boundaries.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from dataclasses import dataclass
from typing import Optional, Union

import pyarrow as pa

from adallm_core.config import EngineArgs
from jobs.rows import RowResult, RowSpec, output_table, prepare_rows

logger = logging.getLogger(__name__)


@dataclass
class ProcessorConfig:
    """How the engine replicas run; names follow Ray Data's LLM processor config."""

    engine_args: EngineArgs = dataclasses.field(default_factory=EngineArgs)
    rows: RowSpec = dataclasses.field(default_factory=RowSpec)
    batch_size: int = 64  # rows per map_batches call, all submitted to the engine at once
    concurrency: Union[int, tuple[int, int]] = 1  # replicas: fixed, or an autoscaling (min, max) range
    max_concurrent_batches: int = 4  # batches in flight per replica (keeps the engine full at batch ends)
    # per replica; None: tensor_parallel_size with an accelerator_type, device cuda or a cluster with GPUs, else 0
    # (always 0 with device cpu): deployments/resources.engine_gpus
    num_gpus: Optional[float] = None
    num_cpus: float = 1.0
    accelerator_type: Optional[str] = None  # e.g. "L4", "RTX" (Ray accelerator types)
    max_restarts: int = -1  # a replica that dies is restarted (-1: always) ...
    max_task_retries: int = -1  # ... and the batches it held are run again on the new one

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches must be >= 1, got {self.max_concurrent_batches}")
        for name in ("num_gpus", "num_cpus"):  # else Ray refuses them only once the job runs, with a traceback
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        sizes = self.concurrency if isinstance(self.concurrency, tuple) else (self.concurrency, self.concurrency)
        if len(sizes) != 2 or not 1 <= sizes[0] <= sizes[1]:
            raise ValueError(f"concurrency must be N >= 1 or (min, max) with 1 <= min <= max, got {self.concurrency}")


class ClusterTooSmall(ValueError):
    """The replicas asked for cannot run on this Ray cluster: a bad job argument, found only once Ray is up."""


class EngineActor:
    """One engine per replica. Ray Data calls it with a pyarrow batch and runs up to
    max_concurrent_batches calls at once on the actor's event loop."""

    def __init__(self, engine_args: dict, rows: RowSpec):
        import deployments.ray_tp  # noqa: F401  registers the "ray" tensor-parallel launcher
        from adallm_core.engine import AsyncLLM  # torch and the model load here, in the replica

        self.engine = AsyncLLM.from_engine_args(EngineArgs.from_dict(engine_args))
        self.rows = rows
        self.replica = uuid.uuid4().hex[:8]
        self.next_request = 0

    async def __call__(self, batch: pa.Table) -> pa.Table:
        requests = prepare_rows(batch, self.rows, self.engine.tokenizer)
        results = [RowResult(error=r.error) for r in requests]
        todo = [i for i, r in enumerate(requests) if r.error is None]
        items = [(self._request_id(), requests[i].prompt, requests[i].params) for i in todo]
        # one admission for the whole batch, off the actor's loop (the other batches in flight keep streaming)
        streams = await asyncio.to_thread(self.engine.add_requests, items, asyncio.get_running_loop()) if items else []
        finals = await asyncio.gather(*(_final_output(s) for s in streams))
        for i, out in zip(todo, finals):
            if isinstance(out, Exception):  # refused (e.g. prompt over max_model_len), or failed to be made
                results[i] = RowResult(error=_row_error(out))
                continue
            completion = out.outputs[0]
            results[i] = RowResult(
                generated_text=completion.text,
                finish_reason=completion.finish_reason,
                num_prompt_tokens=len(out.prompt_token_ids),
                num_generated_tokens=len(completion.token_ids),
                prompt_logprobs=_own_logprobs(out.prompt_token_ids, out.prompt_logprobs),
            )
        return output_table(batch, results, self.rows.output_schema)

    def _request_id(self) -> str:
        self.next_request += 1
        return f"bulk-{self.replica}-{self.next_request}"


def _own_logprobs(token_ids: list[int], scored: Optional[list]) -> Optional[list[Optional[float]]]:
    """Each prompt token's own logprob (the first None), from the engine's prompt_logprobs."""
    if scored is None:
        return None
    return [None] + [entry[t] for t, entry in zip(token_ids[1:], scored[1:])]


def _row_error(e: Exception) -> str:
    """A ValueError says what is wrong with the row. Anything else names its type: it would recur on every rerun
    (Ray Data does not retry an actor's own errors), so the row keeps it and the job goes on."""
    return str(e) if isinstance(e, ValueError) else f"the engine could not take this row: {type(e).__name__}: {e}"


async def _final_output(stream):
    if isinstance(stream, Exception):
        return stream
    last = None
    async for out in stream:
        last = out
    return last


class Processor:
    """Callable on a ray.data.Dataset; returns the dataset with the generation columns added."""

    def __init__(self, config: ProcessorConfig):
        self.config = config
        self._cluster_gpus: Optional[float] = None  # check_cluster's answer

    def __call__(self, ds):
        import ray

        c = self.config
        sizes = c.concurrency if isinstance(c.concurrency, tuple) else (c.concurrency, c.concurrency)
        compute = ray.data.ActorPoolStrategy(
            min_size=sizes[0], max_size=sizes[1], max_concurrent_calls_per_actor=c.max_concurrent_batches
        )
        # Ray Data already restarts pool actors and retries their calls forever (-1); passing these through
        # ray_remote_args is deprecated, so only a non-default value is passed.
        restarts = {"max_restarts": c.max_restarts, "max_task_retries": c.max_task_retries}
        restarts = {k: v for k, v in restarts.items() if v != -1}
        num_gpus = self.check_cluster()
        engine_args, tp_args = c.engine_args, {}
        if engine_args.tensor_parallel_size > 1 and num_gpus:
            # One STRICT_PACK placement group per replica: the engine actor takes bundle 0 (one GPU), and its
            # tensor-parallel workers, Ray actors, the other bundles.
            from deployments.ray_tp import job_remote_args_fn

            tp_args = {"ray_remote_args_fn": job_remote_args_fn(
                engine_args.tensor_parallel_size, 1, c.num_cpus, c.accelerator_type)}
            engine_args = dataclasses.replace(engine_args, distributed_executor_backend="ray")
            num_gpus = 1
        # One block per batch, so that batches spread over the replicas even when the input is one block.
        ds = ds.repartition(target_num_rows_per_block=c.batch_size)
        return ds.map_batches(
            EngineActor,
            fn_constructor_kwargs={"engine_args": engine_args.to_dict(), "rows": c.rows},
            batch_size=c.batch_size,
            batch_format="pyarrow",
            compute=compute,
            num_gpus=num_gpus,
            num_cpus=c.num_cpus,
            accelerator_type=c.accelerator_type,
            **restarts,
            **tp_args,
        )

    def check_cluster(self) -> float:
        """GPUs per replica, checked against the cluster once: CPU replicas must all fit beside Ray Data's own
        tasks (else ClusterTooSmall), and an accelerator type no node has is warned about."""
        from deployments.resources import missing_accelerator_warning

        if self._cluster_gpus is None:
            c = self.config
            num_gpus = self.num_gpus()
            if num_gpus == 0:
                self._check_cpus(c.concurrency[0] if isinstance(c.concurrency, tuple) else c.concurrency)
            elif warning := missing_accelerator_warning(c.accelerator_type):
                logger.warning(warning)
            self._cluster_gpus = num_gpus
        return self._cluster_gpus

    def num_gpus(self) -> float:
        """GPUs a replica asks for: the configured count, else one a rank on a GPU (engine_gpus)."""
        from deployments.resources import engine_gpus

        c = self.config
        if c.num_gpus is not None:
            return c.num_gpus
        return engine_gpus(c.engine_args.device, c.accelerator_type, c.engine_args.tensor_parallel_size)

    def _check_cpus(self, replicas: int) -> None:
        # On CPU the replicas hold whole CPUs for as long as the job runs; Ray Data's read and write tasks
        # need one more, or they wait forever.
        import ray

        cpus = ray.cluster_resources().get("CPU", 0)
        needed = replicas * self.config.num_cpus + 1
        if needed > cpus:
            raise ClusterTooSmall(
                f"{replicas} CPU engine replica(s) x {self.config.num_cpus} CPU + 1 CPU for reading and writing "
                f"need {needed:g} CPUs; the Ray cluster has {cpus:g}. Lower concurrency or num_cpus, "
                f"or start Ray with more (ray start --num-cpus N)"
            )


def build_processor(config: ProcessorConfig) -> Processor:
    """Ray Data style entry point (cf. ray.data.llm.build_llm_processor)."""
    return Processor(config)
