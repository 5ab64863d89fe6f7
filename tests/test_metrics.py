"""metrics.segmentation_case_scores against MONAI called directly on the case's full volume (or 2D image)."""

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot

import metrics

SIZE = 64


def monai_one_hot(labels: np.ndarray, class_ids) -> torch.Tensor:
    """(spatial...) class ids -> (1, max id + 1, spatial...), so channel c holds class c."""
    labels = torch.as_tensor(np.asarray(labels, np.int64))[None, None]
    return one_hot(labels, num_classes=max(class_ids) + 1, dim=1)


def monai_dice(pred: np.ndarray, truth: np.ndarray, class_ids) -> dict:
    scores = compute_dice(
        monai_one_hot(pred, class_ids), monai_one_hot(truth, class_ids), include_background=True, ignore_empty=False
    )[0]
    return {c: float(scores[c]) for c in class_ids}


def monai_hd95(pred: np.ndarray, truth: np.ndarray, class_ids, spacing) -> dict:
    distances = compute_hausdorff_distance(
        monai_one_hot(pred, class_ids),
        monai_one_hot(truth, class_ids),
        include_background=True,
        percentile=95,
        spacing=list(spacing),
    )[0]
    return {c: float(distances[c]) for c in class_ids}


def full_volume(slices: dict, num_slices: int) -> np.ndarray:
    """The case as the whole volume: every slice not given is background."""
    volume = np.zeros((num_slices, SIZE, SIZE), np.uint8)
    for index, class_map in slices.items():
        volume[index] = class_map
    return volume


