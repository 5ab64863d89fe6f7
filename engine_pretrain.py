"""One epoch of MVG training: the optimisation loop, its metrics and its mid-epoch checkpoints.

A step is `accum_iter` micro-batches followed by one optimizer update; the data position, the lr
schedule and checkpoints all count in steps, and a checkpoint is only ever taken between steps.
"""

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from datasets.canvas import to_model_inputs
from models_mvg import LOSS_WEIGHT_EPS
from pixels import denormalise
from tasks import TASK_NAMES
from util.cli import log, warn
from util.lr_sched import set_lr
from util.misc import MetricLogger, all_reduce_sum
from util.runtime import autocast


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps of `epoch` already done
    global_step: int = 0  # optimizer steps since the start of training, skipped ones included
    skipped_steps: int = 0  # steps whose loss or gradient was not finite (no update)
    consecutive_skips: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The MVG module inside torch.compile and DistributedDataParallel wrappers (or the model itself)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _no_sync(model, sync: bool):
    """DDP's no_sync() on micro-steps that only accumulate; a no-op outside DDP."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


class GroupedLoss:
    """Loss sums and counts per task and per dataset, kept on the device until logged, so that
    collecting them costs no synchronisation per step."""

    def __init__(self, num_datasets: int, device):
        self.sums = torch.zeros(2, max(len(TASK_NAMES), num_datasets), dtype=torch.float64, device=device)
        self.counts = torch.zeros_like(self.sums)

    def add(self, losses, counted, tasks, datasets):
        losses, counted = torch.where(counted, losses.double(), 0.0), counted.double()
        for row, ids in enumerate((tasks, datasets)):
            self.sums[row].index_add_(0, ids, losses)
            self.counts[row].index_add_(0, ids, counted)

    def collect(self, dataset_names) -> dict:
        """Means over all ranks since the last call, as {"loss_task/<task>": v, "loss_dataset/<name>": v}."""
        both = all_reduce_sum(torch.stack([self.sums, self.counts])).tolist()
        self.sums.zero_()
        self.counts.zero_()
        means = {}
        for row, (prefix, names) in enumerate((("loss_task", TASK_NAMES), ("loss_dataset", dataset_names))):
            for i, name in enumerate(names):
                if both[1][row][i] > 0:
                    means[f"{prefix}/{name}"] = both[0][row][i] / both[1][row][i]
        return means


def visual_grid(model, batch, pred, mask, rows: int = 4) -> torch.Tensor:
    """(3, rows*H, 4*W) in [0, 1]: per sample, image canvas | target with the mask in grey |
    prediction | ground truth."""

    def pictures(x):
        return (denormalise(x[:rows].detach().float().cpu()) / 255).clamp(0, 1)

    imgs, tgts = pictures(batch["imgs"]), pictures(batch["tgts"])
    grid = (tgts.shape[2] // model.patch_size, tgts.shape[3] // model.patch_size)
    hidden = model.pixel_mask(mask[:rows].cpu(), grid)
    masked = tgts * (1 - hidden) + 0.5 * hidden
    prediction = pictures(model.unpatchify(pred[:rows].detach().float()))
    panels = torch.cat([imgs, masked, prediction, tgts], dim=3)  # side by side
    return torch.cat(list(panels), dim=1)  # samples stacked top to bottom


# ---------------------------------------------------------------------------------------------------
# one step


def fetch_step(batches, accum: int, device):
    """The step's accum micro-batches on the device, as the model takes them, and the seconds spent
    waiting for them and converting them.

    The loader's batches hold 8-bit canvases (datasets.canvas.InContextDataset); they are normalised
    here, on the device (to_model_inputs). All of them are fetched before the first forward because
    the loss divisor needs their weights. Holding them costs little: about 11 MB a sample at 896x448
    (imgs, tgts, valid in fp32), small next to the activations of one forward.
    """
    start = time.perf_counter()
    micro_batches = [to_model_inputs(next(batches), device) for _ in range(accum)]
    return micro_batches, time.perf_counter() - start


def global_batch_weight(mvg, micro_batches) -> torch.Tensor:
    """The total loss weight of the global batch: every micro-batch of every rank, in float64 so that
    however the batch is split, the totals differ only far below fp32 rounding. One all-reduce of
    one number."""
    with torch.no_grad():
        local = sum(
            mvg.loss_weights(batch["tgts"], batch["mask"], batch["valid"]).sum(dtype=torch.float64)
            for batch in micro_batches
        )
    return all_reduce_sum(local)


def forward_backward(model, batches, scaler, autocast, accum: int, grouped: GroupedLoss, world_size: int):
    """accum micro-batches of forward and backward; DDP all-reduces gradients on the last one.

    Each micro-batch's weighted loss sum is divided by the weight W of the whole global batch, times
    world_size because DDP averages the ranks' gradients: the gradients then add up to those of one
    weighted mean over the global batch, however it is split into micro-batches and ranks. W is
    totalled before the first backward, not applied to the gradients afterwards: with fp16 the loss
    scale times the gradient of a raw sum would overflow.

    Returns (this rank's micro-batch losses summed, a device tensor whose mean over the ranks is the
    step's loss; W as a device tensor; seconds spent waiting for data; the last micro-batch with its
    prediction and mask for pictures).
    """
    mvg = unwrap(model)
    micro_batches, data_time = fetch_step(batches, accum, next(mvg.parameters()).device)
    weight = global_batch_weight(mvg, micro_batches)
    divisor = (weight + LOSS_WEIGHT_EPS) / world_size
    step_loss = torch.zeros((), device=weight.device)
    for micro, batch in enumerate(micro_batches):
        with _no_sync(model, sync=micro == accum - 1):
            with autocast:
                loss, pred, mask, per_sample = model(
                    batch["imgs"],
                    batch["tgts"],
                    batch["mask"],
                    batch["valid"],
                    return_per_sample=True,
                    loss_divisor=divisor,
                )
            scaler.scale(loss).backward()
        step_loss += loss.detach().float()
        # A sample without weight (e.g. dropped by min_visible_target) or with a non-finite loss is not counted.
        grouped.add(per_sample, torch.isfinite(per_sample), batch["task"], batch["dataset"])
    return step_loss, weight, data_time, (batch, pred, mask)


def gradient_norm(scaler, optimizer, parameters, clip_grad):
    """The total gradient norm after unscaling (always measured), clipping to clip_grad if set."""
    scaler.unscale_(optimizer)
    if clip_grad:
        return torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


def agree_across_ranks(loss, grad_norm, stop_requested: bool, world_size: int):
    """(mean loss, grad norm, whether any rank wants to stop), the same on every rank: one small
    all-reduce per step, so every rank takes the same skip and stop decisions.

    With forward_backward's losses the mean over the ranks is the weighted mean over the global batch,
    so the loss needs no collective of its own: a step has two small all-reduces besides DDP's, the
    batch weight before the backward passes, which need it, and this one after them.
    """
    stop = torch.tensor(float(stop_requested), device=loss.device)
    total = all_reduce_sum(torch.stack([loss, grad_norm.float(), stop])).tolist()
    return total[0] / world_size, total[1] / world_size, total[2] > 0


def skip_reason(weightless: bool, loss: float, grad_norm: float) -> str:
    """Why a step's update is skipped, for the warning."""
    if weightless:
        return (
            "no weight in the global batch (every hidden pixel has valid 0, or its sample was dropped "
            "by min_visible_target)"
        )
    return f"non-finite loss {loss} or grad norm {grad_norm}"


