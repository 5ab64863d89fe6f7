"""Trains MVG: arguments, data, model, optimiser, checkpoints; the loop itself is engine_pretrain.py.

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
import functools
import json
import os
import random
import shutil
import signal
import sys
import time

import numpy as np
import torch
from timm.optim import param_groups_layer_decay

import models_mvg
from datasets.canvas import (
    CONTEXT_POLICIES, LABEL_ENCODINGS, MIXTURE_RECIPES, Augment, InContextDataset, Mixture, load_mixture,
)
from datasets.manifest import PreparedDataset
from engine_pretrain import DTYPES, Progress, train_one_epoch
from masking_generator import MaskPolicy
from util import checkpoint, misc
from util.cli import UsageError, run_main
from util.files import atomic_output, writable_folder
from util.record import (
    SETTING_FLAGS, CanvasRecord, DatasetRecord, RecordedSettings, common_slice_size, recorded_settings,
    resolve_settings,
)
from util.lr_sched import lr_at

# What a run without --finetune (or whose checkpoint records nothing) uses.
DEFAULTS = {"model": "mvg_vit_large_patch16", "input_size": [896, 448], "label_encoding": "random_colors"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("MVG training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = argparse.BooleanOptionalAction

    g = p.add_argument_group("run length and batch")
    g.add_argument("--batch_size", type=int, default=16, help="canvases per device per micro-step")
    g.add_argument("--accum_iter", type=int, default=1,
                   help="micro-steps per optimizer step; effective batch = batch_size x accum_iter x processes")
    g.add_argument("--epochs", type=int, default=100, help="at least 1")
    g.add_argument("--samples_per_epoch", type=int, default=None,
                   help="canvases per epoch (default: the number of training slices)")
    g.add_argument("--start_epoch", type=int, default=0,
                   help="without a checkpoint to resume: start at this epoch (lr schedule included)")
    g.add_argument("--stop_after_steps", type=int, default=0,
                   help="stop after this global step, saving checkpoint-last.pth (0: run all epochs); "
                        "for jobs shorter than the run, and tests")

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, choices=sorted(models_mvg.MODELS),
                   help=f"default: what --finetune's checkpoint records, else {DEFAULTS['model']}")
    g.add_argument("--input_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="canvas size: two H/2 x W pairs stacked (default: what --finetune's checkpoint "
                        "records, else 896 448)")
    g.add_argument("--depth", type=int, default=None,
                   help="number of blocks (default: what --finetune's checkpoint records, else the model's)")
    g.add_argument("--drop_path", type=float, default=None, help="drop path rate (default: the model's)")
    g.add_argument("--min_visible_target", type=float, default=0.0,
                   help="leave a sample out of the loss when its visible target's mean intensity (0..1) is "
                        f"below this; 0 keeps all; {models_mvg.AUTHORS_MIN_VISIBLE_TARGET:.3g} is the authors' rule")
    g.add_argument("--grad_checkpointing", action=flag, default=False,
                   help="recompute block activations in the backward pass (less memory, ~30%% slower)")
    g.add_argument("--compile", action=flag, default=False, help="torch.compile the model")
    g.add_argument("--attention", choices=models_mvg.ATTENTION_PATHS, default="auto",
                   help="how attention adds the relative-position bias (all exact): 'auto' picks the fastest "
                        "measured path for the device, dtype and grad mode (models_mvg.choose_attention)")

    g = p.add_argument_group("masking")
    g.add_argument("--num_mask_patches", type=int, default=256, help="tokens hidden by MIM block masking")
    g.add_argument("--min_mask_patches_per_block", type=int, default=16)
    g.add_argument("--max_mask_patches_per_block", type=int, default=128,
                   help="(default 128; the authors' None means num_mask_patches)")
    g.add_argument("--half_mask_ratio", type=float, default=0.1,
                   help="probability of the AR half mask for tasks other than segmentation, which always "
                        "uses it (the seed README trains with 1.0)")

    g = p.add_argument_group("data")
    g.add_argument("--data_path", nargs="+", default=None,
                   help="prepared roots: folders of dataset folders with manifest.json (python -m datasets.prepare)")
    g.add_argument("--datasets", nargs="+", default=None, help="use only these datasets of --data_path")
    g.add_argument("--balance", choices=("datasets", "slices"), default=None,
                   help="--data_path mixture: equal share per dataset, or share by slice count (default: "
                        "the recipe's: datasets for balanced, slices for paper)")
    g.add_argument("--mixture", default=None, help="mixture JSON file (see datasets.canvas.load_mixture), "
                                                   "instead of --data_path")
    g.add_argument("--seg_only", action=flag, default=False, help="train on the segmentation datasets only")
    g.add_argument("--label_encoding", choices=LABEL_ENCODINGS, default=None,
                   help="how segmentation labels are drawn (default: what --finetune's checkpoint records, "
                        f"else {DEFAULTS['label_encoding']})")
    g.add_argument("--recipe", choices=sorted(MIXTURE_RECIPES), default="balanced",
                   help="--data_path mixture: 'balanced' (each dataset an equal share) or 'paper' (the "
                        "authors' lists: every slice once, segmentation twice, half the inpainting cases, "
                        "every fourth synthesis case)")
    g.add_argument("--context", choices=CONTEXT_POLICIES, default="same_case",
                   help="the context pair comes from the query's case or from another case")
    g.add_argument("--scale_jitter", type=float, default=0.0, help="random rescale of a pair by 1 +- this")
    g.add_argument("--hflip", type=float, default=0.0, help="probability of a horizontal flip per pair")
    g.add_argument("--vflip", type=float, default=0.0, help="probability of a vertical flip per pair")
    g.add_argument("--num_workers", type=int, default=8, help="data loading processes per device")
    g.add_argument("--pin_mem", action="store_true", default=True, help="pin host memory (default on)")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: blr x effective batch / 256)")
    g.add_argument("--blr", type=float, default=1e-3, help="base learning rate per 256 canvases")
    g.add_argument("--min_lr", type=float, default=0.0, help="learning rate at the end of the cosine")
    g.add_argument("--warmup_epochs", type=float, default=5, help="epochs of linear warm-up (per step)")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay (none on biases, "
                                                                    "norms, position embedding, tokens)")
    g.add_argument("--layer_decay", type=float, default=0.8, help="layer-wise lr decay")
    g.add_argument("--clip_grad", type=float, default=None, help="clip the gradient norm to this (default: "
                                                                 "no clipping; the norm is logged anyway)")
    g.add_argument("--precision", choices=sorted(DTYPES), default=None,
                   help="autocast dtype (default: fp16 with loss scaling on CUDA, as the recipe; fp32 on CPU)")
    g.add_argument("--max_nonfinite_steps", type=int, default=20,
                   help="stop when this many steps in a row have a non-finite loss or gradient")

    g = p.add_argument_group("initialisation and resuming")
    g.add_argument("--finetune", default="", help="initial weights: MAE, timm ViT, Painter or MVG checkpoint")
    g.add_argument("--force", action="store_true",
                   help="use --model, --input_size, --depth and --label_encoding even where they contradict "
                        "what --finetune's checkpoint records")
    g.add_argument("--allow_key_mismatch", action="store_true",
                   help="--finetune: keep parameters initialised instead of failing when keys do not fit")
    g.add_argument("--resume", default="", help="training checkpoint to continue from (exact position)")
    g.add_argument("--auto_resume", action=flag, default=False,
                   help="continue from the newest loadable checkpoint in --output_dir, if any; newer ones that do "
                        "not load are renamed to <name>.unreadable-<time>, and if none loads the run stops, "
                        "changing nothing")
    g.add_argument("--start_over_if_unreadable", action="store_true",
                   help="--auto_resume: when no checkpoint in --output_dir loads, train from step 0 instead of "
                        "stopping (the unreadable files are kept under new names)")

    g = p.add_argument_group("output and logging")
    g.add_argument("--output_dir", default="./output_dir", help="checkpoints and log.txt")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: --output_dir; '' for none)")
    g.add_argument("--save_every_steps", type=int, default=1000,
                   help="refresh checkpoint-last.pth every this many steps (0: at epoch ends only)")
    g.add_argument("--save_every_epochs", type=int, default=1, help="write checkpoint-{epoch}.pth (0: never)")
    g.add_argument("--keep_checkpoints", type=int, default=3, help="numbered checkpoints to keep (0: all)")
    g.add_argument("--checkpoint_in_background", action=flag, default=True,
                   help="write checkpoints from a background thread: training pauses only to copy the state "
                        "to host memory (it needs that much free host memory); the run waits for the last "
                        "write before it ends")
    g.add_argument("--print_freq", type=int, default=20, help="steps between progress lines and scalars")
    g.add_argument("--vis_every_steps", type=int, default=1000, help="steps between image grids (0: never)")
    g.add_argument("--wandb", action=flag, default=False, help="also log to Weights & Biases")
    g.add_argument("--wandb_project", default="MVG")

    g = p.add_argument_group("devices and processes")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dist_url", default="env://", help="process group init method")
    g.add_argument("--dist_on_itp", action="store_true", help="take ranks from Open MPI (OMPI_COMM_WORLD_*)")
    g.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                   help="set by torch.distributed.launch; LOCAL_RANK in the environment wins")
    g.add_argument("--world_size", type=int, default=None,
                   help="accepted for the authors' command line; the launcher's environment decides")

    g = p.add_argument_group("the authors' flags that have no effect here (accepted, with a note)")
    g.add_argument("--mask_ratio", type=float, default=None,
                   help="unused, as in the authors' code: MIM hides --num_mask_patches tokens")
    g.add_argument("--norm_pix_loss", action="store_true", help="unused, as in the authors' code")
    g.add_argument("--last_norm_instance", action="store_true", help="unused: MVG has no instance-norm variant")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = get_args_parser().parse_args(argv)
    if args.precision is None:
        args.precision = "fp16" if args.device.startswith("cuda") else "fp32"
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        raise UsageError("--precision fp16 needs --device cuda; use bf16 or fp32 on CPU")
    if args.log_dir is None:
        args.log_dir = args.output_dir
    if args.accum_iter < 1 or args.batch_size < 1 or args.print_freq < 1:
        raise UsageError("--batch_size, --accum_iter and --print_freq must be at least 1")
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
        recorded = recorded_settings(checkpoint.read_checkpoint(args.finetune, '--finetune', mmap=True), args.finetune)
    flags = {name: getattr(args, name) for name in ("model", "input_size", "depth", "label_encoding")}
    resolved = resolve_settings(flags, recorded, args.finetune, args.force, defaults=DEFAULTS)
    if resolved["model"] not in models_mvg.MODELS:
        raise UsageError(f"{args.finetune} records the model {resolved['model']}, which is not an MVG model: "
                         f"pass --model")
    for name, value in resolved.items():
        setattr(args, name, value)
    args.input_size = list(args.input_size)


def canvas_record(args, model, mixture) -> CanvasRecord:
    """What inference needs to draw canvases as this run does (stored in every checkpoint)."""
    datasets = {}
    for entry in mixture.entries:
        dataset = PreparedDataset(entry.path)
        datasets[dataset.name] = DatasetRecord(dataset.task, dataset.modality, dataset.classes,
                                               list(dataset.manifest["size"]))
    return CanvasRecord(model=args.model, input_size=list(args.input_size), depth=len(model.blocks),
                        patch_size=model.patch_size, label_encoding=args.label_encoding,
                        slice_size=common_slice_size(datasets), datasets=datasets)


def inert_flag_notes(args, world_size: int) -> list:
    notes = []
    if args.mask_ratio is not None:
        notes.append(f"--mask_ratio {args.mask_ratio} has no effect (the authors' code ignores it too): MIM "
                     f"masking hides --num_mask_patches {args.num_mask_patches} tokens")
    if args.norm_pix_loss:
        notes.append("--norm_pix_loss has no effect: MVG's loss is on ImageNet-normalised pixels (as the authors')")
    if args.last_norm_instance:
        notes.append("--last_norm_instance has no effect: MVG has no instance-norm variant")
    if args.world_size is not None and args.world_size != world_size:
        notes.append(f"--world_size {args.world_size} ignored: the launcher started {world_size} process(es)")
    return notes


# ---------------------------------------------------------------------------------------------------
# building blocks


def build_model(args) -> torch.nn.Module:
    options = dict(input_size=tuple(args.input_size), use_act_checkpoint=args.grad_checkpointing,
                   min_visible_target=args.min_visible_target)
    if args.depth is not None:
        options["depth"] = args.depth
    if args.drop_path is not None:
        options["drop_path_rate"] = args.drop_path
    model = models_mvg.create_model(args.model, **options)
    model.set_attention(args.attention)
    return model


def build_mixture(args) -> Mixture:
    if args.mixture:
        if args.data_path or args.datasets:
            raise UsageError("give either --mixture or --data_path (with --datasets), not both")
        mixture = load_mixture(args.mixture)
    elif args.data_path:
        mixture = Mixture.of(args.data_path, args.datasets, balance=args.balance, recipe=args.recipe)
    else:
        raise UsageError("no training data: give --data_path (prepared roots) or --mixture")
    if args.seg_only:
        mixture.entries = [e for e in mixture.entries if PreparedDataset(e.path).task == "segmentation"]
        if not mixture.entries:
            raise UsageError("--seg_only: the mixture has no segmentation dataset")
    return mixture


def build_dataset(args, mixture: Mixture, patch_size: int) -> InContextDataset:
    height, width = args.input_size
    policy = MaskPolicy(input_size=(height // patch_size, width // patch_size),
                        num_mask_patches=args.num_mask_patches,
                        min_mask_patches_per_block=args.min_mask_patches_per_block,
                        max_mask_patches_per_block=args.max_mask_patches_per_block or args.num_mask_patches,
                        half_mask_ratio=args.half_mask_ratio)
    augment = Augment(crop_size=(height // 2, width), scale_jitter=args.scale_jitter, hflip=args.hflip,
                      vflip=args.vflip)
    return InContextDataset(mixture, policy, split="train", input_size=(height, width),
                            label_encoding=args.label_encoding, context=args.context, augment=augment,
                            seed=args.seed, samples_per_epoch=args.samples_per_epoch, patch_size=patch_size)


def build_loader(dataset, args, dist_info, start_step: int, steps_per_epoch: int, global_batch: int, device):
    """The epoch's batches from start_step on. Its workers end with this process (even on kill -9) and
    leave Ctrl-C to it; a UsageError in a worker (e.g. a damaged slice file) is raised here in one line."""
    sampler = misc.ShardSampler(start_step * global_batch, steps_per_epoch * global_batch,
                                dist_info.rank, dist_info.world_size)
    # Its own generator: creating the iterator then draws no number from the global torch RNG, which
    # a mid-epoch resume would otherwise consume at a different point than the run it continues.
    loader = torch.utils.data.DataLoader(
        misc.CarryUsageErrors(dataset), batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
        collate_fn=misc.collate_carrying_errors, pin_memory=args.pin_mem and device.type == "cuda",
        drop_last=False, persistent_workers=False, generator=torch.Generator(),
        worker_init_fn=functools.partial(misc.end_with_trainer, os.getpid()))
    return misc.RaiseCarriedErrors(loader)


def build_optimizer(model, args, lr: float, device) -> torch.optim.Optimizer:
    """AdamW with layer-wise lr decay (each group's `lr_scale`) and no decay on 1-D params and tokens."""
    groups = param_groups_layer_decay(model, weight_decay=args.weight_decay,
                                      no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=args.layer_decay)
    # Fused: one kernel over all tensors, on CUDA and CPU alike (the per-tensor default is far slower on CPU).
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=device.type in ("cuda", "cpu"))


