"""Volume readers: every format comes back as (array indexed i, j, k[, t], 4x4 voxel-to-RAS affine).

The affine follows the NIfTI/nibabel convention: world coordinates in millimetres, +x Right,
+y Anterior, +z Superior. DICOM, MetaImage and NRRD (as SimpleITK reports them) use LPS world
coordinates, so their first two world axes are negated here.

Formats and what they need:
    NIfTI (.nii, .nii.gz)        nibabel (always installed)
    MetaImage (.mhd/.raw, .mha)  pip install SimpleITK (PROMISE12 ships these)
    NRRD (.nrrd, .nhdr)          pip install SimpleITK (3D Slicer saves volumes and segmentations so)
    DICOM series (a folder)      pip install SimpleITK; one file per slice, one series per folder.
                                 Slices are ordered along the slice normal, and a folder with two
                                 series, two slices at one position or uneven slice steps (a missing
                                 slice) is refused rather than read onto a wrong grid
    HDF5 (.h5, .hdf5)            pip install h5py; arrays only, so the affine is the identity
                                 (1 mm voxels, axis order as stored), e.g. the LA set of UA-MT
                                 (<case>/mri_norm2.h5 with datasets `image` and `label`)
    pictures (.png, .jpg, .jpeg, .bmp, .tif, .tiff)
                                 nothing (Pillow): a 2D image such as a chest radiograph and its mask
                                 is a one-slice volume whose axial slice is the picture as stored;
                                 pictures hold no pixel size, so 1 mm unless prepare --spacing says
    DICOM file (.dcm, .dicom)    pip install pydicom; one 2D image (radiograph, or a single CT/MR
                                 slice). MONOCHROME1 (white is low, as in many CR/DX files) is
                                 inverted within the image's own value range so that bright is high,
                                 like every other input

Single DICOM files stay with pydicom: SimpleITK (GDCM, ITK 5.3 on) inverts MONOCHROME1 against the
stored bit range (2**BitsStored - 1 minus the value), older ITK not at all, so its values depend on the
installed version and differ from the within-range inversion that prepared radiographs rely on;
pydicom hands back the stored values and the inversion is done here. A MONOCHROME1 series (rare:
CT and MR are MONOCHROME2) comes back as SimpleITK inverts it: bright is high, offset by the bit range.

Multi-component images keep their components on a last axis (a colour MetaImage or NRRD is
(i, j, k, 3)); `prepare --channel` picks one. Colour pictures and DICOM files do the same; colour
saved from grey (all components equal) collapses to grey.

`read_header` returns only shape and affine and reads no pixel data where the format allows (for a
DICOM series: each file's header), so the whole input can be checked before any case is processed.
"""

import os
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from util.cli import UsageError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class InputError(UsageError):
    """Bad input data; the message names the file or case and says what is wrong. A UsageError, so
    every entry point reports it as `error: <message>` without a traceback (util/cli.py)."""


class MissingExtraError(InputError):
    """An optional reader's package is not installed."""


@dataclass(frozen=True)
class Source:
    """One volume on disk. `key` names the array inside an HDF5 file."""

    path: str
    key: str | None = None

    def __str__(self):
        return f"{self.path}[{self.key}]" if self.key else self.path


def _require(module_name, pip_name, what):
    try:
        return __import__(module_name)
    except ImportError as error:
        raise MissingExtraError(
            f"reading {what} needs the optional package '{pip_name}': pip install {pip_name}"
        ) from error


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
        "metaimage": _read_itk_file,
        "nrrd": _read_itk_file,
        "dicom": _read_dicom,
        "hdf5": _read_hdf5,
        "picture": _read_picture,
        "dicom_file": _read_dicom_file,
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


# ---------------------------------------------------------------- SimpleITK: MetaImage, NRRD

ITK_IMAGE_IOS = {"metaimage": ("MetaImageIO", "MetaImage"), "nrrd": ("NrrdImageIO", "NRRD")}


def _simpleitk(what):
    return _require("SimpleITK", "SimpleITK", what)


def _itk_affine(spacing, origin, direction):
    """Voxel-to-RAS affine of an ITK image: direction is row-major with the axis directions as its
    columns, in LPS. Images of more than three dimensions place their first three."""
    ndim = len(spacing)
    spatial = min(ndim, 3)
    direction = np.array(direction, dtype=float).reshape(ndim, ndim)[:spatial, :spatial]
    affine_lps = np.eye(4)
    affine_lps[:spatial, :spatial] = direction * np.array(spacing[:spatial])[None, :]
    affine_lps[:spatial, 3] = origin[:spatial]
    return LPS_TO_RAS @ affine_lps


