#!/usr/bin/env bash
# Builds the documentation site (the pages of docs/ and an API reference from the docstrings) into
# docs/_build/html, with warnings as errors so that a broken cross-reference fails the build, then runs the
# docstrings' Example:: blocks as doctests. Needs the docs tools: pip install -r docs/requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if ! "$VENV/bin/python" -c "import sphinx, myst_parser" >/dev/null 2>&1; then
    echo "docs.sh: Sphinx or myst-parser is missing from $VENV: $VENV/bin/python -m pip install -r docs/requirements.txt" >&2
    exit 1
fi
# -E: read every page again, so that every warning is reported, not only those of the pages changed since last time
"$VENV/bin/python" -m sphinx -E -W --keep-going -q -b html docs docs/_build/html
echo "docs.sh: built docs/_build/html/index.html"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --doctest-modules lightning_hypergrad
