"""Prepares medical volumes as 2D PNG slices for MVG, in the authors' folder layout.

Each run prepares one dataset from one source layout into <out>/<dataset>/:

    <out>/<dataset>/<folder>/<case>/<slice>.png   one folder per role of the layout's task; <slice> is
                                                  the zero-padded slice index in the canonical volume
    <out>/<dataset>/manifest.json                 everything needed to use the slices and to put
                                                  predictions back (format: datasets/manifest.py)
    <out>/<dataset>/meta/<case>.json              one record per finished case, written last
    <out>/<dataset>/prepare_settings.json         the settings; a rerun with other settings refuses

Layouts are the subcommands below (datasets/layouts.py: each with its task, its flags and its folders;
`python -m datasets.prepare <layout> --help`). The folders follow the task: segmentation image, label;
synthesis one per contrast (<source>, <target>); inpainting image, target, mask; denoising image, target.

Examples:

    python -m datasets.prepare msd --root /data/Task03_Liver --out data --dataset MSD_liver
    python -m datasets.prepare msd --root /data/AMOS22 --out data --dataset AMOS_CT --modality CT
    python -m datasets.prepare glob --root /data/BTCV/RawData/Training --images "img/img*.nii.gz" \\
        --labels "label/label*.nii.gz" --modality CT --out data --dataset BTCV
    python -m datasets.prepare glob --root /data/PROMISE12 --images "Case??.mhd" \\
        --labels "Case??_segmentation.mhd" --modality MRI --out data --dataset PROMISE12
    python -m datasets.prepare glob --root /data/LA --images "*/mri_norm2.h5" \\
        --labels "*/mri_norm2.h5" --modality MRI --out data --dataset LA
    python -m datasets.prepare glob --root /data/ChinaSet --images "CXR_png/CHNCXR_*_?.png" \\
        --labels "mask/CHNCXR_*_?_mask.png" --skip_unpaired --label_map 255:1 --modality XR \\
        --out data --dataset CXR
    python -m datasets.prepare acdc --root /data/ACDC/database --out data --dataset ACDC
    python -m datasets.prepare brats-synthesis --root /data/BraTS2023-GLI --source t1c --target t2w \\
        --out data --dataset BraTS_GLI
    python -m datasets.prepare brats-inpainting --root /data/BraTS2023-Local --out data --dataset BraTS_Local
    python -m datasets.prepare denoising --root /data/LDCT --low_dose "*/quarter_3mm" \\
        --normal_dose "*/full_3mm" --out data --dataset LDCT     # DICOM series folders
    python -m datasets.prepare verify data

Processing of a case (datasets/slicing.py, the path predict.py shares): read every volume, check that all
grids match (shape and affine), reorient to RAS, normalise intensities per volume (datasets/intensity.py;
targets of denoising and inpainting with the input's parameters), find the slices that hold foreground
(label tasks: at least --min_foreground label pixels) or enough body (other tasks: at least
--min_body_fraction of the input slice above black), bring the kept slices to --size x --size
(datasets/geometry.py) and write 8-bit grey PNGs; labels keep their ids (16-bit PNG when an id exceeds
255). Every input is checked (pairing, headers, grids, 4D) before any case is processed, and all problems
are reported together.

Which slices are kept: train (and val) cases keep their foreground slices, all that training reads.
Test cases keep every slice of the volume (--test_slices all, the default), so that one preparation
serves both evaluation protocols: the paper's, on the foreground slices, and whole volumes, where false
positives on the other slices count. The manifest lists each case's foreground slices beside its kept
ones (foreground_slices, slices). --test_slices foreground keeps only foreground slices for test cases
too, as before this option existed, e.g. to save disk space.

A case without any foreground: a train case (or any case with --test_slices foreground) has nothing
to keep; it is skipped with a warning and listed under "skipped" in the manifest. A test case with
--test_slices all is kept whole, with no foreground slice: it is what whole-volume evaluation is for,
as metrics.py leaves a class absent from both truth and prediction unscored and scores a class
predicted where the truth has none 0 (false positives count, an empty prediction is not rewarded).
The foreground protocol has no slice of such a case and leaves it out.

Resuming and interruptions (datasets/output_folder.py): a case is written to <dataset>/.partial/<case>/
and moved into place when complete; its meta/<case>.json is written after that and marks it finished. A
rerun skips finished cases whose kept slices are still the ones wanted (a rerun may change the splits or
--test_slices, and with them whether a case keeps all its slices; such a case is prepared again) and
removes anything an interrupted run left of the others. Every PNG and JSON file is written to a
temporary file, synced to disk and renamed, so a crash or power loss never leaves a finished case with
empty slices. Cases that fail are listed and the run ends with status 2; a rerun keeps the finished ones.

Safety: --dataset and every case id must be plain names (letters, digits, '-', '_', '.', not starting
with '.'), one folder level below --out. A run writes into <out>/<dataset> (and --overwrite deletes
it) only when that folder is empty or holds a preparation of this very dataset: a manifest.json or
prepare_settings.json that names it; anything else is refused.
"""

