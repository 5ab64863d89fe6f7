"""Volume readers: every format comes back as (array indexed i, j, k[, t], 4x4 voxel-to-RAS affine).

The affine follows the NIfTI/nibabel convention: world coordinates in millimetres, +x Right,
+y Anterior, +z Superior. DICOM and MetaImage store LPS world coordinates, so their first two world
axes are negated here.

Formats and what they need:
    NIfTI (.nii, .nii.gz)        nibabel (always installed)
    MetaImage (.mhd/.raw, .mha)  nothing: a small pure-Python reader below (PROMISE12 ships these)
    DICOM series (a folder)      pip install pydicom
    HDF5 (.h5, .hdf5)            pip install h5py; arrays only, so the affine is the identity
                                 (1 mm voxels, axis order as stored), e.g. the LA set of UA-MT
                                 (<case>/mri_norm2.h5 with datasets `image` and `label`)
    pictures (.png, .jpg, .jpeg, .bmp, .tif, .tiff)
                                 nothing (Pillow): a 2D image such as a chest radiograph and its mask
                                 is a one-slice volume whose axial slice is the picture as stored;
                                 pictures hold no pixel size, so 1 mm unless prepare --spacing says
    DICOM file (.dcm, .dicom)    pip install pydicom; one 2D image (radiograph, or a single CT/MR
                                 slice). MONOCHROME1 (white is low, as in many CR/DX files) is
                                 inverted so that bright is high, like every other input

`read_header` returns only shape and affine and reads no pixel data where the format allows, so the
whole input can be checked before any case is processed.
"""
import os
import zlib
from dataclasses import dataclass
from typing import Optional

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
    key: Optional[str] = None

    def __str__(self):
        return f"{self.path}[{self.key}]" if self.key else self.path


def _require(module_name, pip_name, what):
    try:
        return __import__(module_name)
    except ImportError as error:
        raise MissingExtraError(
            f"reading {what} needs the optional package '{pip_name}': pip install {pip_name}") from error


PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LOSSY_EXTENSIONS = (".jpg", ".jpeg")
DICOM_FILE_EXTENSIONS = (".dcm", ".dicom")
FORMATS_WITHOUT_SPACING = ("hdf5", "picture")


def check_lossless(path, where, kind="label"):
    """Labels and masks must come from a lossless file: JPEG changes ids along every edge."""
    if path.lower().endswith(LOSSY_EXTENSIONS):
        raise InputError(f"{where}: a {kind} in JPEG, whose lossy compression changes ids at edges; use "
                         f"the PNG (or another lossless) version")


def volume_format(path):
    lower = path.lower()
    if os.path.isdir(path):
        return "dicom"
    if lower.endswith((".nii", ".nii.gz")):
        return "nifti"
    if lower.endswith((".mhd", ".mha")):
        return "metaimage"
    if lower.endswith((".h5", ".hdf5")):
        return "hdf5"
    if lower.endswith(PICTURE_EXTENSIONS):
        return "picture"
    if lower.endswith(DICOM_FILE_EXTENSIONS):
        return "dicom_file"
    raise InputError(f"{path}: unknown volume format (expected .nii, .nii.gz, .mhd, .mha, .h5, .hdf5, "
                     f"a DICOM folder or file, or a picture: {', '.join(PICTURE_EXTENSIONS)})")


def read_volume(source):
    """Returns (float or integer array, affine). Errors name the file."""
    return _dispatch(source, header_only=False)


def read_header(source):
    """Returns (shape, affine) without reading pixel data where the format allows."""
    return _dispatch(source, header_only=True)


def _dispatch(source, header_only):
    readers = {"nifti": _read_nifti, "metaimage": _read_metaimage, "dicom": _read_dicom,
               "hdf5": _read_hdf5, "picture": _read_picture, "dicom_file": _read_dicom_file}
    if not os.path.exists(source.path):
        raise InputError(f"{source.path}: file not found")
    reader = readers[volume_format(source.path)]
    try:
        return reader(source, header_only)
    except InputError:
        raise
    except Exception as error:  # any library failure on a broken file becomes a named error
        raise InputError(f"{source}: cannot read ({type(error).__name__}: {error})") from error


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


# ---------------------------------------------------------------- MetaImage (.mhd + .raw, .mha)

METAIMAGE_TYPES = {
    "MET_CHAR": np.int8, "MET_UCHAR": np.uint8, "MET_SHORT": np.int16, "MET_USHORT": np.uint16,
    "MET_INT": np.int32, "MET_UINT": np.uint32, "MET_LONG": np.int32, "MET_ULONG": np.uint32,
    "MET_LONG_LONG": np.int64, "MET_ULONG_LONG": np.uint64, "MET_FLOAT": np.float32,
    "MET_DOUBLE": np.float64,
}


