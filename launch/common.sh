# Shared by the launchers: flag parsing and help. Sourced, not run.
# Sets NPROC, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, HOSTFILE, CONFIG and ARGS (the overrides).

usage() {
    sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

default_nproc() {
    # One process per visible GPU; on a CPU-only machine one process (use --nproc for more).
    local gpus
    gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    if [ "${gpus:-0}" -gt 0 ]; then echo "$gpus"; else echo 1; fi
}

torchrun_train() {
    # torchrun with a c10d rendezvous on the master; "$@" goes after `rectrain train CONFIG`.
    set -x
    exec python3 -m torch.distributed.run --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
        --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RUN_ID:-rectrain}" \
        --max-restarts "$MAX_RESTARTS" -m train.cli train "$CONFIG" "$@"
}

# torchrun's agent lends its rendezvous store to the workers by default, and keeps it across
# restarts: a restarted worker can then read the previous attempt's addresses and fail with "Gloo
# connectFullMesh failed ... Connection refused" (pytorch/pytorch#135712, seen here in 3 of 4
# --max-restarts runs). With this, rank 0 hosts a fresh store on a fresh port at every attempt.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

NPROC=${NPROC_PER_NODE:-}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
HOSTFILE=${HOSTFILE:-}
MAX_RESTARTS=${MAX_RESTARTS:-0}
CONFIG=""
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage 0 ;;
        --nproc) NPROC=$2; shift 2 ;;
        --nnodes) NNODES=$2; shift 2 ;;
        --node-rank) NODE_RANK=$2; shift 2 ;;
        --master) MASTER_ADDR=${2%:*}; [ "$2" != "${2#*:}" ] && MASTER_PORT=${2##*:}; shift 2 ;;
        --hostfile) HOSTFILE=$2; shift 2 ;;
        --max-restarts) MAX_RESTARTS=$2; shift 2 ;;
        -*) echo "$(basename "$0"): unknown flag $1 (see --help)" >&2; exit 2 ;;
        *) if [ -z "$CONFIG" ]; then CONFIG=$1; else ARGS+=("$1"); fi; shift ;;
    esac
done
if [ -z "$CONFIG" ]; then
    echo "$(basename "$0"): missing CONFIG (see --help)" >&2
    exit 2
fi
if [ ! -f "$CONFIG" ]; then
    echo "$(basename "$0"): config file not found: $CONFIG" >&2
    exit 2
fi
NPROC=${NPROC:-$(default_nproc)}
