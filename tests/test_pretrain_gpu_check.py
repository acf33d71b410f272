"""The GPU check's preparation, tested where no GPU is: the wheel-set check (bench/gpu_wheels.py)
refuses what would not install on the GPU machines, and the script's arguments."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_wheels  # noqa: E402


def _wheel(d: Path, filename: str, requires: list[str]) -> None:
    name, version = filename.split("-")[:2]
    with zipfile.ZipFile(d / filename, "w") as z:
        meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        meta += [f"Requires-Dist: {r}" for r in requires]
        z.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(meta) + "\n")


def _complete(d: Path) -> None:
    for pkg, version in gpu_wheels.pins().items():
        _wheel(d, f"{pkg.replace('-', '_')}-{version}-py3-none-any.whl", ["torch>=2.6", "numpy"])


def test_a_complete_wheel_set_passes(tmp_path):
    _complete(tmp_path)
    assert gpu_wheels.check(tmp_path) == []


@pytest.mark.parametrize("filename,requires,problem", [
    ("extra-1.0-cp311-cp311-manylinux_2_17_x86_64.whl", [], "built for cp311"),
    ("extra-1.0-cp312-cp312-manylinux_2_40_x86_64.whl", [], "does not run on x86-64 glibc"),
    ("extra-1.0-cp312-cp312-manylinux_2_28_aarch64.whl", [], "does not run on x86-64"),
    ("extra-1.0-py3-none-any.whl", ["apache-beam>=2.60"], "needs apache-beam, neither in the wheel set nor on the GPU image"),
])
def test_what_would_not_install_there_is_named(tmp_path, filename, requires, problem):
    _complete(tmp_path)
    _wheel(tmp_path, filename, requires + ['pywin32; sys_platform == "win32"', 'pytest; extra == "dev"'])
    problems = gpu_wheels.check(tmp_path)
    assert len(problems) == 1 and problem in problems[0], problems


def test_a_missing_or_second_version_is_named(tmp_path):
    _complete(tmp_path)
    liger = next(tmp_path.glob("liger_kernel-*.whl"))
    liger.unlink()
    _wheel(tmp_path, "orjson-0.1-py3-none-any.whl", [])
    problems = gpu_wheels.check(tmp_path)
    assert any(p.startswith("liger-kernel==") and "missing" in p for p in problems)
    assert any(p.startswith("orjson==") and "found" in p for p in problems)


def test_gpu_check_script_arguments():
    script = REPO / "bench/gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run(["bash", str(script), "--part", "c"], capture_output=True, text=True)
    assert r.returncode == 2 and "--part a, b or all" in r.stderr
    r = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--dry-run" in r.stdout
