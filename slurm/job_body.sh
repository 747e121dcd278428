# ---- metabolic job body (slurm/job_body.sh, shared by every template) -------------------------
# Every value below was written by `metabolic submit` with shlex.quote: nothing is re-parsed.
set -uo pipefail
PYTHON={{PYTHON}}
RUN_DIR={{RUN_DIR}}
PROCS_PER_NODE={{PROCS_PER_NODE}}
EXPERIMENT=({{EXPERIMENT}})  # CONFIG, overrides, then resume=true: the first run starts fresh, requeues resume
LAUNCH_EXTRA=({{LAUNCH_EXTRA}})
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/metabolic/torch_extensions}
export PYTHONUNBUFFERED=1
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-$PROCS_PER_NODE} / PROCS_PER_NODE ))
  [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
  export OMP_NUM_THREADS
fi

# Rank 0's node hosts the rendezvous: its address as SLURM knows it (NodeAddr), else its name.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_ADDR=$(scontrol show node "$HEAD_NODE" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
HEAD_ADDR=${HEAD_ADDR:-$HEAD_NODE}
MAIN_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
echo "[metabolic] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $NNODES node(s) x $PROCS_PER_NODE rank(s), rendezvous $HEAD_ADDR:$MAIN_PORT, $(date -Is)"
echo "[metabolic] run folder: $RUN_DIR"

# Preemption: USR1 reaches this script (--signal=B:USR1@N, or `scancel --batch --signal=USR1 JOB`).
# Forward it to every process of the job's steps (not to this script); the launchers ignore it
# (trap "" below, inherited) and the trainer ranks checkpoint at the next step and exit.
preempted=0
on_usr1() {
  preempted=1
  echo "[metabolic] USR1 at $(date -Is): asking every rank to checkpoint and stop"
  scancel --signal=USR1 "$SLURM_JOB_ID"
}
trap on_usr1 USR1

# The node's task launches every rank, so it needs all the CPUs sbatch reserved: srun of Slurm
# 22.05-23.02 does not inherit --cpus-per-task from the allocation.
srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 \
  bash -c 'trap "" USR1; exec "$@" --node-rank "$SLURM_NODEID"' metabolic-node \
  "$PYTHON" -m metabolic launch "${EXPERIMENT[@]}" --nodes "$NNODES" --procs-per-node "$PROCS_PER_NODE" \
  --main-address "$HEAD_ADDR" --main-port "$MAIN_PORT" ${LAUNCH_EXTRA[@]+"${LAUNCH_EXTRA[@]}"} &  # empty array: safe under set -u on bash < 4.4
step=$!
while :; do
  wait "$step"; code=$?
  # wait returns early (>128) when a trapped signal arrives; keep waiting for the step itself.
  if [ $code -gt 128 ] && kill -0 "$step" 2>/dev/null; then continue; fi
  break
done

if [ -f "$RUN_DIR/summary.json" ] && [ $code -eq 0 ]; then
  echo "[metabolic] finished: $RUN_DIR/summary.json ($(date -Is))"
  exit 0
fi
if [ $preempted -eq 1 ] && [ -d "$RUN_DIR/checkpoints" ]; then
  echo "[metabolic] stopped at a checkpoint (step exit $code); requeueing job $SLURM_JOB_ID to resume"
  scontrol requeue "$SLURM_JOB_ID" && exit 0
  echo "[metabolic] scontrol requeue failed; resume by hand: sbatch $RUN_DIR/slurm/job.sbatch"
fi
echo "[metabolic] step failed with exit code $code"
exit $code
