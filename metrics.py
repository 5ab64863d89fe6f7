"""Evaluation metrics, computed with MONAI's implementations, with the empty-label conventions stated.

Segmentation, per case (3D volume or 2D image) and per foreground class, on the case's own grid: slices
at their indices in the volume, those not given counting as background (segmentation_case_scores):
    Dice   1 for a perfect match; a class absent from both the ground truth and the prediction is not
           scored (NaN, left out of means); absent from the ground truth but predicted: 0.
    HD95   95th percentile of the symmetric surface distance, in mm with the case's voxel spacing; NaN
           when the class is absent from the ground truth or from the prediction (reported as a count
           of such cases, never averaged as 0 or infinity).
Image tasks, per case on the 0..255 scale of the prepared slices:
    PSNR   from the case's mean squared error; an exact prediction gives infinity, which means take
           as PSNR_CAP (100 dB, beyond any 8-bit error: one grey level off everywhere is 48 dB).
    SSIM   2D SSIM (Gaussian window 11, sigma 1.5) per slice, averaged over the case's slices.
    region PSNR and SSIM may be restricted to a mask (inpainting: the removed region); SSIM there is
           the mean of the SSIM map inside the mask.
"""

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.metrics.regression import compute_ssim_and_cs

# MONAI's Hausdorff code passes a deprecated argument to itself; the warning tells users nothing.
warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)

PSNR_CAP = 100.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _one_hot(labels: np.ndarray, class_ids: Sequence[int]) -> torch.Tensor:
    """(spatial...) ids -> (1, C, spatial...) bool, one channel per class id."""
    labels = torch.as_tensor(np.asarray(labels).astype(np.int64))
    return torch.stack([labels == c for c in class_ids])[None]


def dice_per_class(pred: np.ndarray, truth: np.ndarray, class_ids: Sequence[int]) -> dict[int, float]:
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {truth.shape} differ in shape")
    y_pred, y = _one_hot(pred, class_ids), _one_hot(truth, class_ids)
    scores = compute_dice(y_pred.float(), y.float(), include_background=True, ignore_empty=False)[0]
    absent_in_both = ~(y_pred.flatten(2).any(-1) | y.flatten(2).any(-1))[0]
    scores[absent_in_both] = float("nan")
    return {int(c): float(s) for c, s in zip(class_ids, scores)}


def hd95_per_class(
    pred: np.ndarray, truth: np.ndarray, class_ids: Sequence[int], spacing: Sequence[float] | None = None
) -> dict[int, float]:
    """HD95 in the units of `spacing` (mm), NaN where a side is empty.

    pred/truth are 2D or 3D; `spacing` has one entry per axis of them.
    """
    y_pred, y = _one_hot(pred, class_ids), _one_hot(truth, class_ids)
    result = {}
    for i, c in enumerate(class_ids):
        if not y_pred[0, i].any() or not y[0, i].any():
            result[int(c)] = float("nan")
            continue
        distance = compute_hausdorff_distance(
            y_pred[:, i : i + 1].float(),
            y[:, i : i + 1].float(),
            include_background=True,
            percentile=95,
            spacing=[float(s) for s in spacing] if spacing is not None else None,
        )
        result[int(c)] = float(distance.item())
    return result


def segmentation_case_scores(
    predictions: Mapping[int, np.ndarray],
    truths: Mapping[int, np.ndarray],
    num_slices: int,
    class_ids: Sequence[int],
    spacing: Sequence[float],
) -> dict:
    """Dice, HD95 and mean Dice of one case, its 2D class maps placed at their slice indices in the volume.

    predictions/truths map a slice index along the case's slice axis (0..num_slices-1) to a (rows, cols)
    class map; spacing is (slice, row, col) in mm. A slice given on one side only, or on neither, is
    background on the other: preparation drops only slices without foreground, so for the truth this is
    exact, and for the prediction it means nothing was predicted there. A volume of one slice is a 2D
    image and is scored in-plane: as a one-slice 3D stack its whole object would count as surface.
    """
    if len(spacing) != 3:
        raise ValueError(f"spacing must be (slice, row, col), got {tuple(spacing)}")
    pred, truth = _slice_span(predictions, truths, num_slices)
    if num_slices == 1:
        pred, truth, spacing = pred[0], truth[0], spacing[1:]
    dice = dice_per_class(pred, truth, class_ids)
    hd95 = hd95_per_class(pred, truth, class_ids, spacing=spacing)
    return {"dice": dice, "hd95": hd95, "mean_dice": nanmean(dice.values())}


