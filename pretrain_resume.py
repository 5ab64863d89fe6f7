"""Where a training run continues from, and what it leaves in --output_dir for the next run.

Before anything is built, rank 0 checks that --output_dir can be written, chooses the checkpoint to
continue from (--resume, or with --auto_resume the newest one that loads, setting aside the newer ones
that do not) and removes what interrupted writes left behind. The chosen checkpoint must fit the model
(check_model_fits) and then restores weights, optimizer, loss scale, position and RNG states
(restore). At every epoch end (finish_epoch) the epoch's line goes into log.txt and
checkpoint-last.pth is written, with a numbered copy every --save_every_epochs.
"""

import json
import os
import shutil

from engine_pretrain import Progress
from util import checkpoint, misc
from util.cli import UsageError, log, warn
from util.files import atomic_output, writable_folder


def choose_checkpoint(args):
    """--auto_resume, on rank 0: (path, state) of the newest checkpoint in --output_dir that loads, or
    (None, None). The newer ones that do not load are set aside, never overwritten; when none loads, the
    run stops and changes nothing, unless --start_over_if_unreadable."""
    path, state, unreadable = checkpoint.find_latest_valid(args.output_dir)
    if unreadable and path is None and not args.start_over_if_unreadable:
        others = f" (and {len(unreadable) - 1} other checkpoint(s))" if len(unreadable) > 1 else ""
        raise UsageError(
            f"--auto_resume: {unreadable[0][1]}{others}, and no checkpoint in {args.output_dir} "
            "loads; nothing was changed: rerun if the file system had a passing problem, or pass "
            "--start_over_if_unreadable to train from step 0 (the unreadable files are kept, renamed)"
        )
    for bad, why in unreadable:
        warn(f"skipping checkpoint {why}; kept as {checkpoint.set_aside(bad)}")
    if unreadable and path is None:
        warn(f"--start_over_if_unreadable: no checkpoint in {args.output_dir} loads; training from step 0")
    return path, state


def prepare_output_dir(args):
    """Rank 0, before anything is built: --output_dir exists and is writable, the checkpoint to continue
    from is chosen (--auto_resume), then leftovers of interrupted writes are removed. Returns (path,
    state) of that checkpoint, or (None, None)."""
    writable_folder(args.output_dir, "--output_dir")  # before anything is built, not at the first checkpoint
    path, state = choose_checkpoint(args) if args.auto_resume and not args.resume else (None, None)
    for leftover in checkpoint.remove_partial_writes(args.output_dir):
        log(f"removed {leftover}, a checkpoint write that an earlier run did not finish")
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


def check_model_fits(state, path: str, flag: str, mvg):
    """A checkpoint of another model (size) is a one-line UsageError that says what the file records."""
    recorded = state["args"]
    settings = " ".join(
        f"--{name} {' '.join(map(str, value)) if isinstance(value, list) else value}"
        for name in ("model", "depth", "input_size")
        if (value := recorded.get(name)) is not None
    )
    hint = (
        f"it records {settings}; resume with the same settings"
        if settings
        else "was it trained with another --model, --depth or --input_size?"
    )
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
        warn(
            f"resuming with an effective batch of {global_batch} instead of {state['global_batch']}: "
            f"continuing at sample {progress.step_in_epoch * global_batch} of epoch {progress.epoch}"
        )
    if len(state["rng"]) == dist_info.world_size:
        checkpoint.restore_rng(state["rng"][dist_info.rank])
    else:
        warn(
            f"{path} holds RNG states of {len(state['rng'])} processes, not {dist_info.world_size}; "
            "random streams (e.g. drop path) restart from the seed"
        )
    log(
        f"resumed from {path}: epoch {progress.epoch}, step {progress.step_in_epoch} of the epoch, "
        f"global step {progress.global_step}"
    )
    return progress


# ---------------------------------------------------------------------------------------------------
# the epoch end


def finish_epoch(args, progress, stats, save, writer):
    """Epoch end: the epoch's line in log.txt, checkpoint-last and maybe a numbered one, and the summary
    line. stats: the whole epoch's, across resumes."""
    finished = progress.epoch
    progress.epoch += 1
    progress.step_in_epoch = 0
    numbered = args.save_every_epochs and (
        progress.epoch % args.save_every_epochs == 0 or progress.epoch == args.epochs
    )

    def keep_numbered_copy():  # runs once checkpoint-last.pth is on disk
        snapshot(
            os.path.join(args.output_dir, checkpoint.LAST), os.path.join(args.output_dir, f"checkpoint-{finished}.pth")
        )
        checkpoint.prune_numbered(args.output_dir, args.keep_checkpoints)

    # The line before the checkpoint: a kill between the two leaves the line and an older checkpoint,
    # and the epoch trained again replaces the line; the other order could leave the epoch without one.
    if args.output_dir and misc.is_main_process():
        record = {
            "epoch": finished,
            "global_step": progress.global_step,
            **{f"train_{k}": v for k, v in stats.items() if k != "stop"},
        }
        write_epoch_record(os.path.join(args.output_dir, "log.txt"), record)
    save(checkpoint.LAST, misc.EpochTotals(), keep_numbered_copy if numbered else None)
    if writer is not None:
        writer.flush()
    log(
        f"epoch {finished} done: loss {stats.get('loss', float('nan')):.4f}, "
        f"{stats['samples_per_s']:.1f} samples/s, {stats['skipped_steps']} skipped step(s)"
    )


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
