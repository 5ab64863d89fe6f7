"""Reading a prepared dataset: its manifest, cases per split, slice files, and volumes put back.

A prepared root holds one folder per dataset, each with a manifest.json written by
`python -m datasets.prepare`. Reading one checks it cheaply (valid JSON, a supported format_version, the
keys and types of MANIFEST_KEYS and CASE_KEYS; no slice is read) and raises util.cli.UsageError, one
line naming the path and the problem, for a root, folder or manifest that is not what it should be.
Manifest format (format_version 1):

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
    splits             {split: [case ids]}, split "train" / "test" (/ "val" if asked for)
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

A slice's relative position in its volume, the one definition that evaluation and prediction share to
pair a query slice with context slices from other volumes: slice_position(index, num_slices) =
(index + 0.5) / num_slices, the centre of the slice's share of the axis (a one-slice volume: 0.5).
"""
import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from util.cli import UsageError

from . import geometry

MANIFEST_NAME = "manifest.json"
SUPPORTED_FORMAT_VERSIONS = (1,)
HIDDEN_PREFIX = "."  # .partial/ and the like: work folders, never datasets
JSON_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "a whole number",
                   type(None): "null"}
# What the readers rely on, checked when a manifest is loaded: key -> accepted JSON types.
MANIFEST_KEYS = {
    "format_version": (int,), "dataset": (str,), "task": (str,), "modality": (str,),
    "input_folder": (str,), "target_folder": (str,), "folders": (dict,), "size": (list,),
    "splits": (dict,), "cases": (dict,),
}
OPTIONAL_MANIFEST_KEYS = {"classes": (list, type(None)), "skipped": (dict,)}
CASE_KEYS = {
    "split": (str,), "slices": (list,), "num_slices": (int,), "slice_digits": (int,),
    "slice_axis": (int,), "resize": (dict,), "canonical": (dict,), "original": (dict,),
}
OPTIONAL_CASE_KEYS = {"foreground_slices": (list,)}


def slice_position(index: int, num_slices: int) -> float:
    """Where slice `index` lies along its volume's axis, in (0, 1): the centre of its share of the
    axis, so that volumes with different slice counts compare and a one-slice volume sits at 0.5."""
    if not 0 <= index < num_slices:
        raise ValueError(f"slice {index} is outside a volume of {num_slices} slices")
    return (index + 0.5) / num_slices


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
            raise UsageError(f"{where}: '{key}' should be {' or '.join(JSON_TYPE_NAMES[t] for t in types)}, "
                             f"not {describe_type(content[key])}")


def read_json_object(path: str) -> dict:
    """A JSON file holding an object; UsageError naming the file for anything else."""
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except FileNotFoundError:
        raise UsageError(f"{path}: not found; is {os.path.dirname(path)} a dataset folder written by "
                         f"python -m datasets.prepare (preparation unfinished or failed?)") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column "
                         f"{error.colno})") from None
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
        raise UsageError(f"{path}: unsupported format_version {json.dumps(version)} (this version of MVG reads "
                         f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); prepare the dataset again, or update MVG")
    check_keys(manifest, MANIFEST_KEYS, OPTIONAL_MANIFEST_KEYS, path)
    for case_id, record in manifest["cases"].items():
        where = f"{path}: cases['{case_id}']"
        if not isinstance(record, dict):
            raise UsageError(f"{where} should be an object, not {describe_type(record)}")
        check_keys(record, CASE_KEYS, OPTIONAL_CASE_KEYS, where)
    return manifest


def dataset_folders(root):
    """The visible sub-folders of a prepared root, sorted; UsageError when root cannot be listed."""
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        raise UsageError(f"{root}: prepared root not found") from None
    except NotADirectoryError:
        raise UsageError(f"{root}: not a folder; expected a prepared root (the --out of "
                         f"python -m datasets.prepare)") from None
    except OSError as error:
        raise UsageError(f"{root}: cannot read the prepared root ({error.strerror or error})") from None
    return [os.path.join(root, name) for name in names
            if not name.startswith(HIDDEN_PREFIX) and os.path.isdir(os.path.join(root, name))]


def find_datasets(root):
    """Dataset folders under a prepared root that have a manifest, sorted by name; UsageError when
    root is missing, unreadable or holds none."""
    folders = dataset_folders(root)
    prepared = [folder for folder in folders if os.path.exists(os.path.join(folder, MANIFEST_NAME))]
    if not prepared and os.path.exists(os.path.join(root, MANIFEST_NAME)):
        raise UsageError(f"{root}: a dataset folder, not a prepared root; give the folder that holds it, "
                         f"{os.path.dirname(os.path.abspath(root))}")
    if not prepared:
        unfinished = f" (found {len(folders)} without one)" if folders else ""
        raise UsageError(f"{root}: no dataset folder with a {MANIFEST_NAME}{unfinished}; prepare data with "
                         f"python -m datasets.prepare")
    return prepared


def read_png(path):
    """A PNG as a numpy array: uint8 for 8-bit files, uint16 for 16-bit labels."""
    with Image.open(path) as image:
        array = np.asarray(image)
    return array.astype(np.uint16) if array.dtype.kind in "iu" and array.dtype.itemsize > 1 else array


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
        return [SlicePair(self.name, case_id, index, self.slice_path(self.input_folder, case_id, index),
                          self.slice_path(self.target_folder, case_id, index))
                for case_id in self.case_ids(split) for index in self.slice_indices(case_id)]

    def restore_volume(self, case_id, pictures, kind="label", fill=0):
        """Puts size x size pictures back on the case's original voxel grid.

        pictures: {slice index: 2D array}, e.g. predicted labels read with `read_png`. Labels use
        nearest neighbour, kind="image" bilinear/area. Slices without a picture get `fill`. The result
        is in the original voxel order, so it can be saved with record["original"]["affine"]."""
        record = self.case(case_id)
        plan, axis = record["resize"], record["slice_axis"]
        canonical_shape = record["canonical"]["shape"]
        dtype = np.float32 if kind == "image" else np.int64
        volume = np.full(canonical_shape, fill, dtype=dtype)
        undo = geometry.unresize_intensity if kind == "image" else geometry.unresize_nearest
        for index, picture in pictures.items():
            in_plane = geometry.display_to_slice(undo(np.asarray(picture), plan))
            np.moveaxis(volume, axis, 0)[index] = in_plane
        return geometry.from_canonical(volume, np.asarray(record["original"]["affine"]))
