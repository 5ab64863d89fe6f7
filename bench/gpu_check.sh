#!/usr/bin/env bash
# One GPU check in about nine minutes (a lent device has 15 in all, a minute or two of which go on
# starting it): the CUDA paths the CPU tests cannot reach, and the figures bench/README.md still lacks,
# most wanted first. Each stage has its own time limit (they sum to 505 s), so one that hangs does not
# take the others with it; everything is also written to $LOG. Run it with timeout_s 600.
#
#   bash bench/gpu_check.sh [prepared-data-root]
#
# Stages:
#   1. the device, torch and CUDA versions, and the Python packages the later stages import
#   2. the attention paths (rel_pos_attention.ATTENTION_PATHS): tests/test_attention.py's CUDA tests
#      (augmented and flex against eager with gradients, augmented in bf16 on a fused kernel)
#   3. ViT-L, 896x448, batch 16, bf16, the augmented path: step time, MFU and peak memory, then a
#      profile of one step (its costliest kernels, device busy time against wall time)
#   4. bench_vs_authors.py at the same canvas, batch and precision, where the authors' release is at
#      hand: set AUTHORS_REPO, or copy their checkout to .authors_mvg/ (git-ignored; carry it)
#   5. the same step as 3 under torch.compile
#   6. bench_inference.py: ViT-L query slices per second at 896x448 in bf16
#   7. main_pretrain.py under torchrun with nccl (ViT-B, so that its checkpoints write fast): fp16
#      with the grad scaler, checkpoints every 10 steps in the background, then --auto_resume to step 30
# The four attention paths side by side at batch 8 were measured in an earlier lent session
# (bench/README.md); rerun stage 3 with --attention fused eager augmented flex to repeat them.
#
# Data: a prepared root (default: bench_data.py's MNI152 preparation, which needs nilearn's files;
# preparing it here and carrying it saves the device the time). Where the GPU machine lacks packages,
# put their wheels in .whl/ and set WHEELS=1. A Python 3.12 machine with torch, timm and scikit-learn
# but without nibabel, monai and nilearn (16 MB of wheels; stage 6 reads the MNI152 template from
# nilearn's files, found without importing it):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl nibabel monai nilearn
#   WHEELS=1 bash bench/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
DATA=${1:-}
LOG=${LOG:-${OUT:-/tmp}/gpu_check.log}
WORK=$(mktemp -d)
AUTHORS_REPO=${AUTHORS_REPO:-.authors_mvg}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [ "${WHEELS:-0}" = 1 ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

stage() { echo; echo "=== $*"; }
run() {  # run LIMIT_SECONDS command...: a failure is reported and the next stage goes on
    local limit=$1; shift
    timeout "$limit" "$@" || echo "!!! exit status $? (limit ${limit}s): $*"
}

{
stage "1. device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, \
'device', torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())"
$PY -c "import importlib.util as u; missing = [m for m in ('nibabel', 'monai', 'nilearn', 'scipy', 'tensorboard') \
if u.find_spec(m) is None]; print('missing packages:', ' '.join(missing) if missing else 'none')"

if [ -z "$DATA" ]; then
    $PY -c "from pathlib import Path; from bench.bench_data import prepared_mni; \
prepared_mni(Path('$WORK'))" || exit 1
    DATA=$WORK/prepared
fi
TRAIN=(--data_path "$DATA" --input_size 896 448 --batch_size 8 --num_workers 8 --epochs 1 --warmup_epochs 0.1
       --num_mask_patches 256 --max_mask_patches_per_block 128 --min_mask_patches_per_block 16 --print_freq 5
       --vis_every_steps 0 --save_every_epochs 0)
VIT_L=(--model mvg_vit_large_patch16 --input_size 896 448 --batch_size 16 --device cuda --precision bf16)

stage "2. attention paths against eager on CUDA"
run 45 $PY -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_canvas_pixels.py -k "cuda or gpu"

stage "3. ViT-L 896x448 batch 16 bf16, augmented attention: step, MFU, memory; profile of one step"
run 75 $PY -m bench.bench_model "${VIT_L[@]}" --attention augmented --checkpointing off --steps 3 --warmup 1 \
    --profile 30

stage "4. against the authors' release, ViT-L 896x448 batch 16, bf16"
if [ -f "$AUTHORS_REPO/models_mvg.py" ]; then
    run 120 $PY -m bench.bench_vs_authors --authors_repo "$AUTHORS_REPO" --input_size 896 448 --batch_size 16 \
        --device cuda --precision bf16 --steps 3 --warmup 1
else
    echo "skipped: no authors' checkout at $AUTHORS_REPO"
fi

stage "5. the step of stage 3 under torch.compile"
run 120 $PY -m bench.bench_model "${VIT_L[@]}" --attention augmented --checkpointing off --steps 3 --warmup 2 \
    --compile

stage "6. inference, ViT-L 896x448, bf16"
run 45 $PY -m bench.bench_inference --models mvg_vit_large_patch16 --device cuda --precision bf16 \
    --slices 64 --batch_size 16 --scale fit

stage "7. torchrun + nccl, fp16 grad scaler, background checkpoints, resume (ViT-B)"
run 50 torchrun --nproc_per_node=1 --master_port 29533 main_pretrain.py --model mvg_vit_base_patch16 \
    "${TRAIN[@]}" --precision fp16 --samples_per_epoch 400 --stop_after_steps 20 --save_every_steps 10 \
    --output_dir "$WORK/run"
run 50 torchrun --nproc_per_node=1 --master_port 29534 main_pretrain.py --model mvg_vit_base_patch16 \
    "${TRAIN[@]}" --precision fp16 --samples_per_epoch 400 --stop_after_steps 30 --save_every_steps 10 \
    --output_dir "$WORK/run" --auto_resume
ls -la "$WORK/run"
} 2>&1 | tee "$LOG"
rm -rf "$WORK"
