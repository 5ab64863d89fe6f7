"""Loop overhead: training samples/s of the whole loop (main_pretrain.main) against the bare model step.

The bare step is forward + backward + AdamW on one fixed batch, with the same model, optimizer
(layer-decay groups, fused AdamW) and precision as main builds. The loop adds what training really
does: loading and collating data, per-task losses, the per-step all-reduce and sync, console and
TensorBoard logging, checkpoints at their cadence. Its steps are timed inside a real run of main by
wrapping the lr schedule (pretrain_setup.lr_at), which the loop calls once at the start of every
step; the first --warmup steps of both are left out. Runs alternate with the bare timing (a shared
machine's slow spells hit both) and medians are reported. Data is the MNI152 template prepared by
the project's prepare tool (as bench_data.py), unless --data names prepared roots.

    python -m bench.bench_train                                   # CPU-sized default
    python -m bench.bench_train --model mvg_vit_base_patch16 --input_size 896 448 --batch_size 8 \
        --device cuda --precision bf16 --num_workers 8 --steps 60
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import main_pretrain
import pretrain_setup
from bench.bench_data import prepared_mni
from datasets.canvas import to_model_inputs
from flags import add_runtime_flags
from util.cli import ArgumentParser, log, run_main
from util.runtime import autocast, resolve_precision


def parse_args(argv=None):
    """The arguments, --precision resolved for --device as training resolves it."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="*", default=[], help="prepared roots (default: MNI152 in a temp dir)")
    p.add_argument("--model", default="mvg_vit_tiny_patch16")
    p.add_argument("--input_size", type=int, nargs=2, default=(224, 112), metavar=("H", "W"))
    p.add_argument("--batch_size", type=int, default=8)
    add_runtime_flags(p)
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads of the training process (0: torch default). On a small CPU, leaving "
        "cores to the data workers separates the loop overhead from the competition for cores, "
        "as on a GPU node where the step runs on the card and the workers on the CPU",
    )
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="alternating repetitions; medians are reported")
    p.add_argument("--save_every_steps", type=int, default=1000, help="main's default checkpoint cadence")
    args = p.parse_args(argv)
    args.precision = resolve_precision(args.precision, args.device)
    return args


def train_argv(args, data, out, steps):
    num_mask = (args.input_size[0] // 16) * (args.input_size[1] // 16) // 6
    return [
        "--model",
        args.model,
        "--input_size",
        *map(str, args.input_size),
        "--batch_size",
        str(args.batch_size),
        "--device",
        args.device,
        "--precision",
        args.precision,
        "--attention",
        args.attention,
        "--num_workers",
        str(args.num_workers),
        "--data_path",
        *data,
        "--output_dir",
        str(out),
        "--samples_per_epoch",
        str(steps * args.batch_size),
        "--epochs",
        "1",
        "--warmup_epochs",
        "0.1",
        "--lr",
        "1e-4",
        "--num_mask_patches",
        str(num_mask),
        "--min_mask_patches_per_block",
        "4",
        "--max_mask_patches_per_block",
        str(num_mask),
        "--half_mask_ratio",
        "0.5",
        "--save_every_steps",
        str(args.save_every_steps),
        "--save_every_epochs",
        "0",
    ]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_seconds_per_step(args, data, folder, repeat):
    """(mean time of the steps after the warm-up, mean wait for data per step) in one run of main."""
    starts = []
    schedule = pretrain_setup.lr_at

    def timed_schedule(*schedule_args):
        starts.append(time.perf_counter())
        return schedule(*schedule_args)

    pretrain_setup.lr_at = timed_schedule
    out = Path(folder) / f"run{repeat}"
    try:
        main_pretrain.main(train_argv(args, data, out, args.warmup + args.steps + 1))
    finally:
        pretrain_setup.lr_at = schedule
    data_wait = json.loads((out / "log.txt").read_text().splitlines()[-1])["train_data_time"]
    return (starts[-1] - starts[args.warmup]) / (len(starts) - 1 - args.warmup), data_wait


def bare_seconds_per_step(args, data, folder):
    """The same model, optimizer and precision on one batch of the same data, nothing else."""
    train_args = main_pretrain.parse_args(train_argv(args, data, Path(folder) / "bare", args.steps))
    main_pretrain.resolve_model_settings(train_args)
    device = torch.device(args.device)
    model = pretrain_setup.build_model(train_args).to(device).train()
    dataset = pretrain_setup.build_dataset(train_args, pretrain_setup.build_mixture(train_args), model.patch_size)
    batch = to_model_inputs(next(iter(torch.utils.data.DataLoader(dataset, batch_size=args.batch_size))), device)
    optimizer = pretrain_setup.build_optimizer(model, train_args, 1e-4, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    def step():
        with autocast(device, args.precision):
            loss, _, _ = model(batch["imgs"], batch["tgts"], batch["mask"], batch["valid"])
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / args.steps


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        data = args.data or [str(prepared_mni(Path(folder)))]
        bare, loop, data_wait = [], [], []
        for repeat in range(args.repeats):  # alternated, so a slow spell of a shared machine hits both
            bare.append(bare_seconds_per_step(args, data, folder))
            seconds, wait = loop_seconds_per_step(args, data, folder, repeat)
            loop.append(seconds)
            data_wait.append(wait)
    bare_s, loop_s, wait_s = (statistics.median(x) for x in (bare, loop, data_wait))
    log(
        f"\n{args.model}, input {args.input_size[0]}x{args.input_size[1]}, batch {args.batch_size}, "
        f"{args.device} ({torch.get_num_threads()} threads), {args.precision}, {args.num_workers} data worker(s), "
        f"median of {args.repeats}"
    )
    log(
        f"bare step:  {args.batch_size / bare_s:8.2f} samples/s   "
        f"(runs: {', '.join(f'{args.batch_size / t:.2f}' for t in bare)})"
    )
    log(
        f"full loop:  {args.batch_size / loop_s:8.2f} samples/s   "
        f"(runs: {', '.join(f'{args.batch_size / t:.2f}' for t in loop)})"
    )
    log(
        f"loop overhead: {100 * (loop_s / bare_s - 1):.1f}% of the bare step time, of which waiting for "
        f"data {100 * wait_s / bare_s:.1f}% ({1000 * wait_s:.1f} ms/step)"
    )


if __name__ == "__main__":
    sys.exit(run_main(main))
