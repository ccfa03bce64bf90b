"""`adallm quantize SRC DST [--format modelopt|compressed-tensors] [--exclude PATTERN ...]`"""
from __future__ import annotations

import argparse
import signal
import sys

from adallm_core.checkpoint.files import CheckpointError
from adallm_core.checkpoint.layout import FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="BF16/FP16 Hugging Face checkpoint folder (Qwen3, Qwen3-MoE, Gemma3)")
    parser.add_argument("dst", help="output folder (must not exist; written atomically)")
    parser.add_argument("--format", choices=FORMATS, default="modelopt", help="NVFP4 layout to write")
    parser.add_argument("--device", default="cpu", help="where the quantization math runs: cpu or cuda (same result)")
    parser.add_argument(
        "--exclude", nargs="+", default=[], metavar="PATTERN",
        help="modules to keep in BF16: shell-style globs over module names ('*.down_proj', 'model.layers.0.*') "
        "or 're:<regex>'. lm_head, embeddings, norms and the MoE router always stay BF16.",
    )


def main(args: argparse.Namespace) -> int:
    from adallm_core.checkpoint.quantize import quantize_checkpoint

    signal.signal(signal.SIGTERM, _interrupted)  # a kill cleans up as Ctrl-C does: no temporary folder left
    try:
        s = quantize_checkpoint(args.src, args.dst, fmt=args.format, exclude=args.exclude, device=args.device)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"adallm quantize: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("adallm quantize: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(
        f"wrote {s['dst']} ({s['format']}): {s['tensors']} tensors ({s['quantized']} quantized), "
        f"{s['bytes_in'] / 1e6:.1f} MB in, {s['bytes_out'] / 1e6:.1f} MB out, {s['seconds']:.1f} s "
        f"({s['bytes_in'] / 1e9 / max(s['seconds'], 1e-9):.3f} GB/s of input)"
    )
    return 0


def _interrupted(signum, frame):
    raise KeyboardInterrupt