def _parse_metaimage_header(path):
    """Key = value lines up to ElementDataFile, which MetaIO requires to be the last key.
    Returns the fields and the byte offset where a LOCAL (.mha) payload starts."""
    fields = {}
    with open(path, "rb") as handle:
        while True:
            line = handle.readline()
            if not line:
                raise InputError(f"{path}: MetaImage header has no ElementDataFile line")
            key, sep, value = line.decode("latin-1").partition("=")
            if not sep:
                continue
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                return fields, handle.tell()


def _metaimage_floats(fields, names, default):
    for name in names:
        if name in fields:
            return [float(v) for v in fields[name].split()]
    return default


def _metaimage_geometry(fields, ndim):
    spacing = _metaimage_floats(fields, ["ElementSpacing", "ElementSize"], [1.0] * ndim)[:3]
    origin = _metaimage_floats(fields, ["Offset", "Position", "Origin"], [0.0] * ndim)[:3]
    matrix = _metaimage_floats(fields, ["TransformMatrix", "Rotation", "Orientation"],
                               list(np.eye(ndim).ravel()))
    # MetaIO lists the direction of axis 0 first, then axis 1, ...: those are the matrix columns.
    direction = np.array(matrix, dtype=float).reshape(ndim, ndim).T
    affine_lps = np.eye(4)
    affine_lps[:ndim, :ndim] = direction[:3, :3] * np.array(spacing)[None, :]
    affine_lps[:ndim, 3] = origin
    return LPS_TO_RAS @ affine_lps


def _read_metaimage(source, header_only):
    path = source.path
    fields, payload_offset = _parse_metaimage_header(path)
    ndim = int(fields.get("NDims", "3"))
    sizes = [int(v) for v in fields["DimSize"].split()]
    channels = int(fields.get("ElementNumberOfChannels", "1"))
    if ndim not in (2, 3) or len(sizes) != ndim:
        raise InputError(f"{path}: MetaImage with NDims={ndim}, DimSize={sizes} is not a 2D/3D volume")
    shape = tuple(sizes) + ((channels,) if channels > 1 else ())
    affine = _metaimage_geometry(fields, ndim)
    if header_only:
        return shape, affine
    element_type = fields.get("ElementType", "")
    if element_type not in METAIMAGE_TYPES:
        raise InputError(f"{path}: unsupported MetaImage ElementType '{element_type}'")
    dtype = np.dtype(METAIMAGE_TYPES[element_type])
    big_endian = fields.get("BinaryDataByteOrderMSB", fields.get("ElementByteOrderMSB", "False"))
    dtype = dtype.newbyteorder(">" if big_endian.lower() == "true" else "<")
    payload = _read_metaimage_payload(path, fields, payload_offset)
    count = int(np.prod(shape))
    if len(payload) < count * dtype.itemsize:
        raise InputError(f"{path}: MetaImage data holds {len(payload)} bytes, "
                         f"{count * dtype.itemsize} expected for {shape} {element_type}")
    # Stored with axis 0 fastest (and channels fastest of all): reverse into i, j, k order.
    flat = np.frombuffer(payload, dtype=dtype, count=count)
    data = flat.reshape(tuple(reversed(sizes)) + ((channels,) if channels > 1 else ()))
    data = np.moveaxis(data, list(range(ndim)), list(reversed(range(ndim))))
    return np.ascontiguousarray(data.astype(dtype.newbyteorder("="))), affine


def _read_metaimage_payload(path, fields, payload_offset):
    data_file = fields["ElementDataFile"]
    if data_file.upper() == "LIST" or "%" in data_file:
        raise InputError(f"{path}: multi-file MetaImage data ({data_file}) is not supported")
    if data_file.upper() == "LOCAL":
        with open(path, "rb") as handle:
            handle.seek(payload_offset)
            payload = handle.read()
    else:
        raw_path = os.path.join(os.path.dirname(path), data_file)
        if not os.path.exists(raw_path):
            raise InputError(f"{path}: its data file {raw_path} is missing")
        with open(raw_path, "rb") as handle:
            header_size = int(fields.get("HeaderSize", "0"))
            if header_size > 0:
                handle.seek(header_size)
            payload = handle.read()
    if fields.get("CompressedData", "False").lower() == "true":
        payload = zlib.decompress(payload)
    return payload


# ---------------------------------------------------------------- DICOM series (one folder)

def _dicom_files(folder, pydicom):
    datasets = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        try:
            datasets.append(pydicom.dcmread(path, stop_before_pixels=True))
        except pydicom.errors.InvalidDicomError:
            continue  # series folders often hold notes or thumbnails next to the slices
    return datasets


