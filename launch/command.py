"""`domainlm launch pretrain|finetune`: print and run the torchrun (or Slurm) command of a stage.

    domainlm launch pretrain --gpus-per-node 8 -- --config configs/pretrain/1B.yaml
    domainlm launch pretrain --nodes 4 --gpus-per-node 8 --rdzv-endpoint node001:29500 -- --config ...
    domainlm launch pretrain --nodes 4 --gpus-per-node 8 --slurm -- --config ...

Every form runs the stage's own entry point (`python -m domainlm.cli pretrain ARGS`, or
`finetune sft ARGS`), one process per GPU
(or per CPU process with --cpu). Multi-node runs meet through torchrun's c10d rendezvous: the
same command on every node. --slurm submits launch/slurm.sbatch, which runs srun + torchrun from
the SLURM_* variables and requeues the job on preemption or at the time limit.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from domainlm.errors import UserError

# The wrappers ship inside the package (domainlm.launch), so they are found from a wheel too.
HERE = Path(__file__).resolve().parent
SBATCH = HERE / "slurm.sbatch"
# What each `domainlm launch STAGE` runs on every rank.
STAGE_COMMANDS = {"pretrain": ["pretrain"], "finetune": ["finetune", "sft"]}
# torchrun forwards these to the workers, which finish the step, save and exit (SIGUSR1 added to
# its default list so a preemption notice reaches them through the agent).
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (default: 1)")
    parser.add_argument("--gpus-per-node", type=int, default=None, metavar="G",
                        help="processes per node, one per GPU (default: the GPUs of this machine)")
    parser.add_argument("--cpu", action="store_true",
                        help="CPU processes with gloo instead of GPUs (tests, laptops); TP <= 2, no PP")
    parser.add_argument("--slurm", action="store_true",
                        help="submit the packaged slurm.sbatch with sbatch instead of running torchrun here")
    parser.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                        help="multi-node: the rendezvous host (any one of the nodes) and port; the same on every node")
    parser.add_argument("--rdzv-id", default="domainlm-pretrain", metavar="ID",
                        help="multi-node: run id, the same on every node (default: domainlm-pretrain)")
    parser.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    parser.add_argument("stage_args", nargs=argparse.REMAINDER, metavar="-- STAGE_ARGS",
                        help="arguments of the stage's command (`domainlm pretrain`, `domainlm finetune sft`), after --")


def build_command(ns: argparse.Namespace, stage: str = "pretrain") -> tuple[list[str], dict[str, str]]:
    """The command and the extra environment for `ns` (no side effects)."""
    words = STAGE_COMMANDS[stage]
    args = list(ns.stage_args)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise UserError(f"give the `domainlm {' '.join(words)}` arguments after --, e.g. -- --config FILE.yaml")
    if ns.nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {ns.nodes}")
    per_node = ns.gpus_per_node
    if per_node is None:
        per_node = _local_gpus() or (1 if ns.cpu else 0)
        if per_node == 0:
            raise UserError("no GPU found on this machine; give --gpus-per-node G, or --cpu for CPU processes")
    if per_node < 1:
        raise UserError(f"--gpus-per-node must be >= 1, got {per_node}")
    if ns.cpu:
        args += ["--train.device", "cpu"]
    if ns.slurm:
        if ns.cpu:
            raise UserError("--slurm launches GPU jobs; drop --cpu")
        cmd = ["sbatch", f"--nodes={ns.nodes}", f"--gpus-per-node={per_node}", str(SBATCH), *args]
        return cmd, {"DOMAINLM_STAGE": " ".join(words)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={ns.nodes}", f"--nproc-per-node={per_node}"]
    if ns.nodes == 1:
        cmd += ["--standalone"]  # a local rendezvous on a free port
    else:
        if not ns.rdzv_endpoint:
            raise UserError(f"--nodes {ns.nodes} needs --rdzv-endpoint HOST:PORT, a node every node can reach "
                            "(run the same command on each node), or --slurm")
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={ns.rdzv_endpoint}",
                f"--rdzv-id={ns.rdzv_id}"]
    cmd += ["-m", "domainlm.cli", *words, *args]
    return cmd, {"TORCHELASTIC_SIGNALS_TO_HANDLE": FORWARDED_SIGNALS}


def launch_pretrain(ns: argparse.Namespace) -> int:
    """Print the torchrun / sbatch command that runs `domainlm pretrain` on every rank, and run it."""
    return launch(ns, "pretrain")


def launch_finetune(ns: argparse.Namespace) -> int:
    """Print the torchrun / sbatch command that runs `domainlm finetune sft` on every rank, and run it."""
    return launch(ns, "finetune")


def launch(ns: argparse.Namespace, stage: str) -> int:
    cmd, env = build_command(ns, stage)
    shown = " ".join(f"{k}={v}" for k, v in env.items())
    print(f"{shown + ' ' if shown else ''}{shlex.join(cmd)}", flush=True)
    if ns.nodes > 1 and not ns.slurm:
        print("(run this same command on each of the nodes)", file=sys.stderr, flush=True)
    if ns.dry_run:
        return 0
    if ns.slurm and shutil.which("sbatch") is None:
        raise UserError("sbatch not found: run on a Slurm login node, or use --dry-run to see the command")
    return subprocess.call(cmd, env={**os.environ, **env})


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch/CUDA means no GPUs to count
        return 0