def seed_everything(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


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
                os.write(2, b"Ctrl-C: stopping after this step, with checkpoint-last.pth written; press "
                            b"Ctrl-C again to abort at once, losing the steps since the last checkpoint\n")

    previous.update({sig: signal.signal(sig, request_stop) for sig in signals})
    try:
        yield lambda: bool(received)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def snapshot(src: str, dst: str):
    """dst becomes a copy of src, atomically; a hard link when the file system allows (no bytes copied:
    a later os.replace of src leaves the link on the old contents)."""
    tmp = dst + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def choose_checkpoint(args):
    """--auto_resume, on rank 0: (path, state) of the newest checkpoint in --output_dir that loads, or
    (None, None). The newer ones that do not load are set aside, never overwritten; when none loads, the
    run stops and changes nothing, unless --start_over_if_unreadable."""
    path, state, unreadable = checkpoint.find_latest_valid(args.output_dir)
    if unreadable and path is None and not args.start_over_if_unreadable:
        others = f" (and {len(unreadable) - 1} other checkpoint(s))" if len(unreadable) > 1 else ""
        raise UsageError(f"--auto_resume: {unreadable[0][1]}{others}, and no checkpoint in {args.output_dir} "
                         "loads; nothing was changed: rerun if the file system had a passing problem, or pass "
                         "--start_over_if_unreadable to train from step 0 (the unreadable files are kept, renamed)")
    for bad, why in unreadable:
        misc.warn0(f"skipping checkpoint {why}; kept as {checkpoint.set_aside(bad)}")
    if unreadable and path is None:
        misc.warn0(f"--start_over_if_unreadable: no checkpoint in {args.output_dir} loads; training from step 0")
    return path, state


def prepare_output_dir(args):
    """Rank 0, before anything is built: --output_dir exists and is writable, the checkpoint to continue
    from is chosen (--auto_resume), then leftovers of interrupted writes are removed. Returns (path,
    state) of that checkpoint, or (None, None)."""
    writable_folder(args.output_dir, "--output_dir")  # before anything is built, not at the first checkpoint
    path, state = choose_checkpoint(args) if args.auto_resume and not args.resume else (None, None)
    for leftover in checkpoint.remove_partial_writes(args.output_dir):
        misc.print0(f"removed {leftover}, a checkpoint write that an earlier run did not finish")
    return path, state


def set_up_output(args, dist_info):
    """prepare_output_dir on rank 0; every rank gets the checkpoint to resume (--resume or the chosen
    one) as (path, state), or (None, None). A UsageError of rank 0 is raised on every rank: the others
    would otherwise wait for rank 0 at the next collective call until the timeout."""
    path, state, message = None, None, None
    if args.output_dir and dist_info.is_main:
        try:
            path, state = prepare_output_dir(args)
        except UsageError as error:
            message = str(error)
    path, message = misc.broadcast_object((path, message))
    if message is not None:
        raise UsageError(message)
    if args.resume:
        return args.resume, checkpoint.load_training_state(args.resume, "--resume")
    if path is not None and state is None:  # the ranks other than 0
        state = checkpoint.load_training_state(path, "--auto_resume")
    return path, state


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


def train(args, dist_info, device):
    for note in inert_flag_notes(args, dist_info.world_size):
        misc.print0(f"note: {note}")
    path, state = set_up_output(args, dist_info)
    # The same initial weights on every rank (DDP would broadcast rank 0's anyway).
    seed_everything(args.seed)
    mvg = build_model(args).to(device)
    if args.finetune and state is None:
        report = checkpoint.load_pretrained(mvg, args.finetune, args.allow_key_mismatch)
        misc.print0(f"finetune from {args.finetune}: {report.summary()}")
    mixture = build_mixture(args)
    dataset = build_dataset(args, mixture, mvg.patch_size)
    record = canvas_record(args, mvg, mixture).to_dict()
    misc.print0(dataset.describe())

    global_batch = args.batch_size * args.accum_iter * dist_info.world_size
    steps_per_epoch = len(dataset) // global_batch
    if steps_per_epoch == 0:
        raise UsageError(f"an epoch of {len(dataset)} canvases is less than one step of {global_batch}; "
                         "raise --samples_per_epoch or lower the batch")
    lr = args.lr if args.lr is not None else args.blr * global_batch / 256
    args.lr = lr
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(round(args.warmup_epochs * steps_per_epoch))

    def schedule(step):
        return lr_at(step, lr, args.min_lr, warmup_steps, total_steps)

    optimizer = build_optimizer(mvg, args, lr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    progress = Progress(epoch=args.start_epoch, global_step=args.start_epoch * steps_per_epoch)
    seed_everything(args.seed + dist_info.rank)  # drop path and the like differ per rank
    misc.print0(f"{args.model}: {sum(p.numel() for p in mvg.parameters()):,} parameters, {args.precision}, "
                f"{dist_info.world_size} process(es) on {device.type}; effective batch {global_batch}, "
                f"lr {lr:.3g}, {steps_per_epoch} steps per epoch, {warmup_steps} warm-up steps")

    earlier = misc.EpochTotals()  # the statistics of the steps of the current epoch that earlier runs trained
    if state is not None:
        if args.finetune:
            misc.print0(f"note: resuming from {path}; --finetune {args.finetune} is not applied")
        check_model_fits(state, path, "--resume" if args.resume else "--auto_resume", mvg)
        progress = restore(state, path, mvg, optimizer, scaler, dist_info, global_batch)
        earlier = misc.EpochTotals.from_dict(state.get("epoch_totals"))

    model = mvg
    if dist_info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            mvg, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)

    args_dict = dict(vars(args))
    writer = None
    if dist_info.is_main and (args.log_dir or args.wandb):
        writer = misc.RunLogger(args.log_dir, args.wandb_project if args.wandb else "", args_dict)

    checkpoint_writer = checkpoint.CheckpointWriter(background=args.checkpoint_in_background)

    def save(name, epoch_totals, then=None):
        if args.output_dir:
            checkpoint.save_training_state(os.path.join(args.output_dir, name), mvg, optimizer, scaler,
                                           progress, args_dict, global_batch, dist_info.world_size,
                                           checkpoint_writer, then, record, epoch_totals.as_dict())

    def save_mid_epoch(stats_so_far=None):
        """save_last of train_one_epoch, which hands the statistics of the steps it trained so far; the
        checkpoint holds them with the earlier runs' (without them, it holds the earlier runs' only)."""
        trained = misc.EpochTotals.of_stats(stats_so_far) if stats_so_far else misc.EpochTotals()
        save(checkpoint.LAST, earlier + trained)

    start = time.time()
    try:
        with stop_on_signals() as stop_requested:
            for epoch in range(progress.epoch, args.epochs):
                dataset.set_epoch(epoch)
                loader = build_loader(dataset, args, dist_info, progress.step_in_epoch, steps_per_epoch,
                                      global_batch, device)
                stats = train_one_epoch(model, loader, optimizer, scaler, progress, args, schedule,
                                        dataset.names, writer, save_mid_epoch, stop_requested)
                if progress.step_in_epoch < steps_per_epoch:  # stopped mid-epoch; the engine saved
                    break
                whole_epoch = (earlier + misc.EpochTotals.of_stats(stats)).stats(stats)
                finish_epoch(args, progress, whole_epoch, save, writer)
                earlier = misc.EpochTotals()
                if stats["stop"]:
                    break
    finally:
        checkpoint_writer.wait()  # a failed write raises here, once the writer has finished
        if writer is not None:
            writer.close()
    misc.print0(f"training time {time.time() - start:.0f}s, global step {progress.global_step}, "
                f"{progress.skipped_steps} skipped step(s)")
    return progress


def check_model_fits(state, path: str, flag: str, mvg):
    """A checkpoint of another model (size) is a one-line UsageError that says what the file records."""
    recorded = state["args"]
    settings = " ".join(f"--{name} {' '.join(map(str, value)) if isinstance(value, list) else value}"
                        for name in ("model", "depth", "input_size") if (value := recorded.get(name)) is not None)
    hint = (f"it records {settings}; resume with the same settings" if settings
            else "was it trained with another --model, --depth or --input_size?")
    checkpoint.check_weights_fit(mvg, state["model"], f"{flag} {path}", hint)


def restore(state, path, mvg, optimizer, scaler, dist_info, global_batch) -> Progress:
    mvg.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):  # empty when the run it continues had no loss scaling
        scaler.load_state_dict(state["scaler"])
    progress = Progress(**{key: state[key] for key in Progress().as_dict()})
    if state["global_batch"] != global_batch:
        # Keep the sample position; the step count and thus the lr schedule are approximate.
        samples = progress.step_in_epoch * state["global_batch"]
        progress.step_in_epoch = samples // global_batch
        misc.warn0(f"resuming with an effective batch of {global_batch} instead of {state['global_batch']}: "
                   f"continuing at sample {progress.step_in_epoch * global_batch} of epoch {progress.epoch}")
    if len(state["rng"]) == dist_info.world_size:
        checkpoint.restore_rng(state["rng"][dist_info.rank])
    else:
        misc.warn0(f"{path} holds RNG states of {len(state['rng'])} processes, not {dist_info.world_size}; "
                   "random streams (e.g. drop path) restart from the seed")
    misc.print0(f"resumed from {path}: epoch {progress.epoch}, step {progress.step_in_epoch} of the epoch, "
                f"global step {progress.global_step}")
    return progress