def disk(radius: float, label: int = 1, centre=(SIZE // 2, SIZE // 2)) -> np.ndarray:
    rows, cols = np.mgrid[:SIZE, :SIZE]
    inside = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2
    return (inside * label).astype(np.uint8)


def box(top: int, left: int, height: int, width: int, label: int = 1) -> np.ndarray:
    class_map = np.zeros((SIZE, SIZE), np.uint8)
    class_map[top : top + height, left : left + width] = label
    return class_map


def assert_scores_match_monai(scores: dict, pred: np.ndarray, truth: np.ndarray, class_ids, spacing):
    """For classes present in both prediction and truth, where MONAI's values are our convention."""
    expected_dice = monai_dice(pred, truth, class_ids)
    expected_hd95 = monai_hd95(pred, truth, class_ids, spacing)
    for c in class_ids:
        assert scores["dice"][c] == pytest.approx(expected_dice[c], abs=1e-6)
        assert scores["hd95"][c] == pytest.approx(expected_hd95[c], abs=1e-5)
    assert scores["mean_dice"] == pytest.approx(np.mean(list(expected_dice.values())), abs=1e-6)


def test_one_slice_case_is_scored_in_2d():
    pred, truth = disk(17), disk(20)
    scores = metrics.segmentation_case_scores(
        {0: pred}, {0: truth}, num_slices=1, class_ids=[1], spacing=(1.0, 1.0, 1.0)
    )
    assert_scores_match_monai(scores, pred, truth, [1], spacing=(1.0, 1.0))
    # The old scoring, a one-slice 3D stack, counts each whole disk as surface and comes out shorter.
    stacked_3d = monai_hd95(pred[None], truth[None], [1], spacing=(1.0, 1.0, 1.0))[1]
    assert scores["hd95"][1] - stacked_3d > 0.5


def test_one_slice_case_uses_row_and_col_spacing_in_order():
    pred = box(20, 16, 20, 30)
    truth = box(24, 20, 12, 22)  # 4 px in from each side
    pred[30:34, 50:60] = 1  # a spur out to the side, so rows and cols weigh differently
    spacing = (3.0, 0.7, 1.3)
    scores = metrics.segmentation_case_scores({0: pred}, {0: truth}, num_slices=1, class_ids=[1], spacing=spacing)
    assert_scores_match_monai(scores, pred, truth, [1], spacing=(0.7, 1.3))
    swapped = monai_hd95(pred, truth, [1], spacing=(1.3, 0.7))[1]
    assert scores["hd95"][1] != pytest.approx(swapped, abs=1e-3)


def test_gapped_case_matches_monai_on_the_full_volume():
    num_slices, spacing = 30, (2.5, 0.8, 0.8)
    kept = [10, 11, 12, 20, 21]  # the foreground slices that preparation kept: 13..19 were empty
    truths = {i: box(10, 10, 20, 20) for i in kept}
    predictions = {i: box(12, 10, 20, 20) for i in kept}
    truths[11][40:50, 40:50] = 2
    truths[12][40:50, 40:50] = 2
    predictions[20][40:50, 40:50] = 2  # class 2 predicted across the gap, 8 slices (20 mm) away
    class_ids = [1, 2]
    scores = metrics.segmentation_case_scores(predictions, truths, num_slices, class_ids, spacing)
    pred_volume, truth_volume = full_volume(predictions, num_slices), full_volume(truths, num_slices)
    assert_scores_match_monai(scores, pred_volume, truth_volume, class_ids, spacing)
    # The old scoring stacked the kept slices as if adjacent, so the gap vanished.
    stacked = monai_hd95(
        np.stack([predictions[i] for i in kept]), np.stack([truths[i] for i in kept]), class_ids, spacing
    )
    assert scores["hd95"][2] - stacked[2] > 5.0


def test_building_only_the_span_equals_the_full_volume():
    num_slices, spacing, class_ids = 40, (2.0, 1.0, 1.0), [1, 2]
    # Objects on the span's first and last slices and on the image border, where cropping could go wrong.
    truths = {5: box(0, 0, 10, 10), 6: box(0, 0, 12, 12), 9: box(50, 50, 14, 14, label=2)}
    predictions = {5: box(0, 0, 12, 10), 9: box(54, 54, 10, 10, label=2) + box(0, 0, 6, 6)}
    scores = metrics.segmentation_case_scores(predictions, truths, num_slices, class_ids, spacing)
    pred_volume, truth_volume = full_volume(predictions, num_slices), full_volume(truths, num_slices)
    assert scores["dice"] == pytest.approx(metrics.dice_per_class(pred_volume, truth_volume, class_ids))
    assert scores["hd95"] == pytest.approx(metrics.hd95_per_class(pred_volume, truth_volume, class_ids, spacing))
    assert_scores_match_monai(scores, pred_volume, truth_volume, class_ids, spacing)


def test_slice_missing_from_predictions_counts_as_not_predicted():
    num_slices, spacing = 8, (3.0, 1.0, 1.0)
    truths = {3: disk(10), 4: disk(12)}
    predictions = {3: disk(11)}
    scores = metrics.segmentation_case_scores(predictions, truths, num_slices, [1], spacing)
    assert_scores_match_monai(
        scores, full_volume(predictions, num_slices), full_volume(truths, num_slices), [1], spacing
    )


def test_class_absent_from_both_is_not_scored():
    truths, predictions = {2: disk(10), 3: disk(10)}, {2: disk(9), 3: disk(11)}
    scores = metrics.segmentation_case_scores(predictions, truths, 6, [1, 3], spacing=(2.0, 1.0, 1.0))
    assert math.isnan(scores["dice"][3]) and math.isnan(scores["hd95"][3])
    pred_volume, truth_volume = full_volume(predictions, 6), full_volume(truths, 6)
    assert scores["dice"][1] == pytest.approx(monai_dice(pred_volume, truth_volume, [1])[1], abs=1e-6)
    assert scores["hd95"][1] == pytest.approx(monai_hd95(pred_volume, truth_volume, [1], (2.0, 1.0, 1.0))[1], abs=1e-5)
    assert scores["mean_dice"] == pytest.approx(scores["dice"][1])  # the unscored class is left out


@pytest.mark.filterwarnings("ignore:the (ground truth|prediction) of class:UserWarning")  # MONAI, on the empty side
def test_class_present_only_in_prediction_or_only_in_truth():
    num_slices, spacing = 6, (2.0, 1.0, 1.0)
    truths = {2: disk(10, label=1), 3: disk(6, label=3, centre=(50, 50))}
    predictions = {2: disk(9, label=1) + disk(5, label=2, centre=(12, 12)), 3: disk(9, label=1)}
    scores = metrics.segmentation_case_scores(predictions, truths, num_slices, [1, 2, 3], spacing)
    pred_volume, truth_volume = full_volume(predictions, num_slices), full_volume(truths, num_slices)
    expected_dice = monai_dice(pred_volume, truth_volume, [1, 2, 3])
    expected_hd95 = monai_hd95(pred_volume, truth_volume, [1, 2, 3], spacing)
    assert scores["dice"] == pytest.approx(expected_dice)
    assert scores["dice"][2] == 0 and scores["dice"][3] == 0
    # MONAI gives a non-finite distance when one side is empty; the convention here is NaN.
    for c in (2, 3):
        assert math.isnan(scores["hd95"][c]) and not math.isfinite(expected_hd95[c])
    assert scores["hd95"][1] == pytest.approx(expected_hd95[1], abs=1e-5)


@pytest.mark.parametrize(
    "predictions, truths, num_slices, spacing",
    [
        ({}, {}, 5, (1.0, 1.0, 1.0)),  # no slices
        ({5: disk(3)}, {5: disk(3)}, 5, (1.0, 1.0, 1.0)),  # index past the volume
        ({1: disk(3)}, {1: disk(3)}, 1, (1.0, 1.0, 1.0)),  # a 2D image has only slice 0
        ({0: disk(3)}, {0: disk(3)[:32]}, 2, (1.0, 1.0, 1.0)),  # slices of different shapes
        ({0: disk(3)[None]}, {0: disk(3)[None]}, 2, (1.0, 1.0, 1.0)),  # not 2D class maps
        ({0: disk(3)}, {0: disk(3)}, 2, (1.0, 1.0)),  # spacing without the slice axis
    ],
)
def test_malformed_cases_are_refused(predictions, truths, num_slices, spacing):
    with pytest.raises(ValueError):
        metrics.segmentation_case_scores(predictions, truths, num_slices, [1], spacing)
