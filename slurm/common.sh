# The shared body of every slurm/*.sh script. Sourced, not run.
#
# slurm/pretrain_*.sh (they differ only in #SBATCH lines and CONFIG) call run_pretrain; slurm/prepare.sh and
# slurm/prepare_finalize.sh call run_prepare (see there).
#
# run_pretrain starts one `electra-scale pretrain` task per GPU with srun; electra_scale/infra/launch.py reads
# rank, world size and master from SLURM's variables. On SIGUSR1 (--signal=USR1@N before the time limit, or
# `scancel --signal=USR1 JOB`) every task finishes its step, saves a checkpoint and exits 75; then the job
# requeues itself, and the requeued run resumes from that checkpoint. A 75 without a signal (a stuck rank)
# restarts the training step inside the allocation first (ELECTRA_RESTARTS times, see run_pretrain).
#
# Environment:
#   ELECTRA_HOME   the electra-scale checkout (default: the directory sbatch was run from)
#   ELECTRA_IMAGE  run inside this container with pyxis/enroot (e.g. registry/electra-scale:0.1.0); else
#   ELECTRA_VENV   the virtualenv to use (default: $ELECTRA_HOME/.venv)
#   ELECTRA_RESTARTS  restarts of the training step inside the allocation after a 75 without a signal
#                  (default 3); then the job is requeued
set -euo pipefail