def finish_epoch(args, progress, stats, save, writer):
    """Epoch end: the epoch's line in log.txt, checkpoint-last and maybe a numbered one, and the summary
    line. stats: the whole epoch's, across resumes."""
    finished = progress.epoch
    progress.epoch += 1
    progress.step_in_epoch = 0
    numbered = args.save_every_epochs and (progress.epoch % args.save_every_epochs == 0
                                           or progress.epoch == args.epochs)

    def keep_numbered_copy():  # runs once checkpoint-last.pth is on disk
        snapshot(os.path.join(args.output_dir, checkpoint.LAST),
                 os.path.join(args.output_dir, f"checkpoint-{finished}.pth"))
        checkpoint.prune_numbered(args.output_dir, args.keep_checkpoints)

    # The line before the checkpoint: a kill between the two leaves the line and an older checkpoint,
    # and the epoch trained again replaces the line; the other order could leave the epoch without one.
    if args.output_dir and misc.is_main_process():
        record = {"epoch": finished, "global_step": progress.global_step,
                  **{f"train_{k}": v for k, v in stats.items() if k != "stop"}}
        write_epoch_record(os.path.join(args.output_dir, "log.txt"), record)
    save(checkpoint.LAST, misc.EpochTotals(), keep_numbered_copy if numbered else None)
    if writer is not None:
        writer.flush()
    misc.print0(f"epoch {finished} done: loss {stats.get('loss', float('nan')):.4f}, "
                f"{stats['samples_per_s']:.1f} samples/s, {stats['skipped_steps']} skipped step(s)")


def write_epoch_record(path: str, record: dict):
    """log.txt with `record` as the line of its epoch, in place of the lines of that epoch and later
    ones (an epoch trained again after a kill, or after resuming from an older checkpoint): one line
    per epoch, as the checkpoints' history has it. Rewritten atomically; it is small."""
    kept = []
    if os.path.exists(path):
        with open(path) as handle:
            kept = [line for line in handle.read().splitlines() if not line_of_epoch_or_later(line, record["epoch"])]
    with atomic_output(path, "w") as handle:
        handle.write("".join(f"{line}\n" for line in [*kept, json.dumps(record)]))


def line_of_epoch_or_later(line: str, epoch: int) -> bool:
    try:
        return json.loads(line)["epoch"] >= epoch
    except (ValueError, KeyError, TypeError):  # not a record (e.g. cut short by a crash of an older version)
        return False


if __name__ == "__main__":
    sys.exit(run_main(main))
