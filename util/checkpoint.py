"""Checkpoints: atomic writes, RNG capture, finding the latest valid one, pruning, and loading
pretrained weights (MAE, timm ViT, Painter / MVG) with a report of what went where.

A training checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
torch.load(..., weights_only=True):
    model, optimizer, scaler     state dicts
    epoch, step_in_epoch         where to continue: `step_in_epoch` optimizer steps of `epoch` are done
    global_step, skipped_steps, consecutive_skips
    global_batch, world_size     to check that a resumed run reads the data the same way
    rng                          one RNG state dict per rank (torch, cuda, numpy, python)
    args                         the command line as a dict
    canvas_record                how the run draws its canvases, for inference (util/record.py)
    epoch_totals                 the statistics of `epoch`'s steps so far (util.misc.EpochTotals.as_dict), so
                                 that its line in log.txt covers all of them across a resume
"""

import argparse
import glob
import math
import os
import random
import re
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from util.cli import UsageError, log
from util.files import describe_os_error
from util.misc import all_gather_objects, is_main_process

LAST = "checkpoint-last.pth"
NUMBERED = re.compile(r"^checkpoint-(\d+)\.pth$")
REQUIRED_KEYS = ("model", "optimizer", "epoch", "step_in_epoch", "global_step", "args")


