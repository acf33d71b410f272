#!/usr/bin/env bash
# One node, one process per GPU:
#   launch/torchrun_single.sh 8 --config configs/pretrain/1B.yaml
#   NPROC=2 launch/torchrun_single.sh --config configs/pretrain/tiny_cpu.yaml --train.device cpu
# The first argument, when a number, is the processes per node (default: $NPROC, else every GPU).
# The rest are `domainlm pretrain` arguments. Same as `domainlm launch pretrain --gpus-per-node N -- ARGS`.
set -euo pipefail
PYTHON=${PYTHON:-python}
if [[ ${1:-} =~ ^[0-9]+$ ]]; then NPROC=$1; shift; fi
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')}
# torchrun forwards these to the workers, which finish the step, save a checkpoint and exit.
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$NPROC" \
    -m domainlm.cli ${DOMAINLM_STAGE:-pretrain} "$@"
