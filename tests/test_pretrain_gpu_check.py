"""The GPU check's preparation, tested where no GPU is: the wheel-set check (bench/gpu_wheels.py)
refuses what would not install on the GPU machines, the carried bitsandbytes is slimmed to the
image's CUDA, part c's conversations fit their sequence, and the script's arguments."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_wheels  # noqa: E402


def _wheel(d: Path, filename: str, requires: list[str], files: dict[str, bytes] | None = None) -> None:
    name, version = filename.split("-")[:2]
    d.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(d / filename, "w") as z:
        meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        meta += [f"Requires-Dist: {r}" for r in requires]
        z.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(meta) + "\n")
        record = [f"{name}-{version}.dist-info/METADATA,,"]
        for path, data in (files or {}).items():
            z.writestr(path, data)
            record.append(f"{path},{gpu_wheels._record_hash(data)},{len(data)}")
        z.writestr(f"{name}-{version}.dist-info/RECORD", "\n".join(record + [f"{name}-{version}.dist-info/RECORD,,"]) + "\n")


def _complete(d: Path) -> None:
    for pkg, version in gpu_wheels.pins().items():
        _wheel(d, f"{pkg.replace('-', '_')}-{version}-py3-none-any.whl", ["torch>=2.6", "numpy"])
    for pkg, version in gpu_wheels.finetune_pins().items():
        files = {f"bitsandbytes/{gpu_wheels.BNB_NEEDED}": b"\x7fELF"} if pkg == "bitsandbytes" else None
        _wheel(d / gpu_wheels.FINETUNE_DIR, f"{pkg.replace('-', '_')}-{version}-py3-none-any.whl",
               ["transformers>=4.56.2", "pyarrow>=21", "liger-kernel"], files)
    for pkg, version in gpu_wheels.serve_pins().items():
        _wheel(d / gpu_wheels.SERVE_DIR, f"{pkg.replace('-', '_')}-{version}-py3-none-any.whl",
               ["anyio>=4", "h11>=0.8", "pydantic>=2", "orjson"])


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


def test_the_finetune_group_is_checked_apart(tmp_path):
    """Part c's wheels live in wheels/finetune: missing there is named, and they may need the first
    group's wheels (installed with them) but the first group may not need theirs."""
    _complete(tmp_path)
    unverified: list[str] = []
    assert gpu_wheels.check(tmp_path, unverified) == []
    assert "pyarrow>=21" in unverified              # no version of the image's pyarrow on record
    next((tmp_path / "finetune").glob("trl-*.whl")).unlink()
    _wheel(tmp_path, "extra-1.0-py3-none-any.whl", ["datasets"])
    problems = gpu_wheels.check(tmp_path)
    assert any(p.startswith("trl==") and "missing" in p and p.count("finetune") for p in problems), problems
    assert any("extra-1.0-py3-none-any.whl needs datasets" in p for p in problems), problems


def test_the_serve_group_is_checked_apart(tmp_path):
    """Part d's wheels live in wheels/serve: missing there is named, and a wheel of the first group
    may not need theirs (they are installed for part d alone)."""
    _complete(tmp_path)
    assert gpu_wheels.check(tmp_path) == []
    next((tmp_path / "serve").glob("uvicorn-*.whl")).unlink()
    _wheel(tmp_path, "extra-1.0-py3-none-any.whl", ["fastapi"])
    problems = gpu_wheels.check(tmp_path)
    assert any(p.startswith("uvicorn==") and "missing" in p and "serve" in p for p in problems), problems
    assert any("extra-1.0-py3-none-any.whl needs fastapi" in p for p in problems), problems


def test_a_range_that_excludes_the_image_version_is_named(tmp_path):
    _complete(tmp_path)
    _wheel(tmp_path / "finetune", "extra-1.0-py3-none-any.whl", ["transformers>=6"])
    problems = gpu_wheels.check(tmp_path)
    assert len(problems) == 1 and "needs transformers>=6, and transformers 5.17.0 is what the GPU image has" \
        in problems[0], problems


def test_bitsandbytes_is_slimmed_to_the_image_cuda(tmp_path):
    libs = ["cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm64", "xpu2025"]
    d = tmp_path / "finetune"
    _wheel(d, "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl", ["torch>=2.4"],
           {"bitsandbytes/__init__.py": b"", **{f"bitsandbytes/libbitsandbytes_{v}.so": v.encode() * 100 for v in libs}})
    whl = next(d.glob("bitsandbytes-*.whl"))
    gpu_wheels.slim_bitsandbytes(whl)
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
        assert z.read("bitsandbytes/libbitsandbytes_cuda130.so") == b"cuda130" * 100
    assert {n for n in names if n.endswith(".so")} == {"bitsandbytes/libbitsandbytes_cpu.so",
                                                       "bitsandbytes/libbitsandbytes_cuda130.so"}
    assert "cuda118" not in record and "libbitsandbytes_cuda130.so,sha256=" in record
    gpu_wheels.slim_bitsandbytes(whl)               # a slim wheel stays as it is
    assert set(zipfile.ZipFile(whl).namelist()) == names
    # one without the CUDA 13.0 library is refused
    _complete(tmp_path)
    _wheel(d, "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl", ["torch>=2.4"], {"bitsandbytes/x.py": b""})
    problems = gpu_wheels.check(tmp_path)
    assert any(f"lacks {gpu_wheels.BNB_NEEDED}" in p for p in problems), problems


def test_part_c_conversations_fit_their_sequence(tokenizer_dir, pydoc_corpus):
    """bench/finetune.py --gpu's conversations: cut to the sequence with the chat template applied
    (ours drops a longer sample, TRL cuts it), the same length for every run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_finetune", REPO / "bench/finetune.py")
    bench_finetune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_finetune)
    tok = bench_finetune.load_tokenizer(Path(tokenizer_dir))
    for corpus in (None, pydoc_corpus / "corpus.jsonl"):
        convs, lengths = bench_finetune.long_conversations(tok, corpus, 6, 512)
        assert len(convs) == 6 and all(c[1]["role"] == "assistant" and c[1]["content"] for c in convs)
        assert all(480 <= n <= 512 - 16 for n in lengths), lengths


def test_gpu_check_script_arguments():
    script = REPO / "bench/gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run(["bash", str(script), "--part", "e"], capture_output=True, text=True)
    assert r.returncode == 2 and "--part a, b, c, d or all" in r.stderr
    r = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--dry-run" in r.stdout
