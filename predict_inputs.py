"""What predict.py reads besides its checkpoint: the kind of each path it is given (a picture, or a
volume in any format of datasets/readers.py but HDF5), PNGs taken as prepared slices (images as
8-bit grey, labels as class ids), and the warning about NaN or infinite voxels in a volume."""

import os

import numpy as np
from PIL import Image

from datasets import intensity, slicing
from datasets.readers import HDF5_EXTENSIONS, PICTURE_EXTENSIONS, VOLUME_FILE_EXTENSIONS, InputError, check_lossless
from util.cli import warn

# Pictures are read as prepared slices; what is written for a picture query is always a PNG.
VOLUME_SUFFIXES = tuple(
    suffix
    for suffix in VOLUME_FILE_EXTENSIONS  # HDF5 holds arrays under keys: no flag here
    if suffix not in PICTURE_EXTENSIONS + HDF5_EXTENSIONS
)


def file_kind(path: str, flag: str) -> str:
    lower = path.lower()
    if lower.endswith(PICTURE_EXTENSIONS):
        return "png"
    if lower.endswith(VOLUME_SUFFIXES) or os.path.isdir(path):
        return "volume"
    raise InputError(
        f"{flag} {path}: unknown format; expected {', '.join(PICTURE_EXTENSIONS + VOLUME_SUFFIXES)} "
        f"or a DICOM series folder"
    )


def read_png_array(path: str, flag: str, convert_palette: bool) -> np.ndarray:
    if not os.path.isfile(path):
        raise InputError(f"{flag} {path}: file not found")
    try:
        with Image.open(path) as png:
            if convert_palette and png.mode == "P":
                png = png.convert("RGB")
            return np.asarray(png)
    except OSError as error:
        raise InputError(f"{flag} {path}: cannot read ({error})") from error


def read_png_image(path: str, flag: str) -> np.ndarray:
    """An 8-bit grey picture from a grey, RGB(A) or palette PNG; 16-bit grey is min-max scaled."""
    picture = read_png_array(path, flag, convert_palette=True)
    if picture.ndim == 3 and picture.shape[2] in (3, 4):
        return np.round(picture[..., :3].astype(np.float32).mean(axis=2)).astype(np.uint8)
    if picture.ndim != 2:
        raise InputError(f"{flag} {path}: expected a 2D grey or RGB PNG, got an array of shape {picture.shape}")
    if picture.dtype == np.uint8:
        return picture
    picture = picture.astype(np.float32)
    return intensity.to_uint8(intensity.normalise(picture, intensity.fit_parameters(picture, "minmax")))


def read_png_label(path: str, flag: str) -> np.ndarray:
    check_lossless(path, f"{flag} {path}")
    label = read_png_array(path, flag, convert_palette=False)
    if label.dtype == bool:  # a 1-bit PNG: a binary mask of class 1
        label = label.astype(np.uint8)
    if label.ndim != 2 or label.dtype.kind not in "iu":
        raise InputError(
            f"{flag} {path}: a label PNG holds class ids (8- or 16-bit grey, or palette "
            f"indices), got an array of shape {label.shape} ({label.dtype})"
        )
    ids = slicing.label_ids(label, f"{flag} {path}")
    # In the type prepare writes, as for volume contexts: the predictor meets the same arrays either way.
    return ids.astype(slicing.label_dtype(int(ids.max()) if ids.size else 0))


def warn_non_finite(volumes: slicing.SlicedVolumes, paths: dict):
    for folder, count in volumes.non_finite.items():
        if count:
            warn(
                f"{paths[folder]}: {count} NaN or infinite voxels, set to the volume's smallest finite value "
                f"before normalising"
            )
