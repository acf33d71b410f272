"""`domainlm launch` and launch/: torchrun's stop flags, a graceful stop of 2 CPU ranks under
torchrun by SIGTERM and SIGUSR1, and the Slurm file's GPU count."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.test_pretrain import args, losses, shards  # noqa: F401 (fixture)

SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def _ns(**kw) -> argparse.Namespace:
    base = dict(nodes=1, gpus_per_node=2, cpu=True, slurm=False, rdzv_endpoint=None, rdzv_id="r",
                stop_timeout=600, dry_run=True, stage_args=["--", "--config", "c.yaml"])
    return argparse.Namespace(**{**base, **kw})


def test_torchrun_gets_the_stop_flags_it_has():
    from domainlm.launch.command import build_command, stop_flags, torchrun_options

    # This torch's torchrun (the flag exists from torch 2.9, the timeout from 2.12).
    have = torchrun_options()
    cmd, env = build_command(_ns(stop_timeout=900))
    assert ("--signals-to-handle=" + SIGNALS in cmd) == ("--signals-to-handle" in have)
    assert ("--shutdown-timeout=900" in cmd) == ("--shutdown-timeout" in have)
    # A torch with both, and one with neither: no unknown flag is ever passed, the gap is said.
    both = {"--signals-to-handle", "--shutdown-timeout", "--nnodes"}
    cmd, _ = build_command(_ns(stop_timeout=900), options=both)
    assert cmd[3:5] == ["--signals-to-handle=" + SIGNALS, "--shutdown-timeout=900"]
    cmd, _ = build_command(_ns(), options={"--nnodes"})
    assert not any(w.startswith(("--signals-to-handle", "--shutdown-timeout")) for w in cmd)
    flags, notes = stop_flags(600, {"--nnodes"})
    assert flags == [] and "SIGUSR1" in notes[0] and "30 s" in notes[1]
    # The shell scripts ask the same function.
    out = subprocess.run([sys.executable, "-m", "domainlm.launch.command", "torchrun-flags", "77"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.split() == stop_flags(77)[0]


def _wait_steps(ckpt: Path, proc, log: Path, n: int, timeout: float = 240) -> None:
    metrics = ckpt / "logs/metrics.jsonl"
    deadline = time.time() + timeout
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= n):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def _children(pid: int, needle: bytes) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
                if int(stat[stat.rindex(")") + 2:].split()[1]) == pid and \
                        needle in Path(f"/proc/{name}/cmdline").read_bytes():
                    out.append(int(name))
            except (OSError, ValueError):
                pass
    return out


@pytest.mark.parametrize("how", ["SIGTERM to domainlm launch", "SIGUSR1 to the torchrun agent"])
def test_a_stop_signal_saves_a_checkpoint_on_every_rank(how, tokenizer_dir, shards, tmp_path):  # noqa: F811
    """2 CPU ranks (TP=2) under torchrun; a stop signal mid-run: the step finishes, every rank
    writes its part of the checkpoint and exits 0, and resuming continues from it."""
    from domainlm.launch.command import torchrun_options, worker_pids
    from domainlm.pretrain import checkpoint

    if how.startswith("SIGUSR1") and "--signals-to-handle" not in torchrun_options():
        pytest.skip("this torch's torchrun cannot forward SIGUSR1 (torch >= 2.9 can); domainlm launch says so")
    ckpt, log = tmp_path / "ckpt", tmp_path / "launch.log"
    cli = args(tokenizer_dir, shards, ckpt, "--train.max-steps", 400, "--parallel.tensor", 2)[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "domainlm.cli", "launch", "pretrain", "--cpu", "--gpus-per-node",
                             "2", "--stop-timeout", "120", "--", *cli],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        _wait_steps(ckpt, proc, log, 3)
        agent = _children(proc.pid, b"torch.distributed.run")
        assert len(agent) == 1 and len(worker_pids(agent[0])) == 2
        if how.startswith("SIGTERM"):
            proc.send_signal(signal.SIGTERM)
            sig, expected_rc = "SIGTERM", 0
        else:
            os.kill(agent[0], signal.SIGUSR1)
            # torchrun forwards SIGUSR1 (--signals-to-handle), waits for the ranks, then reports
            # the signal it got: its exit status is 1 by design (SignalException), after the save.
            sig, expected_rc = "SIGUSR1", 1
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == expected_rc, text[-3000:]
    assert f"stopped by {sig}; rerun to resume" in text, text[-3000:]
    assert "forcefully exiting" not in text                                   # no SIGKILL deadline hit
    # No rank failed; the one traceback of the agent case is torchrun reporting its signal.
    assert text.count("Traceback") == (0 if expected_rc == 0 else 1)
    assert expected_rc == 0 or "SignalException: Process" in text
    stopped = int((ckpt / "latest").read_text().strip()[5:])
    assert 3 <= stopped < 400 and max(losses(ckpt)) == stopped
    assert checkpoint.verify(ckpt / checkpoint.iter_name(stopped)) == []      # both ranks' files, complete
    state = json.loads((ckpt / "manifest.json").read_text())
    assert state["latest"] == checkpoint.iter_name(stopped)


# -- Slurm ------------------------------------------------------------------------------------


@pytest.fixture
def fake_slurm(tmp_path):
    """srun / scontrol / nvidia-smi stand-ins that record their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\necho "srun $*" >> "$FAKE_LOG"\n')
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\nif [[ $1 == show ]]; then echo node001; echo node002; '
                                      'else echo "scontrol $*" >> "$FAKE_LOG"; fi\n')
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\nexit 9\n")   # no GPU on the batch host
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _sbatch(fake_slurm, tmp_path, args=("--config", "c.yaml"), **env) -> tuple[int, str, str]:
    record = tmp_path / "calls.log"
    record.unlink(missing_ok=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "CUDA_VISIBLE"))}
    full = {**clean, "PATH": f"{fake_slurm}:{os.environ['PATH']}", "FAKE_LOG": str(record), "PYTHON": sys.executable,
            "DOMAINLM_LAUNCH_DIR": str(REPO / "launch"), "SLURM_JOB_ID": "42", "SLURM_NNODES": "2",
            "SLURM_JOB_NODELIST": "node[001-002]", **env}
    r = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), *args], env=full,
                       capture_output=True, text=True, cwd=tmp_path)
    return r.returncode, record.read_text() if record.is_file() else "", r.stderr


