"""Prepares medical volumes as 2D PNG slices for MVG, in the authors' folder layout.

Each run prepares one dataset from one source layout into <out>/<dataset>/:

    <out>/<dataset>/<folder>/<case>/<slice>.png   one folder per role (see below); <slice> is the
                                                  zero-padded slice index in the canonical volume
    <out>/<dataset>/manifest.json                 everything needed to use the slices and to put
                                                  predictions back (format: datasets/manifest.py)
    <out>/<dataset>/meta/<case>.json              one record per finished case, written last
    <out>/<dataset>/prepare_settings.json         the settings; a rerun with other settings refuses

Layouts (the subcommand) and the folders they write:

    msd               nnU-Net / Decathlon: imagesTr, labelsTr [, imagesVa/Val/Ts + labels]  image, label
    glob              any files: an images glob and a labels glob, matched by case id         image, label
    acdc              ACDC: patientXXX/patientXXX_frameYY.nii.gz + _gt                        image, label
    brats-synthesis   BraTS 2023: <case>/<case>-{t1c,t1n,t2f,t2w}.nii.gz                      <source>, <target>
    brats-inpainting  BraTS 2023 local synthesis: -t1n-voided, -mask, -t1n                    image, target, mask
    denoising         low-dose and normal-dose globs matched by case id                       image, target

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
        --normal_dose "*/full_3mm" --out data --dataset LDCT     # DICOM folders (pip install pydicom)
    python -m datasets.prepare verify data

Processing of a case: read every volume, check that all grids match (shape and affine), reorient to
RAS, normalise intensities per volume (datasets/intensity.py), find the slices that hold foreground
(segmentation: at least --min_foreground label pixels) or enough body (other tasks: at least
--min_body_fraction of the input slice above black), bring the kept slices to --size x --size
(datasets/geometry.py) and write 8-bit grey PNGs; labels keep their ids (16-bit PNG when an id
exceeds 255). Every input is checked (pairing, headers, grids, 4D) before any case is processed, and
all problems are reported together.

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

Resuming and interruptions: a case is written to <dataset>/.partial/<case>/ and moved into place when
complete; its meta/<case>.json is written after that and marks it finished. A rerun skips finished
cases whose kept slices are still the ones wanted (a rerun may change the splits or --test_slices, and
with them whether a case keeps all its slices; such a case is prepared again) and removes anything an
interrupted run left of the others. Every PNG and JSON file is written to a temporary file, synced to
disk and renamed, so a crash or power loss never leaves a finished case with empty slices.

Safety: --dataset and every case id must be plain names (letters, digits, '-', '_', '.', not starting
with '.'), one folder level below --out. A run writes into <out>/<dataset> (and --overwrite deletes
it) only when that folder is empty or holds a preparation of this very dataset: a manifest.json or
prepare_settings.json that names it; anything else is refused.
"""
import argparse
import json
import os
import random
import shutil
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
from PIL import Image
from tqdm import tqdm

from util.cli import UsageError, run_main
from util.files import atomic_output, describe_os_error, fsync_folder

from . import geometry, intensity, layouts, verify
from .manifest import MANIFEST_NAME, PLAIN_NAME_RULE, is_plain_name, quoted
from .readers import (FORMATS_WITHOUT_SPACING, InputError, check_lossless, read_header, read_volume,
                      volume_format)

FORMAT_VERSION = 1
PARTIAL_FOLDER = ".partial"
META_FOLDER = "meta"
SETTINGS_NAME = "prepare_settings.json"
# Settings that do not change what is written, so a rerun may change them.
# Splits are drawn afresh each run and enter the manifest; with --test_slices they decide which slices a
# case keeps, and a rerun prepares again each finished case whose kept slices no longer fit (record_fits).
RUN_ONLY_SETTINGS = {"workers", "overwrite", "out", "command", "test_fraction", "seed", "test_cases",
                     "test_slices"}
ALL_SLICES, FOREGROUND_SLICES = "all", "foreground"


# ---------------------------------------------------------------- the task of each layout

def task_spec(args):
    """(task, {folder: kind}, input folder, target folder). kind: image (8-bit grey intensities),
    label (integer ids) or mask (0 outside, 255 inside the region to fill)."""
    if args.command in ("msd", "glob", "acdc"):
        return "segmentation", {"image": "image", "label": "label"}, "image", "label"
    if args.command == "brats-synthesis":
        if args.source == args.target:
            raise InputError("--source and --target must be different contrasts")
        return "synthesis", {args.source: "image", args.target: "image"}, args.source, args.target
    if args.command == "brats-inpainting":
        return "inpainting", {"image": "image", "target": "image", "mask": "mask"}, "image", "target"
    if args.command == "denoising":
        return "denoising", {"image": "image", "target": "image"}, "image", "target"
    raise ValueError(args.command)


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


