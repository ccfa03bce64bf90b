"""`adallm serve [MODEL]`: start (or join) Ray, deploy the OpenAI app, block until Ctrl-C."""
from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
import time
from dataclasses import fields

from adallm_core.config import EngineArgs
from deployments.reasoning import PARSERS
from deployments.tool_calls import PARSERS as TOOL_CALL_PARSERS

APP_NAME = "adallm"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="checkpoint folder or hub id; none: the built-in tiny demo model")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    parser.add_argument("--port", type=_port, default=8000)
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join; default: a running local one, else start one")
    parser.add_argument("--served-model-name", default=None, help="the model name clients send; default: the folder name")
    replicas = parser.add_mutually_exclusive_group()
    replicas.add_argument("--num-replicas", type=int, default=None, help="fixed number of engine replicas (default 1)")
    replicas.add_argument("--min-replicas", type=int, default=None, help="autoscale from this many replicas...")
    parser.add_argument("--max-replicas", type=int, default=None, help="...up to this many")
    parser.add_argument("--num-gpus", type=float, default=None,
                        help="GPUs per replica; default: 1 with --accelerator-type or --device cuda, or when the "
                             "cluster has GPUs; else 0 (also with --device cpu)")
    parser.add_argument("--accelerator-type", default=None, help="Ray accelerator type for replicas, e.g. L4, L40S")
    parser.add_argument("--max-batch-size", type=int, default=None, help="@serve.batch: most arrivals admitted together (32)")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=None, help="@serve.batch: how long to wait for more (0.005)")
    parser.add_argument("--stream-interval-s", type=float, default=None, help="streamed tokens within it go as one event (0.1)")
    parser.add_argument("--max-ongoing-requests", type=int, default=None, help="per replica; default: --max-num-seqs")
    parser.add_argument("--max-queued-requests", type=int, default=None, help="beyond this, 503; default: 2x ongoing")
    parser.add_argument("--reasoning-parser", choices=PARSERS, default=None,
                        help="chat: the thinking (<think>...</think>) goes to reasoning_content, apart from content")
    parser.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                        help="chat: the answer's <tool_call> blocks become tool_calls (with --enable-auto-tool-choice)")
    parser.add_argument("--enable-auto-tool-choice", action="store_true", default=None,
                        help='chat: tool_choice "auto", the default with tools; needs --tool-call-parser')
    EngineArgs.add_cli_args(parser, with_model=False)


def _port(text: str) -> int:
    """A TCP port, checked here: Ray would start first and then fail its HTTP proxy with a traceback."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1-65535)")
    return port


SERVE_FLAGS = (
    "served_model_name", "num_replicas", "min_replicas", "max_replicas", "num_gpus", "accelerator_type",
    "max_batch_size", "batch_wait_timeout_s", "stream_interval_s", "max_ongoing_requests", "max_queued_requests",
    "reasoning_parser", "tool_call_parser", "enable_auto_tool_choice",
)  # fmt: skip


def app_args(args: argparse.Namespace) -> dict:
    """The build_app dict: engine fields as given on the command line plus the serving options that were set."""
    engine = EngineArgs.from_cli_args(args).to_dict()
    serving = {k: getattr(args, k) for k in SERVE_FLAGS if getattr(args, k) is not None}
    return {**engine, **serving}


def flag_message(error: ValueError) -> str:
    """An options error in the command line's words: --max-num-seqs, not max_num_seqs."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        text = "; ".join(
            (f"{e['loc'][0]}={e['input']!r}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
            for e in error.errors())
    else:
        text = str(error)
    names = [f.name for f in fields(EngineArgs) if f.name != "model"] + list(SERVE_FLAGS)
    return re.sub(rf"\b({'|'.join(names)})\b", lambda m: "--" + m[1].replace("_", "-"), text)


def main(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from deployments.app import build_app, set_serve_environment, split_args

    try:
        split_args(app_args(args))  # bad options fail here, before Ray starts
    except ValueError as e:  # pydantic's ValidationError too: a clear error naming the flag, not a traceback
        print(f"adallm serve: error: {flag_message(e)}", file=sys.stderr, flush=True)
        return 2
    set_serve_environment()  # read by the proxy and controller of a Ray started here
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as cleanly as Ctrl-C, start-up included
    try:
        ray.init(address=args.ray_address, log_to_driver=False)
        signal.signal(signal.SIGTERM, _interrupt)  # ray.init installs a handler of its own: ours again
        app = build_app(app_args(args))  # after ray.init: sees whether the cluster has GPUs
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as e:  # Serve says only that the deployment failed; its status says why
            print(f"adallm serve: error: {e}\n{deploy_failures()}", file=sys.stderr, flush=True)
            return 1
        print(f"adallm: OpenAI API at http://{args.host}:{args.port}/v1 (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("adallm: shutting down", flush=True)
    finally:
        if ray.is_initialized():
            with contextlib.suppress(Exception):  # stopped during start-up: nothing may be deployed yet
                serve.delete(APP_NAME)
            ray.shutdown(wait_for_processes=True)  # return once the Ray this started is gone (its ports too)
    return 0


def deploy_failures() -> str:
    """Each deployment's status message (a replica's constructor error: the model path, the node), one a line."""
    from ray import serve

    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception as e:  # the controller is gone too: nothing more to say
        return f"(no deployment status: {type(e).__name__})"
    if app is None:
        return "(no deployment status)"
    lines = [f"  {name}: {d.status}: {d.message}" for name, d in app.deployments.items() if d.message]
    return "\n".join(lines or [f"  {app.status}: {app.message}"])


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
