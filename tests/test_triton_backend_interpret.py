"""CI (no GPU): the whole 'triton' kernel backend, under the Triton CPU interpreter, runs each tiny model's prefill
and decode steps (the runner's own step, every kernel the GPU launches but the CUDA decode kernel's) and its logits
match transformers' as closely as the reference backend's do (tests/test_models_parity.py: 1e-4 in fp32). In a
subprocess (tests/interpret_model.py; tests/interpreter.py says why)."""
from __future__ import annotations

from pathlib import Path

import pytest
from interpreter import run_interpreted
from test_models_parity import DECODE_STEPS, PROMPT_LENS

from adallm_core.testing import FAMILIES

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("interpret_model.py")


@pytest.fixture(scope="module")
def results() -> dict:
    return run_interpreted(SCRIPT, timeout=600)


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_backend_logits_match_transformers(results, family):
    r = results[family]
    kernels = {"nvfp4_linear", "attention", "qk_norm_rope_attention", "rms_norm", "moe"}
    assert r["backend"] == "triton" and kernels <= set(r["triton_ops"]), r
    # every sequence's logits at each step; logits with some spread: a zero model would pass anything
    assert r["steps"] == len(PROMPT_LENS) * (DECODE_STEPS + 1) and r["largest"] > 0.5, r
    assert r["diff"] <= 1e-4, r
