#!/usr/bin/env bash
# MVG training on one machine, one process per GPU: the seed README's recipe (ViT-L/16, 896x448
# canvases, 100 epochs, initialised from MAE ViT-L), in bf16 where the GPUs have it, else in fp16
# with loss scaling as the authors (--precision auto; pass --precision fp16 for theirs). Running the
# same command again continues from the newest valid checkpoint in OUT (--auto_resume), at the exact
# sample.
#
#   DATA=/data/prepared MAE=/ckpt/mae_pretrain_vit_large.pth scripts/train_single_node.sh
#   DATA="/data/prepared_a /data/prepared_b" GPUS=4 OUT=runs/mvg_l scripts/train_single_node.sh --accum_iter 2
#
# DATA: prepared roots (python -m datasets.prepare), space separated; MAE: optional initial weights;
# GPUS: processes (default: every GPU nvidia-smi lists); OUT: run folder. Extra arguments go to
# main_pretrain.py and override the ones below. On several machines use torchrun's rendezvous, e.g.
#   torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
#       --rdzv_id mvg main_pretrain.py ...      (the same command on every machine)
# or scripts/train_slurm.sh under SLURM.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

: "${DATA:?set DATA to one or more prepared roots}"
GPUS="${GPUS:-$(nvidia-smi --list-gpus | wc -l)}"
OUT="${OUT:-output_dir/mvg_vit_large}"
read -r -a data_paths <<< "$DATA"
init=()
if [ -n "${MAE:-}" ]; then
  init=(--finetune "$MAE")
fi

exec torchrun --standalone --nproc_per_node "$GPUS" main_pretrain.py \
  --model mvg_vit_large_patch16 --input_size 896 448 \
  --batch_size 16 --epochs 100 --warmup_epochs 5 --lr 1e-3 --weight_decay 0.05 --layer_decay 0.8 \
  --num_mask_patches 256 --half_mask_ratio 1.0 --max_mask_patches_per_block 128 --min_mask_patches_per_block 16 \
  --num_workers 8 \
  --data_path "${data_paths[@]}" --output_dir "$OUT" --auto_resume \
  ${init[@]+"${init[@]}"} "$@"
