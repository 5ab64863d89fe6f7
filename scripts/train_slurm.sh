#!/usr/bin/env bash
#SBATCH --job-name=mvg
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
#
# MVG training under SLURM on several nodes: srun starts one process per GPU and main_pretrain.py
# takes its rank from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, and the rendezvous from
# MASTER_ADDR / MASTER_PORT exported here. Precision: --precision auto, bf16 where the GPUs have it,
# else fp16 with loss scaling.
#
#   DATA=/data/prepared MAE=/ckpt/mae_pretrain_vit_large.pth OUT=runs/mvg_l sbatch scripts/train_slurm.sh
#
# Ten minutes before the time limit SLURM sends SIGUSR1: training writes checkpoint-last.pth at the
# next step and exits with status 0, and the job requeues itself unless the run is finished, as
# checkpoint-last.pth records it (all of its --epochs, or its --stop_after_steps: python -m util.cli
# finished); --auto_resume then continues at the exact sample. Extra arguments go to main_pretrain.py;
# give the output folder as OUT, not --output_dir, since OUT is where the run's progress is read. A
# run that fails (non-zero status) is not requeued, as it would only fail again: fix it and resubmit;
# --auto_resume continues from its last checkpoint, and a crash loses at most --save_every_steps steps.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "${BASH_SOURCE[0]}")/..}"

: "${DATA:?set DATA to one or more prepared roots}"
OUT="${OUT:-output_dir/mvg_vit_large}"
EPOCHS="${EPOCHS:-100}"
read -r -a data_paths <<< "$DATA"
init=()
if [ -n "${MAE:-}" ]; then
  init=(--finetune "$MAE")
fi

MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export MASTER_ADDR MASTER_PORT
# Data-loading workers are processes; keep each training process's own CPU threads modest.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

status=0
srun --kill-on-bad-exit=1 python main_pretrain.py \
  --model mvg_vit_large_patch16 --input_size 896 448 \
  --batch_size 16 --epochs "$EPOCHS" --warmup_epochs 5 --lr 1e-3 --weight_decay 0.05 --layer_decay 0.8 \
  --num_mask_patches 256 --half_mask_ratio 1.0 --max_mask_patches_per_block 128 --min_mask_patches_per_block 16 \
  --num_workers 8 --save_every_steps 1000 \
  --data_path "${data_paths[@]}" --output_dir "$OUT" --auto_resume \
  ${init[@]+"${init[@]}"} "$@" || status=$?
if [ "$status" -ne 0 ]; then
  echo "training failed with status $status; not requeued" >&2
  exit "$status"
fi

# Status 0 also ends a run stopped by the signal. The run's own record says whether it is done; a
# missing or unreadable checkpoint-last.pth is an error (status 2, one line), and set -e then ends the
# job without requeueing it.
progress="$(python -m util.cli finished "$OUT")"
if [ "$progress" = unfinished ]; then
  scontrol requeue "$SLURM_JOB_ID"
fi
