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

`read_header` returns only shape and affine and reads no pixel data where the format allows, so the
whole input can be checked before any case is processed.
"""
import os
import zlib
from dataclasses import dataclass
from typing import Optional

import nibabel as nib
import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class InputError(Exception):
    """Bad input data; the message names the file or case and says what is wrong."""


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
    raise InputError(f"{path}: unknown volume format (expected .nii, .nii.gz, .mhd, .mha, .h5, "
                     f".hdf5 or a DICOM folder)")


def read_volume(source):
    """Returns (float or integer array, affine). Errors name the file."""
    return _dispatch(source, header_only=False)


def read_header(source):
    """Returns (shape, affine) without reading pixel data where the format allows."""
    return _dispatch(source, header_only=True)


def _dispatch(source, header_only):
    readers = {"nifti": _read_nifti, "metaimage": _read_metaimage, "dicom": _read_dicom,
               "hdf5": _read_hdf5}
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
    affine = LPS_TO_RAS @ affine_lps
    shape = (int(headers[0].Columns), int(headers[0].Rows), len(headers))
    if header_only:
        return shape, affine
    volume = np.zeros(shape, dtype=np.float32)
    for k, header in enumerate(headers):
        pixels = pydicom.dcmread(header.filename).pixel_array.astype(np.float32)
        slope = float(getattr(header, "RescaleSlope", 1.0))
        intercept = float(getattr(header, "RescaleIntercept", 0.0))
        volume[:, :, k] = (pixels * slope + intercept).T
    return volume, affine


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
