#!/usr/bin/env bash
# The demo: image + prompt -> streamed text. Installs what it needs first.
# Without MODEL it uses a tiny random LLaVA made locally (the text is gibberish, the pipeline is real).
#   MODEL=/path/to/llava-1.5-7b-hf bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh
IMG=$(mktemp --suffix=.png)
"$PY" - "$IMG" <<'PYEOF'
import sys
import numpy as np
from PIL import Image
y, x = np.mgrid[0:240, 0:320]
rgb = np.stack([x * 255 // 320, y * 255 // 240, 128 + 0 * x], -1).astype(np.uint8)
Image.fromarray(rgb).save(sys.argv[1])
PYEOF
exec "$PY" scripts/generate.py ${MODEL:+--model "$MODEL"} --image "$IMG" --prompt "${PROMPT:-What is in this picture?}" \
  --max-tokens "${MAX_TOKENS:-48}" "$@"
