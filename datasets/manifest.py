"""Reading a prepared dataset: its manifest, cases per split and slice files.

A prepared root holds one folder per dataset, each with a manifest.json written by
`python -m datasets.prepare`. Reading one checks it cheaply (valid JSON, a supported format_version, the
keys and types of MANIFEST_KEYS and CASE_KEYS, plain names, splits that agree with the cases; no slice
is read) and raises util.cli.UsageError, one line naming the path and the problem, for a root, folder
or manifest that is not what it should be. Manifest format (format_version 1):

    format_version     1
    dataset            name, also the folder name
    task               "segmentation" | "synthesis" | "inpainting" | "denoising"
    modality           "CT", "MRI", "US", "XR", ...
    input_folder       folder of the pair's input  (segmentation "image", synthesis e.g. "t1c",
                       inpainting "image" = voided, denoising "image" = low dose)
    target_folder      folder of the pair's target (segmentation "label", synthesis e.g. "t2w",
                       inpainting "target" = healthy, denoising "target" = normal dose)
    folders            {folder: kind}; kind "image" = 8-bit grey, "label" = class ids (8-bit PNG, 16-bit
                       when an id exceeds 255), "mask" = 0 / 255 (inpainting: 255 = region to fill)
    classes            segmentation: [{"id": 0, "name": "background"}, ...]; otherwise null
    label_map          {old id: new id} applied to the labels, or null
    size, fit          slices are size[0] x size[1]; fit "stretch" or "pad" (see datasets/geometry.py)
    slice_axis         0, 1 or 2 of the RAS volume (slice_axis_name: sagittal, coronal, axial)
    slice_orientation  how a picture relates to the canonical volume: picture = flipud(slice.T)
    splits             {split: [case ids]}, split "train" / "test" (/ "val" if asked for): a summary of
                       the cases' own "split", see below
    cases              {case id: record} of the prepared cases
    skipped            {case id: record with "reason"} of cases with nothing to keep

A case record:

    split, sources     the split, and the source file of each folder
    original           shape, affine, spacing, axcodes of the input volume as read
    canonical          the same after reorientation to RAS (the volume the slices come from)
    slices             kept slice indices along slice_axis (file <folder>/<case>/<index>.png, the index
                       zero-padded to slice_digits digits); num_slices: the axis length. Train cases keep
                       their foreground slices; test cases keep every slice of the volume unless prepared
                       with --test_slices foreground
    foreground_slices  the kept slices that hold foreground by prepare's rule (segmentation: at least
                       --min_foreground label pixels; other tasks: enough body), a subset of slices, equal
                       to it for train cases, possibly empty for a test case (a volume without any
                       foreground). Manifests written before this field existed kept only foreground
                       slices: PreparedDataset.foreground_slice_indices falls back to slices
    resize             fit, slice_shape [rows, cols] before fitting, padding [top, bottom, left, right],
                       resized_from (the padded shape), size
    intensity          {image folder: {method, low, high, ...}} the values mapped to 0 and 255
    label_ids, label_bits    ids present after label_map, PNG bit depth (segmentation)
    non_finite_voxels  {image folder: NaN/inf voxels replaced by the volume minimum}
    channel            the 4D index used, or null

Names become paths (<dataset>/<folder>/<case>/<index>.png, and the predictions main_eval writes), so
the dataset name, input_folder, target_folder, every key of folders and every case id must be a plain
name: PLAIN_NAME_RULE, one folder level that stays inside the dataset folder. A manifest with any
other name is refused, so that no reader leaves the dataset folder whatever the manifest says.

Splits have one source of truth: each case's own "split", which prepare writes with the case and which
every reader uses (training takes the "train" cases, evaluation the "test" ones). The top-level
"splits" only sums them up for people and tools that read the file. A manifest whose "splits"
disagree with its cases is refused rather than read by either: someone edited one and not the other,
and quietly following the cases would train on cases the edit meant to hold out. Edit both (or
prepare again with --test_cases).

Predictions go back onto a case's original grid through datasets.slicing.SliceGrid.from_record(record).

A slice's relative position in its volume, the one definition that evaluation and prediction share to
pair a query slice with context slices from other volumes: slice_position(index, num_slices) =
(index + 0.5) / num_slices, the centre of the slice's share of the axis (a one-slice volume: 0.5).
"""

