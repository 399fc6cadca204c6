# Shared by the recipes in slurm/: submission from environment variables, rendezvous, requeue.
# A recipe sets REPO, JOB_NAME and its defaults, sources this file and calls `submit_or_run <command...>`
# (a training recipe: `train_recipe`).
#
# Outside a job (`bash slurm/<recipe>.sbatch`) a recipe submits itself, building sbatch's options
# from these variables (each optional; unset means the recipe's #SBATCH line or the site default):
#   NODES, GPUS_PER_NODE (0: no GPUs requested), TASKS_PER_NODE (default GPUS_PER_NODE),
#   CPUS_PER_TASK, TIME, ACCOUNT, PARTITION, QOS, SIGNAL_LEAD (seconds of SIGUSR1 warning before
#   the time limit), LOG_DIR (default logs/), DEPENDENCY (e.g. afterok:123), SBATCH_ARGS (anything else).
# Inside the job it runs the command once per task with srun and, when the ranks report that they
# saved after a preemption signal (exit 75), requeues the job: the next allocation resumes by itself.

EXIT_PREEMPTED=75

submit_self() {
    local script=$1 options=(--job-name "$JOB_NAME" --chdir "$REPO" --export "ALL,REPO=$REPO")
    local log_dir=${LOG_DIR:-$REPO/logs}
    mkdir -p "$log_dir"
    options+=(--output "$log_dir/%x-%j.out" --open-mode append --requeue --signal "USR1@${SIGNAL_LEAD:-600}")
    [[ -n ${NODES:-} ]] && options+=(--nodes "$NODES")
    [[ -n ${TASKS_PER_NODE:-${GPUS_PER_NODE:-}} ]] && options+=(--ntasks-per-node "${TASKS_PER_NODE:-$GPUS_PER_NODE}")
    [[ -n ${GPUS_PER_NODE:-} ]] && options+=(--gpus-per-node "$GPUS_PER_NODE")  # 0 clears the #SBATCH line
    [[ -n ${CPUS_PER_TASK:-} ]] && options+=(--cpus-per-task "$CPUS_PER_TASK")
    [[ -n ${TIME:-} ]] && options+=(--time "$TIME")
    [[ -n ${ACCOUNT:-} ]] && options+=(--account "$ACCOUNT")
    [[ -n ${PARTITION:-} ]] && options+=(--partition "$PARTITION")
    [[ -n ${QOS:-} ]] && options+=(--qos "$QOS")
    [[ -n ${DEPENDENCY:-} ]] && options+=(--dependency "$DEPENDENCY")
    # shellcheck disable=SC2086  # SBATCH_ARGS is a list of options
    sbatch "${options[@]}" ${SBATCH_ARGS:-} "$script"
}

# The rendezvous: rank 0 runs on the allocation's first node; its address comes from Slurm, not DNS.
set_rendezvous() {
    local first_node
    first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "$first_node" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)}
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
}

run_tasks() {
    echo "== job $SLURM_JOB_ID ($SLURM_JOB_NAME) start $(( ${SLURM_RESTART_COUNT:-0} + 1 )) on $SLURM_JOB_NODELIST," \
         "$SLURM_NTASKS tasks, rendezvous $MASTER_ADDR:$MASTER_PORT, $(date -Is)"
    # The signals reach the tasks through srun; the batch shell only has to outlive them.
    trap 'echo "== batch shell: got a stop signal; the ranks save and exit"' TERM USR1
    # Each rank leaves its exit status in this directory (under REPO or LOG_DIR: visible from every node).
    # srun reports the highest status of its tasks, and --kill-on-bad-exit ends the step as soon as one
    # rank exits non-zero (a crashed rank must not leave the others waiting), so a rank still exiting when
    # the first one's 75 ends the step can count as killed: a rank's own 75, which it writes only after the
    # checkpoint of every rank is published, decides the requeue.
    local status pid status_dir=${LOG_DIR:-$REPO/logs}/status/$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}
    rm -rf "$status_dir" && mkdir -p "$status_dir"
    DIFFMOE_SUPERVISOR_DIR=$status_dir srun --kill-on-bad-exit=1 "$@" &
    pid=$!
    while true; do  # a trapped signal ends `wait` early: wait again until srun itself has exited
        status=0
        wait "$pid" || status=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    if [[ $status != 0 ]] && grep -qsx "$EXIT_PREEMPTED" "$status_dir"/exit_*; then
        status=$EXIT_PREEMPTED
    fi
    rm -rf "$status_dir"
    if [[ $status == "$EXIT_PREEMPTED" ]]; then
        echo "== saved after a stop signal: requeueing job $SLURM_JOB_ID, $(date -Is)"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    echo "== tasks exited with status $status, $(date -Is)"
    return "$status"
}

# Outside a job: submit this recipe. Inside: run the command on every task (the recipe continues
# after it only when it succeeded).
submit_or_run() {
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        submit_self "$(realpath "$0")"
        exit 0
    fi
    set_rendezvous
    run_tasks "$@"
}

# Training: pretrain_diffmoe.py with CONFIG and RUN_DIR (recipe defaults) and, when set, MAX_STEPS,
# DATA (latents directory), OVERRIDES (space-separated section.key=value) and PYTHON (default: the
# repository's .venv). The run directory holds the checkpoints every restart resumes from.
train_recipe() {
    local command=("${PYTHON:-$REPO/.venv/bin/python}" pretrain_diffmoe.py --config "$CONFIG"
                   --set "train.out_dir=$RUN_DIR") override
    [[ -n ${MAX_STEPS:-} ]] && command+=(--set "train.max_steps=$MAX_STEPS")
    [[ -n ${DATA:-} ]] && command+=(--set "data.path=$DATA")
    for override in ${OVERRIDES:-}; do command+=(--set "$override"); done
    submit_or_run "${command[@]}"
}