class StepResult(NamedTuple):
    loss: float  # the weighted mean over the global batch; NaN for a batch without weight
    grad_norm: float
    data_time: float  # seconds spent waiting for the step's batches
    signalled: bool  # some rank was asked to stop
    shown: tuple  # the last micro-batch, its prediction and its mask, for pictures


class OptimisationStep:
    """One optimizer step of the loop: forward and backward over the step's micro-batches, then the
    update, or its skip when the loss or gradient is not finite or the global batch has no weight;
    every rank takes the same decision."""

    def __init__(self, model, optimizer, scaler, args, world_size: int):
        self.model = model
        mvg = unwrap(model)
        self.parameters = [p for p in mvg.parameters() if p.requires_grad]
        self.optimizer = optimizer
        self.scaler = scaler
        self.autocast = autocast(next(mvg.parameters()).device, args.precision)
        self.accum = args.accum_iter
        self.clip_grad = args.clip_grad
        self.world_size = world_size

    def __call__(self, batches, lr: float, progress: Progress, grouped: GroupedLoss, stop_requested) -> StepResult:
        set_lr(self.optimizer, lr)
        loss, weight, data_time, shown = forward_backward(
            self.model, batches, self.scaler, self.autocast, self.accum, grouped, self.world_size
        )
        grad_norm = gradient_norm(self.scaler, self.optimizer, self.parameters, self.clip_grad)
        loss, grad_norm, signalled = agree_across_ranks(loss, grad_norm, stop_requested(), self.world_size)
        weightless = weight.item() == 0  # read once agree_across_ranks has waited for the device anyway
        if weightless:
            loss = math.nan  # a mean over no weight: nothing to log, nothing to learn

        # A non-finite loss or gradient, or a global batch without weight, leaves the weights and
        # optimizer state untouched (momentum and weight decay would move them even without gradient).
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.scaler.step(self.optimizer)
            progress.consecutive_skips = 0
        else:
            progress.skipped_steps += 1
            progress.consecutive_skips += 1
            warn(
                f"step {progress.global_step}: {skip_reason(weightless, loss, grad_norm)}; update "
                f"skipped ({progress.consecutive_skips} in a row, {progress.skipped_steps} in all)"
            )
        self.scaler.update()  # with fp16, an overflow lowers the loss scale
        self.optimizer.zero_grad(set_to_none=True)
        progress.global_step += 1
        progress.step_in_epoch += 1
        return StepResult(loss, grad_norm, data_time, signalled, shown)