@pytest.mark.parametrize("env,gpus", [
    ({"SLURM_GPUS_PER_NODE": "h100:4"}, 4),          # --gpus-per-node=h100:4
    ({"SLURM_GPUS_ON_NODE": "2"}, 2),                 # any GPU request, as slurmd reports it
    ({"SLURM_JOB_GRES": "gpu:h100:3,nic:1"}, 3),      # --gres=gpu:h100:3
    ({"SBATCH_GRES": "gres/gpu:6"}, 6),
    ({"SLURM_JOB_GPUS": "0,1,2,3,4"}, 5),             # only the ids
])
def test_slurm_reads_the_gpu_count_from_how_gpus_were_asked_for(fake_slurm, tmp_path, env, gpus):
    rc, calls, err = _sbatch(fake_slurm, tmp_path, **env)
    assert rc == 0, err
    srun = calls.splitlines()[0]
    assert f"--gpus-per-node={gpus} " in srun and "launch pretrain --nodes=2" in srun
    assert "--rdzv-endpoint=node001:29500 --rdzv-id=42 --stop-timeout=600 -- --config c.yaml" in srun


def test_slurm_without_a_gpu_count_stops_instead_of_guessing(fake_slurm, tmp_path):
    rc, calls, err = _sbatch(fake_slurm, tmp_path)
    assert rc != 0 and "cannot tell how many GPUs each node has" in err and calls == ""


def test_slurm_hands_the_layout_flags_to_launch(fake_slurm, tmp_path):
    rc, calls, err = _sbatch(fake_slurm, tmp_path, args=("--tp", "2", "--pp=2", "--config", "c.yaml"),
                             SLURM_GPUS_ON_NODE="8")
    assert rc == 0, err
    assert "--stop-timeout=600 --tp 2 --pp=2 -- --config c.yaml" in calls.splitlines()[0]


def test_layout_flags_become_the_stage_config():
    from domainlm.launch.command import build_command

    # 2 nodes x 8 GPUs, TP=2 PP=2 (DP=4), 2 virtual stages each: the stage's own config fields.
    cmd, _ = build_command(_ns(nodes=2, gpus_per_node=8, cpu=False, rdzv_endpoint="n1:29500", tp=2, pp=2, vpp=2))
    assert " ".join(cmd).endswith("-m domainlm.cli pretrain --config c.yaml --parallel.tensor 2 "
                                  "--parallel.pipeline 2 --parallel.virtual-pipeline 2")
    # Through Slurm they travel to the script, which hands them to launch on each node.
    cmd, _ = build_command(_ns(nodes=2, gpus_per_node=8, cpu=False, slurm=True, tp=2, pp=2))
    assert cmd[-4:] == ["--tp=2", "--pp=2", "--config", "c.yaml"]


@pytest.mark.parametrize("kw,stage,message", [
    (dict(pp=1, vpp=2), "pretrain", "--vpp 2 needs --pp > 1"),
    (dict(gpus_per_node=6, tp=2, pp=2), "pretrain", "6 processes cannot hold --tp 2 x --pp 2 = 4"),
    (dict(pp=0), "pretrain", "--pp must be >= 1"),
    (dict(pp=2), "finetune", "model-parallel layouts are for `launch pretrain`"),
    (dict(pp=2, stage_args=["--", "--parallel.pipeline", "2"]), "pretrain", "--pp and --parallel.pipeline"),
])
def test_bad_layout_flags_are_refused_in_one_line(kw, stage, message):
    from domainlm.errors import UserError
    from domainlm.launch.command import build_command

    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        build_command(_ns(**kw), stage)


def test_launch_scripts_parse():
    for script in ("torchrun_single.sh", "torchrun_multinode.sh", "slurm.sbatch", "gpus_per_node.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / "launch" / script)]).returncode == 0, script


def test_a_mistake_in_the_stage_arguments_is_one_line_before_torchrun_starts(capsys, tmp_path):
    """The stage's arguments are parsed and its config resolved by `launch` itself: one line, exit
    2, and no torchrun (whose output would be a usage text per rank and its own traceback)."""
    for args, needles in ((["--", "--bogus-flag", "3"], ["after --: unrecognized argument --bogus-flag"]),
                          (["--", "--model.size", "huge"], ["'huge'", "tiny"])):
        code, out, err = run_cli(["launch", "pretrain", "--cpu", "--gpus-per-node", "2", *args], capsys)
        lines = [line for line in err.splitlines() if "error:" in line]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err and "torch.distributed.run" not in out, err
        for n in needles:
            assert str(n) in lines[0], (n, lines[0])
    with pytest.raises(SystemExit) as e:              # a stage flag before --: argparse's error, with the hint
        run_cli(["launch", "pretrain", "--cpu", "--tokenizer", "tok"], capsys)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unrecognized argument --tokenizer; the stage's own arguments go after --" in err