def _slice_span(
    predictions: Mapping[int, np.ndarray], truths: Mapping[int, np.ndarray], num_slices: int
) -> tuple[np.ndarray, np.ndarray]:
    """Prediction and truth stacks from the first to the last given slice index, gaps as background.

    Slices outside that span are background on both sides, so leaving them out changes neither Dice
    (voxel counts) nor HD95 (MONAI crops to the foreground and treats beyond the array as background).
    """
    indices = sorted({*predictions, *truths})
    if not indices:
        raise ValueError("a case needs at least one slice")
    if indices[0] < 0 or indices[-1] >= num_slices:
        raise ValueError(f"slice indices {indices[0]}..{indices[-1]} fall outside the volume's {num_slices} slices")
    class_maps = [*predictions.values(), *truths.values()]
    shapes = {np.shape(class_map) for class_map in class_maps}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"slices must be 2D class maps of one shape, got shapes {sorted(shapes)}")
    first, span_length = indices[0], indices[-1] - indices[0] + 1
    span_shape, dtype = (span_length, *shapes.pop()), np.result_type(*class_maps)
    return (_place_slices(predictions, first, span_shape, dtype), _place_slices(truths, first, span_shape, dtype))


def _place_slices(
    slices: Mapping[int, np.ndarray], first: int, span_shape: tuple[int, ...], dtype: np.dtype
) -> np.ndarray:
    """Background stack of span_shape with each slice written at its index, counted from `first`."""
    stack = np.zeros(span_shape, dtype)
    for index, class_map in slices.items():
        stack[index - first] = class_map
    return stack


def psnr(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None, data_range: float = 255.0) -> float:
    diff = np.asarray(pred, np.float64) - np.asarray(truth, np.float64)
    if mask is not None:
        if not mask.any():
            return float("nan")
        diff = diff[mask.astype(bool)]
    mse = float(np.mean(diff**2))
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def capped(value: float) -> float:
    """PSNR for averaging: infinity (exact prediction) becomes PSNR_CAP."""
    return min(value, PSNR_CAP)


def ssim(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None, data_range: float = 255.0) -> float:
    """Mean 2D SSIM over slices: pred/truth (rows, cols) or (slices, rows, cols)."""
    pred = np.asarray(pred, np.float32)
    truth = np.asarray(truth, np.float32)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {truth.shape} differ in shape")
    if pred.ndim == 2:
        pred, truth = pred[None], truth[None]
        mask = None if mask is None else mask[None]
    if min(pred.shape[1:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs slices of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {pred.shape[1:]}")
    ssim_map, _ = compute_ssim_and_cs(
        torch.from_numpy(pred)[:, None],
        torch.from_numpy(truth)[:, None],
        spatial_dims=2,
        kernel_size=[SSIM_WINDOW] * 2,
        kernel_sigma=[SSIM_SIGMA] * 2,
        data_range=data_range,
    )
    ssim_map = ssim_map[:, 0].numpy()  # (slices, rows - 10, cols - 10): valid window positions only
    if mask is None:
        return float(ssim_map.reshape(len(ssim_map), -1).mean(1).mean())
    margin = SSIM_WINDOW // 2
    inner = np.asarray(mask, bool)[:, margin:-margin, margin:-margin]
    return float(ssim_map[inner].mean()) if inner.any() else float("nan")


def nanmean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")