import argparse
import os
import random
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
from tqdm import tqdm

from util.cli import UsageError, docstring_parser, log, run_main, warn

from . import case_processing, intensity, output_folder, verify
from .case_processing import PrepareConfig
from .layouts import LAYOUTS
from .manifest import MANIFEST_NAME, PLAIN_NAME_RULE, is_plain_name, quoted
from .output_folder import ALL_SLICES, FOREGROUND_SLICES
from .readers import InputError
from .slicing import SliceSettings, add_slicing_arguments

FORMAT_VERSION = 1


# ---------------------------------------------------------------- cases, splits and settings


def parse_pairs(text, what, value_type=int):
    """'1:2,3:0' -> {1: 2, 3: 0}."""
    pairs = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition(":")
        if not sep:
            raise InputError(f"{what}: '{item}' is not KEY:VALUE")
        try:
            pairs[int(key)] = value_type(value.strip())
        except ValueError as error:
            raise InputError(f"{what}: '{item}': {error}") from error
    return pairs


def check_case_ids(cases):
    """Case ids become folder names (<dataset>/<folder>/<case>/); they come from source file and folder
    names, which may hold anything, e.g. '..' that would lead out of the dataset folder. Each must also
    be unique."""
    refused = [case for case in cases if not is_plain_name(case.case_id)]
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise InputError(
            f"case id {quoted(refused[0].case_id)} from {next(iter(refused[0].sources.values()))} "
            f"is not a plain name ({PLAIN_NAME_RULE}){more}; rename the source file or folder"
        )
    seen = {}
    for case in cases:
        if case.case_id in seen:
            raise InputError(
                f"case id '{case.case_id}' occurs twice: {seen[case.case_id]} and {next(iter(case.sources.values()))}"
            )
        seen[case.case_id] = next(iter(case.sources.values()))


def assign_splits(cases, test_fraction, seed, test_cases_file):
    """{case id: split}. A --test_cases file decides alone; otherwise the source's split where it
    has one, and a seeded draw of round(test_fraction * n) test cases among the others."""
    if test_cases_file:
        if not os.path.isfile(test_cases_file):
            raise InputError(f"{test_cases_file}: --test_cases file not found")
        with open(test_cases_file) as handle:
            test_ids = {line.strip() for line in handle if line.strip()}
        unknown = test_ids - {case.case_id for case in cases}
        if unknown:
            raise InputError(f"{test_cases_file}: unknown case ids {sorted(unknown)[:10]}")
        return {case.case_id: "test" if case.case_id in test_ids else "train" for case in cases}
    splits = {case.case_id: case.split for case in cases if case.split}
    undecided = sorted(case.case_id for case in cases if not case.split)
    random.Random(seed).shuffle(undecided)
    test_count = round(test_fraction * len(undecided))
    splits.update({case_id: "test" if rank < test_count else "train" for rank, case_id in enumerate(undecided)})
    return splits


