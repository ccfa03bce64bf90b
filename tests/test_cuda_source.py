"""CI (no GPU): csrc/nvfp4_gemv.cu, the decode linear of 1-8 tokens, compiles with nvcc for Ada (sm_89, the product)
and Hopper (sm_90, the lent GPU) with the flags ops/cuda_gemv.py builds it with. Nothing Hopper-only (programmatic
dependent launch) may reach the sm_89 build unguarded: ptxas refuses it there. No variant spills registers to local
memory on either (ptxas -v): the kernel streams weights, and a spill inside its K loop is traffic beside them."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from adallm_core.ops import cuda_gemv

NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", [89, 90])
def test_decode_kernel_compiles_for(arch, tmp_path):
    done = subprocess.run([NVCC, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-O3", "-std=c++17", "-Xptxas", "-v",
                           "-c", str(cuda_gemv.SOURCE), "-o", str(tmp_path / "kernel.o")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", done.stderr)
    assert len(entries) == cuda_gemv.VARIANTS and {a for _, a in entries} == {str(arch)}, entries
    local = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    assert len(local) == len(entries), done.stderr
    spilling = [(name, frame) for (name, _), frame in zip(entries, local) if any(int(b) for b in frame)]
    assert not spilling, f"sm_{arch}: (kernel, (stack frame, spill stores, spill loads) bytes) {spilling}"
