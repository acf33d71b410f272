#!/usr/bin/env bash
# Several nodes through torchrun's c10d rendezvous: run the SAME command on every node.
#   NNODES=4 NPROC=8 RDZV_ENDPOINT=node001:29500 launch/torchrun_multinode.sh --config configs/pretrain/1B.yaml
# RDZV_ENDPOINT is any one node's host and a free port that every node can reach; RDZV_ID names
# the run (the same on every node). Nodes may join in any order; ranks are assigned at the
# rendezvous. Same as `domainlm launch pretrain --nodes N --gpus-per-node G --rdzv-endpoint H:P -- ARGS`;
# stop signals as in torchrun_single.sh (STOP_TIMEOUT).
set -euo pipefail
PYTHON=${PYTHON:-python}
: "${NNODES:?set NNODES, the number of nodes}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=HOST:PORT, a node every node can reach}"
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')}
RDZV_ID=${RDZV_ID:-domainlm-pretrain}
read -ra STOP_FLAGS <<< "$("$PYTHON" -m domainlm.launch.command torchrun-flags "${STOP_TIMEOUT:-600}")"
exec "$PYTHON" -m torch.distributed.run "${STOP_FLAGS[@]}" --nnodes="$NNODES" --nproc-per-node="$NPROC" \
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID" \
    -m domainlm.cli ${DOMAINLM_STAGE:-pretrain} "$@"
