#!/usr/bin/env bash
# Segmentation table (Dice, HD95) of a checkpoint on the test splits of a prepared root.
#   scripts/eval_seg.sh CHECKPOINT PREPARED_ROOT [OUTPUT_DIR] [extra main_eval.py flags...]
# e.g. scripts/eval_seg.sh output_dir/checkpoint-last.pth data eval_seg --num_prompts 4 --precision bf16
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/eval_common.sh"
run_eval segmentation "$@"
