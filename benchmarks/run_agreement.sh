#!/usr/bin/env bash
# The WeightWatcher agreement gate (tox -e agreement): exits non-zero when ww_core no longer agrees
# with weightwatcher==0.7.7 as README.md and docs/ww-agreement.md claim.
#   1. tests/agreement_ww_reference.py: the committed tests/data/ww077_reference.json (the
#      reference numbers of the engine tests) is still what WeightWatcher 0.7.7 computes;
#   2. benchmarks/ww_agreement.py: both tools on real pretrained models; every model must satisfy
#      its line of CLAIMS in that file (per-layer alpha tolerance, number of layers) and of
#      PARITY_CLAIMS in benchmarks/ww_parity.py (detX columns, describe(), distances()).
#
# Usage: bash benchmarks/run_agreement.sh [--write-doc] [MODEL ...]
#   MODEL ...    only these models (see `python benchmarks/ww_agreement.py list`); skips step 1
#   --write-doc  also refresh the committed record: docs/ww-agreement.md and the CSVs in
#                benchmarks/results/ (all models only). Without it no tracked file is written.
# Environment:
#   WWREF_PY          (required) python of a venv with weightwatcher==0.7.7 (tox -e agreement builds
#                     one: see the [wwref] section of tox.ini for the packages)
#   DEV_PY            python that imports ww_core (default: python)
#   WW_AGREEMENT_OUT  folder for the per-model CSVs and reference_meta.json (default: a new
#                     temporary folder; its path is printed)
#   REPEAT            time the best of REPEAT analyze() runs per side (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${WWREF_PY:-}" ]; then
    echo "run_agreement.sh: WWREF_PY is not set: point it to the python of a venv with" \
         "weightwatcher==0.7.7 (tox -e agreement builds one and sets it)" >&2
    exit 2
fi
if ! "$WWREF_PY" -c "import weightwatcher" 2>/dev/null; then
    echo "run_agreement.sh: WWREF_PY=$WWREF_PY cannot import weightwatcher" >&2
    exit 2
fi
DEV_PY="${DEV_PY:-python}"
REPEAT="${REPEAT:-1}"

write_doc=0
models=()
for arg in "$@"; do
    case "$arg" in
        --write-doc) write_doc=1 ;;
        -*) echo "run_agreement.sh: unknown option $arg" >&2; exit 2 ;;
        *) models+=("$arg") ;;
    esac
done
doc_args=()
if [ "$write_doc" = 1 ]; then
    if [ "${#models[@]}" -gt 0 ]; then
        echo "run_agreement.sh: --write-doc renders every model; do not name models" >&2
        exit 2
    fi
    RESULTS=benchmarks/results
    doc_args=(--doc docs/ww-agreement.md)
else
    RESULTS="${WW_AGREEMENT_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/ww-agreement.XXXXXX")}"
fi
mkdir -p "$RESULTS"
echo "run_agreement.sh: results in $RESULTS"
model_args=()
if [ "${#models[@]}" -gt 0 ]; then model_args=(--models "${models[@]}"); fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES="" WWREF_PY

if [ "${#models[@]}" -eq 0 ]; then
    "$DEV_PY" -m pytest -q -p no:cacheprovider tests/agreement_ww_reference.py
else
    echo "run_agreement.sh: models named: tests/agreement_ww_reference.py not run"
fi
# WeightWatcher prints a line per small-N fit; keep its other output. (pipefail: a failure of the
# reference side fails the script.)
"$WWREF_PY" benchmarks/ww_agreement.py reference --out "$RESULTS" --repeat "$REPEAT" ${model_args[@]+"${model_args[@]}"} 2>&1 \
    | { grep -v "SMALL N PL FIT" || true; }
"$DEV_PY" benchmarks/ww_agreement.py compare --results "$RESULTS" --repeat "$REPEAT" ${doc_args[@]+"${doc_args[@]}"} \
    ${model_args[@]+"${model_args[@]}"}
