"""Checkpoint cost: how long main_pretrain's checkpoint (model, AdamW state, scaler, progress, RNG
states, args) takes to write atomically and to read back with weights_only=True, how long training
pauses for it when it is written in the background (the default) or in the loop, and what that
costs a run that saves every N steps.

The optimizer state is real: one AdamW step with zero gradients creates both moment buffers of every
parameter, as after the first training step. The file goes to --dir (default: a temporary folder
under the current directory, i.e. the disk a run's output_dir would usually be on).

    python -m bench.bench_checkpoint                                   # ViT-L, CPU
    python -m bench.bench_checkpoint --model mvg_vit_base_patch16 --step_seconds 0.5 --every 1000
"""

import argparse
import os
import sys
import tempfile
import time

import torch

import main_pretrain
import pretrain_setup
from engine_pretrain import Progress
from models_mvg import MODELS
from util import checkpoint
from util.cli import ArgumentParser, log, run_main


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mvg_vit_large_patch16", choices=sorted(MODELS))
    p.add_argument("--input_size", type=int, nargs=2, default=(896, 448), metavar=("H", "W"))
    p.add_argument("--dir", help="where the checkpoint is written (default: a temporary folder here)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--step_seconds", type=float, default=1.0, help="training step time the amortised cost is given for")
    p.add_argument("--every", type=int, default=1000, help="checkpoint cadence in steps (--save_every_steps)")
    return p.parse_args(argv)


def trained_state(args):
    """A model and an AdamW with both moment buffers filled, as main builds them."""
    train_args = main_pretrain.parse_args(
        ["--model", args.model, "--input_size", *map(str, args.input_size), "--device", "cpu"]
    )
    main_pretrain.resolve_model_settings(train_args)
    model = pretrain_setup.build_model(train_args)
    optimizer = pretrain_setup.build_optimizer(model, train_args, 1e-4, torch.device("cpu"))
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer, train_args


def main(argv=None):
    args = parse_args(argv)
    model, optimizer, train_args = trained_state(args)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    parameters = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory(dir=args.dir or ".") as folder:
        path = os.path.join(folder, checkpoint.LAST)
        pauses, saves, loads = [], [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            checkpoint.save_training_state(
                path, model, optimizer, scaler, Progress(), dict(vars(train_args)), global_batch=16, world_size=1
            )
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            checkpoint.load_training_state(path)
            loads.append(time.perf_counter() - start)
            writer = checkpoint.CheckpointWriter(background=True)
            start = time.perf_counter()
            checkpoint.save_training_state(
                path,
                model,
                optimizer,
                scaler,
                Progress(),
                dict(vars(train_args)),
                global_batch=16,
                world_size=1,
                writer=writer,
            )
            pauses.append(time.perf_counter() - start)  # training would go on from here
            writer.wait()
        size = os.path.getsize(path)
    pause_s, save_s, load_s = min(pauses), min(saves), min(loads)
    log(f"{args.model}: {parameters:,} parameters; checkpoint {size / 2**30:.2f} GiB (best of {args.repeats})")
    log(
        f"atomic save (write, fsync, rename): {save_s:.1f} s ({size / 2**20 / save_s:.0f} MiB/s); "
        f"load with weights_only=True: {load_s:.1f} s"
    )
    log(
        f"training pauses for: {save_s:.1f} s with --no-checkpoint_in_background, "
        f"{pause_s:.1f} s in the background (the copy to host memory)"
    )
    budget = args.every * args.step_seconds
    log(
        f"every {args.every} steps of {args.step_seconds} s: {100 * save_s / budget:.2f}% of training time in "
        f"the loop, {100 * pause_s / budget:.2f}% in the background"
    )


if __name__ == "__main__":
    sys.exit(run_main(main))
