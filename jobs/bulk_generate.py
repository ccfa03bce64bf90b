"""Bulk generation: Parquet in, the same rows with their generations out, on Ray Data.

    ray job submit --working-dir . -- python -m jobs.bulk_generate \
        --model /models/Qwen3-8B-NVFP4 --input data/prompts.parquet --output out/ \
        --prompt-column prompt --max-tokens 256 --temperature 0.7 --concurrency 4

read_parquet -> drop rows already in --output (resume) -> engine replicas (processor.py) -> atomic Parquet
files. Every argument is checked before Ray starts; without RAY_ADDRESS or a running cluster, a local Ray
is started on the spot.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Optional

from adallm_core.config import EngineArgs
from jobs.processor import ClusterTooSmall, ProcessorConfig, build_processor
from jobs.rows import RowSpec, check_schema
from jobs.summary import STAT_KEYS, JobSummary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    job = parser.add_argument_group("job")
    job.add_argument("--input", required=True, help="Parquet file, folder, glob, or URI (s3://, gs://, ...)")
    job.add_argument("--output", required=True, help="output folder; rerun with the same one to resume")
    job.add_argument("--prompt-column", default=None, help="column of prompt strings (default: prompt)")
    job.add_argument("--messages-column", default=None,
                     help="column of chat messages [{role, content}, ...]; with --prompt-column too, "
                          "each row uses the one that is not null")
    job.add_argument("--chat-template-kwargs", type=_json_arg, default=None, metavar="JSON",
                     help="chat rows: variables for the model's chat template, e.g. '{\"enable_thinking\": false}' "
                          "(Qwen3)")
    job.add_argument("--id-column", default=None, help="unique row id column (default: file path + row position)")
    job.add_argument("--batch-size", type=int, default=64, help="rows handed to an engine at once")
    job.add_argument("--concurrency", type=_concurrency, default=1, help="engine replicas: N or MIN,MAX")
    job.add_argument("--max-concurrent-batches", type=int, default=4, help="batches in flight per replica")
    job.add_argument("--num-gpus", type=float, default=None,
                     help="GPUs per replica (default: 1 with --accelerator-type or --device cuda, or when the "
                          "cluster has GPUs; else 0, also with --device cpu)")
    job.add_argument("--num-cpus", type=float, default=1.0,
                     help="CPUs per replica (on CPU-only nodes also its torch threads)")
    job.add_argument("--accelerator-type", default=None, help="Ray accelerator type to place replicas on, e.g. L4")
    job.add_argument("--max-restarts", type=int, default=-1, help="restarts of a replica that died (-1: always)")
    job.add_argument("--max-task-retries", type=int, default=-1, help="retries of a batch whose replica died")
    sampling = parser.add_argument_group("sampling defaults (per-row columns of the same name override them)")
    sampling.add_argument("--max-tokens", type=int, default=None)
    sampling.add_argument("--temperature", type=float, default=None)
    sampling.add_argument("--top-p", type=float, default=None)
    sampling.add_argument("--sampling-seed", type=int, default=None, help="per-request seed (--seed seeds the engine)")
    sampling.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    sampling.add_argument("--structured-outputs", type=_json_arg, default=None, metavar="JSON",
                          help="a grammar every output follows, as vLLM's StructuredOutputsParams in JSON: "
                               "'{\"json\": SCHEMA}', '{\"regex\": ...}', '{\"choice\": [...]}', "
                               "'{\"grammar\": EBNF}' or '{\"json_object\": true}'")
    sampling.add_argument("--prompt-logprobs", action="store_true",
                          help="score each prompt: a prompt_logprobs column holds each prompt token's logprob under "
                               "the model (the first null), e.g. for perplexity")
    EngineArgs.add_cli_args(parser.add_argument_group("engine"))


def _json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None


def _template_kwargs(value, messages_column: Optional[str]) -> dict:
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"--chat-template-kwargs must be a JSON object, got {value!r}")
    if value and messages_column is None:
        raise ValueError("--chat-template-kwargs applies to chat rows: give --messages-column")
    return value or {}


def _concurrency(text: str):
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX, got {text!r}") from None
    if len(sizes) == 1:
        return sizes[0]
    if len(sizes) != 2:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX, got {text!r}")
    return sizes


@dataclass
class JobPlan:
    """Everything checked and resolved before Ray or the engine starts."""

    input_fs: object
    input_files: list[str]
    output_fs: object
    output_root: str
    id_column: str
    processor: ProcessorConfig
    input_rows: int = 0  # from the Parquet footers: each is either already written or processed by this run
    record: Optional[dict] = None  # what the rows are made from, kept in the output folder (resume.JOB_NAME)
    # ids are Ray Data's row_hash (no --id-column); False when the input's own column, even one named row_hash, is
    # the id: read_parquet(include_row_hash=True) would overwrite that column with its own hashes
    derive_ids: bool = True


def plan_job(args: argparse.Namespace) -> JobPlan:
    """Check every job argument; a ValueError names what is wrong. No engine or GPU work happens here."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    from jobs import resume

    engine_args = EngineArgs.from_cli_args(args)
    defaults = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "seed": args.sampling_seed, "stop": args.stop,
                "prompt_logprobs": 0 if args.prompt_logprobs else None,
                "structured_outputs": args.structured_outputs}  # fmt: skip
    rows = RowSpec(
        prompt_column=args.prompt_column or (None if args.messages_column else "prompt"),
        messages_column=args.messages_column,
        sampling_defaults={k: v for k, v in defaults.items() if v is not None},
        chat_template_kwargs=_template_kwargs(args.chat_template_kwargs, args.messages_column),
    )
    in_fs, in_path = resume.filesystem_and_path(args.input)
    files = resume.input_files(in_fs, in_path)
    schema, input_rows = resume.read_footers(in_fs, files, f"--input {args.input}")
    check_schema(schema, rows, f"--input {args.input}")
    id_column = args.id_column or resume.DERIVED_ID_COLUMN
    if args.id_column and args.id_column not in schema.names:
        raise ValueError(f"--id-column {args.id_column!r}: no such column in {args.input}; columns are {schema.names}")
    if args.id_column:  # reads that one column only, typed as the files unify (the first file alone may lack it,
        # type it null when empty, or type it int32 beside another's int64)
        ids = pads.dataset(files, filesystem=in_fs, format="parquet", schema=schema).to_table(columns=[args.id_column])
        resume.check_ids(ids.column(args.id_column), args.id_column, f"--input {args.input}")
    if not args.id_column and resume.DERIVED_ID_COLUMN in schema.names:
        raise ValueError(f"--input {args.input} has a {resume.DERIVED_ID_COLUMN!r} column; pass it as --id-column")

    out_fs, out_root = resume.filesystem_and_path(args.output)
    out_root = out_root.rstrip("/")
    if out_fs.get_file_info(out_root).type == pafs.FileType.File:
        raise ValueError(f"--output {args.output} is a file; give a folder")
    if type(out_fs) is type(in_fs) and ((out_root + "/").startswith(in_path.rstrip("/") + "/") or (
            resume.is_glob(in_path) and resume.glob_matches(in_path, f"{out_root}/{resume.PART_PREFIX}0.parquet"))):
        raise ValueError(f"--output {args.output} is inside --input {args.input}; its files would be read as input")
    record = {"input": resume.input_fingerprint(in_fs, files), "id_column": id_column,
              "prompt_column": rows.prompt_column, "messages_column": rows.messages_column,
              "sampling_defaults": rows.sampling_defaults, "model": engine_args.model,
              "tokenizer": engine_args.tokenizer, "max_model_len": engine_args.max_model_len}  # fmt: skip
    if rows.chat_template_kwargs:  # recorded only when given: folders written before the flag still resume
        record["chat_template_kwargs"] = rows.chat_template_kwargs
    if engine_args.chat_template is not None:  # its text: the engines' nodes may lack the file
        engine_args.chat_template = _chat_template_text(engine_args.chat_template)
        if rows.messages_column:  # an edited file is another job
            record["chat_template"] = engine_args.chat_template
    # first: a changed --id-column would otherwise read as "not written by this job" (its parts lack the id)
    resume.check_job_record(out_fs, out_root, record, f"--output {args.output}")
    resume.check_output_parts(out_fs, out_root, [id_column, *rows.output_schema.names], f"--output {args.output}")
    check_model(engine_args, chat=rows.messages_column is not None, structure=args.structured_outputs,
                template_kwargs=rows.chat_template_kwargs)

    processor = ProcessorConfig(
        engine_args=engine_args, rows=rows, batch_size=args.batch_size, concurrency=args.concurrency,
        max_concurrent_batches=args.max_concurrent_batches, num_gpus=args.num_gpus, num_cpus=args.num_cpus,
        accelerator_type=args.accelerator_type, max_restarts=args.max_restarts, max_task_retries=args.max_task_retries,
    )  # fmt: skip
    return JobPlan(in_fs, files, out_fs, out_root, id_column, processor, input_rows, record,
                   derive_ids=not args.id_column)


