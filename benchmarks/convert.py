"""Conversion benchmark: `adallm quantize` on a synthetic BF16 checkpoint (random weights of a Qwen3 shape).

    python -m benchmarks.convert [--size-gb 1.6] [--shards 3] [--format modelopt] [--device cpu] [--workdir DIR]

Writes a BF16 Qwen3ForCausalLM checkpoint of RANDOM weights (hidden 2048, MLP 6144, vocab 32768; enough layers
for --size-gb) in --shards shards, converts it in a child process with the real command, and reports GB of BF16
input per second and the child's peak RSS (resource.getrusage RUSAGE_CHILDREN) against the bound of twice the
largest input shard. The baseline RSS of a child that only imports the converter is printed beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2048, 6144, 16, 8, 128, 32768


def layer_tensors(i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    p = f"model.layers.{i}."
    shapes = {
        "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN), "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        "mlp.gate_proj.weight": (INTER, HIDDEN), "mlp.up_proj.weight": (INTER, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, INTER),
    }
    out = {p + k: (torch.randn(s, generator=gen) * 0.02).bfloat16() for k, s in shapes.items()}
    for norm, n in (("input_layernorm", HIDDEN), ("post_attention_layernorm", HIDDEN), ("self_attn.q_norm", HEAD_DIM),
                    ("self_attn.k_norm", HEAD_DIM)):
        out[f"{p}{norm}.weight"] = torch.ones(n, dtype=torch.bfloat16)
    return out


def build_source(folder: Path, size_gb: float, shards: int) -> list[int]:
    """Write the synthetic checkpoint; returns the shard sizes in bytes."""
    per_layer = 2 * (2 * HEADS * HEAD_DIM * HIDDEN + 2 * KV_HEADS * HEAD_DIM * HIDDEN + 3 * INTER * HIDDEN)
    layers = max(shards, round((size_gb * 1e9 - 2 * 2 * VOCAB * HIDDEN) / per_layer))
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": HIDDEN, "intermediate_size": INTER,
        "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "rope_theta": 1e6, "torch_dtype": "bfloat16",
    }
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(0)
    groups = [list(range(layers))[s::shards] for s in range(shards)]
    weight_map, sizes = {}, []
    for s, group in enumerate(groups):
        tensors = {}
        if s == 0:
            tensors["model.embed_tokens.weight"] = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02).bfloat16()
        if s == shards - 1:
            tensors["lm_head.weight"] = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02).bfloat16()
            tensors["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        for i in group:
            tensors.update(layer_tensors(i, gen))
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        sizes.append((folder / name).stat().st_size)
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sizes


def run_child(cmd: list[str]) -> tuple[float, float, float, subprocess.CompletedProcess]:
    """(wall s, CPU s, peak RSS MB, result) of one child, measured in a fresh intermediate process so the
    RUSAGE_CHILDREN figures belong to that child alone."""
    probe = (
        "import resource, subprocess, sys, time, json; t = time.time(); "
        f"p = subprocess.run({cmd!r}, capture_output=True, text=True); "
        "r = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "print(json.dumps([time.time() - t, r.ru_utime + r.ru_stime, r.ru_maxrss / 1024, "
        "p.returncode, p.stdout, p.stderr[-2000:]]))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    wall, cpu, rss, rc, stdout, stderr = json.loads(out)
    return wall, cpu, rss, subprocess.CompletedProcess(cmd, rc, stdout, stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.6)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--format", default="modelopt", choices=["modelopt", "compressed-tensors"])
    ap.add_argument("--device", default="cpu", help="where the quantization math runs (cpu, cuda)")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp folder)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="adallm-convert-bench-"))
    src, dst = work / "bf16", work / "nvfp4"
    try:
        t = time.time()
        sizes = build_source(src, args.size_gb, args.shards)
        print(f"synthetic BF16 checkpoint (random weights): {sum(sizes) / 1e9:.2f} GB in {len(sizes)} shards "
              f"(largest {max(sizes) / 1e6:.0f} MB), written in {time.time() - t:.0f} s")
        _, _, base_rss, _ = run_child([sys.executable, "-c", "import adallm_core.checkpoint.quantize, adallm_core.cli"])
        cmd = [sys.executable, "-m", "adallm_core.cli", "quantize", str(src), str(dst), "--format", args.format,
           "--device", args.device]
        wall, cpu, rss, proc = run_child(cmd)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        print(proc.stdout.strip())
        out_bytes = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
        print(f"throughput: {sum(sizes) / 1e9 / wall:.3f} GB/s of BF16 input (whole command, {wall:.1f} s incl. "
              f"start-up; {cpu:.1f} CPU-s on {os.cpu_count()} cores, so {sum(sizes) / 1e9 / cpu:.3f} GB per CPU-s); "
              f"output {out_bytes / 1e9:.3f} GB ({out_bytes / sum(sizes):.3f} of input)")
        print(f"peak RSS: {rss:.0f} MB (bound: 2 x largest shard = {2 * max(sizes) / 1e6:.0f} MB; "
              f"a child that only imports the converter: {base_rss:.0f} MB)")
        return 0 if rss < 2 * max(sizes) / 1e6 else 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
