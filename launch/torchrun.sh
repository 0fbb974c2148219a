#!/bin/bash
# megagen on one or more nodes with torchrun (no scheduler).
#   single node:  launch/torchrun.sh CONFIG [key=value ...]                 (NPROC=8 by default)
#   multi-node:   on every node, with the same HEAD_ADDR (an address the other nodes can reach):
#                 NNODES=2 HEAD_ADDR=10.0.0.1 launch/torchrun.sh CONFIG [key=value ...]
# torchrun restarts all ranks (MAX_RESTARTS times) when one dies; the job resumes from its latest checkpoint.
set -euo pipefail
CONFIG=${1:?usage: launch/torchrun.sh CONFIG [key=value ...]}
shift
NPROC=${NPROC:-8}
NNODES=${NNODES:-1}
HEAD_ADDR=${HEAD_ADDR:-127.0.0.1}
PORT=${PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-3}
RUN_ID=${RUN_ID:-megagen-$(date +%s)}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# Restarted ranks must not read the previous attempt's addresses from torchrun's shared store
# (pytorch/pytorch#135712): give the training processes a store of their own.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
exec python -m torch.distributed.run \
  --nnodes="$NNODES" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$HEAD_ADDR:$PORT" --rdzv_id="$RUN_ID" \
  --max-restarts="$MAX_RESTARTS" \
  -m megagen train "$CONFIG" "$@"
