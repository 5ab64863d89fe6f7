"""Pixels between numpy slices and the model's tensors: ImageNet normalisation and its inverse,
resizing of a slice picture, the size a slice is met at, and the checks on slices handed to inference.

Slices are 8-bit grey (rows, cols) pictures; targets drawn from labels are (3, rows, cols) uint8. The
model takes (3, H, W) float canvases normalised with ImageNet's mean and std on the 0..255 scale, grey
replicated to three channels, as MAE and the authors' code do.
"""

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

MEAN_255 = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1) * 255
STD_255 = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1) * 255


def to_normalised_tensor(pictures: Sequence[np.ndarray]) -> torch.Tensor:
    """Pictures (rows, cols) grey or (3, rows, cols) colour, stacked top to bottom -> (3, H, W) float,
    ImageNet-normalised; grey is replicated to 3 channels."""
    parts = [torch.tensor(p) for p in pictures]  # a copy: decoded PNG buffers are read-only
    parts = [p.expand(3, *p.shape) if p.ndim == 2 else p for p in parts]
    return normalise(torch.cat(parts, dim=1))


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """8-bit pixels (..., 1 or 3, H, W) -> ImageNet-normalised (..., 3, H, W) float32, grey replicated.
    The one order of operations (float32, minus mean x 255, divided by std x 255), wherever it runs: the
    data workers of inference and the training device give the same values bit for bit."""
    device = pixels.device
    shape = (*pixels.shape[:-3], 3, *pixels.shape[-2:])
    floats = pixels.expand(shape).to(torch.float32, memory_format=torch.contiguous_format)
    return floats.sub_(MEAN_255.to(device)).div_(STD_255.to(device))


def denormalise(canvas: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) normalised values back to the 0..255 pixel scale (not clamped)."""
    return canvas * STD_255.to(canvas) + MEAN_255.to(canvas)


def nearest_indices(source_length: int, target_length: int) -> np.ndarray:
    """For each of target_length pixels, the source pixel whose extent holds its centre (centres aligned)."""
    centres = (np.arange(target_length) + 0.5) * source_length / target_length
    return np.minimum(np.floor(centres).astype(int), source_length - 1)


def resize_picture(array: np.ndarray, size: tuple[int, int], is_label: bool) -> np.ndarray:
    """A 2D picture to size (rows, cols): nearest neighbour for labels, bilinear for intensities.
    Labels are gathered by index rather than by Pillow, whose NEAREST picks other pixels for 8- and
    32-bit arrays than for 16-bit ones (e.g. 512 -> 448), so a label's type never changes its pixels."""
    if array.shape[:2] == tuple(size):
        return array
    if is_label:
        return array[np.ix_(nearest_indices(array.shape[0], size[0]), nearest_indices(array.shape[1], size[1]))]
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), resample=Image.BILINEAR))


def training_scale_size(shape: Sequence[int], crop: Sequence[int], scale: float = 1.0) -> tuple[int, int]:
    """The size a (rows, cols) slice is brought to before a crop of `crop` is cut from it: scaled by
    `scale`, and at least enough on both sides for the crop to fit. Training (datasets.canvas.Augment)
    and inference at the training scale (inference.Predictor) share it, so both see objects at the
    same size."""
    rows, cols = shape
    scale = max(scale, crop[0] / rows, crop[1] / cols)
    if scale == 1.0:
        return rows, cols
    return max(crop[0], round(rows * scale)), max(crop[1], round(cols * scale))


def as_grey_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """A slice as the 8-bit grey picture the model reads; RGB(A) is averaged, floats must be 0..255."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        image = image[..., :3].mean(axis=2)
    if image.ndim != 2:
        raise ValueError(f"{name}: expected a 2D grey slice, got shape {image.shape}")
    if image.dtype != np.uint8:
        if image.min() < 0 or image.max() > 255:
            raise ValueError(
                f"{name}: intensities must be 0..255 like the prepared slices, got {image.min()}..{image.max()}"
            )
        image = image.round().astype(np.uint8)
    return image


def as_label(label: np.ndarray, name: str = "context label") -> np.ndarray:
    """Class ids as an integer array Pillow can resize (uint8, uint16 or int32)."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{name}: expected a 2D map of class ids, got shape {label.shape}")
    if label.dtype in (np.uint8, np.uint16):
        return label
    if not np.all(np.mod(label, 1) == 0) or label.min() < 0 or label.max() >= 2**31:
        raise ValueError(f"{name}: class ids must be non-negative integers")
    return label.astype(np.int32)
