#!/usr/bin/env bash
# The peers of the peers study (python -m studies.peers), installed into .peers/ for that study only: never into
# the environment, never dependencies of the package. learn2learn comes with the package's fewshot extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" -m pip install --quiet --target .peers --no-deps higher==0.2.1 torchopt==0.7.3 optree graphviz
echo "peers installed into .peers/ (python -m studies.peers finds them there)"