def parse_source_splits(text):
    """'Tr:train,Ts:test' -> {'Tr': 'train', 'Ts': 'test'}."""
    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition(":")
        if not sep or value not in ("train", "test", "val", "skip"):
            raise InputError(f"--source_splits: '{item}' is not SUFFIX:{{train,test,val,skip}}")
        pairs[key] = value
    return pairs


def find_cases(args):
    """Cases, source class names ({} when the source has none) and the modality hint of the source."""
    if args.command == "msd":
        description = layouts.read_dataset_json(args.root)
        cases = layouts.find_msd_cases(args.root, args.channel or 0, parse_source_splits(args.source_splits))
        return (cases, layouts.class_names_from_dataset_json(description),
                layouts.modality_from_dataset_json(description, args.channel or 0))
    if args.command == "glob":
        keys = {"image": args.hdf5_image_key, "label": args.hdf5_label_key}
        cases = layouts.pair_globs(args.root, [args.images, args.labels], ["image", "label"], None, keys,
                                   args.skip_unpaired)
        if args.test_images or args.test_labels:
            if not (args.test_images and args.test_labels):
                raise InputError("--test_images and --test_labels go together")
            for case in cases:
                case.split = "train"
            cases += layouts.pair_globs(args.root, [args.test_images, args.test_labels],
                                        ["image", "label"], "test", keys, args.skip_unpaired)
        return cases, {}, None
    if args.command == "acdc":
        return layouts.find_acdc_cases(args.root), dict(layouts.ACDC_CLASS_NAMES), "MRI"
    if args.command == "brats-synthesis":
        return layouts.find_brats_cases(args.root, {args.source: args.source,
                                                    args.target: args.target}), {}, "MRI"
    if args.command == "brats-inpainting":
        cases = layouts.find_brats_cases(
            args.root, {"image": args.voided_suffix, "target": args.healthy_suffix,
                        "mask": args.mask_suffixes[0]}, {"mask": args.mask_suffixes[1:]})
        return cases, {}, "MRI"
    if args.command == "denoising":
        return layouts.pair_globs(args.root, [args.low_dose, args.normal_dose],
                                  ["image", "target"], skip_unpaired=args.skip_unpaired), {}, "CT"
    raise ValueError(args.command)


def check_plain_case_ids(cases):
    """Case ids become folder names (<dataset>/<folder>/<case>/); they come from source file and folder
    names, which may hold anything, e.g. '..' that would lead out of the dataset folder."""
    refused = [case for case in cases if not is_plain_name(case.case_id)]
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise InputError(f"case id {quoted(refused[0].case_id)} from {next(iter(refused[0].sources.values()))} "
                         f"is not a plain name ({PLAIN_NAME_RULE}){more}; rename the source file or folder")


def check_unique_ids(cases):
    seen = {}
    for case in cases:
        if case.case_id in seen:
            raise InputError(f"case id '{case.case_id}' occurs twice: {seen[case.case_id]} and "
                             f"{next(iter(case.sources.values()))}")
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
    test_count = int(round(test_fraction * len(undecided)))
    splits.update({case_id: "test" if rank < test_count else "train"
                   for rank, case_id in enumerate(undecided)})
    return splits


# ---------------------------------------------------------------- checks before processing

