#!/usr/bin/env bash
# Train with `accelerate launch` (engine accelerate), from a config in configs/accelerate/.
#
#   launch/accelerate.sh [flags] CONFIG [key.sub=value ...]
#
# flags (or environment):
#   --accelerate-config FILE   accelerate config (ACCELERATE_CONFIG; default configs/accelerate/multi_gpu.yaml,
#                              or configs/accelerate/cpu.yaml when no GPU is visible)
#   --nproc N          processes per node (NPROC_PER_NODE; default: one per GPU, else 1)
#   --nnodes N, --node-rank R, --master A[:P]   several nodes, as for torchrun.sh
# Examples:
#   launch/accelerate.sh --nproc 8 configs/debug.yaml train.precision=bf16
#   launch/accelerate.sh --nproc 2 configs/debug.yaml device=cpu

set -euo pipefail
here=$(dirname "$0")
accel_config=${ACCELERATE_CONFIG:-}
rest=()
while [ $# -gt 0 ]; do
    case "$1" in
        --accelerate-config) accel_config=$2; shift 2 ;;
        *) rest+=("$1"); shift ;;
    esac
done
set -- "${rest[@]}"
source "$here/common.sh"
if [ -z "$accel_config" ]; then
    if [ "$(default_nproc)" -gt 1 ] || python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
        accel_config="$here/../configs/accelerate/multi_gpu.yaml"
    else
        accel_config="$here/../configs/accelerate/cpu.yaml"
    fi
fi
if grep -q '^use_cpu: true' "$accel_config" && [ $((NPROC * NNODES)) -gt 1 ]; then
    # `accelerate launch` starts several CPU processes only through mpirun. torchrun starts them
    # instead; the Accelerator sees ACCELERATE_USE_CPU and WORLD_SIZE and takes its MULTI_CPU (gloo) path.
    export ACCELERATE_USE_CPU=true ACCELERATE_MIXED_PRECISION=no
    torchrun_train engine=accelerate "${ARGS[@]}"
fi
set -x
exec python3 -m accelerate.commands.launch --config_file "$accel_config" --num_processes "$((NPROC * NNODES))" \
    --num_machines "$NNODES" --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" \
    --main_process_port "$MASTER_PORT" -m train.cli train "$CONFIG" engine=accelerate "${ARGS[@]}"
