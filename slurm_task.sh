#!/usr/bin/env bash
# A task of the job array that `run_all.sh --slurm` submits (slurm_jobs.py): it trains the run on line
# $SLURM_ARRAY_TASK_ID + 1 of the array's plan file, from its last checkpoint if it has one; its output goes to the
# run's log. Before the time limit Slurm sends TERM to this shell alone (--signal=B:TERM@SECONDS): it passes it on to
# train.py, which saves a checkpoint at the end of its step and exits 143, and the task requeues itself, to resume
# when it runs again. docs/slurm.md says why it requeues, and when it does not.
#   slurm_task.sh PLANS PYTHON REPORT_TO     (PLANS: the folder of the plan files, OUTPUT/logs/slurm)
set -uo pipefail
plans=$1 PYTHON=$2 REPORT_TO=$3
task="${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID"  # not $SLURM_JOB_ID: in one task of an array it names the array
line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$plans/$SLURM_ARRAY_JOB_ID.plan")
if [ -z "$line" ]; then
  echo "error: no line $((SLURM_ARRAY_TASK_ID + 1)) in $plans/$SLURM_ARRAY_JOB_ID.plan"
  exit 1
fi
eval "run=($line)"  # folder, label, train.py arguments
dir=${run[0]}
export TQDM_MININTERVAL="${TQDM_MININTERVAL:-60}"  # progress bars in a file: once a minute, not ten times a second

# TERM (the time limit's, or Slurm's own when it cancels or requeues the job): passed on to train.py once, later ones
# ignored (`scontrol requeue` sends another)
child="" stopped=0
stop_training() { trap "" TERM; stopped=1; [ -z "$child" ] || kill -TERM "$child" 2> /dev/null; }
trap stop_training TERM
last_step() {  # the step of the run's last checkpoint, 0 without one
  local path step=0
  for path in "$dir"/checkpoint-*; do
    if [[ "${path##*-}" =~ ^[0-9]+$ ]] && [ "${path##*-}" -gt "$step" ]; then step=${path##*-}; fi
  done
  echo "$step"
}

resume=() what=training
if compgen -G "$dir/checkpoint-*" > /dev/null; then
  resume=(--resume_from_checkpoint true) what="resuming from step $(last_step)"
elif [ -d "$dir" ]; then
  resume=(--overwrite_output_dir) what="no checkpoint, starting over"
fi
echo "== $dir: $what (Slurm job $task, start $((${SLURM_RESTART_COUNT:-0} + 1)), on $(hostname)," \
  "GPU ${CUDA_VISIBLE_DEVICES:-none})"
before=$(last_step)
# bf16 where this node's GPU has it, as run_all.sh trains locally
precision=()
[ "$("$PYTHON" -c "import torch; print(torch.cuda.is_available() and torch.cuda.is_bf16_supported())")" = True ] &&
  precision=(--bf16 true)
if [ "$stopped" = 1 ]; then
  echo "error: $dir: stopped (TERM) before training started: not requeued; give the tasks more --time"
  exit 1
fi
"$PYTHON" train.py --report_to "$REPORT_TO" ${precision[@]+"${precision[@]}"} ${resume[@]+"${resume[@]}"} \
  "${run[@]:2}" &  # in the background: bash runs a trap only between commands, and in `wait`
child=$!
[ "$stopped" = 0 ] || kill -TERM "$child"  # TERM came before $child was set
wait "$child"
status=$?
[ "$stopped" = 0 ] || { wait "$child"; status=$?; }  # the trap ended the first wait: now train.py's own exit

if [ "$status" = 0 ]; then
  echo "== $dir: finished (Slurm job $task)"
elif [ "$status" = 143 ]; then
  # Requeued only when the time limit's signal stopped it (the job still RUNNING: a cancel, which TERMs the job too,
  # leaves it COMPLETING, and a task that requeued then could not be cancelled), and only after a new checkpoint (a
  # limit too short for one would requeue it for ever)
  state=$(squeue --noheader --jobs="$task" --format=%T 2> /dev/null)
  if [ "$stopped" = 1 ] && [ "$state" = RUNNING ] && [ "$(last_step)" -gt "$before" ]; then
    echo "== $dir: stopped at step $(last_step), requeued to resume (Slurm job $task)"
    scontrol requeue "$task" && exit 0
    echo "error: $dir: scontrol requeue $task failed: bash run_all.sh --slurm ... submits it again"
    exit 1
  elif [ "$(last_step)" -le "$before" ]; then
    echo "error: $dir: stopped (TERM) before its first new checkpoint: not requeued; give the tasks more --time"
  else
    echo "== $dir: stopped at step $(last_step); the job is ${state:-gone} (cancelled or preempted): not requeued"
  fi
fi
exit "$status"
