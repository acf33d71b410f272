"""domainlm as a library: a non-editable wheel installed into a fresh virtualenv works from any
working directory (model sizes and the launch templates are package data, not repo files)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    # The wheel as `pip install domainlm` would build it (no build isolation: no network needed).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(REPO)], check=True, capture_output=True)
    wheels = list((tmp / "dist").glob("domainlm-*.whl"))
    assert len(wheels) == 1
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The dependencies come from the test environment (a plain path entry: its editable domainlm
    # finder, a .pth file there, is not processed), domainlm itself only from the wheel.
    site = Path(subprocess.check_output([str(venv / "bin" / "python"), "-c",
                                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheels[0])], check=True, capture_output=True)
    return venv


def run(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    return subprocess.run([str(venv / "bin" / "domainlm"), *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_wheel_runs_from_another_directory(installed, tmp_path):
    where = subprocess.check_output([str(installed / "bin" / "python"), "-c",
                                     "import domainlm.pretrain.config as c; print(c.__file__); print(c.MODEL_DIR)"],
                                    cwd=tmp_path, text=True).split()
    assert str(REPO) not in where[0] and "site-packages" in where[0]      # the wheel, not the checkout
    assert Path(where[1], "1B.yaml").is_file()
    r = run(installed, tmp_path, "pretrain", "--model.size", "1B", "--print-config")
    assert r.returncode == 0, r.stderr
    assert "num_layers: 16" in r.stdout and "hidden_size: 2048" in r.stdout
    r = run(installed, tmp_path, "launch", "pretrain", "--slurm", "--nodes", "2", "--gpus-per-node", "8",
            "--dry-run", "--", "--config", "my.yaml")
    assert r.returncode == 0, r.stderr
    words = r.stdout.split()
    sbatch = next(w for w in words if w.endswith("slurm.sbatch"))
    assert Path(sbatch).is_file() and "site-packages" in sbatch
    assert "--nodes=2" in words and "--gpus-per-node=8" in words
    r = run(installed, tmp_path, "pretrain", "--train.max-stepz", "3")
    assert r.returncode == 2 and "did you mean --train.max-steps?" in r.stderr
