"""MetaImage (.mhd/.raw, .mha) and NRRD (.nrrd, .nhdr) files through SimpleITK, and the ITK
conventions that datasets/dicom.py's series reader shares: LPS world coordinates turned into RAS,
and arrays turned from ITK's (z, y, x) order into (i, j, k).

Called through datasets.readers (read_volume, read_header), which names the formats and their needs.
"""

import numpy as np

from .input_errors import InputError, require_extra

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def simpleitk(what):
    """The SimpleITK module; `what` names the file that needs it when it is not installed."""
    return require_extra("SimpleITK", "SimpleITK", what)


def itk_affine(spacing, origin, direction):
    """Voxel-to-RAS affine of an ITK image: direction is row-major with the axis directions as its
    columns, in LPS. Images of more than three dimensions place their first three."""
    ndim = len(spacing)
    spatial = min(ndim, 3)
    direction = np.array(direction, dtype=float).reshape(ndim, ndim)[:spatial, :spatial]
    affine_lps = np.eye(4)
    affine_lps[:spatial, :spatial] = direction * np.array(spacing[:spatial])[None, :]
    affine_lps[:spatial, 3] = origin[:spatial]
    return LPS_TO_RAS @ affine_lps


def itk_shape(size, components, path):
    """(i, j, k[, t]) from ITK's size (x fastest), plus a last axis for vector components."""
    if not 2 <= len(size) <= (3 if components > 1 else 4):
        raise InputError(
            f"{path}: a {len(size)}D image with {components} components per voxel; expected a "
            f"2D, 3D or 4D image (2D or 3D when it has several components)"
        )
    return tuple(int(n) for n in size) + ((int(components),) if components > 1 else ())


def ijk_array(array, ndim):
    """GetArrayFromImage indexes (z, y, x[, component]): reverse the image axes, components stay last."""
    order = tuple(reversed(range(ndim))) + tuple(range(ndim, array.ndim))
    return np.ascontiguousarray(array.transpose(order))


def read_metaimage(source, header_only):
    return _read_itk_file(source, header_only, "MetaImageIO", "MetaImage")


def read_nrrd(source, header_only):
    return _read_itk_file(source, header_only, "NrrdImageIO", "NRRD")


def _read_itk_file(source, header_only, image_io, name):
    """A file through the ITK reader of its own format (the header alone for read_header)."""
    sitk = simpleitk(f"the {name} file {source.path}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(source.path)
    reader.SetImageIO(image_io)
    reader.ReadImageInformation()
    shape = itk_shape(reader.GetSize(), reader.GetNumberOfComponents(), source.path)
    affine = itk_affine(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    if header_only:
        return shape, affine
    image = reader.Execute()
    return ijk_array(sitk.GetArrayFromImage(image), image.GetDimension()), affine