def _read_dicom(source, header_only):
    pydicom = _require("pydicom", "pydicom", f"the DICOM series {source.path}")
    headers = _dicom_files(source.path, pydicom)
    if not headers:
        raise InputError(f"{source.path}: no DICOM files found")
    series = {str(getattr(h, "SeriesInstanceUID", "")) for h in headers}
    if len(series) > 1:
        raise InputError(f"{source.path}: holds {len(series)} DICOM series; give each its own folder")
    headers, affine = _dicom_slice_geometry(headers)
    shape = (int(headers[0].Columns), int(headers[0].Rows), len(headers))
    if header_only:
        return shape, affine
    volume = np.zeros(shape, dtype=np.float32)
    for k, header in enumerate(headers):
        volume[:, :, k] = _dicom_values(pydicom.dcmread(header.filename), header.filename, invert=False).T
    return _displayed_bright(volume, headers[0]), affine


def _dicom_slice_geometry(headers):
    """(headers sorted along the slice normal, voxel-to-RAS affine) of slices that carry
    ImageOrientationPatient and ImagePositionPatient."""
    row_cosine, column_cosine = (np.array(headers[0].ImageOrientationPatient, dtype=float)
                                 .reshape(2, 3))
    normal = np.cross(row_cosine, column_cosine)
    positions = [np.array(h.ImagePositionPatient, dtype=float) for h in headers]
    order = np.argsort([p @ normal for p in positions])
    headers = [headers[i] for i in order]
    positions = [positions[i] for i in order]
    row_spacing, column_spacing = (float(v) for v in headers[0].PixelSpacing)
    if len(headers) > 1:
        slice_step = (positions[-1] - positions[0]) / (len(headers) - 1)
    else:
        slice_step = normal * float(getattr(headers[0], "SliceThickness", 1.0) or 1.0)
    # Voxel (i, j, k) = (column, row, slice): i walks along the row cosine.
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cosine * column_spacing
    affine_lps[:3, 1] = column_cosine * row_spacing
    affine_lps[:3, 2] = slice_step
    affine_lps[:3, 3] = positions[0]
    return headers, LPS_TO_RAS @ affine_lps


def _displayed_bright(values, dataset):
    """MONOCHROME1 values flipped within their own range, so that high means bright."""
    if str(getattr(dataset, "PhotometricInterpretation", "")).upper() == "MONOCHROME1" and values.size:
        return values.max() + values.min() - values
    return values


def _dicom_values(dataset, where, invert=True):
    """The (rows, cols[, samples]) pixel values after the modality rescale; MONOCHROME1 inverted
    unless `invert` is off (a series is inverted as a whole)."""
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputError(f"{where}: multi-frame DICOM ({frames} frames) is not supported; convert it to "
                         f"NIfTI first (e.g. with dcm2niix)")
    pixels = dataset.pixel_array.astype(np.float32)
    slope = float(getattr(dataset, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(dataset, "RescaleIntercept", 0.0) or 0.0)
    values = pixels * slope + intercept
    return _displayed_bright(values, dataset) if invert else values


def _picture_spacing(dataset):
    """(row spacing, column spacing) in mm of a projection image: PixelSpacing, else
    ImagerPixelSpacing (at the detector); None when absent or zero, as some CR files store."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = getattr(dataset, keyword, None)
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            return float(value[0]), float(value[1])
    return None


def _read_dicom_file(source, header_only):
    """One 2D DICOM image. With patient geometry (a CT/MR slice) it is placed like a one-slice
    series; without (radiographs) it becomes a picture with the file's pixel spacing."""
    pydicom = _require("pydicom", "pydicom", f"the DICOM file {source.path}")
    dataset = pydicom.dcmread(source.path, stop_before_pixels=header_only)
    if "PixelData" not in dataset and not header_only:
        raise InputError(f"{source.path}: DICOM file holds no image (no PixelData)")
    placed = "ImageOrientationPatient" in dataset and "ImagePositionPatient" in dataset \
        and "PixelSpacing" in dataset
    if placed:
        _, affine = _dicom_slice_geometry([dataset])
        shape = (int(dataset.Columns), int(dataset.Rows), 1)
        if header_only:
            return shape, affine
        values = _dicom_values(dataset, source.path)
        if values.ndim != 2:
            raise InputError(f"{source.path}: a placed DICOM slice with {values.shape[2]} samples per "
                             f"pixel; expected grey")
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
            raise InputError(f"{source.path}: no dataset '{source.key}' "
                             f"(has: {', '.join(sorted(handle.keys()))})")
        dataset = handle[source.key]
        if header_only:
            return tuple(int(n) for n in dataset.shape), np.eye(4)
        return np.asarray(dataset[()]), np.eye(4)
