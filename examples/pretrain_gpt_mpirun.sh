#!/usr/bin/env bash
# The paper's runs (pretrain_gpt_{350m,1.7b,13b}.sh) started by Open MPI's mpirun instead of the
# deepspeed launcher: one rank per GPU over the nodes of HOSTFILE; pretrain_gpt.py takes its rank
# and world size from the OMPI_COMM_WORLD_* variables and rendezvouses at MASTER_ADDR.
#
#   MODEL_SIZE=1.7b NNODES=2 HOSTFILE=examples/hostfile.example MASTER_ADDR=node-01 \
#       bash examples/pretrain_gpt_mpirun.sh
#   MODEL_SIZE=350m bash examples/pretrain_gpt_mpirun.sh                 # one node, 8 GPUs
# Every other variable of the size's script (LR, EMBEDDING_NORM, TP, PP, ZERO, ...) applies.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/help.sh"
usage_or_refuse_arguments "${BASH_SOURCE[0]}" "$(dirname "${BASH_SOURCE[0]}")/paper_recipe.sh" \
    "$(dirname "${BASH_SOURCE[0]}")/launch.sh" -- "$@"
MODEL_SIZE="${MODEL_SIZE:-1.7b}"
script="$(dirname "${BASH_SOURCE[0]}")/pretrain_gpt_${MODEL_SIZE}.sh"
if [[ ! -f "$script" ]]; then
    echo "error: MODEL_SIZE=$MODEL_SIZE; use 350m, 1.7b or 13b" >&2
    exit 2
fi
if [[ "${NNODES:-1}" -gt 1 && "${MASTER_ADDR:-localhost}" == localhost ]]; then
    echo "error: NNODES=$NNODES needs MASTER_ADDR=<first node's address, reachable from every node>" >&2
    exit 2
fi
LAUNCHER=mpirun exec bash "$script"