def effective_shape(shape, kind, channel, where):
    """The 3D shape a volume has once trailing singleton axes are dropped, 2D becomes one slice and
    a 4D image gives the --channel volume. Refuses what cannot become 3D."""
    shape = list(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    if len(shape) == 2:
        shape.append(1)
    if len(shape) == 4:
        if kind != "image":
            raise InputError(f"{where}: {kind} volume is 4D {tuple(shape)}; expected 3D")
        if channel is None:
            raise InputError(f"{where}: image is 4D {tuple(shape)}; choose the channel/time index "
                             f"with --channel (0..{shape[3] - 1})")
        if not 0 <= channel < shape[3]:
            raise InputError(f"{where}: --channel {channel} is outside 0..{shape[3] - 1} "
                             f"of the 4D shape {tuple(shape)}")
        shape.pop()
    if len(shape) != 3:
        raise InputError(f"{where}: shape {tuple(shape)} is not a 2D or 3D volume")
    return tuple(shape)


def spacing_affine(spacing):
    """The affine --spacing gives (None without it); a 2D picture's spacing gets 1 mm depth."""
    if spacing is None:
        return None
    if len(spacing) not in (2, 3) or min(spacing) <= 0:
        raise InputError(f"--spacing {' '.join(map(str, spacing))}: give 2 (picture) or 3 (volume) "
                         f"positive sizes in mm")
    return np.diag(list(spacing) + [1.0] * (4 - len(spacing))).tolist()


def placed_affine(source, affine, config):
    """The file's own affine, or the --spacing one for formats that store no geometry."""
    if config["spacing"] is not None and volume_format(source.path) in FORMATS_WITHOUT_SPACING:
        return np.asarray(config["spacing"])
    return affine


def check_case(case, config):
    """Header-level checks of one case: readable, lossless labels, 3D after --channel, all grids
    equal."""
    reference = None
    for role, source in case.sources.items():
        where = f"case '{case.case_id}', {source}"
        kind = config["folders"][role]
        if kind != "image":
            check_lossless(source.path, where, kind)
        shape, affine = read_header(source)
        affine = placed_affine(source, affine, config)
        shape = effective_shape(shape, kind, config["channel"], where)
        if reference is None:
            reference = (role, shape, affine)
            continue
        if not geometry.grids_match(reference[1], reference[2], shape, affine, config["affine_tolerance"]):
            raise InputError(
                f"case '{case.case_id}': the grids of {reference[0]} and {role} differ "
                f"(shapes {reference[1]} vs {shape}; largest affine difference "
                f"{np.abs(np.asarray(reference[2]) - np.asarray(affine)).max():.4g} mm, tolerance "
                f"{config['affine_tolerance']} (--affine_tolerance))")


def check_all_cases(cases, config):
    problems = []
    for case in tqdm(cases, desc="checking inputs", unit="case", leave=False):
        try:
            check_case(case, config)
        except InputError as error:
            problems.append(str(error))
    if problems:
        raise layouts.problem_list_error(f"{len(problems)} of {len(cases)} cases have problems:", problems)


# ---------------------------------------------------------------- one case

def load_role(case, role, config):
    """The role's volume as a 3D array in its original voxel order, and its affine."""
    source = case.sources[role]
    data, affine = read_volume(source)
    affine = placed_affine(source, affine, config)
    where = f"case '{case.case_id}', {source}"
    shape = effective_shape(data.shape, config["folders"][role], config["channel"], where)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        data = data[..., config["channel"]]
    return data.reshape(shape), affine


def label_ids(data, where):
    """Integer ids from a label volume; float files must hold whole numbers."""
    if not np.issubdtype(data.dtype, np.integer):
        if not np.isfinite(data).all():
            raise InputError(f"{where}: label volume holds NaN or infinite values")
        rounded = np.rint(data)
        if np.abs(data - rounded).max() > 1e-3:
            raise InputError(f"{where}: label volume holds non-integer values, e.g. "
                             f"{data[np.abs(data - rounded) > 1e-3].ravel()[0]}")
        data = rounded
    data = data.astype(np.int32)
    if data.size and data.min() < 0:
        raise InputError(f"{where}: label volume holds negative ids ({data.min()})")
    return data


def remap_labels(labels, label_map):
    if not label_map:
        return labels
    remapped = labels.copy()
    for old, new in label_map.items():
        remapped[labels == old] = new
    return remapped


def foreground_slices(volumes, config, intensity_parameters):
    """Indices of the slices that hold foreground (see the module docstring for the rules)."""
    axis = config["axis"]
    other_axes = tuple(a for a in range(3) if a != axis)
    if config["task"] == "segmentation":
        foreground = (volumes["label"] > 0).sum(axis=other_axes)
        return [int(k) for k in np.flatnonzero(foreground >= config["min_foreground"])]
    input_folder = config["input_folder"]
    body = intensity.normalise(volumes[input_folder], intensity_parameters[input_folder]) > 0
    keep = body.mean(axis=other_axes) >= config["min_body_fraction"]
    if config["task"] == "inpainting" and config["min_mask_pixels"] > 0:
        keep &= (volumes["mask"] > 0).sum(axis=other_axes) >= config["min_mask_pixels"]
    return [int(k) for k in np.flatnonzero(keep)]


def fit_intensities(volumes, config):
    """Per-role normalisation. Inpainting and denoising targets reuse the input's parameters, so the
    pair stays on one intensity scale (and the input's are the ones known at inference)."""
    parameters = {}
    for folder, kind in config["folders"].items():
        if kind != "image":
            continue
        if config["task"] in ("inpainting", "denoising") and folder != config["input_folder"]:
            continue
        parameters[folder] = intensity.fit_parameters(
            volumes[folder], config["method"], config["window"], config["percentiles"],
            config["percentile_region"])
    for folder, kind in config["folders"].items():
        if kind == "image" and folder not in parameters:
            parameters[folder] = parameters[config["input_folder"]]
    return parameters


def picture_for(volume, kind, index, config, plan, parameters, label_dtype):
    """The PNG array of one slice of one role."""
    picture = geometry.slice_for_display(volume, config["axis"], index)
    if kind == "image":
        picture = intensity.normalise(picture, parameters)
        return intensity.to_uint8(geometry.resize_intensity(picture, plan))
    picture = geometry.resize_nearest(picture, plan)
    if kind == "mask":
        return np.where(picture > 0, 255, 0).astype(np.uint8)
    return picture.astype(label_dtype)


def write_png(path, picture):
    """Through a temporary file, fsync and rename (util.files), like every file prepare writes: a case's
    record may mark it finished only once its slices are on disk, not in a cache a power loss empties."""
    with atomic_output(path) as handle:
        Image.fromarray(picture).save(handle, format="PNG")


def write_json(path, content):
    with atomic_output(path, "w") as handle:
        json.dump(content, handle, indent=1)


def output_error(error, path):
    """An OSError of writing the output (read-only folder, full disk) as one line naming the path."""
    return UsageError(f"{error.filename or path}: cannot write ({describe_os_error(error)})")


def slice_digits(depth):
    return max(4, len(str(depth - 1)))


def geometry_record(shape, affine):
    return {"shape": [int(n) for n in shape], "affine": np.asarray(affine).tolist(),
            "spacing": geometry.voxel_sizes(affine), "axcodes": geometry.axis_codes(affine)}


def load_case(case, config):
    """Canonical volumes by folder, the canonical affine, the input's original geometry and the
    number of non-finite voxels replaced per image folder."""
    volumes, non_finite = {}, {}
    for folder, kind in config["folders"].items():
        data, affine = load_role(case, folder, config)
        if kind == "image":
            data, non_finite[folder] = intensity.replace_non_finite(data)
        else:
            data = label_ids(data, f"case '{case.case_id}', {case.sources[folder]}")
        if kind == "label":
            data = remap_labels(data, config["label_map"])
        volumes[folder], canonical_affine = geometry.to_canonical(data, affine)
        if folder == config["input_folder"]:
            original, input_canonical_affine = geometry_record(data.shape, affine), canonical_affine
    return volumes, input_canonical_affine, original, non_finite


def label_summary(case, labels, config):
    """The ids a case's label holds and the PNG bit depth they need; refuses unknown ids."""
    present = sorted(int(i) for i in np.unique(labels))
    unknown = set(present) - set(config["class_names"]) if config["class_names_fixed"] else set()
    if unknown:
        raise InputError(f"case '{case.case_id}', {case.sources['label']}: label ids "
                         f"{sorted(unknown)} are not among the classes {config['class_names']}")
    if present and present[-1] > 65535:
        raise InputError(f"case '{case.case_id}': label id {present[-1]} does not fit a 16-bit PNG")
    return {"label_ids": present, "label_bits": 16 if present and present[-1] > 255 else 8}


def write_slices(case, volumes, slices, names, plan, parameters, label_dtype, config, dataset_dir):
    """Writes all folders of a case under .partial/, then moves each into place."""
    partial = os.path.join(dataset_dir, PARTIAL_FOLDER, case.case_id)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for folder, kind in config["folders"].items():
            os.makedirs(os.path.join(partial, folder))
            for index, name in zip(slices, names):
                picture = picture_for(volumes[folder], kind, index, config, plan, parameters.get(folder),
                                      label_dtype)
                write_png(os.path.join(partial, folder, name), picture)
        for folder in config["folders"]:
            move_into_place(os.path.join(partial, folder), os.path.join(dataset_dir, folder, case.case_id))
    except OSError as error:
        raise output_error(error, partial) from error
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def move_into_place(finished, final):
    """Replaces a case's folder by its finished one; the parent's fsync makes the rename durable before
    the case's record is written."""
    os.makedirs(os.path.dirname(final), exist_ok=True)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(finished, final)
    fsync_folder(os.path.dirname(final))


def slice_selection(split, test_slices):
    """Which slices a case keeps: test cases follow --test_slices, all others keep foreground only."""
    return test_slices if split == "test" else FOREGROUND_SLICES


def prepare_case(case, config, dataset_dir, selection):
    """Reads, checks, slices and writes one case, keeping ALL_SLICES or FOREGROUND_SLICES; returns its
    record, written to meta/ last."""
    volumes, canonical_affine, original, non_finite = load_case(case, config)
    record = {"case": case.case_id, "sources": {f: str(s) for f, s in case.sources.items()},
              "source_notes": case.notes, "original": original, "non_finite_voxels": non_finite}
    if "label" in volumes:
        record.update(label_summary(case, volumes["label"], config))
    parameters = fit_intensities(volumes, config)
    foreground = foreground_slices(volumes, config, parameters)
    axis, input_volume = config["axis"], volumes[config["input_folder"]]
    slices = list(range(input_volume.shape[axis])) if selection == ALL_SLICES else foreground
    meta_path = record_path(dataset_dir, case.case_id)
    if not slices:
        reason = ("no foreground label in any slice" if config["task"] == "segmentation"
                  else "no slice with enough body (--min_body_fraction)")
        record.update(status="skipped", reason=reason)
        write_json(meta_path, record)
        return record

    rows, cols = geometry.slice_for_display(input_volume, axis, 0).shape
    plan = geometry.fit_plan(rows, cols, config["size"], config["fit"])
    digits = slice_digits(input_volume.shape[axis])
    label_dtype = np.uint16 if record.get("label_bits") == 16 else np.uint8
    names = [f"{index:0{digits}d}.png" for index in slices]
    write_slices(case, volumes, slices, names, plan, parameters, label_dtype, config, dataset_dir)
    record.update(
        status="done", canonical=geometry_record(input_volume.shape, canonical_affine),
        slice_axis=axis, slice_axis_name=config["axis_name"], num_slices=int(input_volume.shape[axis]),
        slice_digits=digits, slices=slices, foreground_slices=foreground, resize=plan, intensity=parameters,
        channel=config["channel"])
    write_json(meta_path, record)
    return record


def prepare_case_reporting(case, config, dataset_dir, selection):
    """Process-pool entry: (case id, error message or None, record or None)."""
    try:
        return case.case_id, None, prepare_case(case, config, dataset_dir, selection)
    except InputError as error:  # this case's input: reported with the others, the other cases go on
        return case.case_id, str(error), None
    except UsageError:  # the output cannot be written (read-only, disk full): no other case can be
        raise
    except Exception as error:  # a bug or an unexpected file: keep the other cases going, name this one
        return case.case_id, f"case '{case.case_id}': {type(error).__name__}: {error}", None


# ---------------------------------------------------------------- the whole dataset

def build_config(args, class_names, source_modality):
    task, folders, input_folder, target_folder = task_spec(args)
    modality = args.modality or source_modality
    if not modality:
        raise InputError("the source does not say its modality; pass --modality (e.g. CT, MRI, US, XR)")
    method = args.normalization if args.normalization != "auto" else intensity.default_method(modality)
    label_map = parse_pairs(getattr(args, "label_map", None), "--label_map")
    overrides = parse_pairs(getattr(args, "class_names", None), "--class_names", str)
    names = {}
    for old_id, name in sorted(class_names.items()):
        new_id = label_map.get(old_id, old_id)
        if new_id != 0 or old_id == 0:  # a class mapped to 0 is dropped, not renamed background
            names.setdefault(new_id, name)
    names.update(overrides)
    if task == "segmentation":
        names.setdefault(0, "background")
    modality = "MRI" if modality.upper() == "MR" else modality.upper()
    return {
        "task": task, "modality": modality,
        "folders": folders, "input_folder": input_folder, "target_folder": target_folder,
        "method": method, "window": list(args.window), "percentiles": list(args.percentiles),
        "percentile_region": args.percentile_region, "size": args.size, "fit": args.fit,
        "axis": geometry.AXES[args.axis], "axis_name": args.axis, "channel": args.channel,
        "affine_tolerance": args.affine_tolerance, "spacing": spacing_affine(args.spacing),
        "min_foreground": args.min_foreground,
        "min_body_fraction": args.min_body_fraction,
        "min_mask_pixels": getattr(args, "min_mask_pixels", 0), "label_map": label_map,
        "class_names": names, "class_names_fixed": bool(class_names or overrides),
    }


def recorded_settings(args):
    return {key: value for key, value in sorted(vars(args).items()) if key not in RUN_ONLY_SETTINGS}


def check_dataset_name(name):
    """The dataset goes to <out>/<name>: one plain folder, not '..', '' (--out itself) or a path."""
    if not is_plain_name(name):
        raise UsageError(f"--dataset {quoted(name)}: not a plain folder name ({PLAIN_NAME_RULE}); the "
                         f"dataset goes to <out>/<dataset>, one folder below --out")


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
    return any(recorded_dataset(os.path.join(dataset_dir, marker)) == name
               for marker in (MANIFEST_NAME, SETTINGS_NAME))


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
            raise UsageError(f"{dataset_dir}: holds files that are not a preparation of dataset '{args.dataset}' "
                             f"(no {MANIFEST_NAME} or {SETTINGS_NAME} naming it); refusing to {action} it, "
                             f"choose another --dataset or --out")
        if args.overwrite:
            shutil.rmtree(dataset_dir)
    except OSError as error:
        verb = "delete" if args.overwrite else "read"
        raise UsageError(f"{error.filename or dataset_dir}: cannot {verb} ({describe_os_error(error)})") from error


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
            raise InputError(f"{dataset_dir} was prepared with other settings ({', '.join(changed)}); "
                             f"use --overwrite to start again or choose another --dataset/--out")
    write_json(settings_path, settings)
    try:
        os.makedirs(os.path.join(dataset_dir, META_FOLDER), exist_ok=True)
    except OSError as error:
        raise output_error(error, dataset_dir) from error
    shutil.rmtree(os.path.join(dataset_dir, PARTIAL_FOLDER), ignore_errors=True)


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
    if workers <= 1:
        yield from (prepare_case_reporting(case, config, dataset_dir, selections[case.case_id])
                    for case in pending)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(prepare_case_reporting, case, config, dataset_dir, selections[case.case_id])
                   for case in pending]
        try:
            yield from (future.result() for future in as_completed(futures))
        except UsageError:  # the output cannot be written: the queued cases would fail the same way
            pool.shutdown(cancel_futures=True)
            raise


