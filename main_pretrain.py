"""Trains MVG: arguments and the run's course; the loop of one epoch is engine_pretrain.py, what a run
is built of pretrain_setup.py, resuming and the output folder pretrain_resume.py.

One process per device; launch with torchrun (one node or several), srun (SLURM), or plain python:

    torchrun --nproc_per_node=8 main_pretrain.py --batch_size 16 --model mvg_vit_large_patch16 \
        --epochs 100 --warmup_epochs 5 --lr 1e-3 --weight_decay 0.05 --num_mask_patches 256 \
        --half_mask_ratio 1.0 --input_size 896 448 --data_path /data/prepared \
        --finetune mae_pretrain_vit_large.pth
    python main_pretrain.py --device cpu --model mvg_vit_tiny_patch16 --input_size 64 32 ...

See scripts/train_single_node.sh and scripts/train_slurm.sh. Outputs in --output_dir:
checkpoint-last.pth (every --save_every_steps steps and each epoch end), checkpoint-{epoch}.pth
(every --save_every_epochs epochs, the newest --keep_checkpoints kept), log.txt (one JSON line per
epoch) and TensorBoard events (in --log_dir, default the same folder).

Stopping: SIGTERM, SIGUSR1 (SLURM) and a first Ctrl-C end the run at the next step with
checkpoint-last.pth written and exit status 0; a second Ctrl-C aborts at once, losing the steps since
the last checkpoint (which stays whole: checkpoints are written atomically). --auto_resume continues.
"""

import argparse
import contextlib
import os
import signal
import sys
import time

import torch

import models_mvg
from datasets.canvas import CONTEXT_FROM
from datasets.mixture import BALANCES, MIXTURE_RECIPES
from engine_pretrain import Progress, train_one_epoch
from flags import add_model_flags, add_runtime_flags
from pretrain_resume import check_model_fits, finish_epoch, restore, set_up_output
from pretrain_setup import (
    StepPlan,
    build_dataset,
    build_loader,
    build_mixture,
    build_model,
    build_optimizer,
    canvas_record,
    seed_everything,
)
from util import checkpoint, misc
from util.cli import ArgumentParser, UsageError, log, run_main
from util.record import SETTING_FLAGS, RecordedSettings, recorded_settings, resolve_settings
from util.runtime import resolve_precision

# What a run without --finetune (or whose checkpoint records nothing) uses.
DEFAULTS = {"model": "mvg_vit_large_patch16", "input_size": [896, 448], "label_encoding": "random_colors"}


