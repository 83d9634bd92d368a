#!/usr/bin/env bash
# Creates .venv (if absent) and installs lightning_hypergrad with everything it needs, offline-friendly:
# torch and torchvision at the versions pinned below, learn2learn built from source the way Python 3.11 needs,
# then the package itself (editable) with its few-shot and development extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
# torch and torchvision (a CUDA build) take about 5.6 GB in the environment, all of it about 6.2 GB: stop at once,
# naming the fix, when the disk cannot hold that, rather than failing midway with "No space left on device".
NEED_GB="${HYPERGRAD_INSTALL_NEED_GB:-7}"
if ! [[ "$NEED_GB" =~ ^[0-9]+$ ]]; then
    echo "install.sh: HYPERGRAD_INSTALL_NEED_GB must be a whole number of GB, got '$NEED_GB'" >&2
    exit 1
fi
if ! { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; }; then
    WHERE="$VENV"  # the environment's folder, or the nearest folder above it that exists
    while [ ! -e "$WHERE" ]; do WHERE="$(dirname "$WHERE")"; done
    FREE_KB=$(df -Pk "$WHERE" | awk 'NR == 2 {print $4}')
    if [ "$FREE_KB" -lt $((NEED_GB * 1024 * 1024)) ]; then
        FREE_GB=$(awk -v kb="$FREE_KB" 'BEGIN {printf "%.1f", kb / 1024 / 1024}')
        echo "install.sh: $FREE_GB GB free where $VENV goes; the install needs about $NEED_GB GB." >&2
        echo "install.sh: free disk space, or set VENV to a path on a larger disk (VENV=/big/disk/venv bash scripts/install.sh)." >&2
        exit 1
    fi
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
# learn2learn 0.2.0 is source-only and its bundled C files do not compile on Python 3.11: build it with PEP 517
# and build_ext so that Cython regenerates them, without letting pip resolve its dependencies.
if ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('learn2learn')" >/dev/null 2>&1; then
    pip install Cython numpy gym scipy tqdm requests
    pip install --use-pep517 --no-deps --config-settings="--build-option=build_ext" learn2learn==0.2.0
fi
pip install -e ".[fewshot,dev,docs]"
