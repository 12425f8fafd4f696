#!/usr/bin/env bash
# Create or refresh the project virtualenv (.venv) and install normsurgeon with its CPU and test
# extras. Idempotent: a second run only checks what is installed. Override the interpreter with
# PYTHON=python3.12, the venv location with VENV=path.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip >/dev/null
# torch first, pinned: the versions this project is tested with (pip takes them from a local
# wheel store where one is configured, else from PyPI).
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: installing torch (first run takes a few minutes)" >&2
  "${PIP[@]}" install "torch==2.14.1" "torchvision==0.29.1"
fi
"${PIP[@]}" install -e ".[cpu,test]"
echo "setup: ready ($("$VENV/bin/python" -c 'import torch, onnxruntime; print("torch", torch.__version__, "| onnxruntime", onnxruntime.__version__)'))" >&2
