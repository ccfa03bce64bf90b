"""`adallm` command: one subcommand per module, imported only when used (serve pulls in Ray)."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module providing add_arguments(parser) and main(args) -> int, or only main(argv) -> int
# (a benchmark that parses its own arguments, so `python -m benchmarks.decode` and `adallm bench` agree)
COMMANDS = {
    "serve": ("deployments.cli", "serve a model behind an OpenAI-compatible endpoint on Ray Serve"),
    "run": ("adallm_core.run_cli", "generate from a prompt, or chat interactively, in the terminal"),
    "generate": ("adallm_core.generate_cli", "generate for a JSONL file of prompts"),
    "quantize": ("adallm_core.checkpoint.quantize_cli", "convert a BF16/FP16 checkpoint to NVFP4"),
    "bench": ("benchmarks.decode", "decode benchmark on random weights of a real model's shape (GPU)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="adallm", description="NVFP4 LLMs on Ada GPUs, on Ray.")
    parser.add_argument("--version", action="store_true", help="print adallm's version and exit (as `vllm --version`)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"adallm {version()}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    try:
        return _run_command(name, argv[1:])
    except KeyboardInterrupt:  # Ctrl-C: the shell's status for it, and a line rather than a traceback
        print(f"adallm {name}: interrupted", file=sys.stderr)
        return 130


def _run_command(name: str, argv: list[str]) -> int:
    module = importlib.import_module(COMMANDS[name][0])
    if not hasattr(module, "add_arguments"):
        # its own parser names itself after sys.argv[0]: `adallm bench`, not `adallm`, in its usage and errors
        program, sys.argv[0] = sys.argv[0], f"adallm {name}"
        try:
            return int(module.main(argv) or 0)
        finally:
            sys.argv[0] = program
    sub_parser = argparse.ArgumentParser(prog=f"adallm {name}", description=COMMANDS[name][1])
    module.add_arguments(sub_parser)
    # intermixed: `adallm run MODEL --temperature 0 "prompt"` (an optional positional after options) parses as
    # `adallm run MODEL "prompt" --temperature 0` does, not as an unrecognized argument
    args = sub_parser.parse_intermixed_args(argv)
    return int(module.main(args) or 0)


def version() -> str:
    """The installed package's version (`adallm --version`, the server's /version)."""
    from importlib.metadata import PackageNotFoundError, version as package_version

    try:
        return package_version("adallm")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


if __name__ == "__main__":
    sys.exit(main())