def class_table(config, records):
    """[{id, name}] for segmentation: the source's classes, else every id found, named class_<id>."""
    if config["task"] != "segmentation":
        return None
    names = dict(config["class_names"])
    if not config["class_names_fixed"]:
        for record in records.values():
            for class_id in record.get("label_ids", []):
                names.setdefault(class_id, f"class_{class_id}")
    return [{"id": int(i), "name": names[i]} for i in sorted(names)]


def write_manifest(dataset_dir, dataset_name, config, records, splits):
    cases, skipped = {}, {}
    for case_id in sorted(records):
        record = dict(records[case_id], split=splits[case_id])
        if record["status"] == "done":
            cases[case_id] = dict(record, foreground_slices=recorded_foreground(record))
        else:
            skipped[case_id] = record
    manifest = {
        "format_version": FORMAT_VERSION, "dataset": dataset_name, "task": config["task"],
        "modality": config["modality"], "input_folder": config["input_folder"],
        "target_folder": config["target_folder"], "folders": config["folders"],
        "classes": class_table(config, records), "label_map": config["label_map"] or None,
        "size": [config["size"], config["size"]], "fit": config["fit"],
        "slice_axis": config["axis"], "slice_axis_name": config["axis_name"],
        "slice_orientation": "canonical RAS volume; picture = flipud(slice.T) (datasets/geometry.py)",
        "splits": {split: sorted(c for c in cases if cases[c]["split"] == split)
                   for split in sorted({r["split"] for r in cases.values()})},
        "cases": cases, "skipped": skipped,
    }
    write_json(os.path.join(dataset_dir, MANIFEST_NAME), manifest)
    return manifest


