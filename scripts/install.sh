#!/usr/bin/env bash
# Install what the engine and its tests need into the current Python, from scratch.
# Keeps an existing torch (e.g. a CUDA build on a GPU machine); otherwise takes torch 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q "transformers==5.17.0" tokenizers safetensors numpy pillow multiprocess pybind11 ninja \
  pytest ruff
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
