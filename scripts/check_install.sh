#!/usr/bin/env bash
# The package as a pip user gets it: builds the sdist and the wheel, installs the wheel (not editable) into a fresh
# virtual environment outside the checkout, and from an empty folder elsewhere
#   1. imports it and runs a plain-API problem and an HPO fit without the few-shot extra,
#   2. checks that the few-shot quickstart then stops with one line naming the extra,
#   3. installs the extra with the README's command and runs the quickstart, checking what it leaves in the folder;
# then (unless OLDEST=0) installs the oldest versions that pyproject.toml admits and runs the test subset
# scripts/oldest_tests.txt from the checkout against them.
# Usage: bash scripts/check_install.sh   (about 8 minutes and 6 GB of disk, removed at the end; KEEP=1 keeps them)
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKOUT="$(pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/lh-install.XXXXXX")"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
say() { printf '\n== %s\n' "$*"; }

say "build the sdist and the wheel"
"$CHECKOUT/.venv/bin/python" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
rm -rf build lightning_hypergrad.egg-info
WHEEL="$(ls "$WORK"/dist/*.whl)"
ls "$WORK/dist"

say "install the wheel into a fresh environment"
"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
# (a machine's pip configuration may name local package folders that do not exist: those warnings are dropped)
pip() {
    "$PY" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor" || true; }
}
pip install "$WHEEL"
mkdir -p "$WORK/user" && cd "$WORK/user"

say "without the few-shot extra: import, a plain-API problem, an HPO fit"
"$PY" - "$CHECKOUT" <<'EOF'
import sys
from pathlib import Path

import torch

import lightning_hypergrad as lh

checkout = Path(sys.argv[1]).resolve()
where = Path(lh.__file__).resolve()
assert checkout not in where.parents, f"imported from the checkout: {where}"
for name in ("learn2learn", "gym"):
    assert name not in sys.modules, f"import lightning_hypergrad imported {name}"
h = torch.ones(3, dtype=torch.float64, requires_grad=True)
problem = lh.BilevelProblem(
    inner_loss=lambda w, h: 0.5 * ((w[0] - h[0]) ** 2).sum(),
    outer_loss=lambda w, h: 0.5 * (w[0] ** 2).sum(),
    hyperparameters=[h],
    init_params=[torch.zeros(3, dtype=torch.float64)],
    optimizer=lh.SGD(lr=0.5),
    steps=4,
)
result = lh.get_estimator("rmd")(problem)
# w_4 = (1 - 0.5^4) h: d/dh 0.5 |w_4|^2 = (1 - 0.5^4)^2 h
expected = (1 - 0.5**4) ** 2
assert torch.allclose(result.hypergrads[0], torch.full((3,), expected, dtype=torch.float64)), result.hypergrads
print(f"rmd on a quadratic: {result.hypergrads[0].tolist()} (closed form {expected}), from {where.parent}")
EOF
"$WORK/venv/bin/lightning-hypergrad" fit --config hpo/weight_decay --trainer.max_steps 2 --trainer.logger false \
    --trainer.enable_progress_bar false
set +e
"$WORK/venv/bin/lightning-hypergrad" fit --config quickstart --trainer.logger false 2>"$WORK/noextra.err"
code=$?
set -e
cat "$WORK/noextra.err"
[ "$code" = 1 ] && grep -q "^error: .*the few-shot extra" "$WORK/noextra.err" && ! grep -q Traceback "$WORK/noextra.err" \
    || { echo "check_install: the quickstart without the extra did not stop with one line naming it"; exit 1; }

say "the few-shot extra, with the README's command, then the quickstart"
FEWSHOT_COMMAND="$("$PY" -c "from lightning_hypergrad.data._learn2learn import FEWSHOT_COMMAND as c; print(c)")"
echo "$FEWSHOT_COMMAND"
(PATH="$WORK/venv/bin:$PATH" eval "$FEWSHOT_COMMAND") 2>&1 | { grep -v "is ignored: it is neither a file nor" || true; }
pip install "$WHEEL[fewshot]"  # satisfied by now: installs nothing more
rm -rf "$WORK/user"/* "$WORK/user"/.[!.]* 2>/dev/null || true
"$WORK/venv/bin/lightning-hypergrad" fit --config quickstart --trainer.enable_progress_bar false 2>&1 | tail -n 25
left="$(ls -A "$WORK/user" | sort | tr '\n' ' ')"
echo "left in the folder: $left"
[ "$left" = "lightning-hypergrad wandb " ] || { echo "check_install: the quickstart left $left"; exit 1; }

if [ "${OLDEST:-1}" != 0 ]; then
    say "the oldest versions that pyproject.toml admits"
    cd "$CHECKOUT"
    pip install -r scripts/oldest.txt
    "$PY" -m pip --disable-pip-version-check list 2>/dev/null \
        | grep -i -E "^(torch|torchvision|lightning|torchmetrics|jsonargparse|wandb|numpy|scikit-learn) "
    pip install "pytest>=7.4" "hypothesis>=6.100"
    # the checkout's tests, against the installed dependencies (the package itself is imported from the checkout)
    "$PY" -m pytest -q -p no:cacheprovider $(grep -v '^#' scripts/oldest_tests.txt)
fi
say "check_install: all passed"