def spacing_affine(spacing):
    """The affine --spacing gives (None without it); a 2D picture's spacing gets 1 mm depth."""
    if spacing is None:
        return None
    if len(spacing) not in (2, 3) or min(spacing) <= 0:
        raise InputError(
            f"--spacing {' '.join(map(str, spacing))}: give 2 (picture) or 3 (volume) positive sizes in mm"
        )
    return np.diag(list(spacing) + [1.0] * (4 - len(spacing))).tolist()


def build_config(args, layout, found) -> PrepareConfig:
    modality = args.modality or found.modality
    if not modality:
        raise InputError("the source does not say its modality; pass --modality (e.g. CT, MRI, US, XR)")
    label_map = parse_pairs(getattr(args, "label_map", None), "--label_map")
    overrides = parse_pairs(getattr(args, "class_names", None), "--class_names", str)
    names = {}
    for old_id, name in sorted(found.class_names.items()):
        new_id = label_map.get(old_id, old_id)
        if new_id != 0 or old_id == 0:  # a class mapped to 0 is dropped, not renamed background
            names.setdefault(new_id, name)
    names.update(overrides)
    if layout.task.target_is_label:
        names.setdefault(0, "background")
    slicing = SliceSettings.from_args(
        args,
        args.size,
        modality,
        fit=args.fit,
        spacing=spacing_affine(args.spacing),
        affine_tolerance=args.affine_tolerance,
    )
    return PrepareConfig(
        task=layout.task,
        folders=layout.folders(args),
        slicing=slicing,
        modality="MRI" if modality.upper() == "MR" else modality.upper(),
        min_foreground=args.min_foreground,
        min_body_fraction=args.min_body_fraction,
        min_mask_pixels=getattr(args, "min_mask_pixels", 0),
        label_map=label_map,
        class_names=names,
        class_names_fixed=bool(found.class_names or overrides),
    )


# ---------------------------------------------------------------- running the cases


def run_cases(pending, selections, config, dataset_dir, workers):
    """Prepares the pending cases, each keeping selections[case id]; returns (records by case id, error
    messages)."""
    records, errors = {}, []
    # Closed on the way out, an error included, so that the error's line is not glued to the bar.
    with tqdm(total=len(pending), desc=f"preparing {os.path.basename(dataset_dir)}", unit="case") as progress:
        for case_id, error, record in case_results(pending, selections, config, dataset_dir, workers):
            progress.update()
            errors += [error] if error else []
            records.update({case_id: record} if record else {})
    return records, errors


def case_results(pending, selections, config, dataset_dir, workers):
    """(case id, error message or None, record or None) of each pending case as it finishes."""
    prepare = case_processing.prepare_case_reporting
    if workers <= 1:
        yield from (prepare(case, config, dataset_dir, selections[case.case_id]) for case in pending)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(prepare, case, config, dataset_dir, selections[case.case_id]) for case in pending]
        try:
            yield from (future.result() for future in as_completed(futures))
        except UsageError:  # the output cannot be written: the queued cases would fail the same way
            pool.shutdown(cancel_futures=True)
            raise


def report_cases(new_records, errors, cases):
    """Warns about replaced voxels and skipped cases; the failed cases end the run (status 2)."""
    for case_id, record in sorted(new_records.items()):
        replaced = {folder: count for folder, count in record["non_finite_voxels"].items() if count}
        if replaced:
            files = ", ".join(f"{count} in {record['sources'][folder]}" for folder, count in replaced.items())
            warn(
                f"case '{record['case']}': NaN or infinite voxels ({files}), set to the volume's smallest "
                f"finite value before normalising"
            )
        if record["status"] == "skipped":
            warn(f"case '{case_id}' skipped: {record['reason']}")
    if errors:
        for error in errors:
            warn(error.replace("\n", "\n  "))
        raise UsageError(
            f"{len(errors)} of {len(cases)} cases failed (listed above); fix them and rerun (finished cases are kept)"
        )


# ---------------------------------------------------------------- the manifest


def class_table(config, records):
    """[{id, name}] for label tasks: the source's classes, else every id found, named class_<id>."""
    if not config.task.target_is_label:
        return None
    names = dict(config.class_names)
    if not config.class_names_fixed:
        for record in records.values():
            for class_id in record.get("label_ids", []):
                names.setdefault(class_id, f"class_{class_id}")
    return [{"id": int(i), "name": names[i]} for i in sorted(names)]


