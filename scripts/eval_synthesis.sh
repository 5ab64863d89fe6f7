#!/usr/bin/env bash
# Synthesis table (PSNR, SSIM) of a checkpoint on the test splits of a prepared root.
#   scripts/eval_synthesis.sh CHECKPOINT PREPARED_ROOT [OUTPUT_DIR] [extra main_eval.py flags...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/eval_common.sh"
run_eval synthesis "$@"