def warn_binary_255(records, config):
    """Masks saved as pictures often mark the foreground 255; as class 255 they break the grey label
    encoding (classes up to 25) and name a class that does not exist."""
    found = set()
    for record in records.values():
        found.update(record.get("label_ids", []))
    if config["task"] == "segmentation" and not config["label_map"] and found == {0, 255}:
        warnings.warn("the labels hold only the ids 0 and 255, a binary mask saved as a picture; "
                      "rerun with --overwrite --label_map 255:1 to make the foreground class 1", stacklevel=1)


def warn_non_finite(record):
    """Names the files of a case that held NaN or infinite voxels, which prepare replaced."""
    replaced = {folder: count for folder, count in record["non_finite_voxels"].items() if count}
    if replaced:
        files = ", ".join(f"{count} in {record['sources'][folder]}" for folder, count in replaced.items())
        print(f"warning: case '{record['case']}': NaN or infinite voxels ({files}), set to the volume's "
              f"smallest finite value before normalising", file=sys.stderr)


def summary_line(manifest, dataset_dir):
    kept = manifest["cases"].values()
    without_foreground = sum(not record["foreground_slices"] for record in kept)
    note = f" ({without_foreground} test cases without foreground, kept whole)" if without_foreground else ""
    return (f"{manifest['dataset']}: {len(kept)} cases{note}, {sum(len(r['slices']) for r in kept)} slices "
            f"({sum(len(r['foreground_slices']) for r in kept)} with foreground), "
            f"{len(manifest['skipped'])} skipped -> {dataset_dir}")