def _chat_template_text(value: str) -> str:
    from adallm_core.tokenizer import load_chat_template

    try:
        return load_chat_template(value)
    except ValueError as e:
        raise ValueError(f"--chat-template: {e}") from None


def check_model(engine_args: EngineArgs, chat: bool, structure: Optional[dict] = None,
                template_kwargs: Optional[dict] = None) -> None:
    """The model must resolve to a folder with a readable checkpoint and tokenizer (and a chat template for
    chat rows; and a --structured-outputs grammar must compile for its tokenizer). Reads config and headers only.
    Without --model the built-in demo model is built here (CPU, once, cached), so replicas on this node find it
    ready."""
    from adallm_core.checkpoint.read import Checkpoint
    from adallm_core.model_config import ModelConfig
    from adallm_core.model_source import resolve_model_path
    from adallm_core.structured_output import GrammarCompiler, StructuredOutputsParams
    from adallm_core.tokenizer import Tokenizer, chat_template_options

    path = resolve_model_path(engine_args.model)  # ValueError naming the model and host
    try:
        checkpoint = Checkpoint(path)
    except Exception as e:  # checkpoint and transformers errors come in many types; all mean the same here
        raise ValueError(f"--model {engine_args.model or path}: cannot read it: {type(e).__name__}: {e}") from None
    flag, source = ("--tokenizer", engine_args.tokenizer) if engine_args.tokenizer else ("--model", path)
    try:
        tokenizer = Tokenizer.for_engine(engine_args, path)  # --chat-template: its text, checked by plan_job
    except Exception as e:
        raise ValueError(f"{flag} {source}: cannot read its tokenizer: {type(e).__name__}: {e}") from None
    if structure is not None:  # compiled once here: a bad schema would otherwise fail every row alike
        config = ModelConfig.from_hf_config(checkpoint.hf_config, path)
        compiler = GrammarCompiler(tokenizer, config.vocab_size, tokenizer.eos_token_ids)
        try:
            compiler.matcher_factory(StructuredOutputsParams.of(structure))
        except ValueError as e:
            raise ValueError(f"--structured-outputs: {e}") from None
    if chat:
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                          **chat_template_options(chat_template_kwargs=template_kwargs))
        except Exception as e:
            raise ValueError(f"--model {path} cannot render chat rows ({e}); use --prompt-column"
                             + (" or other --chat-template-kwargs" if template_kwargs else "")) from None


