#!/usr/bin/env bash
# Train with torchrun (engine ddp, or whatever `engine` the config names).
#
#   launch/torchrun.sh [flags] CONFIG [key.sub=value ...]
#
# flags (or environment):
#   --nproc N         processes per node (NPROC_PER_NODE; default: one per GPU, else 1)
#   --nnodes N        number of nodes (NNODES; default 1)
#   --node-rank R     this node's rank, 0..N-1 (NODE_RANK; default 0)
#   --master A[:P]    rendezvous host and port of node 0 (MASTER_ADDR, MASTER_PORT; default 127.0.0.1:29500)
#   --max-restarts N  restart every worker up to N times when one dies (MAX_RESTARTS; default 0); with
#                     resume: auto they continue from the newest whole checkpoint
# Examples:
#   launch/torchrun.sh --nproc 8 configs/debug.yaml                         # one node, 8 GPUs
#   launch/torchrun.sh --nproc 2 configs/debug.yaml device=cpu              # 2 CPU ranks (gloo)
#   launch/torchrun.sh --nproc 8 --max-restarts 3 configs/x.yaml train.save_every=500   # survives dead ranks
#   launch/torchrun.sh --nnodes 2 --node-rank 0 --master node0:29500 configs/x.yaml   # on node 0
#   launch/torchrun.sh --nnodes 2 --node-rank 1 --master node0:29500 configs/x.yaml   # on node 1

set -euo pipefail
source "$(dirname "$0")/common.sh"
torchrun_train "${ARGS[@]}"