def shown(value) -> str:
    """A flag's value as it is typed: a list as its items."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser("MVG training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = argparse.BooleanOptionalAction

    g = p.add_argument_group("run length and batch")
    g.add_argument("--batch_size", type=int, default=16, help="canvases per device per micro-step")
    g.add_argument(
        "--accum_iter",
        type=int,
        default=1,
        help="micro-steps per optimizer step; effective batch = batch_size x accum_iter x processes",
    )
    g.add_argument("--epochs", type=int, default=100, help="at least 1")
    g.add_argument(
        "--samples_per_epoch",
        type=int,
        default=None,
        help="canvases per epoch (default: the number of training slices)",
    )
    g.add_argument(
        "--start_epoch",
        type=int,
        default=0,
        help="without a checkpoint to resume: start at this epoch (lr schedule included)",
    )
    g.add_argument(
        "--stop_after_steps",
        type=int,
        default=0,
        help="stop after this global step, saving checkpoint-last.pth (0: run all epochs); "
        "for jobs shorter than the run, and tests",
    )

    g = p.add_argument_group(
        "model",
        "without --finetune, or where its checkpoint records nothing: "
        + " ".join(f"--{name} {shown(value)}" for name, value in DEFAULTS.items()),
    )
    add_model_flags(g, recorded_by="--finetune's checkpoint")
    g.add_argument("--drop_path", type=float, default=None, help="drop path rate (default: the model's)")
    g.add_argument(
        "--min_visible_target",
        type=float,
        default=0.0,
        help="leave a sample out of the loss when its visible target's mean intensity (0..1) is "
        f"below this; 0 keeps all; {models_mvg.AUTHORS_MIN_VISIBLE_TARGET:.3g} is the authors' rule",
    )
    g.add_argument(
        "--grad_checkpointing",
        action=flag,
        default=False,
        help="recompute block activations in the backward pass (less memory, ~30%% slower)",
    )
    g.add_argument("--compile", action=flag, default=False, help="torch.compile the model")

    g = p.add_argument_group("masking")
    g.add_argument("--num_mask_patches", type=int, default=256, help="tokens hidden by MIM block masking")
    g.add_argument("--min_mask_patches_per_block", type=int, default=16)
    g.add_argument(
        "--max_mask_patches_per_block",
        type=int,
        default=128,
        help="(default 128; the authors' None means num_mask_patches)",
    )
    g.add_argument(
        "--half_mask_ratio",
        type=float,
        default=0.1,
        help="probability of the AR half mask for the tasks that do not always use it (those "
        "tasks.py marks always_autoregressive: segmentation); the seed README trains with 1.0",
    )

    g = p.add_argument_group("data")
    g.add_argument(
        "--data_path",
        nargs="+",
        default=None,
        help="prepared roots: folders of dataset folders with manifest.json (python -m datasets.prepare)",
    )
    g.add_argument("--datasets", nargs="+", default=None, help="use only these datasets of --data_path")
    g.add_argument(
        "--balance",
        choices=BALANCES,
        default=None,
        help="--data_path mixture: equal share per dataset, or share by slice count (default: "
        "the recipe's: datasets for balanced, slices for paper)",
    )
    g.add_argument(
        "--mixture", default=None, help="mixture JSON file (see datasets.mixture.load_mixture), instead of --data_path"
    )
    g.add_argument(
        "--seg_only",
        action=flag,
        default=False,
        help="train only on the datasets whose target is a label map (segmentation)",
    )
    g.add_argument(
        "--recipe",
        choices=sorted(MIXTURE_RECIPES),
        default="balanced",
        help="--data_path mixture: 'balanced' (each dataset an equal share) or 'paper' (the "
        "authors' lists: every slice once, segmentation twice, half the inpainting cases, "
        "every fourth synthesis case)",
    )
    g.add_argument(
        "--context_from",
        choices=CONTEXT_FROM,
        default="same_case",
        help="the context pair is another slice of the query's case, or a slice of another case",
    )
    g.add_argument(
        "--background_weight",
        type=float,
        default=None,
        help="loss weight of the black (background) pixels of label targets (default: the task's, "
        "0.1 for segmentation as in the authors' code)",
    )
    g.add_argument("--scale_jitter", type=float, default=0.0, help="random rescale of a pair by 1 +- this")
    g.add_argument("--hflip", type=float, default=0.0, help="probability of a horizontal flip per pair")
    g.add_argument("--vflip", type=float, default=0.0, help="probability of a vertical flip per pair")
    g.add_argument("--num_workers", type=int, default=8, help="data loading processes per device")
    g.add_argument(
        "--slice_cache_mb",
        type=int,
        default=2048,
        help="decoded slices kept in memory shared by this process's data workers (0: decode at every read)",
    )
    g.add_argument("--pin_mem", action="store_true", default=True, help="pin host memory (default on)")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: blr x effective batch / 256)")
    g.add_argument("--blr", type=float, default=1e-3, help="base learning rate per 256 canvases")
    g.add_argument("--min_lr", type=float, default=0.0, help="learning rate at the end of the cosine")
    g.add_argument("--warmup_epochs", type=float, default=5, help="epochs of linear warm-up (per step)")
    g.add_argument(
        "--weight_decay",
        type=float,
        default=0.05,
        help="AdamW weight decay (none on biases, norms, position embedding, tokens)",
    )
    g.add_argument("--layer_decay", type=float, default=0.8, help="layer-wise lr decay")
    g.add_argument(
        "--clip_grad",
        type=float,
        default=None,
        help="clip the gradient norm to this (default: no clipping; the norm is logged anyway)",
    )
    g.add_argument(
        "--max_nonfinite_steps",
        type=int,
        default=20,
        help="stop when this many steps in a row have a non-finite loss or gradient",
    )

    g = p.add_argument_group("initialisation and resuming")
    g.add_argument("--finetune", default="", help="initial weights: MAE, timm ViT, Painter or MVG checkpoint")
    g.add_argument(
        "--allow_key_mismatch",
        action="store_true",
        help="--finetune: keep parameters initialised instead of failing when keys do not fit",
    )
    g.add_argument("--resume", default="", help="training checkpoint to continue from (exact position)")
    g.add_argument(
        "--auto_resume",
        action=flag,
        default=False,
        help="continue from the newest loadable checkpoint in --output_dir, if any; newer ones that do "
        "not load are renamed to <name>.unreadable-<time>, and if none loads the run stops, "
        "changing nothing",
    )
    g.add_argument(
        "--start_over_if_unreadable",
        action="store_true",
        help="--auto_resume: when no checkpoint in --output_dir loads, train from step 0 instead of "
        "stopping (the unreadable files are kept under new names)",
    )

    g = p.add_argument_group("output and logging")
    g.add_argument("--output_dir", default="./output_dir", help="checkpoints and log.txt")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: --output_dir; '' for none)")
    g.add_argument(
        "--save_every_steps",
        type=int,
        default=1000,
        help="refresh checkpoint-last.pth every this many steps (0: at epoch ends only)",
    )
    g.add_argument("--save_every_epochs", type=int, default=1, help="write checkpoint-{epoch}.pth (0: never)")
    g.add_argument("--keep_checkpoints", type=int, default=3, help="numbered checkpoints to keep (0: all)")
    g.add_argument(
        "--checkpoint_in_background",
        action=flag,
        default=True,
        help="write checkpoints from a background thread: training pauses only to copy the state "
        "to host memory (it needs that much free host memory); the run waits for the last "
        "write before it ends",
    )
    g.add_argument("--print_freq", type=int, default=20, help="steps between progress lines and scalars")
    g.add_argument("--vis_every_steps", type=int, default=1000, help="steps between image grids (0: never)")
    g.add_argument("--wandb", action=flag, default=False, help="also log to Weights & Biases")
    g.add_argument("--wandb_project", default="MVG")

    g = p.add_argument_group("devices, precision and processes", "fp16 trains with loss scaling (GradScaler)")
    add_runtime_flags(g)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dist_url", default="env://", help="process group init method")
    g.add_argument("--dist_on_itp", action="store_true", help="take ranks from Open MPI (OMPI_COMM_WORLD_*)")
    g.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=-1,
        help="set by torch.distributed.launch; LOCAL_RANK in the environment wins",
    )
    g.add_argument(
        "--world_size",
        type=int,
        default=None,
        help="accepted for the authors' command line; the launcher's environment decides",
    )

    g = p.add_argument_group("the authors' flags that have no effect here (accepted, with a note)")
    g.add_argument(
        "--mask_ratio",
        type=float,
        default=None,
        help="unused, as in the authors' code: MIM hides --num_mask_patches tokens",
    )
    g.add_argument("--norm_pix_loss", action="store_true", help="unused, as in the authors' code")
    g.add_argument("--last_norm_instance", action="store_true", help="unused: MVG has no instance-norm variant")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, --precision resolved for --device (util.runtime.resolve_precision: auto is bf16 on
    GPUs that have it, else fp16 with loss scaling on CUDA, fp32 on the CPU)."""
    args = get_args_parser().parse_args(argv)
    args.precision = resolve_precision(args.precision, args.device)
    if args.log_dir is None:
        args.log_dir = args.output_dir
    if args.accum_iter < 1 or args.batch_size < 1 or args.print_freq < 1:
        raise UsageError("--batch_size, --accum_iter and --print_freq must be at least 1")
    if args.num_workers < 0 or args.slice_cache_mb < 0:
        raise UsageError("--num_workers and --slice_cache_mb must be 0 or more")
    # Refused rather than warned about: such a run would train nothing, write nothing and exit 0,
    # which a job script could not tell from a finished run.
    if args.epochs < 1:
        raise UsageError(f"--epochs {args.epochs}: nothing to train; give at least 1")
    return args


