"""The Python 3.12 wheels the GPU check carries to a GPU machine, fetched here and checked.

    .venv/bin/python bench/gpu_wheels.py download   # -> bench/work/gpu/wheels (`make gpu-wheels`)
    .venv/bin/python bench/gpu_wheels.py check      # what bench/gpu_check.sh --dry-run runs

The GPU machines (Python 3.12, x86-64, no network) have a CUDA torch, triton, transformers, peft
and the rest of IMAGE below, but not megatron-core, webdataset or orjson, which pretraining
imports; liger-kernel is the benchmark's baseline, installed for the benchmark run only. The
versions are the ones this checkout's venv tests with (liger-kernel: its newest), downloaded
without their dependencies; `check` proves every dependency is in the set or on the image, and
that no pinned range excludes a version the image is known to have (IMAGE_VERSIONS).

A second group, in wheels/finetune, is installed only for the fine-tuning benchmark (part c of
bench/gpu_check.sh): TRL, its baseline, with datasets, dill and multiprocess, which the image
lacks, and bitsandbytes for QLoRA. bitsandbytes ships one 43 MB wheel with a native library for
every CUDA 11.8-13.2, ROCm and XPU release; the image's torch is CUDA 13, so the carried wheel is
that wheel less the other libraries (slimmed here after the download, RECORD rewritten to match).

A third group, in wheels/serve, is installed only for the serving benchmark (part d): FastAPI,
Starlette, pydantic and uvicorn, which `domainlm serve` needs and the image lacks.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
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
# Carried in wheels/finetune, installed only where the fine-tuning benchmark runs (part c): the
# versions this venv tests with, and bitsandbytes (not in the venv: QLoRA needs a GPU) at its newest.
FINETUNE = ("trl", "datasets", "dill", "multiprocess")
FINETUNE_EXTRA = {"bitsandbytes": "0.50.2"}
FINETUNE_DIR = "finetune"
# Carried in wheels/serve, installed only where the serving benchmark runs (part d, issue 21): the
# server's web stack, which the image lacks (it has anyio, h11, click, httpx), at this venv's versions.
SERVE = ("fastapi", "starlette", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "uvicorn",
         "opentelemetry-api")
SERVE_DIR = "serve"
# The native libraries the carried bitsandbytes keeps: CPU, and CUDA 13.0 for the image's torch 2.11+cu130.
BNB_KEEP = re.compile(r"libbitsandbytes_(cpu|cuda130)\.so")
BNB_NEEDED = "libbitsandbytes_cuda130.so"
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
# Versions seen there (KINDS.md's pip list and the image's torch build); a carried wheel's range must admit them.
# The image's other packages (pyarrow, fsspec, pandas, ...) have no version on record: `check` lists the
# ranges it could not hold against one, and bench/gpu_check.sh part c prints what the machine has.
IMAGE_VERSIONS = {"torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0", "peft": "0.21.0",
                  "accelerate": "1.15.0", "huggingface-hub": "1.33.0", "tokenizers": "0.23.2", "safetensors": "0.8.0",
                  "numpy": "2.5.2", "sentencepiece": "0.2.2"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    """The wheels of every part (dest itself)."""
    out = {p: metadata.version(p) for p in RUNTIME}
    out.update(BENCH_ONLY)
    return out


def finetune_pins() -> dict[str, str]:
    """The fine-tuning benchmark's wheels (dest/finetune)."""
    out = {p: metadata.version(p) for p in FINETUNE}
    out.update(FINETUNE_EXTRA)
    return out


def serve_pins() -> dict[str, str]:
    """The serving benchmark's wheels (dest/serve)."""
    return {p: metadata.version(p) for p in SERVE}


def groups(dest: Path) -> list[tuple[str, Path, dict[str, str]]]:
    return [("every part", dest, pins()), ("part c (fine-tuning)", dest / FINETUNE_DIR, finetune_pins()),
            ("part d (serving)", dest / SERVE_DIR, serve_pins())]