def run(plan: JobPlan) -> JobSummary:
    return execute(plan)[0]


def read_input(plan: JobPlan):
    """The input rows as a ray.data.Dataset, with Ray Data's row_hash ids when no --id-column was given."""
    import ray

    return ray.data.read_parquet(plan.input_files, filesystem=plan.input_fs, include_row_hash=plan.derive_ids)


def execute(plan: JobPlan):
    """Run the job; returns its summary and the executed ray.data.Dataset (whose .stats() Ray Data filled), None
    when every row was written already."""
    import ray

    from jobs import resume

    start = time.perf_counter()
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS / a running cluster, else a local one started on the spot
    processor = build_processor(plan.processor)
    processor.check_cluster()  # before the output folder is touched: a cluster too small is an argument error
    plan.output_fs.create_dir(plan.output_root, recursive=True)
    resume.remove_temp_files(plan.output_fs, plan.output_root)
    if plan.record is not None:
        resume.write_job_record(plan.output_fs, plan.output_root, plan.record)
    written = resume.written_ids(plan.output_fs, plan.output_root, plan.id_column)
    if written is not None and _all_written(plan, written):
        # no engine starts, which on a cluster would launch GPU nodes to write nothing
        print("bulk_generate: every input row is in --output already; no engine started", file=sys.stderr, flush=True)
        return _finish(plan, dict.fromkeys(STAT_KEYS, 0), start), None

    ds = read_input(plan)
    if written is not None:
        # A map (not ds.filter): a filter may be pushed into the read, which would shift row positions.
        ds = ds.map_batches(
            resume.drop_written, batch_format="pyarrow", fn_kwargs={"id_column": plan.id_column, "written": written}
        )
    ds = processor(ds)
    sink = resume.AtomicParquetDatasink(plan.output_fs, plan.output_root, plan.id_column)
    ds.write_datasink(sink)
    return _finish(plan, sink.stats, start), ds


def _all_written(plan: JobPlan, written) -> bool:
    """Every input row's id is among the written ones. As many written ids as input rows is not enough: a folder
    whose _job.json was deleted to mix jobs holds other inputs' rows too, so the input's ids (only them) are read."""
    import pyarrow.compute as pc

    from jobs import resume

    if pc.count_distinct(written).as_py() < plan.input_rows:
        return False
    ids = read_input(plan).select_columns([plan.id_column])
    return ids.map_batches(resume.drop_written, batch_format="pyarrow",
                           fn_kwargs={"id_column": plan.id_column, "written": written}).count() == 0


def _finish(plan: JobPlan, stats: dict, start: float) -> JobSummary:
    """Remove rows written twice, then write and return the summary of a run that wrote stats["rows"]."""
    from jobs import resume

    duplicates = resume.remove_duplicates(plan.output_fs, plan.output_root, plan.id_column)
    if duplicates:
        print(f"bulk_generate: removed {duplicates} duplicate row(s): an earlier run's last writes landed after this "
              "run had listed the output folder", file=sys.stderr, flush=True)
    # every input row is either one this run wrote or one an earlier run had (exactly once)
    summary = JobSummary(**stats, wall_time_s=time.perf_counter() - start,
                         rows_skipped=plan.input_rows - stats["rows"], duplicates_removed=duplicates)
    resume.write_whole(plan.output_fs, plan.output_root, resume.SUMMARY_NAME, summary.to_json())
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bulk_generate", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        plan = plan_job(args)
    except ValueError as e:  # a bad argument, found before any engine work (see plan_job, Processor)
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    try:
        summary = run(plan)  # any other error from here on is the run's, not an argument's: it keeps its traceback
    except ClusterTooSmall as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(summary.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
