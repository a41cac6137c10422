#!/usr/bin/env bash
# The GPU check, as one prepared script: the speed table in bf16 (bench/gpu.py) and 100 steps of
# `accelerate launch` with DeepSpeed ZeRO-2 and Lion 8-bit, naming the optimizer DeepSpeed really steps, beside
# the same steps without DeepSpeed.
# From the repository root on the GPU machine, with the missing packages as wheels in .whl/ and a BERT uncased
# tokenizer in .gpu/tokenizer/ (`bash bench/gpu_prep.sh` makes both where pip reaches the registry; carry them):
#   bash bench/gpu.sh                  # the whole check
#   bash bench/gpu.sh --rerank_only    # the reranking table alone
set -uo pipefail
case "${1:-}" in
  -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;;
esac
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, datasets, pyarrow, bitsandbytes, deepspeed, ir_measures, bm25s
print('torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__,
      'pyarrow', pyarrow.__version__, 'bitsandbytes', bitsandbytes.__version__, 'deepspeed', deepspeed.__version__)" \
  2>&1 | grep -v "^\[" || exit 1
python3 bench/gpu.py --tokenizer .gpu/tokenizer "$@" 2>&1 | grep -vE "it/s\]|s/it\]|^\s*$|Warning|warn\("
[ "${1:-}" = --rerank_only ] && exit 0
echo
echo "## train.py, 100 steps of MiniLM-L12 with Lion 8-bit in bf16: DeepSpeed ZeRO-2 on one GPU, then plain"
echo "## python with autocast (as run_all.sh trains each run)"
flags=(--model .gpu/minilm --optim lion --lion_bits 8 --train_data data/demo:train --negatives_per_query 4
       --max_steps 100 --warmup_steps 2 --logging_steps 25 --save_strategy no --report_to none --disable_tqdm true)
keep() { grep -E "optimizer stepping|'loss'|train_runtime|rror" | grep -v "^\[" | cut -c1-300; }
accelerate launch --config_file accelerate_config.yaml train.py "${flags[@]}" --output_dir /tmp/ds-run 2>&1 | keep
python3 train.py "${flags[@]}" --bf16 true --output_dir /tmp/plain-run 2>&1 | keep
