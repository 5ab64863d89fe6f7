"""DICOM: series (one folder, one file per slice) through SimpleITK, single files through pydicom.

A series is read in the order of its slices along the slice normal; a folder with two series, two
slices at one position or uneven slice steps (a missing slice) is refused rather than read onto a
wrong grid. A single file is one 2D image: a CT/MR slice with patient geometry is placed like a
one-slice series, a radiograph without it becomes a picture (datasets/pictures.py) with the file's
pixel spacing.

Single DICOM files stay with pydicom: SimpleITK (GDCM, ITK 5.3 on) inverts MONOCHROME1 against the
stored bit range (2**BitsStored - 1 minus the value), older ITK not at all, so its values depend on the
installed version and differ from the within-range inversion that prepared radiographs rely on;
pydicom hands back the stored values and the inversion is done here. A MONOCHROME1 series (rare:
CT and MR are MONOCHROME2) comes back as SimpleITK inverts it: bright is high, offset by the bit range.

Called through datasets.readers (read_volume, read_header), which names the formats and their needs.
"""

import os
from dataclasses import dataclass

import numpy as np

from .input_errors import InputError, require_extra
from .itk_images import LPS_TO_RAS, ijk_array, simpleitk
from .pictures import picture_affine, picture_volume

# ---------------------------------------------------------------- DICOM series (one folder)

# The header fields that place a slice, by DICOM keyword, as SimpleITK names them (group|element).
DICOM_TAGS = {
    "SeriesInstanceUID": "0020|000e",
    "ImagePositionPatient": "0020|0032",
    "ImageOrientationPatient": "0020|0037",
    "PixelSpacing": "0028|0030",
    "SliceThickness": "0018|0050",
    "PhotometricInterpretation": "0028|0004",
}
DUPLICATE_MM = 0.01  # slices closer than this along the normal are one position written twice
# Allowed deviation of a slice step from the series' median step, as a fraction of it: positions are
# often written with two or three decimals, while a missing slice doubles a step.
SLICE_STEP_TOLERANCE = 0.1


@dataclass(frozen=True)
class _DicomSlice:
    """The header fields of one slice file that place it in its series."""

    path: str
    series: str
    size: tuple  # (columns, rows, frames)
    components: int
    position: tuple
    orientation: tuple  # row cosine, then column cosine
    pixel_spacing: tuple  # (row spacing, column spacing), as DICOM lists them
    thickness: float
    photometric: str


def _dicom_text(reader, keyword):
    tag = DICOM_TAGS[keyword]
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""


def _dicom_numbers(reader, keyword, path, count=None):
    """The backslash-separated numbers of a tag; `count` of them, or the slice is refused."""
    value = _dicom_text(reader, keyword)
    try:
        numbers = tuple(float(v) for v in value.split("\\") if v.strip())
    except ValueError:
        numbers = ()
    if count is not None and len(numbers) != count:
        found = f"'{value}'" if value else "none"
        raise InputError(
            f"{path}: a slice of a DICOM series needs {count} numbers in {keyword} "
            f"({DICOM_TAGS[keyword].replace('|', ',')}), found {found}; a radiograph or other "
            f"unplaced image is read as a single file (give its path)"
        )
    return numbers


def _dicom_header(sitk, path):
    """A reader holding the file's header, read without its pixels; None for files that are no DICOM
    image (series folders often hold notes, thumbnails or a DICOMDIR next to the slices)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.SetImageIO("GDCMImageIO")  # by content, never by name: a thumbnail.png is no slice
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def _dicom_slice(reader, path):
    size = tuple(reader.GetSize()) + (1,) * (3 - reader.GetDimension())
    if size[2] > 1:
        raise InputError(
            f"{path}: multi-frame DICOM ({size[2]} frames) is not supported; convert it to "
            f"NIfTI first (e.g. with dcm2niix)"
        )
    return _DicomSlice(
        path=path,
        series=_dicom_text(reader, "SeriesInstanceUID"),
        size=size,
        components=reader.GetNumberOfComponents(),
        position=_dicom_numbers(reader, "ImagePositionPatient", path, 3),
        orientation=_dicom_numbers(reader, "ImageOrientationPatient", path, 6),
        pixel_spacing=_dicom_numbers(reader, "PixelSpacing", path, 2),
        thickness=(_dicom_numbers(reader, "SliceThickness", path) or (1.0,))[0] or 1.0,
        photometric=_dicom_text(reader, "PhotometricInterpretation").upper(),
    )


def _dicom_series(folder, sitk):
    """The folder's slices, checked to form one regular series and sorted along the slice normal."""
    headers = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        header = _dicom_header(sitk, path) if not name.startswith(".") and os.path.isfile(path) else None
        if header is not None:
            headers[path] = header
    if not headers:
        raise InputError(f"{folder}: no DICOM files found (a DICOM series folder holds one file per slice)")
    series = sorted({_dicom_text(header, "SeriesInstanceUID") for header in headers.values()})
    if len(series) > 1:
        raise InputError(
            f"{folder}: holds {len(series)} DICOM series (SeriesInstanceUID "
            f"{', '.join(series)}); which one is meant? Give each series its own folder"
        )
    slices = [_dicom_slice(header, path) for path, header in headers.items()]
    _check_slices_alike(folder, slices)
    normal = np.cross(*np.reshape(slices[0].orientation, (2, 3)))
    offsets = np.array([np.dot(s.position, normal) for s in slices])
    order = np.argsort(offsets, kind="stable")
    slices, offsets = [slices[i] for i in order], offsets[order]
    _check_slice_steps(folder, slices, offsets)
    return slices


