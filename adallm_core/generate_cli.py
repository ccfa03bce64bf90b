"""`adallm generate MODEL --input prompts.jsonl --output out.jsonl`: an offline batch with a progress bar.

Each input line: {"prompt": "..."} or {"prompt_token_ids": [...]} or {"messages": [...]} (chat template);
an optional "id" is copied to the output line. The output file appears only when every line is done.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

from adallm_core.config import EngineArgs
from adallm_core.run_cli import add_sampling_args, sampling_params_from_args
from adallm_core.sampling_params import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint folder, hub id, or 'demo' (the built-in tiny model)")
    parser.add_argument("--input", required=True, type=Path, help="JSONL file of prompts")
    parser.add_argument("--output", required=True, type=Path, help="JSONL file to write (atomically)")
    add_sampling_args(parser, max_tokens=128)
    EngineArgs.add_cli_args(parser, with_model=False)


def read_prompts(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for every non-blank line; a bad line is a ValueError naming it."""
    from adallm_core.llm import template_messages

    rows = []
    # '\n' only: splitlines() also cuts at U+2028, U+2029 and U+0085, which a JSON string may hold raw
    for n, line in enumerate(_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        given = sorted({"prompt", "prompt_token_ids", "messages"} & row.keys()) if isinstance(row, dict) else []
        if not given:
            raise ValueError(f"{path}:{n}: needs a 'prompt', 'prompt_token_ids' or 'messages' field")
        if len(given) > 1:  # which one was meant? one of them would be dropped without a word
            raise ValueError(f"{path}:{n}: has {' and '.join(repr(k) for k in given)}; give one of them")
        if "messages" in row:
            try:  # as LLM.chat takes them (text parts, earlier tool calls), checked before the model loads
                row["messages"] = template_messages(_conversation(row["messages"]))
            except ValueError as e:
                raise ValueError(f"{path}:{n}: {e}") from None
        rows.append((n, row))
    return rows


def _conversation(messages) -> list[dict]:
    shape = "'messages' must be a non-empty list of {role, content} messages"
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{shape}, got {messages!r}")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"{shape}: message {j} needs a string 'role', got {message!r}")
    return messages


def _text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a BOM (Windows editors) is no part of the first line
    except UnicodeDecodeError as e:  # its own message names no file
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def check_output(input_path: Path, output: Path) -> None:
    """Before the model loads: a path the generations can be written to, without overwriting the input."""
    if output.exists() and output.resolve() == input_path.resolve():
        raise ValueError(f"--output {output} is the input file")
    if output.is_dir():
        raise ValueError(f"--output {output} is a folder; give the path of a .jsonl file")
    output.parent.mkdir(parents=True, exist_ok=True)  # a file in the way is an OSError, reported as such


def main(args: argparse.Namespace) -> int:
    from adallm_core.llm import LLM, PromptError

    try:
        rows = read_prompts(args.input)
        check_output(args.input, args.output)
        params = sampling_params_from_args(args)
        engine_args = EngineArgs.from_cli_args(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine_args.model = args.model
    try:
        llm = LLM(**engine_args.to_dict())
    except (OSError, ValueError) as e:  # the model or the engine options: CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        prompts = [row_prompt(llm.llm_engine.tokenizer, args.input, n, row) for n, row in rows]
        outputs = llm.generate(prompts, line_params(params, len(prompts)), use_tqdm=True)
    except PromptError as e:  # named by its line: the batch's index skips blank lines and counts from 0
        print(f"error: {args.input}:{rows[e.index][0]}: {e.error}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_atomically(args.output, [
        {"id": row.get("id", i), "text": out.outputs[0].text, "token_ids": out.outputs[0].token_ids,
         "finish_reason": out.outputs[0].finish_reason, "num_prompt_tokens": len(out.prompt_token_ids)}
        for i, ((_, row), out) in enumerate(zip(rows, outputs))])
    print(f"wrote {len(outputs)} generations to {args.output}", file=sys.stderr)
    return 0


def line_params(params: SamplingParams, count: int) -> list[SamplingParams]:
    """Line i is seeded with --seed + i: reproducible, yet a prompt repeated to sample it several times gets
    different samples, not copies of one (every line seeded with --seed itself gave the same tokens)."""
    return [dataclasses.replace(params, seed=params.seed + i) for i in range(count)]


def row_prompt(tok, path: Path, n: int, row: dict):
    if "messages" in row:
        try:
            return {"prompt_token_ids": tok.encode_chat(row["messages"])}
        except ValueError as e:  # the chat template refused them
            raise ValueError(f"{path}:{n}: {e}") from None
    if "prompt_token_ids" in row:
        return {"prompt_token_ids": row["prompt_token_ids"]}
    return row["prompt"]


def write_atomically(output: Path, lines: list[dict]) -> None:
    """The file appears complete or not at all, with the permissions a plain open() would give it. A symlink's
    target is written, the link kept; a pipe or device (/dev/stdout) cannot be replaced, so it is written to."""
    if output.exists() and not output.is_file():  # folders were refused by check_output
        with open(output, "w") as f:
            _write_lines(f, lines)
        return
    output = output.resolve()  # renaming over a symlink would replace the link, not its target
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it 0600
        with os.fdopen(fd, "w") as f:
            _write_lines(f, lines)
        os.replace(tmp, output)
    except BaseException:
        os.unlink(tmp)
        raise


def _write_lines(f, lines: list[dict]) -> None:
    for line in lines:
        f.write(json.dumps(line, ensure_ascii=False) + "\n")
