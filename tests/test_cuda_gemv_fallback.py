"""The CUDA decode kernel is optional: where it cannot be built or run, load() says why once and returns None, and
the op's choice (cuda_gemv.takes) then leaves every step to the Triton kernel."""
import logging
import os
import time
from pathlib import Path

import torch

from adallm_core.ops import cuda_gemv


def _fresh(monkeypatch):
    monkeypatch.setattr(cuda_gemv, "_module", None)
    monkeypatch.setattr(cuda_gemv, "_error", None)


def test_switched_off_by_the_environment(monkeypatch, caplog):
    _fresh(monkeypatch)
    monkeypatch.setenv("ADALLM_DISABLE_CUDA_GEMV", "1")
    with caplog.at_level(logging.WARNING, logger=cuda_gemv.__name__):
        assert cuda_gemv.load() is None
        assert cuda_gemv.load() is None  # asked again: no second build, no second warning
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "ADALLM_DISABLE_CUDA_GEMV=1" in warnings[0]


def test_a_failed_build_is_named_and_leaves_the_arch_list_alone(monkeypatch, caplog, tmp_path):
    _fresh(monkeypatch)
    monkeypatch.delenv("ADALLM_DISABLE_CUDA_GEMV", raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    monkeypatch.setattr(cuda_gemv, "SOURCE", Path(tmp_path) / "missing.cu")
    with caplog.at_level(logging.WARNING, logger=cuda_gemv.__name__):
        assert cuda_gemv.load() is None
    assert "FileNotFoundError" in cuda_gemv._error and "missing.cu" in cuda_gemv._error
    assert any("Triton one runs every M" in r.getMessage() for r in caplog.records)
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.6"


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_named(tmp_path, caplog):
    """torch waits forever on its build lock: one older than any build is removed, a fresh one kept and named."""
    lock = tmp_path / "lock"
    lock.touch()
    with caplog.at_level(logging.WARNING, logger=cuda_gemv.__name__):
        cuda_gemv.clear_stale_lock(tmp_path)
    assert lock.exists() and "waiting for another process's build" in caplog.text and str(lock) in caplog.text
    old = time.time() - cuda_gemv.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING, logger=cuda_gemv.__name__):
        cuda_gemv.clear_stale_lock(tmp_path)
    assert not lock.exists() and "did not finish" in caplog.text
    cuda_gemv.clear_stale_lock(tmp_path)  # no lock: nothing to do


def test_the_build_folder_is_per_torch_and_python_under_the_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = cuda_gemv.build_directory()
    assert folder.parent.parent == tmp_path and folder.name == cuda_gemv.EXTENSION
    assert torch.__version__ in folder.parent.name