def prepare_dataset(args):
    """The whole run; returns the process exit status."""
    check_dataset_name(args.dataset)
    cases, class_names, source_modality = find_cases(args)
    check_plain_case_ids(cases)
    check_unique_ids(cases)
    config = build_config(args, class_names, source_modality)
    splits = assign_splits(cases, args.test_fraction, args.seed, args.test_cases)
    check_all_cases(cases, config)
    dataset_dir = os.path.join(args.out, args.dataset)
    start_dataset_folder(dataset_dir, args)

    selections = {case_id: slice_selection(split, args.test_slices) for case_id, split in splits.items()}
    records = {case.case_id: finished_record(dataset_dir, case.case_id) for case in cases}
    records = {case_id: record for case_id, record in records.items()
               if record and record_fits(record, selections[case_id])}
    pending = [case for case in cases if case.case_id not in records]
    if records:
        print(f"{len(records)} cases already prepared, {len(pending)} to go")
    for case in pending:
        remove_leftovers(dataset_dir, case.case_id, config["folders"])
    new_records, errors = run_cases(pending, selections, config, dataset_dir, args.workers)
    shutil.rmtree(os.path.join(dataset_dir, PARTIAL_FOLDER), ignore_errors=True)
    records.update(new_records)
    for case_id, record in sorted(new_records.items()):
        warn_non_finite(record)
        if record["status"] == "skipped":
            warnings.warn(f"case '{case_id}' skipped: {record['reason']}", stacklevel=1)
    if errors:
        print(f"{len(errors)} cases failed; fix them and rerun (finished cases are kept):", file=sys.stderr)
        for error in errors:
            print("  " + error.replace("\n", "\n  "), file=sys.stderr)
        return 1
    manifest = write_manifest(dataset_dir, args.dataset, config, records, splits)
    warn_binary_255(records, config)
    print(summary_line(manifest, dataset_dir))
    return 0


