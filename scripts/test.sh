#!/usr/bin/env bash
# Quick start 2: install (into .venv, with the test extra), lint, and run the test suite on the CPU, offline.
# Arguments go to pytest: `bash scripts/test.sh -m "not slow"` is the fast subset (CONTRIBUTING.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
export HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
exec .venv/bin/python -m pytest "$@"
