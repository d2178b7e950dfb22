#!/usr/bin/env bash
# The threshold study on a CUDA machine, in one go: every point through the hybrid runtime (the GPU
# executor holds attention and GPU_SHARE of each layer's FFN neurons on the GPU, the CPU executor the
# rest), then the hot sweep, then the report. Results go to their own folder and report, and each
# summary names its machine: Pass@1 compares with the CPU runs, tok/s and wall times do not.
#
#   PYTHON=/path/to/python-with-cuda-torch benchmarks/gpu_sweep.sh
#   MODELS=llama-33b,llama-2-70b GPU_SHARE=0.3 benchmarks/gpu_sweep.sh   # paper-scale, weights under $PINFER_MODELS
#
# Needs: pinfer installed in that Python (pip install -e . --no-deps beside a CUDA build of torch) and
# the offline results of every model (`pinfer prepare --model M --sparsity 0.3 0.5 0.7 0.8 0.9`);
# points whose results are missing are skipped with a warning. Rerun to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MODELS=${MODELS:-qwen2.5-coder-0.5b,qwen2.5-coder-1.5b}
GPU_SHARE=${GPU_SHARE:-1.0}
OUT=benchmarks/results/humaneval-cuda

"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to this torch")'
"$PY" benchmarks/threshold_sweep.py --models "$MODELS" --kinds predictor,gate --gpu-share "$GPU_SHARE" \
    --out "$OUT" "$@"
"$PY" benchmarks/threshold_sweep.py --models "$MODELS" --kinds hot --gpu-share "$GPU_SHARE" --out "$OUT" "$@"
"$PY" benchmarks/humaneval_report.py --root "$OUT" --out benchmarks/results/humaneval_threshold-cuda
