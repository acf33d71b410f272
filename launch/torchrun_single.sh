#!/usr/bin/env bash
# One node, one process per GPU:
#   launch/torchrun_single.sh 8 --config configs/pretrain/1B.yaml
#   NPROC=2 launch/torchrun_single.sh --config configs/pretrain/tiny_cpu.yaml --train.device cpu
# The first argument, when a number, is the processes per node (default: $NPROC, else every GPU).
# The rest are `domainlm pretrain` arguments. Same as `domainlm launch pretrain --gpus-per-node N -- ARGS`,
# except that a stop signal goes to torchrun (exec'd here), which forwards it to the ranks:
# SIGTERM, and SIGUSR1 with torch >= 2.9; they get STOP_TIMEOUT seconds (default 600, torch >= 2.12;
# older torchrun: 30) to finish the step and save a checkpoint.
set -euo pipefail
PYTHON=${PYTHON:-python}
if [[ ${1:-} =~ ^[0-9]+$ ]]; then NPROC=$1; shift; fi
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')}
# --signals-to-handle / --shutdown-timeout, as far as this torch's torchrun has them.
read -ra STOP_FLAGS <<< "$("$PYTHON" -m domainlm.launch.command torchrun-flags "${STOP_TIMEOUT:-600}")"
exec "$PYTHON" -m torch.distributed.run "${STOP_FLAGS[@]}" --standalone --nnodes=1 --nproc-per-node="$NPROC" \
    -m domainlm.cli ${DOMAINLM_STAGE:-pretrain} "$@"
