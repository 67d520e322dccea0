#!/usr/bin/env bash
# The tests: install, compile-check every CUDA source (when nvcc is here), run the CPU suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh
"$PY" -m ruff check .
if command -v nvcc >/dev/null; then
  "$PY" -m epd_kernels.build --check --jobs "${JOBS:-2}"
else
  echo "nvcc not found: skipping the CUDA compile check"
fi
exec "$PY" -m pytest -q -m "not gpu" "$@"