def write_manifest(dataset_dir, dataset_name, config, records, splits):
    cases, skipped = {}, {}
    for case_id in sorted(records):
        record = dict(records[case_id], split=splits[case_id])
        if record["status"] == "done":
            cases[case_id] = dict(record, foreground_slices=output_folder.recorded_foreground(record))
        else:
            skipped[case_id] = record
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset_name,
        "task": config.task.name,
        "modality": config.modality,
        "input_folder": config.input_folder,
        "target_folder": config.target_folder,
        "folders": config.folders,
        "classes": class_table(config, records),
        "label_map": config.label_map or None,
        "size": [config.slicing.size, config.slicing.size],
        "fit": config.slicing.fit,
        "slice_axis": config.slicing.axis,
        "slice_axis_name": config.slicing.axis_name,
        "slice_orientation": "canonical RAS volume; picture = flipud(slice.T) (datasets/geometry.py)",
        "splits": {
            split: sorted(c for c in cases if cases[c]["split"] == split)
            for split in sorted({r["split"] for r in cases.values()})
        },
        "cases": cases,
        "skipped": skipped,
    }
    output_folder.write_json(os.path.join(dataset_dir, MANIFEST_NAME), manifest)
    return manifest


def warn_binary_255(records, config):
    """Masks saved as pictures often mark the foreground 255; as class 255 they break the grey label
    encoding (classes up to 25) and name a class that does not exist."""
    found = set()
    for record in records.values():
        found.update(record.get("label_ids", []))
    if config.task.target_is_label and not config.label_map and found == {0, 255}:
        warn(
            "the labels hold only the ids 0 and 255, a binary mask saved as a picture; "
            "rerun with --overwrite --label_map 255:1 to make the foreground class 1"
        )


def summary_line(manifest, dataset_dir):
    kept = manifest["cases"].values()
    without_foreground = sum(not record["foreground_slices"] for record in kept)
    note = f" ({without_foreground} test cases without foreground, kept whole)" if without_foreground else ""
    return (
        f"{manifest['dataset']}: {len(kept)} cases{note}, {sum(len(r['slices']) for r in kept)} slices "
        f"({sum(len(r['foreground_slices']) for r in kept)} with foreground), "
        f"{len(manifest['skipped'])} skipped -> {dataset_dir}"
    )


def prepare_dataset(args):
    """The whole run."""
    output_folder.check_dataset_name(args.dataset)
    layout = LAYOUTS[args.command]
    found = layout.find_cases(args)
    cases = found.cases
    check_case_ids(cases)
    config = build_config(args, layout, found)
    splits = assign_splits(cases, args.test_fraction, args.seed, args.test_cases)
    case_processing.check_all_cases(cases, config)
    dataset_dir = os.path.join(args.out, args.dataset)
    output_folder.start_dataset_folder(dataset_dir, args)

    selections = {case_id: output_folder.slice_selection(split, args.test_slices) for case_id, split in splits.items()}
    records = {case.case_id: output_folder.finished_record(dataset_dir, case.case_id) for case in cases}
    records = {
        case_id: record
        for case_id, record in records.items()
        if record and output_folder.record_fits(record, selections[case_id])
    }
    pending = [case for case in cases if case.case_id not in records]
    if records:
        log(f"{len(records)} cases already prepared, {len(pending)} to go")
    for case in pending:
        output_folder.remove_leftovers(dataset_dir, case.case_id, config.folders)
    new_records, errors = run_cases(pending, selections, config, dataset_dir, args.workers)
    output_folder.clear_partial(dataset_dir)
    records.update(new_records)
    report_cases(new_records, errors, pending)
    manifest = write_manifest(dataset_dir, args.dataset, config, records, splits)
    warn_binary_255(records, config)
    log(summary_line(manifest, dataset_dir))


# ---------------------------------------------------------------- command line