def _itk_shape(size, components, path):
    """(i, j, k[, t]) from ITK's size (x fastest), plus a last axis for vector components."""
    if not 2 <= len(size) <= (3 if components > 1 else 4):
        raise InputError(
            f"{path}: a {len(size)}D image with {components} components per voxel; expected a "
            f"2D, 3D or 4D image (2D or 3D when it has several components)"
        )
    return tuple(int(n) for n in size) + ((int(components),) if components > 1 else ())


def _ijk_array(array, ndim):
    """GetArrayFromImage indexes (z, y, x[, component]): reverse the image axes, components stay last."""
    order = tuple(reversed(range(ndim))) + tuple(range(ndim, array.ndim))
    return np.ascontiguousarray(array.transpose(order))


def _read_itk_file(source, header_only):
    """A MetaImage or NRRD file, each through its own ITK reader (the header alone for read_header)."""
    image_io, name = ITK_IMAGE_IOS[volume_format(source.path)]
    sitk = _simpleitk(f"the {name} file {source.path}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(source.path)
    reader.SetImageIO(image_io)
    reader.ReadImageInformation()
    shape = _itk_shape(reader.GetSize(), reader.GetNumberOfComponents(), source.path)
    affine = _itk_affine(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    if header_only:
        return shape, affine
    image = reader.Execute()
    return _ijk_array(sitk.GetArrayFromImage(image), image.GetDimension()), affine


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


def _read_dicom(source, header_only):
    sitk = _simpleitk(f"the DICOM series {source.path}")
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
    volume = _ijk_array(sitk.GetArrayFromImage(reader.Execute()), 3)
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


def _read_dicom_file(source, header_only):
    """One 2D DICOM image. With patient geometry (a CT/MR slice) it is placed like a one-slice
    series; without (radiographs) it becomes a picture with the file's pixel spacing."""
    pydicom = _require("pydicom", "pydicom", f"the DICOM file {source.path}")
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
    affine = _picture_affine(column_spacing, row_spacing)
    if header_only and int(getattr(dataset, "SamplesPerPixel", 1) or 1) == 1:
        return (int(dataset.Columns), int(dataset.Rows), 1), affine
    if header_only:  # whether colour is really grey (equal channels) shows only in the pixels
        dataset = pydicom.dcmread(source.path)
    # Colour (RGB, or YBR that pydicom's pixel_array turns into RGB) stays colour: prepare asks for --channel.
    volume = _picture_volume(_dicom_values(dataset, source.path))
    return (volume.shape, affine) if header_only else (volume, affine)


# ---------------------------------------------------------------- pictures (PNG, JPEG, BMP, TIFF)


def _picture_affine(column_spacing=1.0, row_spacing=1.0):
    """i runs along columns to the right, j along rows upwards: the axial view of the volume is the
    picture the right way up (see geometry.slice_for_display)."""
    return np.diag([column_spacing, row_spacing, 1.0, 1.0])


def _picture_volume(picture):
    """(rows, cols[, channels]) -> (cols, rows, 1[, channels]); channels that are all equal (a grey
    image saved as RGB) collapse to one, an alpha channel is dropped. True colour stays: prepare
    then asks for --channel."""
    if picture.ndim == 3:
        if picture.shape[2] in (2, 4):
            picture = picture[..., :-1]
        if all(np.array_equal(picture[..., 0], picture[..., c]) for c in range(1, picture.shape[2])):
            picture = picture[..., 0]
    volume = np.flipud(picture).swapaxes(0, 1)[:, :, None]
    return np.ascontiguousarray(volume)


def _read_picture(source, header_only):
    """A 2D picture. Palette pictures give their palette indices (label masks saved that way keep
    their class ids); 1-bit pictures give 0/1; 16-bit grey stays 16-bit."""
    from PIL import Image

    with Image.open(source.path) as picture:
        if picture.mode not in ("1", "L", "LA", "P", "I", "I;16", "I;16B", "I;16L", "F", "RGB", "RGBA"):
            picture = picture.convert("RGB")
        elif picture.mode == "1":
            picture = picture.convert("L").point(lambda value: 1 if value else 0)
        array = np.asarray(picture)
    volume = _picture_volume(array.astype(array.dtype.newbyteorder("=")))
    return (volume.shape, _picture_affine()) if header_only else (volume, _picture_affine())


# ---------------------------------------------------------------- HDF5 (arrays only)


def _read_hdf5(source, header_only):
    h5py = _require("h5py", "h5py", f"the HDF5 file {source.path}")
    with h5py.File(source.path, "r") as handle:
        if source.key not in handle:
            raise InputError(f"{source.path}: no dataset '{source.key}' (has: {', '.join(sorted(handle.keys()))})")
        dataset = handle[source.key]
        if header_only:
            return tuple(int(n) for n in dataset.shape), np.eye(4)
        return np.asarray(dataset[()]), np.eye(4)
