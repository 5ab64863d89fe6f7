"""Volume geometry: canonical (RAS) reorientation, slicing, in-plane resize, and the inverse of each.

Conventions, used by `prepare` and recorded in the manifest:
  * Volumes are first reoriented to the closest canonical orientation, RAS (voxel axes 0, 1, 2 point
    towards Right, Anterior, Superior), as nibabel.as_closest_canonical does: only axis flips and
    permutations, never resampling, so an oblique scan keeps its voxels.
  * A slice along axis a keeps the two other axes in order (u, v). It is shown with v upwards and u to
    the right: png = flipud(slice.T). Axial slices thus have anterior at the top and the patient's
    right on the image's right (neurological view); coronal and sagittal have superior at the top.
  * The (rows, cols) slice is brought to size x size either by stretching (fit "stretch", what the
    authors' 512x512 slices are) or by zero-padding to a centred square, then resizing (fit "pad").
    Intensities use area averaging when an axis shrinks and bilinear interpolation when it grows;
    labels and masks use nearest neighbour with pixel centres aligned.
"""

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from PIL import Image

from pixels import nearest_indices

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


def to_canonical(data, affine):
    """Reorients the first three axes to RAS. Returns (data, canonical affine)."""
    orientation = nib.orientations.io_orientation(affine)
    canonical = nib.orientations.apply_orientation(data, orientation)
    canonical_affine = affine @ nib.orientations.inv_ornt_aff(orientation, data.shape[:3])
    return np.ascontiguousarray(canonical), canonical_affine


def from_canonical(data, original_affine):
    """Undoes `to_canonical`: a canonical array back to the original voxel order."""
    orientation = nib.orientations.io_orientation(original_affine)
    undo = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), orientation)
    return nib.orientations.apply_orientation(data, undo)


def axis_codes(affine):
    return "".join(nib.orientations.aff2axcodes(affine))


def voxel_sizes(affine):
    return [float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))]


def grids_match(shape_a, affine_a, shape_b, affine_b, tolerance):
    return tuple(shape_a[:3]) == tuple(shape_b[:3]) and np.allclose(affine_a, affine_b, atol=tolerance, rtol=0)


def grid_difference(shape_a, affine_a, shape_b, affine_b) -> str:
    """How two voxel grids differ, for the messages that refuse a pair whose grids do not match."""
    difference = np.abs(np.asarray(affine_a) - np.asarray(affine_b)).max()
    return f"shapes {tuple(shape_a)} vs {tuple(shape_b)}; largest affine difference {difference:.4g} mm"


def slice_for_display(volume, axis, index):
    """The (rows, cols) picture of slice `index` along `axis` (see module docstring)."""
    return np.flipud(np.take(volume, index, axis=axis).T)


def display_to_slice(picture):
    """Inverse of `slice_for_display`: rows/cols back to the volume's in-plane (u, v) order."""
    return np.flipud(picture).T


# ---------------------------------------------------------------- square fitting and resizing


@dataclass(frozen=True)
class ResizePlan:
    """How a (rows, cols) slice becomes size x size: zero padding (top, bottom, left, right) first, then a
    resize from the padded shape. Recorded per case (the manifest's "resize") so predictions can be put
    back; to_json gives the recorded form, which readers of older manifests read as a plain dict."""

    fit: str
    slice_shape: tuple[int, int]
    padding: tuple[int, int, int, int]
    resized_from: tuple[int, int]
    size: tuple[int, int]

    def to_json(self) -> dict:
        return {
            "fit": self.fit,
            "slice_shape": list(self.slice_shape),
            "padding": list(self.padding),
            "resized_from": list(self.resized_from),
            "size": list(self.size),
        }

    @classmethod
    def from_json(cls, record: dict) -> "ResizePlan":
        return cls(
            record["fit"],
            *(tuple(int(n) for n in record[key]) for key in ("slice_shape", "padding", "resized_from", "size")),
        )


def fit_plan(rows, cols, size, fit) -> ResizePlan:
    """The plan that brings a (rows, cols) slice to size x size by `fit` ("stretch" or "pad")."""
    if fit == "pad":
        side = max(rows, cols)
        top, left = (side - rows) // 2, (side - cols) // 2
        padding = (top, side - rows - top, left, side - cols - left)
    elif fit == "stretch":
        padding = (0, 0, 0, 0)
    else:
        raise ValueError(f"unknown fit '{fit}'")
    padded = (rows + padding[0] + padding[1], cols + padding[2] + padding[3])
    return ResizePlan(
        fit,
        (int(rows), int(cols)),
        tuple(int(n) for n in padding),
        tuple(int(n) for n in padded),
        (int(size), int(size)),
    )


def _pad(picture, padding):
    top, bottom, left, right = padding
    return np.pad(picture, ((top, bottom), (left, right)))


def _unpad(picture, plan):
    top, bottom, left, right = plan.padding
    padded_rows, padded_cols = plan.resized_from
    return picture[top : padded_rows - bottom, left : padded_cols - right]


def _resize_axis(picture, length, axis):
    """One axis at a time, so each can shrink (area) or grow (bilinear) on its own."""
    rows, cols = picture.shape
    current = picture.shape[axis]
    if current == length:
        return picture
    method = Image.Resampling.BOX if length < current else Image.Resampling.BILINEAR
    target = (cols, length) if axis == 0 else (length, rows)
    return np.asarray(Image.fromarray(picture, mode="F").resize(target, method))


def resize_intensity(picture, plan: ResizePlan):
    """A float picture in [0, 1] -> size x size float picture."""
    picture = _pad(picture.astype(np.float32), plan.padding)
    rows, cols = plan.size
    return _resize_axis(_resize_axis(picture, rows, 0), cols, 1)


def resize_nearest(picture, plan: ResizePlan):
    """Integer picture (labels, masks) -> size x size, ids unchanged."""
    picture = _pad(picture, plan.padding)
    rows, cols = plan.size
    return picture[np.ix_(nearest_indices(picture.shape[0], rows), nearest_indices(picture.shape[1], cols))]


def unresize_nearest(picture, plan: ResizePlan):
    """size x size integer picture (e.g. a predicted label) -> the slice's (rows, cols)."""
    padded_rows, padded_cols = plan.resized_from
    picture = picture[
        np.ix_(nearest_indices(picture.shape[0], padded_rows), nearest_indices(picture.shape[1], padded_cols))
    ]
    return _unpad(picture, plan)


def unresize_intensity(picture, plan: ResizePlan):
    """size x size float picture -> the slice's (rows, cols), the way `resize_intensity` went."""
    padded_rows, padded_cols = plan.resized_from
    picture = _resize_axis(_resize_axis(picture.astype(np.float32), padded_rows, 0), padded_cols, 1)
    return _unpad(picture, plan)