def add_common_arguments(parser, task):
    """The flags of every layout; label tasks add --label_map and --class_names, tasks with a region
    folder --min_mask_pixels."""
    output = parser.add_argument_group("output")
    output.add_argument("--root", required=True, help="folder holding the source data")
    output.add_argument("--out", required=True, help="output root; the dataset goes to <out>/<dataset>")
    output.add_argument("--dataset", required=True, help="dataset name, the output folder name")
    output.add_argument(
        "--modality",
        help="CT, MRI, US, XR, ... (CT: HU window; MRI: percentile "
        "clipping; others: min-max). Defaults to what the layout "
        "or dataset.json says",
    )
    output.add_argument("--workers", type=int, default=1, help="processes working on cases in parallel")
    output.add_argument("--overwrite", action="store_true", help="delete <out>/<dataset> first instead of resuming")
    geometry_group = parser.add_argument_group("geometry")
    add_slicing_arguments(geometry_group, "; with nnU-Net _XXXX files, the channel file (0 if not given)")
    geometry_group.add_argument("--size", type=int, default=512, help="slices become size x size")
    geometry_group.add_argument(
        "--fit",
        choices=["stretch", "pad"],
        default="stretch",
        help="non-square slices: stretch to the square, or zero-pad to a "
        "centred square first (recorded per case either way)",
    )
    geometry_group.add_argument(
        "--affine_tolerance",
        type=float,
        default=1e-3,
        help="largest affine difference (mm) between the volumes of a case",
    )
    geometry_group.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        metavar="MM",
        help="voxel size along the file's axes for formats that store none "
        "(pictures, HDF5): 'COLUMN ROW' for a picture, 'X Y Z' for a volume. "
        "Without it they count as 1 mm, and so do distances like HD95",
    )
    intensity.add_intensity_arguments(parser.add_argument_group("intensities"))
    selection = parser.add_argument_group("slices and splits")
    selection.add_argument(
        "--min_foreground", type=int, default=1, help="label tasks: keep slices with at least this many label pixels"
    )
    selection.add_argument(
        "--min_body_fraction",
        type=float,
        default=0.05,
        help="other tasks: keep slices whose input has at least this fraction of pixels above black",
    )
    if task.region_folder:
        selection.add_argument(
            "--min_mask_pixels",
            type=int,
            default=0,
            help=f"also require this many {task.region_folder} pixels in a kept slice",
        )
    selection.add_argument(
        "--test_slices",
        choices=[ALL_SLICES, FOREGROUND_SLICES],
        default=ALL_SLICES,
        help="test cases keep every slice of the volume (evaluation can then score whole "
        "volumes as well as foreground slices), or only their foreground slices like "
        "train cases",
    )
    selection.add_argument(
        "--test_fraction",
        type=float,
        default=0.2,
        help="share of test cases drawn when the source has no split of its own",
    )
    selection.add_argument("--seed", type=int, default=0, help="seed of that draw")
    selection.add_argument(
        "--test_cases", help="text file of case ids (one a line) that form the test split; all other cases are train"
    )
    if task.target_is_label:
        labels = parser.add_argument_group("labels")
        labels.add_argument("--label_map", help="remap ids, e.g. '2:1,3:0' merges 2 into 1 and drops 3")
        labels.add_argument("--class_names", help="name classes (after --label_map), e.g. '1:liver,2:tumour'")


def build_parser():
    parser = docstring_parser(__doc__, prog="python -m datasets.prepare")
    commands = parser.add_subparsers(dest="command", required=True, metavar="LAYOUT")
    for layout in LAYOUTS.values():
        sub = commands.add_parser(
            layout.name,
            help=layout.help,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
            description=f"{layout.help}; task {layout.task.name}: {layout.task.help}. Output layout, "
            f"processing and examples: python -m datasets.prepare --help",
        )
        layout.add_arguments(sub)
        add_common_arguments(sub, layout.task)
    commands.add_parser(
        "verify", help="check a prepared root: python -m datasets.prepare verify <root>", add_help=False
    )
    return parser


def run_command(argv):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["verify"]:
        return verify.main(argv[1:])
    return prepare_dataset(build_parser().parse_args(argv))


def main(argv=None):
    return run_main(run_command, argv)


if __name__ == "__main__":
    sys.exit(main())