def _check_slices_alike(folder, slices):
    first = slices[0]
    for candidate in slices:
        name = os.path.basename(candidate.path)
        if candidate.components > 1:
            raise InputError(
                f"{candidate.path}: a colour slice ({candidate.components} samples per pixel) "
                f"in a DICOM series; expected grey"
            )
        if candidate.size != first.size:
            raise InputError(
                f"{folder}: slices of different sizes ({name}: {candidate.size[:2]}, "
                f"{os.path.basename(first.path)}: {first.size[:2]} columns x rows)"
            )
        if not np.allclose(candidate.orientation, first.orientation, atol=1e-4):
            raise InputError(
                f"{folder}: slices with different ImageOrientationPatient ({name} and "
                f"{os.path.basename(first.path)}); one series is one stack of parallel slices"
            )


def _check_slice_steps(folder, slices, offsets):
    """Refuses two slices at one position and steps that are not all the same (a missing slice)."""
    steps = np.diff(offsets)
    if not len(steps):
        return
    names = [os.path.basename(s.path) for s in slices]
    k = int(np.argmin(steps))
    if steps[k] < DUPLICATE_MM:
        raise InputError(
            f"{folder}: two slices at the same position ({offsets[k]:g} mm along the slice "
            f"normal): {names[k]} and {names[k + 1]}; remove the duplicate"
        )
    nominal = float(np.median(steps))
    tolerance = SLICE_STEP_TOLERANCE * nominal
    grid = offsets[0] + np.arange(len(offsets)) * (offsets[-1] - offsets[0]) / len(steps)
    k = int(np.argmax(np.abs(steps - nominal)))
    if abs(steps[k] - nominal) <= tolerance and np.abs(offsets - grid).max() <= tolerance:
        return
    between = (
        f"between {names[k]} ({offsets[k]:g} mm) and {names[k + 1]} ({offsets[k + 1]:g} mm) along the slice normal"
    )
    if steps[k] > 1.5 * nominal:
        raise InputError(
            f"{folder}: missing slice {between}: a step of {steps[k]:g} mm where the others are {nominal:g} mm"
        )
    raise InputError(
        f"{folder}: uneven slice spacing: steps from {steps.min():g} to {steps.max():g} mm "
        f"(the least regular {between}); a volume needs one slice step"
    )


def _slice_affine(orientation, first_position, pixel_spacing, slice_step):
    """Voxel (i, j, k) = (column, row, slice) to RAS: i walks along the row cosine."""
    row_cosine, column_cosine = np.reshape(np.asarray(orientation, dtype=float), (2, 3))
    row_spacing, column_spacing = (float(v) for v in pixel_spacing)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cosine * column_spacing
    affine_lps[:3, 1] = column_cosine * row_spacing
    affine_lps[:3, 2] = slice_step
    affine_lps[:3, 3] = np.asarray(first_position, dtype=float)
    return LPS_TO_RAS @ affine_lps


def _series_affine(slices):
    """One slice has no neighbour, so its step is the slice thickness along the normal."""
    if len(slices) > 1:
        step = (np.array(slices[-1].position) - np.array(slices[0].position)) / (len(slices) - 1)
    else:
        step = np.cross(*np.reshape(slices[0].orientation, (2, 3))) * slices[0].thickness
    return _slice_affine(slices[0].orientation, slices[0].position, slices[0].pixel_spacing, step)


