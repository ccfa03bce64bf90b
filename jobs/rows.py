"""Rows in, requests out, rows back: per-row prompts, per-row sampling parameters, the output columns.

A bad row (null or empty prompt, malformed chat messages, an invalid per-row parameter) becomes an error
string for that row; the batch goes on. A bad *schema* (missing column, wrong column type) is a job
argument error, raised before any engine work by `check_schema`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Optional, Union

import pyarrow as pa

from adallm_core.sampling_params import RequestOutputKind, SamplingParams
from adallm_core.tokenizer import chat_template_options, check_conversation

# Optional input columns that override the job's sampling defaults row by row (null: use the default).
SAMPLING_COLUMNS = ("max_tokens", "temperature", "top_p", "seed", "stop", "structured_outputs")
INTEGER_PARAMS = ("max_tokens", "seed")

# Columns the job adds to every row. Types are fixed so that every output file has the same schema,
# even one whose rows all failed (an all-null column would otherwise be typed `null`).
OUTPUT_SCHEMA = pa.schema(
    [
        ("generated_text", pa.string()),
        ("finish_reason", pa.string()),
        ("num_prompt_tokens", pa.int64()),
        ("num_generated_tokens", pa.int64()),
        ("error", pa.string()),
    ]
)
# With --prompt-logprobs: each prompt token's logprob under the model, the first null (nothing predicts it).
PROMPT_LOGPROBS_FIELD = pa.field("prompt_logprobs", pa.list_(pa.float64()))


@dataclass(frozen=True)
class RowSpec:
    """Where a row's prompt comes from and the sampling defaults its own columns override.

    With both columns given, each row uses the one that is not null (a file may mix plain and chat rows)."""

    prompt_column: Optional[str] = "prompt"
    messages_column: Optional[str] = None  # chat rows: a list of {"role", "content"} rendered with the chat template
    sampling_defaults: dict = dataclasses.field(default_factory=dict)  # SamplingParams fields
    chat_template_kwargs: dict = dataclasses.field(default_factory=dict)  # chat rows, e.g. {"enable_thinking": False}

    def __post_init__(self) -> None:
        if self.prompt_column is None and self.messages_column is None:
            raise ValueError("give a prompt column, a messages column, or both")
        SamplingParams(**self.sampling_defaults)  # a bad default is a job error, raised here

    @property
    def output_schema(self) -> pa.Schema:
        """The columns the job adds: OUTPUT_SCHEMA, and prompt_logprobs when the prompts are scored."""
        if self.sampling_defaults.get("prompt_logprobs") is None:
            return OUTPUT_SCHEMA
        return OUTPUT_SCHEMA.insert(len(OUTPUT_SCHEMA) - 1, PROMPT_LOGPROBS_FIELD)  # before error

@dataclass
class RowRequest:
    """One row made ready for the engine: a prompt and its params, or the reason it cannot run."""

    prompt: Union[str, list[int], None] = None
    params: Optional[SamplingParams] = None
    error: Optional[str] = None


@dataclass
class RowResult:
    generated_text: Optional[str] = None
    finish_reason: Optional[str] = None
    num_prompt_tokens: Optional[int] = None
    num_generated_tokens: Optional[int] = None
    prompt_logprobs: Optional[list[Optional[float]]] = None
    error: Optional[str] = None


def check_schema(schema: pa.Schema, spec: RowSpec, where: str) -> None:
    """Job-level checks of the input schema; `where` names the input in the message."""
    names = set(schema.names)
    for column, flag, is_ok, holds in (
        (spec.prompt_column, "--prompt-column", _is_string, "strings"),
        (spec.messages_column, "--messages-column", _is_messages, "lists of {role, content}"),
    ):
        if column is None:
            continue
        if column not in names:
            raise ValueError(f"{where}: no column {column!r} ({flag}); columns are {sorted(names)}")
        kind = schema.field(column).type
        if not (is_ok(kind) or pa.types.is_null(kind)):
            raise ValueError(f"{where}: column {column!r} ({flag}) must hold {holds}, it holds {kind}")
    taken = sorted(names & set(spec.output_schema.names))
    if taken:
        raise ValueError(f"{where}: input already has output column(s) {taken}; rename them first")
    for name in SAMPLING_COLUMNS:
        if name not in names:
            continue
        kind = schema.field(name).type
        ok = pa.types.is_null(kind) or (  # all null (as pandas writes a column of None): the default for every row
            _is_string(kind) or _is_list(kind) if name == "stop"
            else _is_string(kind) if name == "structured_outputs"  # JSON text
            else pa.types.is_integer(kind) or pa.types.is_floating(kind)
        )
        if not ok:
            raise ValueError(f"{where}: per-row sampling column {name!r} has type {kind}, which cannot hold {name}")


def prepare_rows(batch: pa.Table, spec: RowSpec, tokenizer: Any) -> list[RowRequest]:
    """One RowRequest per row of `batch`, in order."""
    n = batch.num_rows
    prompts = batch.column(spec.prompt_column).to_pylist() if spec.prompt_column else [None] * n
    chats = batch.column(spec.messages_column).to_pylist() if spec.messages_column else [None] * n
    overrides = {name: batch.column(name).to_pylist() for name in SAMPLING_COLUMNS if name in batch.column_names}
    requests = []
    for i in range(n):
        try:
            prompt = _render(prompts[i], chats[i], spec, tokenizer)
            params = _params(spec.sampling_defaults, {name: column[i] for name, column in overrides.items()})
            requests.append(RowRequest(prompt=prompt, params=params))
        except ValueError as e:
            requests.append(RowRequest(error=str(e)))
    return requests


def output_table(batch: pa.Table, results: list[RowResult], schema: pa.Schema = OUTPUT_SCHEMA) -> pa.Table:
    """The input batch with the output columns (`schema`: RowSpec.output_schema) appended, every input column kept."""
    for field in schema:
        values = [getattr(r, field.name) for r in results]
        batch = batch.append_column(field, pa.array(values, type=field.type))
    return batch


def _render(prompt: Any, messages: Any, spec: RowSpec, tokenizer: Any) -> Union[str, list[int]]:
    """A prompt string (the engine tokenizes it, as LLM.generate does) or, for chat rows, the token ids of the
    rendered template (encoded without adding special tokens again, as LLM.chat does)."""
    if prompt is not None and messages is not None:
        raise ValueError(f"row has both a prompt ({spec.prompt_column!r}) and messages ({spec.messages_column!r})")
    if messages is None:
        if prompt is None:
            names = " / ".join(repr(c) for c in (spec.prompt_column, spec.messages_column) if c)
            raise ValueError(f"prompt is null (column {names})")
        if prompt == "":
            raise ValueError(f"prompt is empty (column {spec.prompt_column!r})")
        return prompt
    column = spec.messages_column
    if not messages:
        raise ValueError(f"messages are empty (column {column!r})")
    try:
        check_conversation(list(messages))
    except ValueError as e:
        raise ValueError(f"{e} (column {column!r})") from None
    conversation = [{k: v for k, v in message.items() if v is not None} for message in messages]
    try:
        options = chat_template_options(chat_template_kwargs=spec.chat_template_kwargs)
        return tokenizer.encode_chat(conversation, **options)
    except Exception as e:  # the template is user-facing Jinja: any failure is this row's problem
        raise ValueError(f"chat template failed on these messages: {type(e).__name__}: {e}") from e


def _is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _is_list(kind: pa.DataType) -> bool:  # large lists: what Polars writes
    return pa.types.is_list(kind) or pa.types.is_large_list(kind)


def _is_messages(kind: pa.DataType) -> bool:
    """Lists of structs with string role and content (other fields, e.g. name, go to the template too): any other
    type (lists of strings, of maps, of other structs) would fail every row alike, once the engines had started."""
    if not _is_list(kind) or pa.types.is_null(kind.value_type):  # all lists empty: each row's own error
        return _is_list(kind)
    item = kind.value_type
    if not pa.types.is_struct(item) or item.get_field_index("role") < 0 or item.get_field_index("content") < 0:
        return False
    return all(_is_string(t) or pa.types.is_null(t) for t in (item.field("role").type, item.field("content").type))


def _params(defaults: dict, row: dict) -> SamplingParams:
    values = dict(defaults)
    for name, value in row.items():
        if value is None:
            continue
        if name in INTEGER_PARAMS and isinstance(value, float) and value.is_integer():
            value = int(value)  # pandas turns integer columns with nulls into floats
        if name == "structured_outputs":
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs (column) is not JSON: {e}") from None
        values[name] = value
    # One finished output per request: the job never looks at partial text.
    return SamplingParams(**values, output_kind=RequestOutputKind.FINAL_ONLY)
