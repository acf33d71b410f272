"""`domainlm launch pretrain|finetune`: print and run the torchrun (or Slurm) command of a stage.

    domainlm launch pretrain --gpus-per-node 8 -- --config configs/pretrain/1B.yaml
    domainlm launch pretrain --nodes 4 --gpus-per-node 8 --rdzv-endpoint node001:29500 -- --config ...
    domainlm launch pretrain --nodes 4 --gpus-per-node 8 --slurm -- --config ...
    domainlm launch pretrain --nodes 2 --gpus-per-node 8 --tp 2 --pp 2 -- --config configs/pretrain/7B.yaml

Every form runs the stage's own entry point (`python -m domainlm.cli pretrain ARGS`, or
`finetune sft ARGS`), one process per GPU
(or per CPU process with --cpu). Multi-node runs meet through torchrun's c10d rendezvous: the
same command on every node. --slurm submits launch/slurm.sbatch, which runs srun + torchrun from
the SLURM_* variables and requeues the job on preemption or at the time limit.

Stopping (SIGTERM, or SIGUSR1 as a preemption notice): each rank finishes its step, saves a
checkpoint and exits 0. Two ways a signal gets there:
- to this command: it is delivered to the ranks themselves (torchrun's worker processes), so
  torchrun sees them finish, exits 0, and so does this command; no SIGKILL deadline applies;
- to torchrun itself (a scheduler signalling every process, the shell scripts): torchrun forwards
  the signals named by its `--signals-to-handle` flag -- it overwrites
  TORCHELASTIC_SIGNALS_TO_HANDLE from that flag, whose default leaves SIGUSR1 out (SIGUSR1 would
  kill the agent) -- and SIGKILLs the ranks `--shutdown-timeout` seconds later (default 30, too
  short to save a 1B+ checkpoint). Both flags are passed where the installed torch has them
  (torch >= 2.9 and >= 2.12); torchrun then exits 1 reporting the signal, after the ranks saved.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from domainlm.errors import UserError

# The wrappers ship inside the package (domainlm.launch), so they are found from a wheel too.
HERE = Path(__file__).resolve().parent
SBATCH = HERE / "slurm.sbatch"
# What each `domainlm launch STAGE` runs on every rank.
STAGE_COMMANDS = {"pretrain": ["pretrain"], "finetune": ["finetune", "sft"]}
# torchrun forwards these to the ranks (its default list plus SIGUSR1, Slurm's preemption notice).
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# Seconds torchrun waits for the ranks after forwarding a stop signal before SIGKILL: time to
# finish a step and write a checkpoint of a multi-billion-parameter model to shared storage.
STOP_TIMEOUT = 600
# Signals this command hands to the ranks directly (the trainer's stop signals).
DELIVERED = (signal.SIGTERM, signal.SIGUSR1)
# The layout flags of `launch pretrain` and the stage's config fields they set.
LAYOUT = {"tp": "--parallel.tensor", "pp": "--parallel.pipeline", "vpp": "--parallel.virtual-pipeline"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (default: 1)")
    parser.add_argument("--gpus-per-node", type=int, default=None, metavar="G",
                        help="processes per node, one per GPU (default: the GPUs of this machine)")
    parser.add_argument("--cpu", action="store_true",
                        help="CPU processes with gloo instead of GPUs (tests, laptops)")
    parser.add_argument("--tp", type=int, default=None, metavar="T",
                        help="pretrain: tensor-parallel size (the stage's parallel.tensor)")
    parser.add_argument("--pp", type=int, default=None, metavar="P",
                        help="pretrain: pipeline-parallel size, the layers split into P stages (parallel.pipeline); "
                             "data parallel = processes / (T x P)")
    parser.add_argument("--vpp", type=int, default=None, metavar="V",
                        help="pretrain: virtual pipeline chunks per stage, the interleaved schedule "
                             "(parallel.virtual_pipeline); needs --pp > 1")
    parser.add_argument("--slurm", action="store_true",
                        help="submit the packaged slurm.sbatch with sbatch instead of running torchrun here")
    parser.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                        help="multi-node: the rendezvous host (any one of the nodes) and port; the same on every node")
    parser.add_argument("--rdzv-id", default="domainlm-pretrain", metavar="ID",
                        help="multi-node: run id, the same on every node (default: domainlm-pretrain)")
    parser.add_argument("--stop-timeout", type=int, default=STOP_TIMEOUT, metavar="S",
                        help=f"seconds the ranks get to save after a stop signal reaches torchrun, before it "
                             f"kills them (default: {STOP_TIMEOUT}; needs torch >= 2.12, older torchrun waits 30)")
    parser.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    parser.add_argument("stage_args", nargs=argparse.REMAINDER, metavar="-- STAGE_ARGS",
                        help="arguments of the stage's command (`domainlm pretrain`, `domainlm finetune sft`), after --")


def torchrun_options() -> set[str]:
    """The option strings of the installed torchrun (torch.distributed.run)."""
    from torch.distributed.run import get_args_parser

    return {s for action in get_args_parser()._actions for s in action.option_strings}


def stop_flags(stop_timeout: int = STOP_TIMEOUT, options: set[str] | None = None) -> tuple[list[str], list[str]]:
    """torchrun flags for a graceful stop, as far as the installed torch has them, and a note for
    each one it lacks."""
    options = torchrun_options() if options is None else options
    flags, notes = [], []
    if "--signals-to-handle" in options:
        flags.append(f"--signals-to-handle={FORWARDED_SIGNALS}")
    else:
        notes.append("this torch's torchrun forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT only (torch >= 2.9 also "
                     "forwards SIGUSR1): send SIGTERM to stop")
    if "--shutdown-timeout" in options:
        flags.append(f"--shutdown-timeout={stop_timeout}")
    else:
        notes.append("this torch's torchrun kills the ranks 30 s after forwarding a stop signal (torch >= 2.12 "
                     "takes --shutdown-timeout): signal this command instead, which hands the signal to the ranks")
    return flags, notes


def build_command(ns: argparse.Namespace, stage: str = "pretrain",
                  options: set[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The command and the extra environment for `ns` (no side effects)."""
    words = STAGE_COMMANDS[stage]
    args = list(ns.stage_args)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise UserError(f"give the `domainlm {' '.join(words)}` arguments after --, e.g. -- --config FILE.yaml")
    if ns.nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {ns.nodes}")
    if ns.stop_timeout < 0:
        raise UserError(f"--stop-timeout must be >= 0 seconds, got {ns.stop_timeout}")
    per_node = ns.gpus_per_node
    if per_node is None:
        per_node = _local_gpus() or (1 if ns.cpu else 0)
        if per_node == 0:
            raise UserError("no GPU found on this machine; give --gpus-per-node G, or --cpu for CPU processes")
    if per_node < 1:
        raise UserError(f"--gpus-per-node must be >= 1, got {per_node}")
    layout = layout_flags(ns, stage, args, ns.nodes * per_node)
    if ns.cpu:
        args += ["--train.device", "cpu"]
    if ns.slurm:
        if ns.cpu:
            raise UserError("--slurm launches GPU jobs; drop --cpu")
        # The job's settings travel in the command itself (--export), so the printed line is whole.
        # The layout flags go to the script, which hands them to `domainlm launch` on each node.
        cmd = ["sbatch", f"--nodes={ns.nodes}", f"--gpus-per-node={per_node}",
               f"--export=ALL,DOMAINLM_STAGE={' '.join(words)},STOP_TIMEOUT={ns.stop_timeout}", str(SBATCH),
               *[f"--{k}={v}" for k, v in layout.items()], *args]
        return cmd, {}
    for key, value in layout.items():
        args += [LAYOUT[key], str(value)]
    flags, _ = stop_flags(ns.stop_timeout, options)
    cmd = [sys.executable, "-m", "torch.distributed.run", *flags, f"--nnodes={ns.nodes}", f"--nproc-per-node={per_node}"]
    if ns.nodes == 1:
        cmd += ["--standalone"]  # a local rendezvous on a free port
    else:
        if not ns.rdzv_endpoint:
            raise UserError(f"--nodes {ns.nodes} needs --rdzv-endpoint HOST:PORT, a node every node can reach "
                            "(run the same command on each node), or --slurm")
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={ns.rdzv_endpoint}",
                f"--rdzv-id={ns.rdzv_id}"]
    cmd += ["-m", "domainlm.cli", *words, *args]
    # No TORCHELASTIC_SIGNALS_TO_HANDLE: torch >= 2.9 overwrites it from the flag, older torch
    # does not read it.
    return cmd, {}