# ---------------------------------------------------------------- command line

def add_common_arguments(parser):
    output = parser.add_argument_group("output")
    output.add_argument("--root", required=True, help="folder holding the source data")
    output.add_argument("--out", required=True, help="output root; the dataset goes to <out>/<dataset>")
    output.add_argument("--dataset", required=True, help="dataset name, the output folder name")
    output.add_argument("--modality", help="CT, MRI, US, XR, ... (CT: HU window; MRI: percentile "
                                           "clipping; others: min-max). Defaults to what the layout "
                                           "or dataset.json says")
    output.add_argument("--workers", type=int, default=1, help="processes working on cases in parallel")
    output.add_argument("--overwrite", action="store_true",
                        help="delete <out>/<dataset> first instead of resuming")
    geometry_group = parser.add_argument_group("geometry")
    geometry_group.add_argument("--axis", choices=sorted(geometry.AXES), default="axial",
                                help="slicing axis of the RAS-reoriented volume")
    geometry_group.add_argument("--size", type=int, default=512, help="slices become size x size")
    geometry_group.add_argument("--fit", choices=["stretch", "pad"], default="stretch",
                                help="non-square slices: stretch to the square, or zero-pad to a "
                                     "centred square first (recorded per case either way)")
    geometry_group.add_argument("--channel", type=int,
                                help="index into the 4th axis of 4D images (4D is refused without "
                                     "it); with nnU-Net _XXXX files, the channel file (0 if not given)")
    geometry_group.add_argument("--affine_tolerance", type=float, default=1e-3,
                                help="largest affine difference (mm) between the volumes of a case")
    geometry_group.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                                help="voxel size along the file's axes for formats that store none "
                                     "(pictures, HDF5): 'COLUMN ROW' for a picture, 'X Y Z' for a volume. "
                                     "Without it they count as 1 mm, and so do distances like HD95")
    values = parser.add_argument_group("intensities")
    intensity.add_intensity_arguments(values)
    selection = parser.add_argument_group("slices and splits")
    selection.add_argument("--min_foreground", type=int, default=1,
                           help="segmentation: keep slices with at least this many label pixels")
    selection.add_argument("--min_body_fraction", type=float, default=0.05,
                           help="other tasks: keep slices whose input has at least this fraction of "
                                "pixels above black")
    selection.add_argument("--test_slices", choices=[ALL_SLICES, FOREGROUND_SLICES], default=ALL_SLICES,
                           help="test cases keep every slice of the volume (evaluation can then score whole "
                                "volumes as well as foreground slices), or only their foreground slices like "
                                "train cases")
    selection.add_argument("--test_fraction", type=float, default=0.2,
                           help="share of test cases drawn when the source has no split of its own")
    selection.add_argument("--seed", type=int, default=0, help="seed of that draw")
    selection.add_argument("--test_cases", help="text file of case ids (one a line) that form the test "
                                                "split; all other cases are train")