EXIT_PREEMPTED=75
KILLED_BY_USR1=138 # srun's status when a task died of SIGUSR1 (128 + 10)
ELECTRA_HOME=${ELECTRA_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ELECTRA_HOME"

# NCCL on InfiniBand/RoCE clusters; uncomment and adapt to your fabric.
#   export NCCL_IB_HCA=mlx5            # which HCAs to use
#   export NCCL_SOCKET_IFNAME=ib0      # interface for bootstrap traffic (not eth0 on most clusters)
#   export NCCL_DEBUG=WARN             # INFO to see the topology NCCL picked
#   export NCCL_ASYNC_ERROR_HANDLING=1 # fail fast instead of hanging when a peer dies
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# The srun options and the command that run electra-scale: in ELECTRA_IMAGE's container, else from the venv.
electra_command() {
    SRUN_ARGS=()
    if [ -n "${ELECTRA_IMAGE:-}" ]; then
        SRUN_ARGS+=(--container-image="$ELECTRA_IMAGE" --container-workdir=/opt/electra-scale)
        ELECTRA=(electra-scale)
    else
        ELECTRA=("${ELECTRA_VENV:-$ELECTRA_HOME/.venv}/bin/electra-scale")
    fi
}

run_pretrain() {
    # A 75 (a stuck rank's watchdog, engine/watchdog.py; or a crashed task whose peers' watchdogs then fire)
    # needs only a new srun on the nodes this job already holds: up to ELECTRA_RESTARTS (default 3) times it runs
    # the training step again in this allocation, in seconds, where a requeue waits for BeginTime (~2 minutes)
    # and then the queue (hours on a busy cluster). The job is requeued only once those restarts are spent, or
    # when the 75 followed a signal (USR1 before the time limit, preemption's TERM): the allocation is ending.
    electra_command
    local restarts=0 max=${ELECTRA_RESTARTS:-3} rc signaled
    while true; do
        echo "electra-scale: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}, in-allocation restart ${restarts}) on ${SLURM_JOB_NODELIST}: ${CONFIG} $*"
        run_step "$@"
        if [ "$rc" -eq "$EXIT_PREEMPTED" ] && [ "$signaled" -eq 0 ] && [ "$restarts" -lt "$max" ]; then
            restarts=$((restarts + 1))
            echo "electra-scale: exit 75 without a signal (a stuck or crashed rank); restarting in job ${SLURM_JOB_ID}'s allocation, restart ${restarts} of ELECTRA_RESTARTS=${max}"
            continue
        fi
        break
    done
    if [ "$rc" -eq "$EXIT_PREEMPTED" ]; then
        if [ "$signaled" -eq 1 ]; then
            echo "electra-scale: exit 75 (a checkpoint saved after a signal; requeueing job ${SLURM_JOB_ID})"
        else
            echo "electra-scale: exit 75 (a stuck rank's watchdog; the ${max} restart(s) in this allocation are spent: requeueing job ${SLURM_JOB_ID})"
        fi
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    if [ "$rc" -eq "$KILLED_BY_USR1" ]; then
        # The signal came in the instant before a task's interpreter ran the CLI's first line, which holds
        # USR1 back from then on (electra_scale/engine/early_stop.py): nothing new to save, the run resumes from
        # its latest complete checkpoint all the same.
        echo "electra-scale: USR1 reached a task before it could catch it; requeueing job ${SLURM_JOB_ID}"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    exit "$rc"
}

# One srun of the training step; sets rc (75 also when srun reports the kill of a frozen task after another
# exited 75) and signaled (1 when a task logged that a signal stopped it).
run_step() {
    # No --kill-on-bad-exit: after a signal every task saves and exits 75, and srun must let the last one
    # finish its save rather than kill it when the first one exits (they leave within seconds of each other:
    # the save ends in a collective). --wait ends the tasks left ELECTRA_SRUN_WAIT seconds after the first one
    # exits: a rank frozen (SIGSTOP, a hung driver) cannot run its own watchdog, and without it srun would wait
    # for it forever while its peers' watchdogs have already exited 75 (engine/watchdog.py).
    # srun in the background so that this shell can wait and still react; the tasks get the signal.
    set +e
    # Copies of two kinds of line (everything still reaches the job's log): srun's about its tasks' ends (when
    # a task's watchdog exited 75 and srun then killed a frozen one, srun reports the kill, not the 75), and a
    # task's "SIGUSR1 received" (engine/train.py's StopRequest): the 75 that follows is the allocation ending.
    local ends
    ends=$(mktemp)
    srun --cpu-bind=none "--wait=${ELECTRA_SRUN_WAIT:-120}" "${SRUN_ARGS[@]}" "${ELECTRA[@]}" pretrain --config "$CONFIG" "$@" \
        2> >(tee >(grep --line-buffered -E "^srun: error: .*: tasks? [0-9,-]+: Exited with exit code|SIG(USR1|TERM) received: stopping" >"$ends") >&2) &
    local pid=$!
    wait "$pid"
    rc=$?
    while [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; do  # interrupted wait: srun still running
        wait "$pid"
        rc=$?
    done
    if [ "$rc" -ne 0 ] && [ "$rc" -ne "$EXIT_PREEMPTED" ]; then
        for _ in $(seq 50); do # the copy may lag srun's exit by a moment
            grep -q "Exited with exit code $EXIT_PREEMPTED\$" "$ends" && break
            sleep 0.1
        done
        if grep -q "Exited with exit code $EXIT_PREEMPTED\$" "$ends"; then
            echo "electra-scale: srun exited $rc after a task exited $EXIT_PREEMPTED (the others ended by srun --wait)"
            rc=$EXIT_PREEMPTED
        fi
    fi
    signaled=0
    if grep -q "received: stopping" "$ends"; then
        signaled=1
    fi
    rm -f "$ends"
    set -e
}

run_prepare() {
    # One `electra-scale prepare` process: a task of a job array (it reads SLURM_ARRAY_TASK_ID/COUNT), the
    # finalize step, or the vocabulary step. No --cpu-bind=none here: the task keeps the CPUs the job was
    # given as its affinity, and prepare's --workers defaults to them (--cpus-per-task). srun is told them
    # again because since Slurm 22.11 it no longer inherits --cpus-per-task from sbatch.
    electra_command
    local task=""
    if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
        task=" (array job ${SLURM_ARRAY_JOB_ID}, task ${SLURM_ARRAY_TASK_ID} of ${SLURM_ARRAY_TASK_COUNT:-?})"
    fi
    echo "electra-scale: job ${SLURM_JOB_ID}${task} on ${SLURM_JOB_NODELIST}, ${SLURM_CPUS_PER_TASK:-all} CPU(s): prepare $*"
    exec srun --ntasks=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} "${SRUN_ARGS[@]}" \
        "${ELECTRA[@]}" prepare "$@"
}
