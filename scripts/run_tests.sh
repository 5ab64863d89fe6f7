#!/usr/bin/env bash
# The test command: sets up .venv on a fresh machine, checks lint and formatting (ruff, settings in
# pyproject.toml), then runs the CPU test suite. Extra arguments go to pytest, e.g.
# `scripts/run_tests.sh -k masking`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
python -m ruff check .
python -m ruff format --check .
python -m pytest tests "$@"
