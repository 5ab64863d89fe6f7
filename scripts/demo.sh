#!/usr/bin/env bash
# The README's first command: sets up .venv on a fresh machine, then trains and evaluates MVG on real
# MRI (the MNI152 template shipped with nilearn) on the CPU. Options go to scripts/demo.py
# (--steps, --minutes, --out, --fresh, --fast); see `python -m scripts.demo --help`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
python -m scripts.demo "$@"