import json
import os
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from util.cli import UsageError

MANIFEST_NAME = "manifest.json"
SUPPORTED_FORMAT_VERSIONS = (1,)
HIDDEN_PREFIX = "."  # .partial/ and the like: work folders, never datasets
JSON_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "a whole number", type(None): "null"}
# What the readers rely on, checked when a manifest is loaded: key -> accepted JSON types.
MANIFEST_KEYS = {
    "format_version": (int,),
    "dataset": (str,),
    "task": (str,),
    "modality": (str,),
    "input_folder": (str,),
    "target_folder": (str,),
    "folders": (dict,),
    "size": (list,),
    "splits": (dict,),
    "cases": (dict,),
}
OPTIONAL_MANIFEST_KEYS = {"classes": (list, type(None)), "skipped": (dict,)}
CASE_KEYS = {
    "split": (str,),
    "slices": (list,),
    "num_slices": (int,),
    "slice_digits": (int,),
    "slice_axis": (int,),
    "resize": (dict,),
    "canonical": (dict,),
    "original": (dict,),
}
OPTIONAL_CASE_KEYS = {"foreground_slices": (list,)}
# One folder level: no separator (so no '..'), not hidden, no control characters, no outer spaces.
# Spaces and brackets inside are fine: public sets name files like "benign (1).png".
PLAIN_NAME = re.compile(r"(?![.\s])[^\x00-\x1f\x7f/\\]+(?<!\s)")
PLAIN_NAME_RULE = "one folder level: no '/' or '\\', not starting with '.' or a space, no control characters"
PREPARE_AGAIN = "prepare the dataset again (python -m datasets.prepare ... --overwrite)"


def slice_position(index: int, num_slices: int) -> float:
    """Where slice `index` lies along its volume's axis, in (0, 1): the centre of its share of the
    axis, so that volumes with different slice counts compare and a one-slice volume sits at 0.5."""
    if not 0 <= index < num_slices:
        raise ValueError(f"slice {index} is outside a volume of {num_slices} slices")
    return (index + 0.5) / num_slices


def is_plain_name(name) -> bool:
    """Whether name is a single folder or file name that stays where it is joined."""
    return isinstance(name, str) and PLAIN_NAME.fullmatch(name) is not None


def quoted(name) -> str:
    """A name as JSON writes it: quoted, and one line whatever characters it holds."""
    return json.dumps(name, ensure_ascii=False)


def describe_type(value) -> str:
    return JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def is_json_type(value, types) -> bool:
    # JSON has no booleans where a number is expected, but bool is an int subclass in Python.
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def check_keys(content: dict, required: dict, optional: dict, where: str):
    """UsageError naming the first key that is missing or of the wrong type."""
    for key in required:
        if key not in content:
            raise UsageError(f"{where} lacks the key '{key}'")
    for key, types in {**required, **optional}.items():
        if key in content and not is_json_type(content[key], types):
            raise UsageError(
                f"{where}: '{key}' should be {' or '.join(JSON_TYPE_NAMES[t] for t in types)}, "
                f"not {describe_type(content[key])}"
            )


def read_json_object(path: str) -> dict:
    """A JSON file holding an object; UsageError naming the file for anything else."""
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except FileNotFoundError:
        raise UsageError(
            f"{path}: not found; is {os.path.dirname(path)} a dataset folder written by "
            f"python -m datasets.prepare (preparation unfinished or failed?)"
        ) from None
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise UsageError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not isinstance(content, dict):
        raise UsageError(f"{path}: expected a JSON object, found {describe_type(content)}")
    return content


