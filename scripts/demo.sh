#!/usr/bin/env bash
# Quick start 1: install (into .venv) and run the whole pipeline offline on the tiny model and synthetic data.
# Extra arguments are Hydra overrides, e.g. `bash scripts/demo.sh stage=dpo reward.beta=0.5`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m looper "$@"
