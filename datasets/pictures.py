"""2D pictures (PNG, JPEG, BMP, TIFF) as one-slice volumes, through Pillow; datasets/dicom.py places
radiographs (DICOM files without patient geometry) the same way.

Called through datasets.readers (read_volume, read_header), which names the formats and their needs.
"""

import numpy as np


def picture_affine(column_spacing=1.0, row_spacing=1.0):
    """i runs along columns to the right, j along rows upwards: the axial view of the volume is the
    picture the right way up (see geometry.slice_for_display)."""
    return np.diag([column_spacing, row_spacing, 1.0, 1.0])


def picture_volume(picture):
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


def read_picture(source, header_only):
    """A 2D picture. Palette pictures give their palette indices (label masks saved that way keep
    their class ids); 1-bit pictures give 0/1; 16-bit grey stays 16-bit."""
    from PIL import Image

    with Image.open(source.path) as picture:
        if picture.mode not in ("1", "L", "LA", "P", "I", "I;16", "I;16B", "I;16L", "F", "RGB", "RGBA"):
            picture = picture.convert("RGB")
        elif picture.mode == "1":
            picture = picture.convert("L").point(lambda value: 1 if value else 0)
        array = np.asarray(picture)
    volume = picture_volume(array.astype(array.dtype.newbyteorder("=")))
    return (volume.shape, picture_affine()) if header_only else (volume, picture_affine())
