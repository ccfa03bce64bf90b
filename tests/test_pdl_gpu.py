"""Programmatic dependent launch (ops/pdl.py) on Hopper and later GPUs.

Chains of dependent decode kernels (each reads the output of the one before), captured in a CUDA graph as the
engine's decode steps are, must give the same bits as the same chain launched plainly without PDL. A kernel that
read its input or wrote its output before `griddepcontrol.wait` would see the previous replay's values instead.
"""
from __future__ import annotations

import kernel_cases as kc
import pytest
import torch

from adallm_core.ops import pdl

DEV = "cuda"
HIDDEN, LAYERS = 2048, 6


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= pdl.MIN_CAPABILITY


def _layers(tile_major: bool):
    def weight(n):
        w = kc.random_nvfp4(n, HIDDEN, DEV, scale_exp=(-6.0, -4.0)).in_kernel_order()
        return w.in_tile_major() if tile_major else w

    return [(torch.rand(HIDDEN, device=DEV, dtype=torch.bfloat16) + 0.5, weight(2 * HIDDEN), weight(HIDDEN))
            for _ in range(LAYERS)]


def _decoder(x, layers, fused: bool):
    """What a decode step's MLP halves do: residual add + RMSNorm, gate_up, SiLU gating (in gate_up's epilogue when
    fused), down."""
    from adallm_core.ops.triton import add_rms_norm, nvfp4_linear, silu_and_mul
    from adallm_core.ops.triton.nvfp4_prefill import nvfp4_gated_linear

    h, residual = x, torch.zeros_like(x)
    for norm, gate_up, down in layers:
        normed, residual = add_rms_norm(h, residual, norm, 1e-6)
        y = nvfp4_gated_linear(normed, gate_up, "silu") if fused else silu_and_mul(nvfp4_linear(normed, gate_up))
        h = nvfp4_linear(y, down)
    return h + residual


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="programmatic dependent launch needs compute capability >= 9.0")
@pytest.mark.parametrize("fused", [False, True], ids=["act_kernel", "act_fused"])
@pytest.mark.parametrize("m,tile_major", [(1, True), (4, True), (3, False), (8, True), (12, True), (20, True)],
                         ids=["cuda_1", "cuda_4", "triton_3", "cuda_8", "triton_12", "plain_20"])  # plain above 16
def test_dependent_launches_in_a_graph_give_the_plain_launches_bits(m, tile_major, fused, monkeypatch):
    """The CUDA linear's grids here are of one wave (gate_up 128 blocks of 32 rows, down 64), so with PDL they take
    one block an SM (csrc/nvfp4_gemv.cu); fused, gate|up with its activation is followed directly by down."""
    from adallm_core.ops import cuda_gemv

    if fused and not tile_major:
        pytest.skip("row-major weights: with PDL the Triton gate|up keeps its activation kernel, without it fuses")
    layers = _layers(tile_major)
    x = torch.empty(m, HIDDEN, device=DEV, dtype=torch.bfloat16)
    assert pdl.enabled(x.device, m) == (m <= pdl.MAX_TOKENS)
    assert cuda_gemv.takes(x, layers[0][1]) == (tile_major and m <= cuda_gemv.DECODE_TOKENS)
    x.normal_()
    _decoder(x, layers, fused)  # compile and set up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _decoder(x, layers, fused)
    for _ in range(3):
        x.normal_()
        out.fill_(float("nan"))
        graph.replay()
        with monkeypatch.context() as env:
            env.setenv("ADALLM_DISABLE_PDL", "1")
            assert not pdl.enabled(x.device, m)
            ref = _decoder(x, layers, fused)
        torch.cuda.synchronize()
        assert torch.isfinite(ref).all()
        assert torch.equal(out, ref)


def test_pdl_is_off_where_it_cannot_run(monkeypatch):
    """The interpreter, the CPU, steps over MAX_TOKENS and ADALLM_DISABLE_PDL=1 launch plainly; Hopper turns it on
    by default."""
    assert not pdl.enabled(torch.device("cpu"))
    assert pdl.triton_args(torch.device("cpu"), 1) == {"PDL": False}
    if _hopper():
        assert pdl.triton_args(torch.device(DEV), pdl.MAX_TOKENS) == {"PDL": True, "launch_pdl": True}
        assert pdl.triton_args(torch.device(DEV), pdl.MAX_TOKENS + 1) == {"PDL": False}
        monkeypatch.setenv("ADALLM_DISABLE_PDL", "1")
        assert not pdl.enabled(torch.device(DEV))
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.delenv("ADALLM_DISABLE_PDL")
        assert not pdl.enabled(torch.device(DEV))
