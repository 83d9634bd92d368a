#!/usr/bin/env bash
# The GPU check: seconds per Lightning step of FewShotClassifier for fo, t1t2, greedy(0.99) and rmd at
# T = 10 and 50 with the tasks batched and one by one, the peak CUDA memory of each, and the GPU's hypergradient
# against the CPU's in float32 and float64; tables printed and written to studies/gpu_check/results/. Sized to take
# under 5 minutes on an H100 (not yet timed on one). Options go to python -m studies.gpu_check (--help lists them):
#     bash scripts/gpu_check.sh --steps 3 --rounds 2
#     bash scripts/gpu_check.sh --device cpu --dataset digits --steps 1 --rounds 1 --inner-steps 2   # no GPU
# Installs nothing beyond the README's install command, and runs that only when the environment ($VENV, default
# .venv) is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || bash scripts/install.sh
exec "$VENV/bin/python" -m studies.gpu_check "$@"