def layout_flags(ns: argparse.Namespace, stage: str, args: list[str], world: int) -> dict[str, int]:
    """The layout flags given (--tp, --pp, --vpp), checked against each other, the stage and the
    number of processes; the stage checks the rest (e.g. that P x V divides the layers) before it
    computes anything."""
    given = {k: getattr(ns, k, None) for k in LAYOUT if getattr(ns, k, None) is not None}
    if not given:
        return {}
    names = " ".join(f"--{k}" for k in given)
    if stage != "pretrain":
        raise UserError(f"{names}: model-parallel layouts are for `launch pretrain`; fine-tuning parallelizes "
                        "over data (DDP/FSDP), drop them")
    for key, value in given.items():
        if value < 1:
            raise UserError(f"--{key} must be >= 1, got {value}")
        if any(a == LAYOUT[key] or a.startswith(LAYOUT[key] + "=") for a in args):
            raise UserError(f"--{key} and {LAYOUT[key]} after -- set the same thing; give one of them")
    tp, pp, vpp = given.get("tp", 1), given.get("pp", 1), given.get("vpp", 1)
    if vpp > 1 and pp == 1:
        raise UserError(f"--vpp {vpp} needs --pp > 1: virtual stages interleave the layers of a pipeline; "
                        "add --pp 2 (or more), or drop --vpp")
    if world % (tp * pp):
        raise UserError(f"{world} processes cannot hold --tp {tp} x --pp {pp} = {tp * pp} model-parallel ranks; "
                        f"use a number of processes that is a multiple of {tp * pp}")
    return given