def load_manifest(dataset_dir):
    """The manifest of a dataset folder, checked against MANIFEST_KEYS and CASE_KEYS."""
    path = os.path.join(dataset_dir, MANIFEST_NAME)
    manifest = read_json_object(path)
    version = manifest.get("format_version")
    if not is_json_type(version, (int,)) or version not in SUPPORTED_FORMAT_VERSIONS:
        raise UsageError(
            f"{path}: unsupported format_version {json.dumps(version)} (this version of MVG reads "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); prepare the dataset again, or update MVG"
        )
    check_keys(manifest, MANIFEST_KEYS, OPTIONAL_MANIFEST_KEYS, path)
    for case_id, record in manifest["cases"].items():
        where = f"{path}: cases['{case_id}']"
        if not isinstance(record, dict):
            raise UsageError(f"{where} should be an object, not {describe_type(record)}")
        check_keys(record, CASE_KEYS, OPTIONAL_CASE_KEYS, where)
    check_names(manifest, path)
    disagreement = split_disagreement(manifest)
    if disagreement:
        raise UsageError(
            f"{path}: {disagreement}; each case's own 'split' is what training and evaluation "
            f"use, 'splits' only sums them up: make the two agree, or {PREPARE_AGAIN}"
        )
    return manifest


def check_names(manifest: dict, path: str):
    """UsageError naming the first dataset, folder or case name that is not a plain name."""
    named = [
        ("dataset", manifest["dataset"]),
        ("input_folder", manifest["input_folder"]),
        ("target_folder", manifest["target_folder"]),
    ]
    named += [("folder", folder) for folder in manifest["folders"]]
    named += [("case id", case_id) for case_id in manifest["cases"]]
    for what, name in named:
        if not is_plain_name(name):
            raise UsageError(
                f"{path}: {what} {quoted(name)} is not a plain name ({PLAIN_NAME_RULE}), so "
                f"it could lead outside the dataset folder; {PREPARE_AGAIN}"
            )


def split_disagreement(manifest: dict) -> str | None:
    """Where 'splits' and the cases' own 'split' part ways (the first such case), or None."""
    listed = {}  # case id -> the splits that list it
    for split, case_ids in manifest["splits"].items():
        if not isinstance(case_ids, list):
            return f"splits[{quoted(split)}] should be a list of case ids, not {describe_type(case_ids)}"
        for case_id in case_ids:
            if not isinstance(case_id, str):
                return f"splits[{quoted(split)}] holds {describe_type(case_id)}, not a case id"
            listed.setdefault(case_id, []).append(split)
    for case_id, record in manifest["cases"].items():
        own, in_splits = record["split"], listed.pop(case_id, [])
        if in_splits != [own]:
            where = " and ".join(map(quoted, in_splits)) or "no split"
            return f"case {quoted(case_id)} is {quoted(own)} by its own 'split' but under {where} in 'splits'"
    if listed:
        case_id, in_splits = next(iter(listed.items()))
        return f"'splits' lists {quoted(case_id)} under {quoted(in_splits[0])}, which is not among the cases"
    return None


def dataset_folders(root):
    """The visible sub-folders of a prepared root, sorted; UsageError when root cannot be listed."""
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        raise UsageError(f"{root}: prepared root not found") from None
    except NotADirectoryError:
        raise UsageError(
            f"{root}: not a folder; expected a prepared root (the --out of python -m datasets.prepare)"
        ) from None
    except OSError as error:
        raise UsageError(f"{root}: cannot read the prepared root ({error.strerror or error})") from None
    return [
        os.path.join(root, name)
        for name in names
        if not name.startswith(HIDDEN_PREFIX) and os.path.isdir(os.path.join(root, name))
    ]


