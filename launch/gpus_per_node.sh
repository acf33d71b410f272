# Sourced by slurm.sbatch: gpus_per_node prints how many GPUs each node of this Slurm job has, from
# whichever way they were asked for, or fails (never a guessed default):
#   --gpus-per-node=[type:]G   SLURM_GPUS_PER_NODE
#   any GPU request            SLURM_GPUS_ON_NODE (set by slurmd for the batch step)
#   --gres=gpu[:type]:G        SLURM_JOB_GRES / SLURM_GRES / SBATCH_GRES ("gpu:h100:8,nic:1", "gres/gpu:8")
#   the GPUs' ids              SLURM_JOB_GPUS / CUDA_VISIBLE_DEVICES ("0,1,2,3")
#   this node's devices        nvidia-smi -L
gpus_per_node() {
    local v entry n
    v=${SLURM_GPUS_PER_NODE:-}
    if [[ -n $v ]]; then echo "${v##*:}"; return 0; fi
    v=${SLURM_GPUS_ON_NODE:-}
    if [[ $v =~ ^[0-9]+$ && $v -gt 0 ]]; then echo "$v"; return 0; fi
    for v in "${SLURM_JOB_GRES:-}" "${SLURM_GRES:-}" "${SBATCH_GRES:-}"; do
        IFS=',' read -ra entries <<< "$v"
        for entry in "${entries[@]}"; do
            entry=${entry#gres/}
            entry=${entry#gres:}
            if [[ $entry == gpu || $entry == gpu:* ]]; then
                n=${entry##*:}
                n=${n%%(*}                       # "gpu:8(IDX:0-7)" -> 8
                [[ $n =~ ^[0-9]+$ ]] || n=1      # "gpu" or "gpu:h100": one of them
                echo "$n"; return 0
            fi
        done
    done
    for v in "${SLURM_JOB_GPUS:-}" "${CUDA_VISIBLE_DEVICES:-}"; do
        if [[ -n $v ]]; then
            IFS=',' read -ra entries <<< "$v"
            echo "${#entries[@]}"; return 0
        fi
    done
    if n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU '); then
        if [[ $n -gt 0 ]]; then echo "$n"; return 0; fi
    fi
    echo "slurm.sbatch: cannot tell how many GPUs each node has; submit with --gpus-per-node=G or --gres=gpu:G" >&2
    return 1
}
