"""`adallm run MODEL [PROMPT]`: stream a completion to the terminal, or chat interactively (`\\q` quits; Ctrl-C
stops an answer)."""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from typing import Optional, TextIO

from adallm_core.config import EngineArgs
from adallm_core.sampling_params import ContextLengthError, RequestOutputKind, SamplingParams

QUIT = "\\q"


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--ignore-eos", action="store_true")
    # --seed is EngineArgs' flag: it seeds the engine and, here, every request.


def sampling_params_from_args(args: argparse.Namespace, **overrides) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, seed=args.seed, **overrides)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint folder, hub id, or 'demo' (the built-in tiny model)")
    parser.add_argument("prompt", nargs="?", help="generate for this prompt and exit; without it: interactive")
    parser.add_argument("--chat", action="store_true", help="apply the chat template and keep the conversation")
    parser.add_argument("--system", default=None, help="system message for --chat")
    add_sampling_args(parser, max_tokens=256)
    EngineArgs.add_cli_args(parser, with_model=False)


def main(args: argparse.Namespace, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    from adallm_core.engine import LLMEngine, next_request_id

    if args.system is not None and not args.chat:  # a plain prompt has no system message: it was dropped silently
        print("error: --system applies to --chat (the system message goes through the chat template)", file=sys.stderr)
        return 2
    try:
        params = sampling_params_from_args(args, output_kind=RequestOutputKind.DELTA)
        engine_args = EngineArgs.from_cli_args(args)
        engine_args.model = args.model
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        engine = LLMEngine.from_engine_args(engine_args)
    except (OSError, ValueError) as e:  # the model or the engine options: CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []

    def submit(rid: str, user_text: str) -> None:
        while True:
            if args.chat:
                prompt, special = engine.tokenizer.apply_chat_template(history), False
            else:
                prompt, special = user_text, True
            try:
                return engine.add_request(rid, prompt, params, add_special_tokens=special)
            except ContextLengthError:
                # a chat that outgrew the context loses its oldest exchange (else every later turn failed too)
                if not (args.chat and _drop_oldest_exchange(history)):
                    raise
                print("(the conversation outgrew --max-model-len: its oldest exchange was dropped)", file=sys.stderr)

    def answer(user_text: str) -> Optional[str]:
        if args.chat:
            history.append({"role": "user", "content": user_text})
        rid = next_request_id()
        try:  # the template too: a model without one, or one that refuses the messages, is an error line
            submit(rid, user_text)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            if args.chat:
                history.pop()
            return None
        text = []
        try:
            with _ctrl_c_between_steps() as pressed:
                while engine.has_unfinished_requests():
                    for out in engine.step():
                        for c in out.outputs:
                            stdout.write(c.text)
                            stdout.flush()
                            text.append(c.text)
                    if pressed:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:  # Ctrl-C stops this answer: its blocks go back, its turn is dropped
            engine.abort_request(rid)
            if args.chat:
                history.pop()
            if args.prompt is not None:
                raise
            stdout.write("\n")
            stdout.flush()
            return None
        stdout.write("\n")
        stdout.flush()
        if args.chat:
            history.append({"role": "assistant", "content": "".join(text)})
        return "".join(text)

    try:
        if args.prompt is not None:
            return 0 if answer(args.prompt) is not None else 1
        return _session(answer, stdin, stdout)
    except KeyboardInterrupt:  # in a one-shot answer, or at the prompt: the exit status of Ctrl-C, no traceback
        stdout.write("\n")
        return 130


def _drop_oldest_exchange(history: list[dict]) -> bool:
    """Removes the first user message and the answer after it, keeping a system message and the last question;
    False when nothing but those is left."""
    first = 1 if history and history[0]["role"] == "system" else 0
    if len(history) - first <= 1:
        return False
    end = first + 2 if history[first + 1]["role"] == "assistant" else first + 1
    del history[first:min(end, len(history) - 1)]
    return True


@contextlib.contextmanager
def _ctrl_c_between_steps():
    """Ctrl-C while an answer streams is taken after the engine's step: a step cut midway would leave its
    bookkeeping half done for the next answer. A second Ctrl-C (a step that hangs) quits at once, status 130."""
    pressed: list[bool] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield pressed
        return

    def on_ctrl_c(signum, frame):
        if pressed:
            raise SystemExit(130)
        pressed.append(True)

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def _session(answer, stdin: TextIO, stdout: TextIO) -> int:
    """Answer each line until \\q or the end of the input."""
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == QUIT:
            return 0
        if line.strip():
            answer(line.rstrip("\r\n"))  # a Windows terminal's line ends in \r\n
