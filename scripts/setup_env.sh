#!/usr/bin/env bash
# Create .venv (once) and install looper with the given extras. torch 2.13.0 goes in first so that nothing pulls a
# CUDA build of a newer torch. Idempotent: the editable install is redone only when pyproject.toml or the extras change
# (a stamp in .venv records what was installed), so a second run costs a second.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
stamp=".venv/.looper-install"  # "<pyproject.toml's hash> <extras installed>"
{ read -r hash installed < "$stamp"; } 2>/dev/null || true
if [ "${hash:-}" != "$(sha256sum pyproject.toml | cut -d' ' -f1)" ] || { [ -n "$extras" ] && [ "$extras" != "${installed:-}" ]; }; then
  .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
  echo "$(sha256sum pyproject.toml | cut -d' ' -f1) ${extras}" > "$stamp"
fi
