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
# this workplace's pip config names local wheel folders that may be absent: hide those warnings only
quiet() { "$@" 2> >(grep -v "^WARNING: Location .* is ignored" >&2); }
# torch first, pinned: the versions this project is tested with (pip takes them from a local
# wheel store where one is configured, else from PyPI).
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: installing torch (first run takes a few minutes)" >&2
  quiet "${PIP[@]}" install "torch==2.14.1" "torchvision==0.29.1"
fi
# reinstall only when pyproject.toml changed since the last successful install
stamp="$VENV/.normsurgeon-install-stamp"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$VENV/bin/python" -c "import normsurgeon, onnxruntime, pytest" 2>/dev/null; then
  quiet "${PIP[@]}" install -e ".[cpu,test]" 2> >(grep -v "BuildBackendWarning\|^ *!!\|^ *\*\*\*\|return\|Please be careful\|name as your package\|with strategy\|^ *$" >&2)
  echo "$want" > "$stamp"
fi
echo "setup: ready ($("$VENV/bin/python" -c 'import torch, onnxruntime; print("torch", torch.__version__, "| onnxruntime", onnxruntime.__version__)'))" >&2
