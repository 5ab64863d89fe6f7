"""One case of datasets.prepare: its header checks, its slices (datasets/slicing.py) and its record.

A case is read, reoriented and normalised by datasets.slicing, as predict.py reads a volume. What is
prepare's own: which slices a case keeps (foreground: a label above background on at least
--min_foreground pixels; body: at least --min_body_fraction of the input above black, and for tasks with
a region folder at least --min_mask_pixels of it), the label checks against the classes, and the record
that ends up in meta/<case>.json and the manifest (format: datasets/manifest.py).
"""

import os
import shutil
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from tasks import Task
from util.cli import UsageError

from . import geometry, output_folder, slicing
from .output_folder import ALL_SLICES, PARTIAL_FOLDER, output_error, record_path, write_json
from .readers import InputError, check_lossless
from .sources import problem_list_error


@dataclass(frozen=True)
class PrepareConfig:
    """What every case of a run is prepared with (datasets.prepare builds it from the command line)."""

    task: Task
    folders: dict[str, str]  # {folder: kind}, input first, target second
    modality: str
    slicing: slicing.SliceSettings
    min_foreground: int = 1
    min_body_fraction: float = 0.05
    min_mask_pixels: int = 0
    label_map: dict[int, int] = field(default_factory=dict)
    class_names: dict[int, str] = field(default_factory=dict)
    class_names_fixed: bool = False  # the source or --class_names named the classes: other ids are refused

    @property
    def input_folder(self) -> str:
        return next(iter(self.folders))

    @property
    def target_folder(self) -> str:
        return list(self.folders)[1]

    @property
    def label_folder(self) -> str | None:
        return next((folder for folder, kind in self.folders.items() if kind == slicing.LABEL), None)


# ---------------------------------------------------------------- checks before processing


def check_case(case, config: PrepareConfig):
    """Header-level checks of one case: readable, lossless labels, 3D after --channel, all grids equal."""
    reference = None
    tolerance = config.slicing.affine_tolerance
    for role, source in case.sources.items():
        where = f"case '{case.case_id}', {source}"
        kind = config.folders[role]
        if kind != slicing.IMAGE:
            check_lossless(source.path, where, kind)
        shape, affine = slicing.header_3d(source, kind, config.slicing, where)
        if reference is None:
            reference = (role, shape, affine)
            continue
        if not geometry.grids_match(reference[1], reference[2], shape, affine, tolerance):
            raise InputError(
                f"case '{case.case_id}': the grids of {reference[0]} and {role} differ "
                f"({geometry.grid_difference(reference[1], reference[2], shape, affine)}, tolerance "
                f"{tolerance} (--affine_tolerance))"
            )


def check_all_cases(cases, config: PrepareConfig):
    problems = []
    for case in tqdm(cases, desc="checking inputs", unit="case", leave=False):
        try:
            check_case(case, config)
        except InputError as error:
            problems.append(str(error))
    if problems:
        raise problem_list_error(f"{len(problems)} of {len(cases)} cases have problems:", problems)


# ---------------------------------------------------------------- one case


def read_case(case, config: PrepareConfig) -> slicing.SlicedVolumes:
    where = {folder: f"case '{case.case_id}', {source}" for folder, source in case.sources.items()}
    return slicing.read_volumes(
        case.sources, config.folders, config.slicing, where, config.task.target_on_input_scale, config.label_map
    )


def foreground_slices(sliced: slicing.SlicedVolumes, config: PrepareConfig):
    """Indices of the slices that hold foreground by the task's rule (see the module docstring)."""
    axes = sliced.in_plane_axes
    if config.task.keep_slices == "foreground":
        counts = sliced.above_background(config.target_folder).sum(axis=axes)
        return [int(k) for k in np.flatnonzero(counts >= config.min_foreground)]
    keep = sliced.above_background(config.input_folder).mean(axis=axes) >= config.min_body_fraction
    region = config.task.region_folder
    if region and config.min_mask_pixels > 0:
        keep &= sliced.above_background(region).sum(axis=axes) >= config.min_mask_pixels
    return [int(k) for k in np.flatnonzero(keep)]