def resolve_model_settings(args):
    """--model, --input_size, --depth and --label_encoding: the flags, else what --finetune's checkpoint
    records (a contradiction needs --force), else the defaults. Resuming uses the same command line."""
    recorded = RecordedSettings(dict.fromkeys(SETTING_FLAGS), "nothing")
    if args.finetune:
        # Mapped, not read: only its record is wanted here; load_pretrained reads the weights once.
        recorded = recorded_settings(checkpoint.read_checkpoint(args.finetune, "--finetune", mmap=True), args.finetune)
    flags = {name: getattr(args, name) for name in ("model", "input_size", "depth", "label_encoding")}
    resolved = resolve_settings(flags, recorded, args.finetune, args.force, defaults=DEFAULTS)
    if resolved["model"] not in models_mvg.MODELS:
        raise UsageError(
            f"{args.finetune} records the model {resolved['model']}, which is not an MVG model: pass --model"
        )
    for name, value in resolved.items():
        setattr(args, name, value)
    args.input_size = list(args.input_size)


def inert_flag_notes(args, world_size: int) -> list:
    notes = []
    if args.mask_ratio is not None:
        notes.append(
            f"--mask_ratio {args.mask_ratio} has no effect (the authors' code ignores it too): MIM "
            f"masking hides --num_mask_patches {args.num_mask_patches} tokens"
        )
    if args.norm_pix_loss:
        notes.append("--norm_pix_loss has no effect: MVG's loss is on ImageNet-normalised pixels (as the authors')")
    if args.last_norm_instance:
        notes.append("--last_norm_instance has no effect: MVG has no instance-norm variant")
    if args.world_size is not None and args.world_size != world_size:
        notes.append(f"--world_size {args.world_size} ignored: the launcher started {world_size} process(es)")
    return notes


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):
    """Turns SIGTERM / SIGUSR1 (SLURM preemption, `scancel --signal`) and a first Ctrl-C (SIGINT) into
    a stop request that the loop honours at the next step, after writing checkpoint-last.pth. A second
    Ctrl-C gets the previous handler back (KeyboardInterrupt): whoever presses again wants out now."""
    received = []
    previous = {}

    def request_stop(number, frame):
        received.append(number)
        if number == signal.SIGINT:
            signal.signal(signal.SIGINT, previous[signal.SIGINT])
            if misc.is_main_process():
                # os.write, not print: a handler may run in the middle of a print to the same stream.
                os.write(
                    2,
                    b"Ctrl-C: stopping after this step, with checkpoint-last.pth written; press "
                    b"Ctrl-C again to abort at once, losing the steps since the last checkpoint\n",
                )

    previous.update({sig: signal.signal(sig, request_stop) for sig in signals})
    try:
        yield lambda: bool(received)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------
