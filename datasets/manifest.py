"""Reading a prepared dataset: its manifest, cases per split, slice files, and volumes put back.

A prepared root holds one folder per dataset, each with a manifest.json written by
`python -m datasets.prepare`. Manifest format (format_version 1):

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
                       zero-padded to slice_digits digits); num_slices: the axis length
    resize             fit, slice_shape [rows, cols] before fitting, padding [top, bottom, left, right],
                       resized_from (the padded shape), size
    intensity          {image folder: {method, low, high, ...}} the values mapped to 0 and 255
    label_ids, label_bits    ids present after label_map, PNG bit depth (segmentation)
    non_finite_voxels  {image folder: NaN/inf voxels replaced by the volume minimum}
    channel            the 4D index used, or null
"""
import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import geometry

MANIFEST_NAME = "manifest.json"
SUPPORTED_FORMAT_VERSIONS = (1,)


def load_manifest(dataset_dir):
    path = os.path.join(dataset_dir, MANIFEST_NAME)
    with open(path) as handle:
        manifest = json.load(handle)
    if manifest.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(f"{path}: unsupported manifest format_version {manifest.get('format_version')}")
    return manifest


def find_datasets(root):
    """Dataset folders under a prepared root that have a manifest, sorted by name."""
    return [os.path.join(root, name) for name in sorted(os.listdir(root))
            if os.path.exists(os.path.join(root, name, MANIFEST_NAME))]


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
