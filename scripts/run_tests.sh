#!/usr/bin/env bash
# The test command: sets up .venv on a fresh machine, then runs the CPU test suite.
# Extra arguments go to pytest, e.g. `scripts/run_tests.sh -k masking`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
python -m pytest tests "$@"
