"""`adallm generate MODEL --input prompts.jsonl --output out.jsonl`: an offline batch with a progress bar.

Each input line: {"prompt": "..."} or {"prompt_token_ids": [...]} or {"messages": [...]} (chat template);
an optional "id" is copied to the output line. The output file appears only when every line is done.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from adallm_core.config import EngineArgs
from adallm_core.run_cli import add_sampling_args, sampling_params_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint folder, hub id, or 'demo' (the built-in tiny model)")
    parser.add_argument("--input", required=True, type=Path, help="JSONL file of prompts")
    parser.add_argument("--output", required=True, type=Path, help="JSONL file to write (atomically)")
    add_sampling_args(parser, max_tokens=128)
    EngineArgs.add_cli_args(parser, with_model=False)


def read_prompts(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not {"prompt", "prompt_token_ids", "messages"} & row.keys():
            raise ValueError(f"{path}:{n}: needs a 'prompt', 'prompt_token_ids' or 'messages' field")
        rows.append(row)
    return rows


def main(args: argparse.Namespace) -> int:
    from adallm_core.llm import LLM

    try:
        rows = read_prompts(args.input)
        params = sampling_params_from_args(args)
        engine_args = EngineArgs.from_cli_args(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine_args.model = args.model
    llm = LLM(**engine_args.to_dict())
    tok = llm.get_tokenizer()
    prompts = []
    for row in rows:
        if "messages" in row:
            prompts.append({"prompt_token_ids": tok.encode_chat(row["messages"])})
        elif "prompt_token_ids" in row:
            prompts.append({"prompt_token_ids": row["prompt_token_ids"]})
        else:
            prompts.append(row["prompt"])
    try:
        outputs = llm.generate(prompts, params, use_tqdm=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{args.output.name}.", dir=args.output.parent)
    try:
        with os.fdopen(fd, "w") as f:
            for i, (row, out) in enumerate(zip(rows, outputs)):
                c = out.outputs[0]
                f.write(json.dumps({"id": row.get("id", i), "text": c.text, "token_ids": c.token_ids,
                                    "finish_reason": c.finish_reason, "num_prompt_tokens": len(out.prompt_token_ids)},
                                   ensure_ascii=False) + "\n")
        os.replace(tmp, args.output)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"wrote {len(outputs)} generations to {args.output}", file=sys.stderr)
    return 0