# main


def main(argv=None):
    """Trains; returns the final Progress. Bad input raises UsageError (`python main_pretrain.py` turns
    it into one line on stderr and exit status 2)."""
    args = parse_args(argv)
    resolve_model_settings(args)
    dist_info, device = misc.init_distributed(args.device, args.dist_url, args.dist_on_itp, args.local_rank)
    try:
        return train(args, dist_info, device)
    finally:
        misc.cleanup_distributed()


def train(args, dist_info, device) -> Progress:
    """Builds the run from the arguments (the output folder checked first), continues the run it
    resumes if any, and trains its epochs."""
    for note in inert_flag_notes(args, dist_info.world_size):
        log(f"note: {note}")
    path, state = set_up_output(args, dist_info)
    # The same initial weights on every rank (DDP would broadcast rank 0's anyway).
    seed_everything(args.seed)
    mvg = build_model(args).to(device)
    if args.finetune and state is None:
        report = checkpoint.load_pretrained(mvg, args.finetune, args.allow_key_mismatch)
        log(f"finetune from {args.finetune}: {report.summary()}")
    mixture = build_mixture(args)
    dataset = build_dataset(args, mixture, mvg.patch_size)
    record = canvas_record(args, mvg, mixture).to_dict()
    log(dataset.describe())

    plan = StepPlan.of(args, len(dataset), dist_info.world_size)
    args.lr = plan.lr  # the checkpoints record the peak lr the run used
    optimizer = build_optimizer(mvg, args, plan.lr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    progress = Progress(epoch=args.start_epoch, global_step=args.start_epoch * plan.steps_per_epoch)
    seed_everything(args.seed + dist_info.rank)  # drop path and the like differ per rank
    log(
        f"{args.model}: {sum(p.numel() for p in mvg.parameters()):,} parameters, {args.precision}, "
        f"{dist_info.world_size} process(es) on {device.type}; effective batch {plan.global_batch}, "
        f"lr {plan.lr:.3g}, {plan.steps_per_epoch} steps per epoch, {plan.warmup_steps} warm-up steps"
    )

    earlier = misc.EpochTotals()  # the statistics of the steps of the current epoch that earlier runs trained
    if state is not None:
        if args.finetune:
            log(f"note: resuming from {path}; --finetune {args.finetune} is not applied")
        check_model_fits(state, path, "--resume" if args.resume else "--auto_resume", mvg)
        progress = restore(state, path, mvg, optimizer, scaler, dist_info, plan.global_batch)
        earlier = misc.EpochTotals.from_dict(state.get("epoch_totals"))
    epochs = Epochs(args, dist_info, device, mvg, optimizer, scaler, progress, plan, record, earlier)
    return epochs.run(dataset)


class Epochs:
    """A run's epochs from where it stands: the loop over them, and the checkpoints they write (with
    the epoch's statistics so far, so that a resumed epoch's log.txt line covers all of its steps)."""

    def __init__(
        self,
        args,
        dist_info,
        device,
        mvg,
        optimizer,
        scaler,
        progress: Progress,
        plan: StepPlan,
        record: dict,
        earlier: misc.EpochTotals,
    ):
        self.args, self.dist_info, self.device = args, dist_info, device
        self.mvg, self.optimizer, self.scaler = mvg, optimizer, scaler
        self.progress, self.plan, self.record = progress, plan, record
        self.earlier = earlier  # the statistics of the current epoch's steps that earlier runs trained
        self.model = mvg
        if dist_info.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(
                mvg, device_ids=[device.index] if device.type == "cuda" else None
            )
        if args.compile:
            self.model = torch.compile(self.model)
        self.args_dict = dict(vars(args))
        self.writer = None
        if dist_info.is_main and (args.log_dir or args.wandb):
            self.writer = misc.RunLogger(args.log_dir, args.wandb_project if args.wandb else "", self.args_dict)
        self.checkpoint_writer = checkpoint.CheckpointWriter(background=args.checkpoint_in_background)

    def run(self, dataset) -> Progress:
        start = time.time()
        try:
            with stop_on_signals() as stop_requested:
                for epoch in range(self.progress.epoch, self.args.epochs):
                    if not self.train_epoch(dataset, epoch, stop_requested):
                        break
        finally:
            self.checkpoint_writer.wait()  # a failed write raises here, once the writer has finished
            if self.writer is not None:
                self.writer.close()
        log(
            f"training time {time.time() - start:.0f}s, global step {self.progress.global_step}, "
            f"{self.progress.skipped_steps} skipped step(s)"
        )
        return self.progress

    def train_epoch(self, dataset, epoch: int, stop_requested) -> bool:
        """Trains the epoch from where the run stands; whether training goes on after it."""
        args, progress, plan = self.args, self.progress, self.plan
        dataset.set_epoch(epoch)
        loader = build_loader(
            dataset, args, self.dist_info, progress.step_in_epoch, plan.steps_per_epoch, plan.global_batch, self.device
        )
        stats = train_one_epoch(
            self.model,
            loader,
            self.optimizer,
            self.scaler,
            progress,
            args,
            plan.lr_at,
            dataset.names,
            self.writer,
            self.save_mid_epoch,
            stop_requested,
        )
        if progress.step_in_epoch < plan.steps_per_epoch:  # stopped mid-epoch; the engine saved
            return False
        whole_epoch = (self.earlier + misc.EpochTotals.of_stats(stats)).stats(stats)
        finish_epoch(args, progress, whole_epoch, self.save, self.writer)
        self.earlier = misc.EpochTotals()
        return not stats["stop"]

    def save(self, name: str, epoch_totals: misc.EpochTotals, then=None):
        if self.args.output_dir:
            checkpoint.save_training_state(
                os.path.join(self.args.output_dir, name),
                self.mvg,
                self.optimizer,
                self.scaler,
                self.progress,
                self.args_dict,
                self.plan.global_batch,
                self.dist_info.world_size,
                self.checkpoint_writer,
                then,
                self.record,
                epoch_totals.as_dict(),
            )

    def save_mid_epoch(self, stats_so_far=None):
        """save_last of train_one_epoch, which hands the statistics of the steps it trained so far; the
        checkpoint holds them with the earlier runs' (without them, it holds the earlier runs' only)."""
        trained = misc.EpochTotals.of_stats(stats_so_far) if stats_so_far else misc.EpochTotals()
        self.save(checkpoint.LAST, self.earlier + trained)


if __name__ == "__main__":
    sys.exit(run_main(main))