def add_label_arguments(parser):
    labels = parser.add_argument_group("labels")
    labels.add_argument("--label_map", help="remap ids, e.g. '2:1,3:0' merges 2 into 1 and drops 3")
    labels.add_argument("--class_names", help="name classes (after --label_map), e.g. '1:liver,2:tumour'")


LAYOUT_HELP = {
    "msd": "nnU-Net / Medical Segmentation Decathlon folders (AMOS, WORD, MSD)",
    "glob": "an images glob and a labels glob matched by case id (BTCV, MicroSegNet, PROMISE12, LA, ...)",
    "acdc": "ACDC patient folders (frames with _gt labels)",
    "brats-synthesis": "BraTS 2023 contrasts, source -> target",
    "brats-inpainting": "BraTS 2023 local synthesis (inpainting)",
    "denoising": "low-dose / normal-dose volumes (e.g. CT)",
}


def add_layout(commands, name):
    return commands.add_parser(
        name, help=LAYOUT_HELP[name], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=f"{LAYOUT_HELP[name]}. Output layout, processing and examples: "
                    f"python -m datasets.prepare --help")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m datasets.prepare", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="LAYOUT")

    msd = add_layout(commands, "msd")
    msd.add_argument("--source_splits", default="Tr:train,Va:test,Val:test,Ts:test",
                     help="images<SUFFIX>/labels<SUFFIX> folders and their split (train, test, val, skip);"
                          " with one split present, the test split is drawn (--test_fraction)")
    glob_mode = add_layout(commands, "glob")
    glob_mode.add_argument("--images", required=True,
                           help="glob relative to --root; the case id is what the wildcards match, "
                                "e.g. 'img/img*.nii.gz' gives img0001.nii.gz the id 0001")
    glob_mode.add_argument("--labels", required=True, help="glob of the labels, same case ids")
    glob_mode.add_argument("--test_images", help="glob of test images (the others become train)")
    glob_mode.add_argument("--test_labels", help="glob of test labels")
    glob_mode.add_argument("--hdf5_image_key", default="image", help="HDF5 dataset holding the image")
    glob_mode.add_argument("--hdf5_label_key", default="label", help="HDF5 dataset holding the label")
    denoising = add_layout(commands, "denoising")
    denoising.add_argument("--low_dose", required=True, help="glob of low-dose volumes or DICOM folders")
    denoising.add_argument("--normal_dose", required=True, help="glob of normal-dose ones, same case ids")
    for globbing in (glob_mode, denoising):
        globbing.add_argument("--skip_unpaired", action="store_true",
                              help="leave out case ids that lack a partner file (e.g. images without "
                                   "a mask) instead of refusing; the count is printed")
    add_layout(commands, "acdc")
    synthesis = add_layout(commands, "brats-synthesis")
    synthesis.add_argument("--source", default="t1c", help="input contrast suffix (t1c, t1n, t2f, t2w)")
    synthesis.add_argument("--target", default="t2w", help="target contrast suffix")
    inpainting = add_layout(commands, "brats-inpainting")
    inpainting.add_argument("--voided_suffix", default="t1n-voided", help="image with the region removed")
    inpainting.add_argument("--healthy_suffix", default="t1n", help="complete image (the target)")
    inpainting.add_argument("--mask_suffixes", nargs="+", default=["mask", "mask-healthy"],
                            help="region to fill; the first one present is used")
    inpainting.add_argument("--min_mask_pixels", type=int, default=0,
                            help="also require this many mask pixels in a kept slice")

    for name, sub in commands.choices.items():
        add_common_arguments(sub)
        if name in ("msd", "glob", "acdc"):
            add_label_arguments(sub)
    commands.add_parser("verify", help="check a prepared root: python -m datasets.prepare verify <root>",
                        add_help=False)
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
