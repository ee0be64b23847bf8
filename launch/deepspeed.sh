#!/usr/bin/env bash
# Train with the DeepSpeed launcher (engine deepspeed; the ZeRO stage from deepspeed.config or
# deepspeed.zero_stage=N).
#
#   launch/deepspeed.sh [flags] CONFIG [key.sub=value ...]
#
# flags (or environment):
#   --nproc N          processes per node (NPROC_PER_NODE; default: one per GPU, else 1)
#   --hostfile FILE    several nodes: lines "hostname slots=N" (HOSTFILE); needs passwordless ssh
#   --master A[:P]     address and port of the first node (MASTER_ADDR, MASTER_PORT)
# Examples:
#   launch/deepspeed.sh --nproc 8 configs/debug.yaml deepspeed.zero_stage=3
#   launch/deepspeed.sh --hostfile hosts.txt --master node0:29500 configs/x.yaml
#   DS_ACCELERATOR=cpu launch/deepspeed.sh --nproc 2 configs/debug.yaml device=cpu   # CPU ranks (gloo)

set -euo pipefail
source "$(dirname "$0")/common.sh"
nodes=(--num_gpus "$NPROC")
# One intra-op thread per rank unless told otherwise, as torchrun does: DeepSpeed's launcher leaves
# OMP_NUM_THREADS unset, so each of N ranks starts one OpenMP thread per core and, on CPU ranks, they
# spin against each other (2 ranks on 2 cores: ~15x slower steps than with one thread each).
if [ "$NPROC" -gt 1 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
    export OMP_NUM_THREADS=1
fi
if [ -n "$HOSTFILE" ]; then
    nodes=(--hostfile "$HOSTFILE")  # slots per host come from the file
fi
set -x
exec python3 -m deepspeed.launcher.runner "${nodes[@]}" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --no_local_rank --module train.cli train "$CONFIG" engine=deepspeed "${ARGS[@]}"
