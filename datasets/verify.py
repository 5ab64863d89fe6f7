"""Checks a prepared root and prints a summary per dataset.

    python -m datasets.verify <root>            (same as: python -m datasets.prepare verify <root>)

Per dataset: manifest readable and consistent (plain names, a 'splits' summary that agrees with each
case's own split; see datasets/manifest.py); every case of the manifest has the same slice files in
each of its folders and exactly those the manifest lists; no case without slices; foreground_slices
among the case's slices, and all of them for cases outside the test split (only test cases keep slices
without foreground); every PNG readable and of the manifest's size; image folders 8-bit grey; label
ids among the manifest's classes; masks 0/255; no case folder that the manifest does not know (left by
an interrupted run). Problems are listed as warnings (the first SUMMARY_LIMIT), then the run ends with
one error line and status 2, as it does when the root itself is missing or holds no dataset folder.
"""

import os
import sys

import numpy as np
from tqdm import tqdm

from util.cli import UsageError, docstring_parser, log, run_main, warn

from .manifest import HIDDEN_PREFIX, PreparedDataset, dataset_folders, decode_png

SUMMARY_LIMIT = 20


def check_picture(path, kind, size, class_ids, label_bits=8):
    """The problem with one slice file, or None."""
    try:
        picture = decode_png(path)
    except Exception as error:  # unreadable or truncated files are reported, not raised
        return f"{path}: unreadable PNG ({type(error).__name__}: {error})"
    if picture.ndim != 2:
        return f"{path}: expected a grey picture, got shape {picture.shape}"
    if list(picture.shape) != list(size):
        return f"{path}: size {list(picture.shape)}, manifest says {list(size)}"
    if kind == "image" and picture.dtype != np.uint8:
        return f"{path}: image is {picture.dtype}, expected 8-bit"
    if kind == "label":
        if picture.dtype.itemsize * 8 != label_bits:
            return f"{path}: {picture.dtype.itemsize * 8}-bit label, the manifest says {label_bits}-bit"
        unknown = set(np.unique(picture).tolist()) - class_ids
        if unknown:
            return f"{path}: label ids {sorted(unknown)} are not among the manifest's classes"
    if kind == "mask" and not set(np.unique(picture).tolist()) <= {0, 255}:
        return f"{path}: mask values other than 0 and 255"
    return None


def verify_dataset(dataset_dir):
    """(summary line, problems) of one dataset folder."""
    try:
        dataset = PreparedDataset(dataset_dir)
    except UsageError as error:  # a manifest that is not what it should be is one more problem
        return None, [str(error)]
    problems = []
    class_ids = set(dataset.classes)
    size = dataset.manifest["size"]
    case_ids = dataset.case_ids()
    if not case_ids:
        problems.append(f"{dataset_dir}: the manifest lists no cases")
    for case_id in case_ids:
        problems += foreground_problems(dataset, case_id)
    for folder, kind in dataset.folders.items():
        folder_dir = os.path.join(dataset_dir, folder)
        present = set(os.listdir(folder_dir)) if os.path.isdir(folder_dir) else set()
        for stray in sorted(present - set(case_ids)):
            problems.append(f"{os.path.join(folder_dir, stray)}: case folder not in the manifest")
        for case_id in tqdm(case_ids, desc=f"verifying {dataset.name}/{folder}", unit="case", leave=False):
            problems += verify_case_folder(dataset, folder, kind, case_id, size, class_ids)
    slices = sum(len(dataset.slice_indices(c)) for c in case_ids)
    foreground = sum(len(dataset.foreground_slice_indices(c)) for c in case_ids)
    splits = ", ".join(f"{split} {len(ids)}" for split, ids in dataset.manifest["splits"].items())
    classes = ", ".join(f"{i}:{n}" for i, n in dataset.classes.items()) or "-"
    summary = (
        f"{dataset.name}: {dataset.task}, {dataset.modality}, {len(case_ids)} cases ({splits}), "
        f"{slices} slices ({foreground} with foreground), "
        f"{len(dataset.manifest.get('skipped', {}))} skipped, classes {classes}"
    )
    return summary, problems


def foreground_problems(dataset, case_id):
    """A case's foreground_slices must be among its slices; outside the test split, all of them."""
    slices = set(dataset.slice_indices(case_id))
    foreground = set(dataset.foreground_slice_indices(case_id))
    where = f"{dataset.dataset_dir}: case '{case_id}'"
    if not foreground <= slices:
        return [f"{where}: foreground_slices {sorted(foreground - slices)} are not among its slices"]
    split = dataset.case(case_id)["split"]
    if split != "test" and foreground != slices:
        return [f"{where}: a {split} case keeps slices without foreground {sorted(slices - foreground)}"]
    return []


def verify_case_folder(dataset, folder, kind, case_id, size, class_ids):
    case_dir = os.path.join(dataset.dataset_dir, folder, case_id)
    if not os.path.isdir(case_dir):
        return [f"{case_dir}: missing"]
    expected = {os.path.basename(dataset.slice_path(folder, case_id, i)): i for i in dataset.slice_indices(case_id)}
    if not expected:
        return [f"case '{case_id}': the manifest lists no slices"]
    present = {name for name in os.listdir(case_dir) if not name.startswith(HIDDEN_PREFIX)}
    problems = [f"{os.path.join(case_dir, name)}: missing" for name in sorted(set(expected) - present)]
    problems += [f"{os.path.join(case_dir, name)}: not in the manifest" for name in sorted(present - set(expected))]
    for name in sorted(set(expected) & present):
        problem = check_picture(
            os.path.join(case_dir, name), kind, size, class_ids, dataset.case(case_id).get("label_bits", 8)
        )
        problems += [problem] if problem else []
    return problems


def verify_root(root):
    """(summary lines, problems) of every dataset under root; UsageError when root is missing,
    unreadable or holds no dataset folder, as nothing can be checked then."""
    dataset_dirs = dataset_folders(root)
    if not dataset_dirs:
        raise UsageError(f"{root}: no dataset folders; expected the --out of python -m datasets.prepare")
    summaries, problems = [], []
    for dataset_dir in dataset_dirs:  # a folder without a manifest is reported by verify_dataset
        summary, dataset_problems = verify_dataset(dataset_dir)
        summaries += [summary] if summary else []
        problems += dataset_problems
    return summaries, problems


def main(argv=None):
    parser = docstring_parser(__doc__, prog="python -m datasets.verify")
    parser.add_argument("root", help="the prepared root (the --out of datasets.prepare)")
    args = parser.parse_args(argv)
    summaries, problems = verify_root(args.root)
    for line in summaries:
        log(line)
    if problems:
        for problem in problems[:SUMMARY_LIMIT]:
            warn(problem)
        if len(problems) > SUMMARY_LIMIT:
            warn(f"... and {len(problems) - SUMMARY_LIMIT} more problems")
        raise UsageError(f"{args.root}: {len(problems)} problems (listed above)")
    log("ok")


if __name__ == "__main__":
    sys.exit(run_main(main))
