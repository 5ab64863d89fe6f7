#!/usr/bin/env bash
# Shared by scripts/eval_*.sh: argument checks, then main_eval.py on one task's datasets.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

run_eval() {
  local task="$1"; shift
  if [ "$#" -lt 2 ]; then
    echo "usage: $(basename "$0") CHECKPOINT PREPARED_ROOT [OUTPUT_DIR] [main_eval.py flags...]" >&2
    exit 2
  fi
  local checkpoint="$1" root="$2"; shift 2
  local output_dir="eval_${task}"
  if [ "$#" -gt 0 ] && [[ "$1" != --* ]]; then output_dir="$1"; shift; fi
  [ -f "$checkpoint" ] || { echo "checkpoint not found: $checkpoint" >&2; exit 2; }
  [ -d "$root" ] || { echo "prepared root not found: $root" >&2; exit 2; }
  python "$repo_root/main_eval.py" --checkpoint "$checkpoint" --data_path "$root" --tasks "$task" \
    --output_dir "$output_dir" "$@"
  echo "results: $output_dir/results.md, $output_dir/results.json, per-case CSVs and grids/"
}