def launch_pretrain(ns: argparse.Namespace) -> int:
    """Print the torchrun / sbatch command that runs `domainlm pretrain` on every rank, and run it."""
    return launch(ns, "pretrain")


def launch_finetune(ns: argparse.Namespace) -> int:
    """Print the torchrun / sbatch command that runs `domainlm finetune sft` on every rank, and run it."""
    return launch(ns, "finetune")


def check_stage_args(stage: str, args: list[str]) -> None:
    """The stage's own arguments parsed and its config resolved here, as each rank would: a mistake
    in them is one line from this command, not a usage text per rank and torchrun's traceback."""
    import contextlib
    import io

    from domainlm.cli import _refuse_unknown, build_parser, config_from_args, normalize_argv, resolve

    argv = normalize_argv([*STAGE_COMMANDS[stage], *args])
    parser = build_parser(argv)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns, unknown = parser.parse_known_args(argv)
            if unknown:
                _refuse_unknown(getattr(ns, "_parser", None) or parser, unknown)
    except SystemExit:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        why = next((line.split("error: ", 1)[1] for line in reversed(lines) if "error: " in line),
                   lines[-1] if lines else "refused")
        raise UserError(f"after --: {why}") from None
    config_from_args(resolve(ns._command.config), ns)   # noqa: SLF001 - the command argparse chose


def launch(ns: argparse.Namespace, stage: str) -> int:
    cmd, env = build_command(ns, stage)
    if not (ns.slurm or ns.dry_run):   # (a dry run, or a Slurm job's nodes, may see other paths than here)
        check_stage_args(stage, cmd[cmd.index("domainlm.cli") + 1 + len(STAGE_COMMANDS[stage]):])
    shown = " ".join(f"{k}={v}" for k, v in env.items())
    print(f"{shown + ' ' if shown else ''}{shlex.join(cmd)}", flush=True)
    if ns.nodes > 1 and not ns.slurm:
        print("(run this same command on each of the nodes)", file=sys.stderr, flush=True)
    if not ns.slurm:
        for note in stop_flags(ns.stop_timeout)[1]:
            print(f"note: {note}", file=sys.stderr, flush=True)
    if ns.dry_run:
        return 0
    if ns.slurm:
        if shutil.which("sbatch") is None:
            raise UserError("sbatch not found: run on a Slurm login node, or use --dry-run to see the command")
        return subprocess.call(cmd, env={**os.environ, **env})
    return supervise(cmd, {**os.environ, **env})


def supervise(cmd: list[str], env: dict[str, str]) -> int:
    """Run torchrun; a stop signal sent to this process goes to the ranks themselves.

    Forwarding it to torchrun instead would make the agent raise (exit 1) and start its SIGKILL
    timer; handed to the ranks, they save and exit 0, which torchrun takes as success."""
    proc = subprocess.Popen(cmd, env=env)

    def deliver(signum, frame):
        ranks = worker_pids(proc.pid)
        for pid in ranks or [proc.pid]:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    old = {sig: signal.signal(sig, deliver) for sig in DELIVERED}
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:   # Ctrl-C reached torchrun and the ranks too; wait for them
                continue
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def worker_pids(agent: int) -> list[int]:
    """The rank processes torchrun (pid `agent`) started: its children running domainlm.cli
    (read from /proc; empty where there is none)."""
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            if ppid == agent and b"domainlm.cli" in Path(f"/proc/{name}/cmdline").read_bytes():
                out.append(int(name))
        except (OSError, ValueError, IndexError):
            continue   # a process that ended meanwhile
    return out


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch/CUDA means no GPUs to count
        return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m domainlm.launch.command torchrun-flags [SECONDS]`: the stop flags the installed
    torchrun takes, one line (what the shell scripts pass to torchrun)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "torchrun-flags":
        print("usage: python -m domainlm.launch.command torchrun-flags [STOP_TIMEOUT_SECONDS]", file=sys.stderr)
        return 2
    flags, notes = stop_flags(int(argv[1]) if len(argv) > 1 else STOP_TIMEOUT)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(" ".join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
