#!/usr/bin/env bash
# Install the engine and what it and its tests need into the current Python, from the one
# dependency spec in pyproject.toml (an editable install, with the `test`, `http`, `bench` and `ray` extras).
# Keeps an existing torch (e.g. a CUDA build on a GPU machine) and an installed transformers
# inside the supported range; otherwise takes torch 2.13.0 (a plain `pip install torch`
# resolves a CUDA build: GBs) and the newest transformers in the range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
# --no-build-isolation: setup.py must see the installed torch to build the CUDA extension
"$PY" -m pip install -q "setuptools>=64" wheel
"$PY" -m pip install -q --no-build-isolation -e ".[test,http,bench,ray]"
