"""Volume readers: every format comes back as (array indexed i, j, k[, t], 4x4 voxel-to-RAS affine).

The affine follows the NIfTI/nibabel convention: world coordinates in millimetres, +x Right,
+y Anterior, +z Superior. DICOM, MetaImage and NRRD (as SimpleITK reports them) use LPS world
coordinates, so their first two world axes are negated as they are read (LPS_TO_RAS).

`read_volume` and `read_header` take every format below; the module named for a format reads it.
Formats and what they need:
    NIfTI (.nii, .nii.gz)        nibabel (always installed); this module
    MetaImage (.mhd/.raw, .mha)  pip install SimpleITK (PROMISE12 ships these); datasets/itk_images.py
    NRRD (.nrrd, .nhdr)          pip install SimpleITK (3D Slicer saves volumes and segmentations so);
                                 datasets/itk_images.py
    DICOM series (a folder)      pip install SimpleITK; one file per slice, one series per folder.
                                 Slices are ordered along the slice normal, and a folder with two
                                 series, two slices at one position or uneven slice steps (a missing
                                 slice) is refused rather than read onto a wrong grid; datasets/dicom.py
    HDF5 (.h5, .hdf5)            pip install h5py; arrays only, so the affine is the identity
                                 (1 mm voxels, axis order as stored), e.g. the LA set of UA-MT
                                 (<case>/mri_norm2.h5 with datasets `image` and `label`); this module
    pictures (.png, .jpg, .jpeg, .bmp, .tif, .tiff)
                                 nothing (Pillow): a 2D image such as a chest radiograph and its mask
                                 is a one-slice volume whose axial slice is the picture as stored;
                                 pictures hold no pixel size, so 1 mm unless prepare --spacing says;
                                 datasets/pictures.py
    DICOM file (.dcm, .dicom)    pip install pydicom; one 2D image (radiograph, or a single CT/MR
                                 slice). MONOCHROME1 (white is low, as in many CR/DX files) is
                                 inverted within the image's own value range so that bright is high,
                                 like every other input; datasets/dicom.py (which says why single
                                 files are read by pydicom, not SimpleITK)

Multi-component images keep their components on a last axis (a colour MetaImage or NRRD is
(i, j, k, 3)); `prepare --channel` picks one. Colour pictures and DICOM files do the same; colour
saved from grey (all components equal) collapses to grey.

`read_header` returns only shape and affine and reads no pixel data where the format allows (for a
DICOM series: each file's header), so the whole input can be checked before any case is processed.

The errors (InputError, MissingExtraError) live in datasets/input_errors.py so that the format
modules can raise them; import them from here.
"""

import os
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from .dicom import read_dicom_file, read_dicom_series
from .input_errors import InputError, require_extra
from .input_errors import MissingExtraError as MissingExtraError  # re-exported: callers import it from here
from .itk_images import LPS_TO_RAS as LPS_TO_RAS  # re-exported: the convention of every affine read here
from .itk_images import read_metaimage, read_nrrd
from .pictures import read_picture


@dataclass(frozen=True)
class Source:
    """One volume on disk. `key` names the array inside an HDF5 file."""

    path: str
    key: str | None = None

    def __str__(self):
        return f"{self.path}[{self.key}]" if self.key else self.path


NIFTI_EXTENSIONS = (".nii.gz", ".nii")
METAIMAGE_EXTENSIONS = (".mhd", ".mha")
NRRD_EXTENSIONS = (".nrrd", ".nhdr")
HDF5_EXTENSIONS = (".h5", ".hdf5")
PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LOSSY_EXTENSIONS = (".jpg", ".jpeg")
DICOM_FILE_EXTENSIONS = (".dcm", ".dicom")
# Every file these readers take (a DICOM series is a folder, so it has none).
VOLUME_FILE_EXTENSIONS = (
    NIFTI_EXTENSIONS
    + METAIMAGE_EXTENSIONS
    + NRRD_EXTENSIONS
    + HDF5_EXTENSIONS
    + PICTURE_EXTENSIONS
    + DICOM_FILE_EXTENSIONS
)
FORMATS_WITHOUT_SPACING = ("hdf5", "picture")


def check_lossless(path, where, kind="label"):
    """Labels and masks must come from a lossless file: JPEG changes ids along every edge."""
    if path.lower().endswith(LOSSY_EXTENSIONS):
        raise InputError(
            f"{where}: a {kind} in JPEG, whose lossy compression changes ids at edges; use "
            f"the PNG (or another lossless) version"
        )


def volume_format(path):
    lower = path.lower()
    if os.path.isdir(path):
        return "dicom"
    formats = (
        ("nifti", NIFTI_EXTENSIONS),
        ("metaimage", METAIMAGE_EXTENSIONS),
        ("nrrd", NRRD_EXTENSIONS),
        ("hdf5", HDF5_EXTENSIONS),
        ("picture", PICTURE_EXTENSIONS),
        ("dicom_file", DICOM_FILE_EXTENSIONS),
    )
    for name, extensions in formats:
        if lower.endswith(extensions):
            return name
    raise InputError(
        f"{path}: unknown volume format (expected {', '.join(VOLUME_FILE_EXTENSIONS)} or a DICOM series folder)"
    )


def read_volume(source):
    """Returns (float or integer array, affine). Errors name the file."""
    return _dispatch(source, header_only=False)


def read_header(source):
    """Returns (shape, affine) without reading pixel data where the format allows."""
    return _dispatch(source, header_only=True)


def _dispatch(source, header_only):
    readers = {
        "nifti": _read_nifti,
        "metaimage": read_metaimage,
        "nrrd": read_nrrd,
        "dicom": read_dicom_series,
        "hdf5": _read_hdf5,
        "picture": read_picture,
        "dicom_file": read_dicom_file,
    }
    if not os.path.exists(source.path):
        raise InputError(f"{source.path}: file not found")
    reader = readers[volume_format(source.path)]
    try:
        return reader(source, header_only)
    except InputError:
        raise
    except Exception as error:  # any library failure on a broken file becomes a named error
        raise InputError(f"{source}: cannot read ({type(error).__name__}: {_one_line(error)})") from error


def _one_line(error):
    """SimpleITK's messages span lines and start with the C++ source location; keep what ITK says
    after its last 'ERROR:' (minus the object address), on one line."""
    text = str(error)
    if "ERROR:" in text:
        text = text.rsplit("ERROR:", 1)[1]
        if "): " in text.split("\n", 1)[0]:
            text = text.split("): ", 1)[1]
    return " ".join(text.split())


def _read_nifti(source, header_only):
    image = nib.load(source.path)
    if header_only:
        return tuple(int(n) for n in image.shape), image.affine
    # Integer files stay integer (labels); scaled or float files come back as float32.
    header = image.header
    slope, inter = header.get_slope_inter()
    scaled = slope not in (None, 1.0) or inter not in (None, 0.0)
    if np.issubdtype(image.get_data_dtype(), np.integer) and not scaled:
        data = np.asarray(image.dataobj)
    else:
        data = image.get_fdata(dtype=np.float32)
    return data, image.affine


# ---------------------------------------------------------------- HDF5 (arrays only)


def _read_hdf5(source, header_only):
    h5py = require_extra("h5py", "h5py", f"the HDF5 file {source.path}")
    with h5py.File(source.path, "r") as handle:
        if source.key not in handle:
            raise InputError(f"{source.path}: no dataset '{source.key}' (has: {', '.join(sorted(handle.keys()))})")
        dataset = handle[source.key]
        if header_only:
            return tuple(int(n) for n in dataset.shape), np.eye(4)
        return np.asarray(dataset[()]), np.eye(4)