# ---------------------------------------------------------------------------------------------------
# the epoch's measurements


class EpochRecord:
    """What an epoch has measured so far: smoothed step metrics, the per-task and per-dataset losses
    of the current logging window, and the means of the windows logged so far."""

    def __init__(self, window: int, dataset_names, device, global_batch: int, skipped_before: int):
        self.metrics = MetricLogger(window=window)
        self.grouped = GroupedLoss(len(dataset_names), device)
        self.dataset_names = dataset_names
        self.window_means = {}  # name -> [sum of window means, windows], for the epoch's per-task losses
        self.global_batch = global_batch
        self.skipped_before = skipped_before  # the run's skipped steps when the epoch (part) began

    def add_step(self, step_time: float, result: StepResult, lr: float):
        self.metrics.update(step_time=step_time, data_time=result.data_time, lr=lr)
        self.metrics.update(
            **{
                name: value
                for name, value in (("loss", result.loss), ("grad_norm", result.grad_norm))
                if math.isfinite(value)
            }
        )

    def log_window(self, progress: Progress, steps_per_epoch: int, writer):
        """The progress line and TensorBoard scalars for the steps since the last call."""
        window = self.grouped.collect(self.dataset_names)
        for name, value in window.items():
            total = self.window_means.setdefault(name, [0.0, 0])
            total[0] += value
            total[1] += 1
        log(
            self.metrics.progress_line(
                f"Epoch [{progress.epoch}]",
                progress.step_in_epoch,
                steps_per_epoch,
                self.global_batch,
                progress.skipped_steps,
            )
        )
        if writer is not None:
            meters = self.metrics.meters
            writer.scalars(
                {
                    "loss": meters["loss"].avg,
                    "lr": meters["lr"].value,
                    "grad_norm": meters["grad_norm"].avg,
                    "samples_per_s": self.global_batch / meters["step_time"].avg,
                    "data_time": meters["data_time"].avg,
                    "skipped_steps": progress.skipped_steps,
                    **window,
                },
                progress.global_step,
            )

    def stats(self, progress: Progress, stop: bool) -> dict:
        """The averages over the epoch's steps trained so far, as train_one_epoch returns them."""
        stats = self.metrics.averages()
        stats.update({name: total / count for name, (total, count) in self.window_means.items()})
        stats["lr"] = self.metrics.meters["lr"].value
        stats["samples_per_s"] = self.global_batch / stats.pop("step_time")
        stats["skipped_steps"] = progress.skipped_steps - self.skipped_before
        stats["steps"] = self.metrics.meters["step_time"].count
        stats["stop"] = stop
        return stats


