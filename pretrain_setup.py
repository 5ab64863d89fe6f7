"""What a training run is built from main_pretrain's arguments: the model, the data (mixture, dataset,
loader), the optimizer and its schedule, and the canvas record every checkpoint carries.

The builders take the parsed arguments (main_pretrain.parse_args, with the model settings resolved by
main_pretrain.resolve_model_settings), so the benches and tests build exactly what a run trains.
"""

import functools
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from timm.optim import param_groups_layer_decay

import models_mvg
from datasets.canvas import Augment, InContextDataset
from datasets.manifest import PreparedDataset
from datasets.mixture import Mixture, load_mixture
from masking_generator import MaskPolicy
from tasks import get_task
from util import misc
from util.cli import UsageError
from util.lr_sched import lr_at
from util.record import CanvasRecord, DatasetRecord, common_slice_size


def seed_everything(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_model(args) -> torch.nn.Module:
    options = {
        "input_size": tuple(args.input_size),
        "use_act_checkpoint": args.grad_checkpointing,
        "min_visible_target": args.min_visible_target,
    }
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
        mixture.entries = [entry for entry in mixture.entries if has_label_target(entry.path)]
        if not mixture.entries:
            raise UsageError("--seg_only: the mixture has no dataset whose target is a label map (segmentation)")
    return mixture


def has_label_target(path: str) -> bool:
    dataset = PreparedDataset(path)
    return get_task(dataset.task, f"{path}: manifest").target_is_label


def build_dataset(args, mixture: Mixture, patch_size: int) -> InContextDataset:
    height, width = args.input_size
    policy = MaskPolicy(
        input_size=(height // patch_size, width // patch_size),
        num_mask_patches=args.num_mask_patches,
        min_mask_patches_per_block=args.min_mask_patches_per_block,
        max_mask_patches_per_block=args.max_mask_patches_per_block or args.num_mask_patches,
        half_mask_ratio=args.half_mask_ratio,
    )
    augment = Augment(
        crop_size=(height // 2, width), scale_jitter=args.scale_jitter, hflip=args.hflip, vflip=args.vflip
    )
    return InContextDataset(
        mixture,
        policy,
        split="train",
        input_size=(height, width),
        label_encoding=args.label_encoding,
        context_from=args.context_from,
        augment=augment,
        seed=args.seed,
        samples_per_epoch=args.samples_per_epoch,
        patch_size=patch_size,
        slice_cache_bytes=args.slice_cache_mb * 2**20,
        background_weight=args.background_weight,
    )


def build_loader(dataset, args, dist_info, start_step: int, steps_per_epoch: int, global_batch: int, device):
    """The epoch's batches from start_step on. Its workers end with this process (even on kill -9) and
    leave Ctrl-C to it; a UsageError in a worker (e.g. a damaged slice file) is raised here in one line."""
    sampler = misc.ShardSampler(
        start_step * global_batch, steps_per_epoch * global_batch, dist_info.rank, dist_info.world_size
    )
    # Its own generator: creating the iterator then draws no number from the global torch RNG, which
    # a mid-epoch resume would otherwise consume at a different point than the run it continues.
    loader = torch.utils.data.DataLoader(
        misc.CarryUsageErrors(dataset),
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.num_workers,
        collate_fn=misc.collate_carrying_errors,
        pin_memory=args.pin_mem and device.type == "cuda",
        drop_last=False,
        persistent_workers=False,
        generator=torch.Generator(),
        worker_init_fn=functools.partial(misc.end_with_trainer, os.getpid()),
    )
    return misc.RaiseCarriedErrors(loader)


def build_optimizer(model, args, lr: float, device) -> torch.optim.Optimizer:
    """AdamW with layer-wise lr decay (each group's `lr_scale`) and no decay on 1-D params and tokens."""
    groups = param_groups_layer_decay(
        model,
        weight_decay=args.weight_decay,
        no_weight_decay_list=model.no_weight_decay(),
        layer_decay=args.layer_decay,
    )
    # Fused: one kernel over all tensors, on CUDA and CPU alike (the per-tensor default is far slower on CPU).
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=device.type in ("cuda", "cpu"))


@dataclass(frozen=True)
class StepPlan:
    """How many samples a step takes and how many steps the run has, and the lr at each step."""

    global_batch: int  # batch_size x accum_iter x processes
    steps_per_epoch: int
    lr: float  # the peak: --lr, or --blr x global batch / 256
    min_lr: float
    warmup_steps: int
    total_steps: int

    @classmethod
    def of(cls, args, epoch_samples: int, world_size: int) -> "StepPlan":
        global_batch = args.batch_size * args.accum_iter * world_size
        steps_per_epoch = epoch_samples // global_batch
        if steps_per_epoch == 0:
            raise UsageError(
                f"an epoch of {epoch_samples} canvases is less than one step of {global_batch}; "
                "raise --samples_per_epoch or lower the batch"
            )
        lr = args.lr if args.lr is not None else args.blr * global_batch / 256
        return cls(
            global_batch,
            steps_per_epoch,
            lr,
            args.min_lr,
            warmup_steps=round(args.warmup_epochs * steps_per_epoch),
            total_steps=args.epochs * steps_per_epoch,
        )

    def lr_at(self, step: int) -> float:
        """Per-step warm-up, then half a cosine (util.lr_sched)."""
        return lr_at(step, self.lr, self.min_lr, self.warmup_steps, self.total_steps)


def canvas_record(args, model, mixture) -> CanvasRecord:
    """What inference needs to draw canvases as this run does (stored in every checkpoint)."""
    datasets = {}
    for entry in mixture.entries:
        dataset = PreparedDataset(entry.path)
        datasets[dataset.name] = DatasetRecord(
            dataset.task, dataset.modality, dataset.classes, list(dataset.manifest["size"])
        )
    return CanvasRecord(
        model=args.model,
        input_size=list(args.input_size),
        depth=len(model.blocks),
        patch_size=model.patch_size,
        label_encoding=args.label_encoding,
        slice_size=common_slice_size(datasets),
        datasets=datasets,
    )
