"""The output folder of datasets.prepare: which folder a run may claim, what marks it as this dataset's,
how a rerun resumes, and how every file lands on disk whole.

    <out>/<dataset>/prepare_settings.json   written first: it names the dataset (a folder holding it is
                                            a preparation of that dataset) and a rerun must match it
    <out>/<dataset>/.partial/<case>/        a case being written, moved into place when complete
    <out>/<dataset>/meta/<case>.json        a case's record, written after its folders: it marks the case
                                            finished, so it never outlives the slices it describes

Every PNG and JSON file goes through a temporary file, fsync and rename (util.files.atomic_output).
"""

import json
import os
import shutil

from PIL import Image

from util.cli import UsageError
from util.files import atomic_output, describe_os_error, fsync_folder

from .manifest import MANIFEST_NAME, PLAIN_NAME_RULE, is_plain_name, quoted
from .readers import InputError

PARTIAL_FOLDER = ".partial"
META_FOLDER = "meta"
SETTINGS_NAME = "prepare_settings.json"
# Settings that do not change what is written, so a rerun may change them.
# Splits are drawn afresh each run and enter the manifest; with --test_slices they decide which slices a
# case keeps, and a rerun prepares again each finished case whose kept slices no longer fit (record_fits).
RUN_ONLY_SETTINGS = {"workers", "overwrite", "out", "command", "test_fraction", "seed", "test_cases", "test_slices"}
ALL_SLICES, FOREGROUND_SLICES = "all", "foreground"


# ---------------------------------------------------------------- writing files whole


def write_png(path, picture):
    """Through a temporary file, fsync and rename, like every file prepare writes: a case's record may
    mark it finished only once its slices are on disk, not in a cache a power loss empties."""
    with atomic_output(path) as handle:
        Image.fromarray(picture).save(handle, format="PNG")


def write_json(path, content):
    with atomic_output(path, "w") as handle:
        json.dump(content, handle, indent=1)


def output_error(error, path):
    """An OSError of writing the output (read-only folder, full disk) as one line naming the path."""
    return UsageError(f"{error.filename or path}: cannot write ({describe_os_error(error)})")


def move_into_place(finished, final):
    """Replaces a case's folder by its finished one; the parent's fsync makes the rename durable before
    the case's record is written."""
    os.makedirs(os.path.dirname(final), exist_ok=True)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(finished, final)
    fsync_folder(os.path.dirname(final))


# ---------------------------------------------------------------- claiming the dataset folder


def check_dataset_name(name):
    """The dataset goes to <out>/<name>: one plain folder, not '..', '' (--out itself) or a path."""
    if not is_plain_name(name):
        raise UsageError(
            f"--dataset {quoted(name)}: not a plain folder name ({PLAIN_NAME_RULE}); the "
            f"dataset goes to <out>/<dataset>, one folder below --out"
        )


def recorded_dataset(path):
    """The "dataset" a manifest or settings file records; None when there is no such readable file."""
    try:
        with open(path) as handle:
            content = json.load(handle)
    except (OSError, ValueError):
        return None
    return content.get("dataset") if isinstance(content, dict) else None


def is_preparation_of(dataset_dir, name):
    """Whether the folder holds a preparation of the dataset `name`: a finished one has a manifest that
    names it, an unfinished one the settings file a run writes before anything else, which names it too."""
    return any(recorded_dataset(os.path.join(dataset_dir, marker)) == name for marker in (MANIFEST_NAME, SETTINGS_NAME))


def claim_dataset_folder(dataset_dir, args):
    """Makes sure that the run writes into, and --overwrite deletes, only a folder that is missing, empty
    or a preparation of this very dataset, whatever else lies where --out and --dataset point."""
    if not os.path.lexists(dataset_dir):
        return
    action = "delete (--overwrite)" if args.overwrite else "write into"
    if not os.path.isdir(dataset_dir):
        raise UsageError(f"{dataset_dir}: not a folder; refusing to {action} it, choose another --dataset or --out")
    try:
        empty = not os.listdir(dataset_dir)
        if not empty and not is_preparation_of(dataset_dir, args.dataset):
            raise UsageError(
                f"{dataset_dir}: holds files that are not a preparation of dataset '{args.dataset}' "
                f"(no {MANIFEST_NAME} or {SETTINGS_NAME} naming it); refusing to {action} it, "
                f"choose another --dataset or --out"
            )
        if args.overwrite:
            shutil.rmtree(dataset_dir)
    except OSError as error:
        verb = "delete" if args.overwrite else "read"
        raise UsageError(f"{error.filename or dataset_dir}: cannot {verb} ({describe_os_error(error)})") from error


def recorded_settings(args):
    return {key: value for key, value in sorted(vars(args).items()) if key not in RUN_ONLY_SETTINGS}


def start_dataset_folder(dataset_dir, args):
    """Creates the folder, or checks that an earlier run used the same settings. The settings file is
    written first: it marks the folder as this dataset's preparation (is_preparation_of)."""
    claim_dataset_folder(dataset_dir, args)
    settings_path = os.path.join(dataset_dir, SETTINGS_NAME)
    settings = json.loads(json.dumps(recorded_settings(args)))
    if os.path.exists(settings_path):
        with open(settings_path) as handle:
            earlier = json.load(handle)
        changed = sorted(key for key in set(settings) | set(earlier) if settings.get(key) != earlier.get(key))
        if changed:
            raise InputError(
                f"{dataset_dir} was prepared with other settings ({', '.join(changed)}); "
                f"use --overwrite to start again or choose another --dataset/--out"
            )
    write_json(settings_path, settings)
    try:
        os.makedirs(os.path.join(dataset_dir, META_FOLDER), exist_ok=True)
    except OSError as error:
        raise output_error(error, dataset_dir) from error
    clear_partial(dataset_dir)


def clear_partial(dataset_dir):
    """Removes what cases being written left in .partial/ (an interrupted run's, or this run's at its end)."""
    shutil.rmtree(os.path.join(dataset_dir, PARTIAL_FOLDER), ignore_errors=True)


# ---------------------------------------------------------------- case records and resuming


def record_path(dataset_dir, case_id):
    return os.path.join(dataset_dir, META_FOLDER, case_id + ".json")


def finished_record(dataset_dir, case_id):
    path = record_path(dataset_dir, case_id)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def recorded_foreground(record):
    """A done case's foreground slices; records written before foreground_slices kept only those."""
    return record.get("foreground_slices", record["slices"])


def slice_selection(split, test_slices):
    """Which slices a case keeps: test cases follow --test_slices, all others keep foreground only."""
    return test_slices if split == "test" else FOREGROUND_SLICES


def record_fits(record, selection):
    """Whether a finished case keeps the slices this run would keep: its split, and so its selection,
    may have changed since. Compared by content, so a case whose foreground fills the volume fits both."""
    if record["status"] != "done":  # skipped for lack of foreground, which ALL_SLICES never does
        return selection == FOREGROUND_SLICES
    wanted = list(range(record["num_slices"])) if selection == ALL_SLICES else recorded_foreground(record)
    return record["slices"] == wanted


def remove_leftovers(dataset_dir, case_id, folders):
    """Clears a case about to be prepared: an interrupted run may have moved some of its folders into
    place (never its record), and a finished case that no longer fits has both. The record goes first:
    it marks the case finished, so it must never outlive the folders it describes."""
    path = record_path(dataset_dir, case_id)
    if os.path.exists(path):
        os.remove(path)
    for folder in folders:
        shutil.rmtree(os.path.join(dataset_dir, folder, case_id), ignore_errors=True)