# ---------------------------------------------------------------------------------------------------
# the epoch


def train_one_epoch(
    model,
    loader,
    optimizer,
    scaler,
    progress: Progress,
    args,
    lr_schedule,
    dataset_names,
    writer=None,
    save_last=None,
    stop_requested=lambda: False,
) -> dict:
    """Runs the loader to its end (or until a stop), updating `progress` after every step.

    model            the (possibly DDP- and compile-wrapped) model
    loader           yields len(loader) micro-batches of InContextDataset items (8-bit canvases, see
                     datasets.canvas), a multiple of args.accum_iter, starting at
                     progress.step_in_epoch of the epoch
    args             main_pretrain's arguments, args.precision resolved (util.runtime.resolve_precision)
    lr_schedule      global step -> lr
    writer           rank 0's RunLogger, or None
    save_last        collective callable writing checkpoint-last.pth, given the statistics of the
                     steps so far (as this function returns them), for the checkpoint to keep
    stop_requested   -> bool, e.g. a signal was received; honoured at the next step on all ranks
    Returns the epoch's averages, and "stop": whether training should end after this (a signal or
    --stop_after_steps); if that happened before the epoch's last step, checkpoint-last.pth is saved.
    """
    model.train()
    mvg = unwrap(model)
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    steps = len(loader) // args.accum_iter
    steps_per_epoch = progress.step_in_epoch + steps
    record = EpochRecord(
        args.print_freq,
        dataset_names,
        next(mvg.parameters()).device,
        args.batch_size * args.accum_iter * world_size,
        progress.skipped_steps,
    )
    optimisation_step = OptimisationStep(model, optimizer, scaler, args, world_size)
    batches = iter(loader)
    step_start = time.perf_counter()
    stop = False
    for _ in range(steps):
        lr = lr_schedule(progress.global_step)
        result = optimisation_step(batches, lr, progress, record.grouped, stop_requested)
        now = time.perf_counter()
        record.add_step(now - step_start, result, lr)
        step_start = now
        step = progress.global_step
        if step % args.print_freq == 0 or progress.step_in_epoch == steps_per_epoch:
            record.log_window(progress, steps_per_epoch, writer)
        if writer is not None and args.vis_every_steps and step % args.vis_every_steps == 0:
            writer.image("canvas: image | masked target | prediction | target", visual_grid(mvg, *result.shown), step)
        stop = stop_or_save(progress, args, record, save_last, result.signalled, steps_per_epoch)
        if stop:
            log(
                f"stopping after step {step} ({'signal' if result.signalled else '--stop_after_steps'}); "
                "checkpoint-last.pth holds the position"
            )
            break
    return record.stats(progress, stop)


def stop_or_save(
    progress: Progress, args, record: EpochRecord, save_last, signalled: bool, steps_per_epoch: int
) -> bool:
    """After a step: whether training stops (a signal or --stop_after_steps). checkpoint-last.pth is
    written at a stop and every --save_every_steps, except at the epoch's end, where the caller saves.
    Too many non-finite steps in a row raise NonFiniteError, with the last good state saved first."""
    step = progress.global_step
    if progress.consecutive_skips >= args.max_nonfinite_steps:
        if save_last is not None:
            save_last(record.stats(progress, stop=False))
        raise NonFiniteError(
            f"{progress.consecutive_skips} consecutive steps had a non-finite loss or gradient, or no "
            f"loss weight (up to step {step}); stopping. The weights are those of the last good step and "
            f"were saved to checkpoint-last.pth; lower --lr, set --clip_grad or check the data, then "
            f"--auto_resume."
        )
    stop = signalled or bool(args.stop_after_steps and step >= args.stop_after_steps)
    at_epoch_end = progress.step_in_epoch == steps_per_epoch
    if (
        save_last is not None
        and not at_epoch_end
        and (stop or (args.save_every_steps and step % args.save_every_steps == 0))
    ):
        save_last(record.stats(progress, stop))
    return stop
