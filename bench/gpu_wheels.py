"""The Python 3.12 wheels the GPU check carries to a GPU machine, fetched here and checked.

    .venv/bin/python bench/gpu_wheels.py download   # -> bench/work/gpu/wheels (`make gpu-wheels`)
    .venv/bin/python bench/gpu_wheels.py check      # what bench/gpu_check.sh --dry-run runs

The GPU machines (Python 3.12, x86-64, no network) have a CUDA torch, triton, transformers, peft
and the rest of IMAGE below, but not megatron-core, webdataset or orjson, which pretraining
imports; liger-kernel is the benchmark's baseline, installed for the benchmark run only. The
versions are the ones this checkout's venv tests with (liger-kernel: its newest), downloaded
without their dependencies; `check` proves every dependency is in the set or on the image.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
WHEELS = HERE / "work" / "gpu" / "wheels"
# Carried, and installed for every part of the check.
RUNTIME = ("megatron-core", "webdataset", "braceexpand", "orjson")
# Carried, installed only where the kernel benchmark runs.
BENCH_ONLY = {"liger-kernel": "0.8.5"}
PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
GLIBC_THERE = (2, 39)   # Ubuntu 24.04 (Python 3.12.3 there)
# The GPU image's Python packages (the device tool's KINDS.md, read 2026-11-17).
IMAGE = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split())


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    out = {p: metadata.version(p) for p in RUNTIME}
    out.update(BENCH_ONLY)
    return out


def download(dest: Path) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    want = pins()
    for f in dest.glob("*.whl"):   # one version of each: stale ones go
        name, version = f.name.split("-")[:2]
        if want.get(norm(name)) != version:
            f.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON,
           "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS], "-d", str(dest),
           *[f"{k}=={v}" for k, v in want.items()]]
    print(" ".join(cmd), flush=True)
    return subprocess.call(cmd)


def _tags_ok(filename: str) -> str | None:
    parts = filename[:-4].split("-")
    py, abi, plat = parts[-3], parts[-2], parts[-1]
    if not any(t in ("py3", "cp312", "py2.py3") for t in py.split(".")) and "py3" not in py:
        return f"{filename}: built for {py}, not Python {PYTHON}"
    if plat != "any":
        ok = False
        for p in plat.split("."):
            m = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", p)
            if m and (int(m.group(1)), int(m.group(2))) <= GLIBC_THERE:
                ok = True
            if p in ("manylinux2014_x86_64", "manylinux1_x86_64", "manylinux2010_x86_64"):
                ok = True
        if not ok:
            return f"{filename}: platform {plat} does not run on x86-64 glibc {GLIBC_THERE}"
    return None


def _requires(whl: Path) -> list[str]:
    from packaging.requirements import Requirement

    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    env = {"python_version": PYTHON, "python_full_version": f"{PYTHON}.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    out = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                out.append(norm(req.name))
    return out


def check(dest: Path) -> list[str]:
    """Problems with the wheel set (empty when it is complete and installable there)."""
    problems = []
    wheels = sorted(dest.glob("*.whl"))
    have: dict[str, list[str]] = {}
    for w in wheels:
        name, version = w.name.split("-")[:2]
        have.setdefault(norm(name), []).append(version)
        if (p := _tags_ok(w.name)):
            problems.append(p)
    for pkg, version in pins().items():
        got = have.get(pkg, [])
        if got != [version]:
            problems.append(f"{pkg}=={version}: {'missing' if not got else 'found ' + ', '.join(got)} in {dest} "
                            "(make gpu-wheels)")
    for w in wheels:
        for dep in _requires(w):
            if dep not in have and dep not in IMAGE:
                problems.append(f"{w.name} needs {dep}, neither in the wheel set nor on the GPU image")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["download", "check"])
    ap.add_argument("--dir", default=str(WHEELS))
    a = ap.parse_args(argv)
    dest = Path(a.dir)
    if a.action == "download":
        rc = download(dest)
        if rc:
            return rc
    problems = check(dest)
    size = sum(f.stat().st_size for f in dest.glob("*.whl")) if dest.is_dir() else 0
    for p in problems:
        print(f"wheel set: {p}", file=sys.stderr)
    names = ", ".join(sorted(f.name.split("-")[0] + " " + f.name.split("-")[1] for f in dest.glob("*.whl")))
    print(f"wheel set {dest}: {'OK' if not problems else 'INCOMPLETE'}, {size / 2**20:.1f} MiB ({names})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
