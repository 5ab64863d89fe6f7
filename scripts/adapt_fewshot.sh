#!/usr/bin/env bash
# Few-shot adaptation to a dataset the model has not seen: evaluate, finetune on its first K training
# cases, evaluate again with contexts from the same K cases, and print the two tables side by side.
#
#   scripts/adapt_fewshot.sh CHECKPOINT PREPARED_ROOT DATASET K [OUTPUT_DIR] [main_pretrain.py flags...]
#   e.g. scripts/adapt_fewshot.sh mvg.pth data MSD_spleen 5 adapt_spleen --precision bf16
#
# Environment (defaults in brackets): EPOCHS [20], SAMPLES_PER_EPOCH [200], BATCH [4], LR [1e-4],
# DEVICE [cuda if available], EVAL_FLAGS [""] (extra main_eval.py flags, e.g. "--num_prompts 4").
# The model, canvas size, depth and label encoding come from the checkpoint's record (main_eval.py and
# main_pretrain.py --finetune read it); its masking flags are passed on from its training arguments.
# A checkpoint without a record (the authors') needs them as flags: EVAL_FLAGS and the extra arguments.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ "$#" -lt 4 ]; then
  echo "usage: $(basename "$0") CHECKPOINT PREPARED_ROOT DATASET K [OUTPUT_DIR] [main_pretrain.py flags...]" >&2
  exit 2
fi
checkpoint="$1" root="$2" dataset="$3" k="$4"; shift 4
out="adapt_${dataset}_${k}"
if [ "$#" -gt 0 ] && [[ "$1" != --* ]]; then out="$1"; shift; fi
[ -f "$checkpoint" ] || { echo "checkpoint not found: $checkpoint" >&2; exit 2; }
[ -f "$root/$dataset/manifest.json" ] || { echo "no prepared dataset $root/$dataset (manifest.json missing)" >&2; exit 2; }
[[ "$k" =~ ^[1-9][0-9]*$ ]] || { echo "K must be a positive number of cases, got '$k'" >&2; exit 2; }
device="${DEVICE:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
read -r -a eval_flags <<< "${EVAL_FLAGS:-}"
mkdir -p "$out"

# The masking the checkpoint was trained with, as main_pretrain.py flags.
read -r -a masking < <(cd "$repo_root" && python - "$checkpoint" <<'PY'
import sys
from util.checkpoint import read_checkpoint, recorded_args
from util.cli import UsageError
try:
    args = recorded_args(read_checkpoint(sys.argv[1]))
except UsageError as error:
    sys.exit(f"error: {error}")
flags = []
for name in ('num_mask_patches', 'min_mask_patches_per_block', 'max_mask_patches_per_block'):
    if args.get(name):
        flags += [f'--{name}', str(args[name])]
print(' '.join(flags))
PY
)

evaluate() {  # evaluate CHECKPOINT OUTPUT_DIR
  python "$repo_root/main_eval.py" --checkpoint "$1" --data_path "$root" --datasets "$dataset" \
    --context_cases "$k" --device "$device" --output_dir "$2" ${eval_flags[@]+"${eval_flags[@]}"}
}

echo "== before adaptation"
evaluate "$checkpoint" "$out/before"

echo "== finetuning on the first $k training cases of $dataset"
printf '{"datasets": [{"path": "%s", "num_cases": %d}]}\n' "$(cd "$root/$dataset" && pwd)" "$k" > "$out/mixture.json"
python "$repo_root/main_pretrain.py" ${masking[@]+"${masking[@]}"} --finetune "$checkpoint" --mixture "$out/mixture.json" \
  --epochs "${EPOCHS:-20}" --samples_per_epoch "${SAMPLES_PER_EPOCH:-200}" --batch_size "${BATCH:-4}" \
  --lr "${LR:-1e-4}" --warmup_epochs 1 --device "$device" --output_dir "$out/finetune" \
  --save_every_epochs 0 --vis_every_steps 0 "$@"

echo "== after adaptation"
evaluate "$out/finetune/checkpoint-last.pth" "$out/after"

python "$repo_root/main_eval.py" --compare "$out/before/results.json" "$out/after/results.json" | tee "$out/before_after.md"
