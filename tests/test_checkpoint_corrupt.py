"""Damaged checkpoints: every file of a checkpoint is recorded (size, sha256) when written; resume
and `convert to-hf` check the one they load, name the damaged file, fall back to the previous
intact checkpoint with a warning, and stop with one line when none is intact."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import run_cli
from tests.test_pretrain import args, losses, shards  # noqa: F401 (fixture)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _truncate(path, keep: float = 0.5) -> int:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return len(data)


@pytest.fixture(scope="module")
def run4(tmp_path_factory, tokenizer_dir, shards):  # noqa: F811
    """A tiny run saved at steps 2 and 4, untouched (tests copy it)."""
    ckpt = tmp_path_factory.mktemp("run4") / "ckpt"
    from domainlm.cli import main

    assert main([str(a) for a in args(tokenizer_dir, shards, ckpt, "--train.max-steps", 4,
                                      "--checkpoint.save-every", 2)]) == 0
    return ckpt


def test_checksums_are_written_and_catch_changed_bytes(run4, tmp_path):
    from domainlm.pretrain import checkpoint

    ckpt = tmp_path / "c"
    shutil.copytree(run4, ckpt)
    it = ckpt / "iter_0000004"
    recorded = json.loads((it / "checksums.json").read_text())
    files = sorted(p.name for p in it.iterdir() if p.is_file() and p.name != "checksums.json")
    assert recorded["algorithm"] == "sha256" and sorted(recorded["files"]) == files
    assert any(n.endswith(".distcp") for n in files) and "metadata.json" in files
    assert checkpoint.verify(it) == []
    data = bytearray((it / "common.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF                       # same size, one byte changed
    (it / "common.pt").write_bytes(bytes(data))
    assert checkpoint.verify(it) == ["common.pt: contents differ from when written (sha256)"]
    (it / "common.pt").unlink()
    assert checkpoint.verify(it) == ["common.pt: missing"]
    assert checkpoint.verify(ckpt / "iter_0000002") == []


def test_damaged_latest_falls_back_to_the_previous_checkpoint(run4, tokenizer_dir, shards, tmp_path, capsys):  # noqa: F811
    ckpt = tmp_path / "c"
    shutil.copytree(run4, ckpt)
    before = losses(ckpt)
    distcp = sorted((ckpt / "iter_0000004").glob("*.distcp"))[0]
    size = _truncate(distcp)
    code, _, err = run_cli(args(tokenizer_dir, shards, ckpt, "--train.max-steps", 5), capsys)
    assert code == 0, err
    assert f"iter_0000004 is damaged: {distcp.name}: {size // 2:,} bytes, {size:,} when written" in err
    assert "resuming from iter_0000002 (step 2) instead of iter_0000004: 2 steps are redone" in err
    after = losses(ckpt)
    assert sorted(after) == [1, 2, 3, 4, 5]
    # Steps 3 and 4 redone from the intact checkpoint give the losses they gave the first time.
    assert max(abs(after[s] - before[s]) for s in (3, 4)) <= 1e-6
    assert (ckpt / "latest").read_text().strip() == "iter_0000005"


def test_no_intact_checkpoint_is_one_line(run4, tokenizer_dir, shards, tmp_path, capsys):  # noqa: F811
    import torch.distributed as dist

    ckpt = tmp_path / "c"
    shutil.copytree(run4, ckpt)
    for it in ("iter_0000002", "iter_0000004"):
        _truncate(sorted((ckpt / it).glob("*.distcp"))[0])
    code, _, err = run_cli(args(tokenizer_dir, shards, ckpt, "--train.max-steps", 5), capsys)
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert "holds no intact checkpoint to load: iter_0000004 (__" in line and "iter_0000002 (__" in line
    assert "Traceback" not in err and not dist.is_initialized()


def test_a_damaged_checkpoint_without_checksums_is_one_line(run4, tokenizer_dir, shards, tmp_path, capsys):  # noqa: F811
    """Checkpoints written before checksums were recorded: the load itself fails; one line."""
    ckpt = tmp_path / "c"
    shutil.copytree(run4, ckpt)
    for it in ("iter_0000002", "iter_0000004"):
        (ckpt / it / "checksums.json").unlink()
    _truncate(sorted((ckpt / "iter_0000004").glob("*.distcp"))[0])
    code, _, err = run_cli(args(tokenizer_dir, shards, ckpt, "--train.max-steps", 5), capsys)
    assert code == 2, err
    assert "iter_0000004: cannot be read (" in err and "the checkpoint is damaged" in err
    assert "Traceback" not in err


def test_convert_verifies_the_checkpoint_it_exports(run4, tmp_path, capsys):
    ckpt = tmp_path / "c"
    shutil.copytree(run4, ckpt)
    distcp = sorted((ckpt / "iter_0000004").glob("*.distcp"))[0]
    _truncate(distcp)
    # Asked for by number: refused, naming the file.
    code, _, err = run_cli(["convert", "to-hf", "--checkpoint", str(ckpt), "--iteration", "4",
                            "--output", str(tmp_path / "hf4")], capsys)
    assert code == 2 and f"iter_0000004 is damaged: {distcp.name}" in err and "Traceback" not in err, err
    assert not (tmp_path / "hf4").exists()
    # `latest`: the previous intact checkpoint is exported, with the warning.
    code, _, err = run_cli(["convert", "to-hf", "--checkpoint", str(ckpt), "--output", str(tmp_path / "hf"),
                            "--checks.new-tokens", "4"], capsys)
    assert code == 0, err
    assert f"iter_0000004 is damaged: {distcp.name}" in err and "exporting iter_0000002" in err
    manifest = json.loads((tmp_path / "hf" / "manifest.json").read_text())
    assert manifest["source"]["iteration"] == 2
