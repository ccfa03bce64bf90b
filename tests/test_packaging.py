"""What a wheel carries: every package of the source tree, its data files, and the CUDA sources of csrc/ (as
adallm_core/csrc), so a non-editable install builds the CUDA decode kernel too (ops/cuda_gemv.py looks there first)."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOTS = ("adallm_core", "deployments", "jobs", "benchmarks")


def test_wheel_carries_every_package_and_the_cuda_sources(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".devrun", "__pycache__", "build", "*.egg-info", ".pytest_cache", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(tree)], check=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("adallm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    expected = {str(p.relative_to(ROOT)) for top in PACKAGE_ROOTS for p in (ROOT / top).rglob("*.py")
                if "__pycache__" not in p.parts}
    expected |= {str(p.relative_to(ROOT)) for top in PACKAGE_ROOTS for p in (ROOT / top).rglob("*.yaml")}
    expected |= {f"adallm_core/csrc/{p.name}" for p in (ROOT / "csrc").glob("*.cu")}
    assert "adallm_core/csrc/nvfp4_gemv.cu" in expected
    assert expected <= names, sorted(expected - names)