def _check_monochrome1_inverted(sitk, folder, first):
    """ITK inverts MONOCHROME1 itself from 5.3 on (SimpleITK 2.3); before, such a series would come
    back with white low."""
    itk_version = (sitk.Version.ITKMajorVersion(), sitk.Version.ITKMinorVersion())
    if first.photometric == "MONOCHROME1" and itk_version < (5, 3):
        raise InputError(
            f"{folder}: a MONOCHROME1 series needs SimpleITK 2.3 or later, which inverts it so "
            f"that bright is high (installed: ITK {itk_version[0]}.{itk_version[1]}): "
            f"pip install -U SimpleITK"
        )


def read_dicom_series(source, header_only):
    sitk = simpleitk(f"the DICOM series {source.path}")
    slices = _dicom_series(source.path, sitk)
    _check_monochrome1_inverted(sitk, source.path, slices[0])
    affine = _series_affine(slices)
    shape = (int(slices[0].size[0]), int(slices[0].size[1]), len(slices))
    if header_only:
        return shape, affine
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([s.path for s in slices])  # read in our order: the k axis of the affine
    reader.SetOutputPixelType(sitk.sitkFloat32)  # each slice's own rescale slope and intercept applied
    volume = ijk_array(sitk.GetArrayFromImage(reader.Execute()), 3)
    return volume, affine


# ---------------------------------------------------------------- single DICOM files (pydicom)


def _displayed_bright(values, dataset):
    """MONOCHROME1 values flipped within their own range, so that high means bright."""
    if str(getattr(dataset, "PhotometricInterpretation", "")).upper() == "MONOCHROME1" and values.size:
        return values.max() + values.min() - values
    return values


def _dicom_values(dataset, where):
    """The (rows, cols[, samples]) pixel values after the modality rescale, MONOCHROME1 inverted."""
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputError(
            f"{where}: multi-frame DICOM ({frames} frames) is not supported; convert it to "
            f"NIfTI first (e.g. with dcm2niix)"
        )
    pixels = dataset.pixel_array.astype(np.float32)
    slope = float(getattr(dataset, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(dataset, "RescaleIntercept", 0.0) or 0.0)
    return _displayed_bright(pixels * slope + intercept, dataset)


def _picture_spacing(dataset):
    """(row spacing, column spacing) in mm of a projection image: PixelSpacing, else
    ImagerPixelSpacing (at the detector); None when absent or zero, as some CR files store."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = getattr(dataset, keyword, None)
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            return float(value[0]), float(value[1])
    return None


def _placed_slice_affine(dataset):
    """A CT/MR slice file placed like a one-slice series: its step is the slice thickness."""
    normal = np.cross(*np.reshape(np.asarray(dataset.ImageOrientationPatient, dtype=float), (2, 3)))
    thickness = float(getattr(dataset, "SliceThickness", 1.0) or 1.0)
    return _slice_affine(
        dataset.ImageOrientationPatient, dataset.ImagePositionPatient, dataset.PixelSpacing, normal * thickness
    )


def read_dicom_file(source, header_only):
    """One 2D DICOM image. With patient geometry (a CT/MR slice) it is placed like a one-slice
    series; without (radiographs) it becomes a picture with the file's pixel spacing."""
    pydicom = require_extra("pydicom", "pydicom", f"the DICOM file {source.path}")
    dataset = pydicom.dcmread(source.path, stop_before_pixels=header_only)
    if "PixelData" not in dataset and not header_only:
        raise InputError(f"{source.path}: DICOM file holds no image (no PixelData)")
    placed = "ImageOrientationPatient" in dataset and "ImagePositionPatient" in dataset and "PixelSpacing" in dataset
    if placed:
        affine = _placed_slice_affine(dataset)
        shape = (int(dataset.Columns), int(dataset.Rows), 1)
        if header_only:
            return shape, affine
        values = _dicom_values(dataset, source.path)
        if values.ndim != 2:
            raise InputError(
                f"{source.path}: a placed DICOM slice with {values.shape[2]} samples per pixel; expected grey"
            )
        return values.T[:, :, None], affine
    row_spacing, column_spacing = _picture_spacing(dataset) or (1.0, 1.0)
    affine = picture_affine(column_spacing, row_spacing)
    if header_only and int(getattr(dataset, "SamplesPerPixel", 1) or 1) == 1:
        return (int(dataset.Columns), int(dataset.Rows), 1), affine
    if header_only:  # whether colour is really grey (equal channels) shows only in the pixels
        dataset = pydicom.dcmread(source.path)
    # Colour (RGB, or YBR that pydicom's pixel_array turns into RGB) stays colour: prepare asks for --channel.
    volume = picture_volume(_dicom_values(dataset, source.path))
    return (volume.shape, affine) if header_only else (volume, affine)