def find_datasets(root):
    """Dataset folders under a prepared root that have a manifest, sorted by name; UsageError when
    root is missing, unreadable or holds none."""
    folders = dataset_folders(root)
    prepared = [folder for folder in folders if os.path.exists(os.path.join(folder, MANIFEST_NAME))]
    if not prepared and os.path.exists(os.path.join(root, MANIFEST_NAME)):
        raise UsageError(
            f"{root}: a dataset folder, not a prepared root; give the folder that holds it, "
            f"{os.path.dirname(os.path.abspath(root))}"
        )
    if not prepared:
        unfinished = f" (found {len(folders)} without one)" if folders else ""
        raise UsageError(
            f"{root}: no dataset folder with a {MANIFEST_NAME}{unfinished}; prepare data with "
            f"python -m datasets.prepare"
        )
    return prepared


def decode_png(path):
    """A PNG as a numpy array: uint8 for 8-bit files, uint16 for 16-bit labels. Pillow's own error
    for a file that cannot be decoded (verify reports those as they come)."""
    with Image.open(path) as image:
        array = np.asarray(image)
    return array.astype(np.uint16) if array.dtype.kind in "iu" and array.dtype.itemsize > 1 else array


def prepared_root_of(slice_path) -> str:
    """The prepared root a slice file lies in: <root>/<dataset>/<folder>/<case>/<index>.png."""
    return os.path.normpath(os.path.join(slice_path, *[os.pardir] * 4))


def read_png(path):
    """decode_png, with a UsageError naming the file and the check to run when it is damaged (truncated
    by a full disk or a copy that stopped, overwritten, missing)."""
    try:
        return decode_png(path)
    except (OSError, SyntaxError) as error:  # Pillow raises both for files it cannot decode
        raise UsageError(
            f"{path}: not a readable PNG ({png_problem(error)}); run `python -m datasets.prepare "
            f"verify {prepared_root_of(path)}` to find every damaged slice"
        ) from None


def png_problem(error) -> str:
    if isinstance(error, UnidentifiedImageError):  # Pillow's message only repeats the path
        return "not a picture, or cut short before its pixels"
    return getattr(error, "strerror", None) or str(error)


@dataclass(frozen=True)
class SlicePair:
    dataset: str
    case_id: str
    index: int
    input_path: str
    target_path: str


class PreparedDataset:
    """One prepared dataset folder, e.g. PreparedDataset("data/ACDC")."""

    def __init__(self, dataset_dir):
        self.dataset_dir = dataset_dir
        self.manifest = load_manifest(dataset_dir)
        self.name = self.manifest["dataset"]
        self.task = self.manifest["task"]
        self.modality = self.manifest["modality"]
        self.input_folder = self.manifest["input_folder"]
        self.target_folder = self.manifest["target_folder"]
        self.folders = self.manifest["folders"]

    @property
    def classes(self):
        """{id: name} (segmentation), else {}."""
        return {entry["id"]: entry["name"] for entry in self.manifest.get("classes") or []}

    def case_ids(self, split=None):
        cases = self.manifest["cases"]
        return sorted(c for c in cases if split is None or cases[c]["split"] == split)

    def case(self, case_id):
        return self.manifest["cases"][case_id]

    def slice_indices(self, case_id):
        return list(self.case(case_id)["slices"])

    def foreground_slice_indices(self, case_id):
        """The kept slices that hold foreground (see foreground_slices in the module docstring)."""
        record = self.case(case_id)
        return list(record.get("foreground_slices", record["slices"]))

    def slice_position(self, case_id, index):
        """slice_position(index, the case's num_slices)."""
        return slice_position(index, self.case(case_id)["num_slices"])

    def slice_path(self, folder, case_id, index):
        digits = self.case(case_id)["slice_digits"]
        return os.path.join(self.dataset_dir, folder, case_id, f"{index:0{digits}d}.png")

    def pairs(self, split=None):
        """Every (input, target) slice pair of the split, case by case, slice by slice."""
        return [
            SlicePair(
                self.name,
                case_id,
                index,
                self.slice_path(self.input_folder, case_id, index),
                self.slice_path(self.target_folder, case_id, index),
            )
            for case_id in self.case_ids(split)
            for index in self.slice_indices(case_id)
        ]