def download(dest: Path) -> int:
    for _, d, want in groups(dest):
        d.mkdir(parents=True, exist_ok=True)
        for f in d.glob("*.whl"):   # one version of each: stale ones go
            name, version = f.name.split("-")[:2]
            if want.get(norm(name)) != version:
                f.unlink()
        have = _versions(d)         # present ones stay (pip would fetch the slimmed bitsandbytes again)
        missing = [f"{k}=={v}" for k, v in want.items() if have.get(k) != [v]]
        if not missing:
            continue
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON,
               "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS], "-d", str(d), *missing]
        print(" ".join(cmd), flush=True)
        if (rc := subprocess.call(cmd)):
            return rc
    for whl in (dest / FINETUNE_DIR).glob("bitsandbytes-*.whl"):
        slim_bitsandbytes(whl)
    return 0


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim_bitsandbytes(whl: Path) -> None:
    """Drop the native libraries the image cannot load (other CUDA majors, ROCm, XPU) from the
    bitsandbytes wheel, in place, and the RECORD lines that name them; a slim wheel stays as it is."""
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        drop = {n for n in names if re.fullmatch(r"bitsandbytes/libbitsandbytes_\w+\.so", n)
                and not BNB_KEEP.fullmatch(n.rsplit("/", 1)[1])}
        if not drop:
            return
        tmp = whl.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for info in z.infolist():
                if info.filename in drop:
                    continue
                data = z.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = [ln for ln in data.decode().splitlines() if ln.split(",", 1)[0] not in drop]
                    data = ("\n".join(lines) + "\n").encode()
                out.writestr(info, data)
    before = whl.stat().st_size
    tmp.replace(whl)
    print(f"{whl.name}: kept {', '.join(sorted(n.rsplit('/', 1)[1] for n in names if n not in drop and n.endswith('.so')))}"
          f"; dropped {len(drop)} other native libraries ({before / 2**20:.1f} -> {whl.stat().st_size / 2**20:.1f} MiB)")


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


def _requires(whl: Path) -> list:
    """The wheel's requirements that apply there (packaging Requirements)."""
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
                out.append(req)
    return out


def _versions(d: Path) -> dict[str, list[str]]:
    have: dict[str, list[str]] = {}
    for w in sorted(d.glob("*.whl")):
        name, version = w.name.split("-")[:2]
        have.setdefault(norm(name), []).append(version)
    return have


def check(dest: Path, unverified: list[str] | None = None) -> list[str]:
    """Problems with the wheel set (empty when it is complete and installable there). Ranges on
    image packages of no known version are appended to `unverified` when given."""
    problems = []
    base = _versions(dest)
    for _, d, want in groups(dest):
        wheels = sorted(d.glob("*.whl"))
        have = _versions(d)
        # parts c and d install their group on top of the first; the first is installed alone
        visible = have if d == dest else {**base, **have}
        for w in wheels:
            if (p := _tags_ok(w.name)):
                problems.append(p)
        for pkg, version in want.items():
            got = have.get(pkg, [])
            if got != [version]:
                problems.append(f"{pkg}=={version}: {'missing' if not got else 'found ' + ', '.join(got)} in {d} "
                                "(make gpu-wheels)")
        for w in wheels:
            for req in _requires(w):
                dep = norm(req.name)
                if dep in visible:
                    there = visible[dep][0]
                elif dep in IMAGE:
                    there = IMAGE_VERSIONS.get(dep)
                    if there is None:
                        if req.specifier and unverified is not None and f"{dep}{req.specifier}" not in unverified:
                            unverified.append(f"{dep}{req.specifier}")
                        continue
                else:
                    problems.append(f"{w.name} needs {dep}, neither in the wheel set nor on the GPU image")
                    continue
                if req.specifier and not req.specifier.contains(there, prereleases=True):
                    problems.append(f"{w.name} needs {dep}{req.specifier}, and {dep} {there} is what "
                                    f"{'the wheel set' if dep in visible else 'the GPU image'} has")
        for w in d.glob("bitsandbytes-*.whl"):
            with zipfile.ZipFile(w) as z:
                if f"bitsandbytes/{BNB_NEEDED}" not in z.namelist():
                    problems.append(f"{w.name} lacks {BNB_NEEDED}, the library for the image's CUDA 13 torch")
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
    unverified: list[str] = []
    problems = check(dest, unverified)
    for p in problems:
        print(f"wheel set: {p}", file=sys.stderr)
    for label, d, _ in groups(dest):
        files = sorted(d.glob("*.whl")) if d.is_dir() else []
        size = sum(f.stat().st_size for f in files)
        names = ", ".join(f"{f.name.split('-')[0]} {f.name.split('-')[1]} ({f.stat().st_size / 2**20:.1f})" for f in files)
        print(f"wheel set {d} ({label}): {'OK' if not problems else 'INCOMPLETE'}, {size / 2**20:.1f} MiB: {names}")
    if unverified:
        print("ranges on image packages of no recorded version (part c prints theirs): " + ", ".join(sorted(unverified)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