def atomic_save(obj, path: str):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`: a crash
    at any moment leaves either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # The rename itself lives in the folder's metadata.
    folder_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(folder_fd)
    finally:
        os.close(folder_fd)


# ---------------------------------------------------------------------------------------------------
# random number generators


def capture_rng() -> dict:
    """This process's RNG states as tensors and plain Python values (weights_only-loadable)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": numpy_state,
        "python": random.getstate(),
    }


def restore_rng(state: dict):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = dict(numpy_state["state"], key=numpy_state["state"]["key"].numpy().astype(np.uint32))
    np.random.set_state(numpy_state)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------------------------------
# training checkpoints


def to_host(obj):
    """A copy of a nested state (dicts, lists, tuples) whose tensors are in host memory and share
    nothing with the live ones, so that training may go on while the copy is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: to_host(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(value) for value in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints in a background thread, so that training waits only while the state is
    copied to host memory (about a second for ViT-L), not while gigabytes reach the disk.

    One write at a time: a new one first waits for the last. `wait()` blocks until the last write is
    on disk and raises its error, if it had one: a UsageError as it is (e.g. a full disk, in one line
    that names the file), anything else as a RuntimeError; main calls it before exiting, also on errors
    and signals, so a run never ends with a checkpoint half-written. With background=False every write
    happens in the caller, as a plain function call.
    """

    def __init__(self, background: bool = True):
        self.background = background
        self._thread = None
        self._error = None

    def submit(self, write):
        """Runs write() (no arguments) after the previous write has finished."""
        self.wait()
        if not self.background:
            write()
            return
        self._thread = threading.Thread(target=self._run, args=(write,), name="checkpoint-writer")
        self._thread.start()

    def _run(self, write):
        try:
            write()
        except BaseException as error:  # handed to the training thread by wait()
            self._error = error

    def wait(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, UsageError):
                raise error
            raise RuntimeError(f"writing a checkpoint failed: {type(error).__name__}: {error}") from error


def save_training_state(
    path: str,
    model,
    optimizer,
    scaler,
    progress,
    args_dict: dict,
    global_batch: int,
    world_size: int,
    writer: CheckpointWriter = None,
    then=None,
    canvas_record: dict | None = None,
    epoch_totals: dict | None = None,
):
    """Collective: every rank contributes its RNG state; rank 0 writes the file, through `writer`
    (in the background) when given, and afterwards calls then() (e.g. a numbered copy and pruning).
    canvas_record: how the run draws its canvases (util/record.py), for inference to do the same;
    epoch_totals: the statistics of the epoch's steps so far (util.misc.EpochTotals.as_dict).
    A file system error (a full disk, a folder turned read-only) is a UsageError naming the file."""
    rng_states = all_gather_objects(capture_rng())
    if not is_main_process():
        return
    writer = writer or CheckpointWriter(background=False)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        **progress.as_dict(),
        "global_batch": global_batch,
        "world_size": world_size,
        "rng": rng_states,
        "args": args_dict,
    }
    if canvas_record is not None:
        state["canvas_record"] = canvas_record
    if epoch_totals is not None:
        state["epoch_totals"] = epoch_totals
    if writer.background:  # training will change the live tensors while this copy is written
        state = to_host(state)

    def write():
        try:
            atomic_save(state, path)
            if then is not None:
                then()
        except OSError as error:
            raise UsageError(
                f"{error.filename or path}: cannot write the checkpoint ({describe_os_error(error)}); "
                "training stopped: make room or fix the folder, then continue with --auto_resume"
            ) from error

    writer.submit(write)


def load_training_state(path: str, flag: str = "--resume") -> dict:
    """A training checkpoint of this project; a missing, unreadable or foreign file is a one-line
    UsageError naming the flag (none: the path alone) and the file."""
    state = read_checkpoint(path, flag)
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise UsageError(f"{where(flag, path)}: not a training checkpoint of this project (no {', '.join(missing)})")
    return state


def find_latest_valid(output_dir: str):
    """(path, state, unreadable): the newest checkpoint in output_dir that loads, or None, None when none
    does; unreadable lists (path, why) for each newer one that does not load (all, when none does).

    Newest by modification time, checkpoint-last.pth first among equals. A file may not load because a
    crash or a full disk cut it short, or because the file system failed to read it this time.
    """
    paths = [
        p
        for p in glob.glob(os.path.join(output_dir, "checkpoint-*.pth"))
        if os.path.basename(p) == LAST or NUMBERED.match(os.path.basename(p))
    ]
    paths.sort(key=lambda p: (os.path.getmtime(p), os.path.basename(p) == LAST), reverse=True)
    unreadable = []
    for path in paths:
        try:
            return path, load_training_state(path, flag=""), unreadable
        except UsageError as error:
            unreadable.append((path, str(error)))
    return None, None, unreadable


def set_aside(path: str) -> str:
    """Renames an unreadable checkpoint to <name>.unreadable-<time>, out of the way of the names that
    training writes, prunes and resumes from, and never deleted: a read error may have been passing.
    Returns the new path."""
    kept = f"{path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(path, kept)
    return kept


def remove_partial_writes(output_dir: str) -> list:
    """Deletes the temporary files of checkpoint writes that a killed run left (each as large as a
    checkpoint); returns their names. The complete checkpoints are never touched."""
    leftovers = sorted(
        name
        for name in os.listdir(output_dir)
        if name.startswith("checkpoint-") and ".pth" in name and name.endswith(".tmp")
    )
    for name in leftovers:
        os.remove(os.path.join(output_dir, name))
    return leftovers


def prune_numbered(output_dir: str, keep: int):
    """Deletes all but the `keep` highest-numbered checkpoint-{epoch}.pth (keep <= 0: keep all)."""
    if keep <= 0:
        return
    numbered = sorted((int(m.group(1)), name) for name in os.listdir(output_dir) if (m := NUMBERED.match(name)))
    for _, name in numbered[:-keep]:
        os.remove(os.path.join(output_dir, name))


def check_weights_fit(model: torch.nn.Module, weights: dict, source: str, hint: str, target: str = "the model"):
    """A UsageError in one line when `weights` (a state dict) do not fit `model` key for key and shape
    for shape, as load_state_dict would demand: counts, an example, then `hint`; not the full key list.
    `target` names the model in the message."""
    own = model.state_dict()
    missing = [f"{name} (not in the file)" for name in own if name not in weights]
    unknown = [f"{name} (not in the model)" for name in weights if name not in own]
    misshapen = [
        f"{name} ({list(weights[name].shape)} in the file, {list(target.shape)} in the model)"
        for name, target in own.items()
        if name in weights and weights[name].shape != target.shape
    ]
    if missing or misshapen or unknown:
        raise UsageError(f"{source} does not fit {target}: {mismatch_summary(missing, misshapen, unknown)}; {hint}")


def mismatch_summary(missing: list, misshapen: list, unknown: list) -> str:
    """'12 missing, 3 misshapen weights, e.g. <the first misshapen one>': each list holds descriptions."""
    kinds = (("misshapen", misshapen), ("missing", missing), ("unknown", unknown))
    counts = ", ".join(f"{len(described)} {kind}" for kind, described in kinds if described)
    example = next(described[0] for _, described in kinds if described)
    return f"{counts} weights, e.g. {example}"


# ---------------------------------------------------------------------------------------------------
# pretrained weights


# Keys of MAE / timm ViT checkpoints with no counterpart in MVG (or a different meaning): skipped
# silently when they do not fit. MAE's decoder_embed / decoder_pred / mask_token share our names but
# belong to its 512-wide pixel decoder.
FOREIGN_KEYS = re.compile(r"^(cls_token|dist_token|reg_token|mask_token|decoder_.*|head\..*|fc_norm\..*)$")
# Our keys that a ViT checkpoint cannot hold; they keep their initialisation.
MVG_ONLY_KEYS = re.compile(
    r"^(mask_token|segment_token_[xy]|blocks\.\d+\.attn\.rel_pos_[hw]|decoder_(embed|pred)\..*)$"
)


@dataclass
class LoadReport:
    loaded: list = field(default_factory=list)  # names copied as they are
    adapted: list = field(default_factory=list)  # (name, checkpoint shape, model shape) resampled
    skipped: list = field(default_factory=list)  # (name, reason) expected not to fit
    missing: list = field(default_factory=list)  # model names the checkpoint lacks (kept as initialised)
    unexpected: list = field(default_factory=list)  # (name, reason) that should have loaded but did not

    def summary(self) -> str:
        def names(items):
            keys = [item[0] if isinstance(item, tuple) else item for item in items]
            # blocks.0.x ... blocks.23.x -> "blocks.*.x (x24)", so the report stays readable.
            counts = {}
            for key in keys:
                pattern = re.sub(r"^blocks\.\d+\.", "blocks.*.", key)
                counts[pattern] = counts.get(pattern, 0) + 1
            return ", ".join(k if n == 1 else f"{k} (x{n})" for k, n in counts.items()) or "-"

        adapted = ", ".join(f"{k} {list(a)}->{list(b)}" for k, a, b in self.adapted) or "-"
        return (
            f"loaded {len(self.loaded)} tensors; adapted {len(self.adapted)}: {adapted}\n"
            f"  skipped {len(self.skipped)}: {names(self.skipped)}\n"
            f"  missing (kept as initialised) {len(self.missing)}: {names(self.missing)}\n"
            f"  unexpected {len(self.unexpected)}: " + ("; ".join(f"{k} ({why})" for k, why in self.unexpected) or "-")
        )


def load_weights_only(path: str, mmap: bool = False):
    """torch.load(weights_only=True), also accepting the argparse.Namespace that MAE's and the
    authors' training checkpoints pickle next to the weights (only that class is allowed). mmap: map
    the tensors instead of reading them, for a look at the other entries of a large file (only
    torch.save's zip format can be mapped; older files are read whole)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))


def where(flag: str, path: str) -> str:
    """How a message names a file: with the flag it was given with, if any."""
    return f"{flag} {path}" if flag else path


def read_checkpoint(path: str, flag: str = "--checkpoint", mmap: bool = False) -> dict:
    """A checkpoint's contents, loaded weights-only (mmap: see load_weights_only); a missing or
    unreadable file is a one-line error that names the flag it was given with."""
    if not os.path.isfile(path):
        raise UsageError(f"{where(flag, path)}: file not found")
    try:
        return load_weights_only(path, mmap)
    except Exception as error:  # truncated, random bytes, a pickle with objects: all mean "not usable"
        raise UsageError(
            f"{where(flag, path)}: not a readable checkpoint ({unreadable_reason(path, error)})"
        ) from error


def unreadable_reason(path: str, error: Exception) -> str:
    """Why torch.load failed, in a few words: torch's own messages run over lines of advice."""
    if isinstance(error, OSError):  # the file system's failure, e.g. an input/output error
        return error.strerror or str(error)
    with open(path, "rb") as handle:
        start = handle.read(2)
    # torch.save writes a zip archive (whose directory is at the end) or, before PyTorch 1.6, a pickle.
    if not zipfile.is_zipfile(path) and start != b"\x80\x02":
        return "not a whole PyTorch file: cut short, or another kind of file"
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return first_line.split(". ")[0][:200]


def recorded_args(checkpoint) -> dict:
    """The training arguments a checkpoint records, as a dict: ours store a dict, MAE's and the
    authors' an argparse.Namespace; {} when there are none."""
    saved = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    return vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved or {})


def strip_prefixes(state: dict) -> dict:
    """Drops the wrappers' prefixes: 'module.' (DDP) and '_orig_mod.' (torch.compile)."""
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", key): value for key, value in state.items()}


def state_dict_of(checkpoint) -> dict:
    for key in ("model", "state_dict", "model_state"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint  # a bare state dict, as timm saves


def _resample_pos_embed(pos: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A (1, prefix + side^2, D) embedding onto our (1, prefix' + side'^2, D) layout (bicubic)."""

    def layout(n):
        side = math.isqrt(n)
        return side, n - side * side

    _side, prefix = layout(pos.shape[1])
    new_side, new_prefix = layout(shape[1])
    if prefix > 1 or new_prefix > 1 or pos.shape[-1] != shape[-1]:
        raise ValueError(f"cannot map a position embedding {list(pos.shape)} onto {list(shape)}")
    pos = resample_abs_pos_embed(
        pos.float(), new_size=[new_side, new_side], num_prefix_tokens=prefix, interpolation="bicubic", antialias=False
    )
    if prefix < new_prefix:  # the checkpoint has no cls slot; ours is unused by the model anyway
        pos = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
    elif prefix > new_prefix:
        pos = pos[:, prefix:]
    return pos


def _resample_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """(L, C) relative position table -> (length, C), linearly along L (as ViTDet does)."""
    resized = F.interpolate(table.float().t().unsqueeze(0), size=length, mode="linear", align_corners=False)
    return resized[0].t()


def _adapt(name: str, value: torch.Tensor, target: torch.Tensor):
    """The checkpoint tensor resampled to the model's shape, or None if it cannot be."""
    if name == "pos_embed" and value.ndim == 3:
        return _resample_pos_embed(value, target.shape)
    if re.fullmatch(r"blocks\.\d+\.attn\.rel_pos_[hw]", name) and value.ndim == 2 and value.shape[1] == target.shape[1]:
        return _resample_rel_pos(value, target.shape[0])
    return None


def load_pretrained(
    model: torch.nn.Module, path: str, allow_mismatch: bool = False, flag: str = "--finetune"
) -> LoadReport:
    """Initialises `model` from an MAE, timm-ViT, Painter or MVG checkpoint (weights only).

    Keys that fit load; the position embedding and rel-pos tables are resampled when their sizes
    differ; MAE's decoder and ViT-only tokens are skipped; MVG-only keys may be missing. Anything
    else (an unknown key, a shape that cannot be adapted, a missing backbone key) is a one-line
    UsageError with counts and an example, after every such key is listed on stdout, unless
    `allow_mismatch`, which keeps those parameters initialised.
    """
    state = strip_prefixes(state_dict_of(load_weights_only(path)))
    own = model.state_dict()
    report = LoadReport()
    to_load = {}
    for name, value in state.items():
        target = own.get(name)
        if target is not None and value.shape == target.shape:
            to_load[name] = value
            report.loaded.append(name)
            continue
        if FOREIGN_KEYS.match(name):
            report.skipped.append((name, "not part of MVG" if target is None else "MAE decoder shape"))
            continue
        if target is None:
            report.unexpected.append((name, "no such key in the model"))
            continue
        try:
            adapted = _adapt(name, value, target)
        except ValueError as error:
            adapted, why = None, str(error)
        else:
            why = f"shape {list(value.shape)} vs model {list(target.shape)}"
        if adapted is None:
            report.unexpected.append((name, why))
        else:
            to_load[name] = adapted
            report.adapted.append((name, tuple(value.shape), tuple(target.shape)))
    for name in own:
        if name not in state:
            if MVG_ONLY_KEYS.match(name):
                report.missing.append(name)
            else:
                report.unexpected.append((name, "missing from the checkpoint"))
    if report.unexpected and not allow_mismatch:
        log(
            f"{path}: the weights that do not fit the model\n"
            + "\n".join(f"  {name}: {why}" for name, why in report.unexpected)
        )
        missing = [f"{name} ({why})" for name, why in report.unexpected if name not in state]
        unknown = [f"{name} ({why})" for name, why in report.unexpected if name not in own]
        misshapen = [f"{name} ({why})" for name, why in report.unexpected if name in state and name in own]
        raise UsageError(
            f"{where(flag, path)} does not fit the model: {mismatch_summary(missing, misshapen, unknown)}"
            f" (all {len(report.unexpected)} listed on stdout); pass --allow_key_mismatch to keep "
            "those parameters initialised"
        )
    model.load_state_dict(to_load, strict=False)
    return report
