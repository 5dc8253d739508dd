# Sourced by the pretrain_gpt_*.sh examples: starts pretrain_gpt.py on every GPU of every node
# with the launcher the user picks. The example scripts only decide the flags.
#
#   LAUNCHER=deepspeed   (default) `deepspeed` runner: one node with --num_gpus, several nodes through
#                        HOSTFILE (pdsh/ssh to each host; see hostfile.example)
#   LAUNCHER=torchrun    one torchrun per node; run the script on every node (SLURM: srun does that,
#                        see pretrain_gpt_slurm.sbatch), NODE_RANK defaults to SLURM_NODEID
#   LAUNCHER=mpirun      Open MPI, one rank per GPU over HOSTFILE (see pretrain_gpt_mpirun.sh)
#   LAUNCHER=srun        inside a SLURM allocation: srun starts one rank per GPU itself, with no
#                        launcher in between, so SLURM's signals reach the ranks and their exit
#                        status is srun's (pretrain_gpt_slurm.sbatch requeues on status 4)
#
# Environment: NNODES, GPUS_PER_NODE, HOSTFILE, MASTER_ADDR (deepspeed: default the hostfile's first
# host), MASTER_PORT, NODE_RANK, PYTHON. The job runs in the repository root: relative paths
# (DATA_PREFIX, VOCAB, RUN_DIR, ...) are relative to it.
# DRY_RUN=1 prints the world size and the command instead of running it (the tests read it); the
# command's words are quoted only where the shell needs it, so `$(...)` of its flags can be pasted
# into another command (the "will it fit?" recipe in examples/README.md).

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/examples/help.sh"
LAUNCHER="${LAUNCHER:-deepspeed}"
MASTER_PORT="${MASTER_PORT:-29500}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
PYTHON="${PYTHON:-python}"

# micro_batch_for MAX: the largest micro-batch <= MAX that splits GLOBAL_BATCH evenly over the
# data-parallel ranks (world / (TP x PP)) with a whole number of accumulation steps, so changing
# NNODES keeps the paper's global batch. Prints it; fails with a message if there is none.
micro_batch_for() {
    local dp=$((NNODES * GPUS_PER_NODE / (TP * PP))) m
    for ((m = $1; m >= 1; m--)); do
        if ((dp > 0 && GLOBAL_BATCH % (m * dp) == 0)); then
            echo "$m"
            return 0
        fi
    done
    echo "error: GLOBAL_BATCH=$GLOBAL_BATCH cannot be split over DP=$dp ranks (NNODES=$NNODES x" \
         "GPUS_PER_NODE=$GPUS_PER_NODE / (TP=$TP x PP=$PP)); change one of them" >&2
    return 2
}

# launch ARGS...: runs pretrain_gpt.py ARGS on NNODES x GPUS_PER_NODE ranks.
launch() {
    local world=$((NNODES * GPUS_PER_NODE)) cmd
    if [[ "$NNODES" -gt 1 && "$LAUNCHER" != torchrun && "$LAUNCHER" != srun && -z "${HOSTFILE:-}" ]]; then
        echo "error: NNODES=$NNODES needs HOSTFILE=<file listing the nodes> (see examples/hostfile.example)" >&2
        return 2
    fi
    case "$LAUNCHER" in
        deepspeed)
            cmd=(deepspeed --num_nodes "$NNODES" --num_gpus "$GPUS_PER_NODE" --master_port "$MASTER_PORT")
            [[ -n "${MASTER_ADDR:-}" ]] && cmd+=(--master_addr "$MASTER_ADDR")
            [[ -n "${HOSTFILE:-}" ]] && cmd+=(--hostfile "$HOSTFILE")
            cmd+=(pretrain_gpt.py) ;;
        torchrun)
            cmd=(torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$NODE_RANK"
                 --master-addr "${MASTER_ADDR:-localhost}" --master-port "$MASTER_PORT" pretrain_gpt.py) ;;
        mpirun)
            # pretrain_gpt.py reads rank and world size from Open MPI's OMPI_COMM_WORLD_* variables.
            cmd=(mpirun -np "$world" --map-by "ppr:$GPUS_PER_NODE:node" --bind-to none
                 -x MASTER_ADDR="${MASTER_ADDR:-localhost}" -x MASTER_PORT="$MASTER_PORT" -x PYTHONPATH -x PATH)
            [[ -n "${HOSTFILE:-}" ]] && cmd+=(--hostfile "$HOSTFILE")
            cmd+=("$PYTHON" pretrain_gpt.py) ;;
        srun)
            # Each task is one rank: SLURM's task ids are torch.distributed's rank variables.
            cmd=(srun --nodes "$NNODES" --ntasks-per-node "$GPUS_PER_NODE" bash -c
                 'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$@"'
                 rank "$PYTHON" pretrain_gpt.py) ;;
        *)
            echo "error: LAUNCHER=$LAUNCHER; use deepspeed, torchrun, mpirun or srun" >&2
            return 2 ;;
    esac
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        echo "# world size $world ($NNODES nodes x $GPUS_PER_NODE GPUs)"
        shell_words "${cmd[@]}" "$@"
        return 0
    fi
    cd "$REPO"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    exec "${cmd[@]}" "$@"
}