def label_summary(case, labels, config: PrepareConfig):
    """The ids a case's label holds and the PNG bit depth they need; refuses unknown ids."""
    present = sorted(int(i) for i in np.unique(labels))
    unknown = set(present) - set(config.class_names) if config.class_names_fixed else set()
    if unknown:
        raise InputError(
            f"case '{case.case_id}', {case.sources[config.label_folder]}: label ids "
            f"{sorted(unknown)} are not among the classes {config.class_names}"
        )
    if present and present[-1] > 65535:
        raise InputError(f"case '{case.case_id}': label id {present[-1]} does not fit a 16-bit PNG")
    return {"label_ids": present, "label_bits": 16 if present and present[-1] > 255 else 8}


def slice_digits(depth):
    return max(4, len(str(depth - 1)))


def geometry_record(shape, affine):
    return {
        "shape": [int(n) for n in shape],
        "affine": np.asarray(affine).tolist(),
        "spacing": geometry.voxel_sizes(affine),
        "axcodes": geometry.axis_codes(affine),
    }


def write_slices(case, sliced: slicing.SlicedVolumes, slices, names, dataset_dir):
    """Writes all folders of a case under .partial/, then moves each into place."""
    partial = os.path.join(dataset_dir, PARTIAL_FOLDER, case.case_id)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for folder in sliced.kinds:
            os.makedirs(os.path.join(partial, folder))
            for index, name in zip(slices, names):
                output_folder.write_png(os.path.join(partial, folder, name), sliced.picture(folder, index))
        for folder in sliced.kinds:
            output_folder.move_into_place(
                os.path.join(partial, folder), os.path.join(dataset_dir, folder, case.case_id)
            )
    except OSError as error:
        raise output_error(error, partial) from error
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def prepare_case(case, config: PrepareConfig, dataset_dir, selection):
    """Reads, checks, slices and writes one case, keeping ALL_SLICES or FOREGROUND_SLICES; returns its
    record, written to meta/ last."""
    sliced = read_case(case, config)
    record = {
        "case": case.case_id,
        "sources": {f: str(s) for f, s in case.sources.items()},
        "source_notes": case.notes,
        "original": geometry_record(sliced.original_shape, sliced.original_affine),
        "non_finite_voxels": sliced.non_finite,
    }
    if config.label_folder:
        record.update(label_summary(case, sliced.volumes[config.label_folder], config))
    foreground = foreground_slices(sliced, config)
    slices = list(range(sliced.num_slices)) if selection == ALL_SLICES else foreground
    meta_path = record_path(dataset_dir, case.case_id)
    if not slices:
        reason = (
            "no foreground label in any slice"
            if config.task.keep_slices == "foreground"
            else "no slice with enough body (--min_body_fraction)"
        )
        record.update(status="skipped", reason=reason)
        write_json(meta_path, record)
        return record

    digits = slice_digits(sliced.num_slices)
    write_slices(case, sliced, slices, [f"{index:0{digits}d}.png" for index in slices], dataset_dir)
    input_volume = sliced.volumes[config.input_folder]
    record.update(
        status="done",
        canonical=geometry_record(input_volume.shape, sliced.canonical_affine),
        slice_axis=config.slicing.axis,
        slice_axis_name=config.slicing.axis_name,
        num_slices=int(sliced.num_slices),
        slice_digits=digits,
        slices=slices,
        foreground_slices=foreground,
        resize=sliced.grid.plan.to_json(),
        intensity=sliced.parameters,
        channel=config.slicing.channel,
    )
    write_json(meta_path, record)
    return record


def prepare_case_reporting(case, config: PrepareConfig, dataset_dir, selection):
    """Process-pool entry: (case id, error message or None, record or None)."""
    try:
        return case.case_id, None, prepare_case(case, config, dataset_dir, selection)
    except InputError as error:  # this case's input: reported with the others, the other cases go on
        return case.case_id, str(error), None
    except UsageError:  # the output cannot be written (read-only, disk full): no other case can be
        raise
    except Exception as error:  # a bug or an unexpected file: keep the other cases going, name this one
        return case.case_id, f"case '{case.case_id}': {type(error).__name__}: {error}", None
