"""Scores of one test case on its true grid, and of a dataset from its cases.

Label targets: Dice and HD95 in mm per class, each case in 3D, its slices at their indices with the
volume's voxel spacing (scaled to the prepared slice size), slices not kept as background, one-slice
volumes in 2D (metrics.segmentation_case_scores). Image targets: the task's metrics (PSNR, SSIM) over the
case's slices, and inside the task's region (inpainting's removed region) as <metric>_region. A dataset's
score is the mean over classes of the per-class mean over cases (labels), or the mean over cases.
"""

import math

import numpy as np

import metrics
from datasets.manifest import PreparedDataset
from tasks import Task

IMAGE_METRICS = {"psnr": metrics.psnr, "ssim": metrics.ssim}


def prepared_spacing(dataset: PreparedDataset, case_id: str):
    """(slice, row, col) spacing in mm of a case's stack of prepared slices."""
    record = dataset.case(case_id)
    spacing = record["canonical"]["spacing"]
    axis = record["slice_axis"]
    u, v = [a for a in range(3) if a != axis]
    plan = record["resize"]
    # picture = flipud(slice.T): rows run along v, columns along u
    return (
        spacing[axis],
        spacing[v] * plan["resized_from"][0] / plan["size"][0],
        spacing[u] * plan["resized_from"][1] / plan["size"][1],
    )


def score_case(
    task: Task,
    dataset: PreparedDataset,
    case_id: str,
    preds: dict,
    truths: dict,
    class_ids,
    regions: dict | None = None,
) -> dict:
    """Scores of one case; preds, truths (and regions) map slice indices to 2D arrays."""
    if task.target_is_label:
        return metrics.segmentation_case_scores(
            preds, truths, dataset.case(case_id)["num_slices"], class_ids, prepared_spacing(dataset, case_id)
        )
    indices = sorted(preds)
    pred, truth = np.stack([preds[i] for i in indices]), np.stack([truths[i] for i in indices])
    scores = {name: IMAGE_METRICS[name](pred, truth) for name in task.metrics}
    if regions is not None:
        region = np.stack([regions[i] for i in indices]) > 0
        scores.update({f"{name}_region": IMAGE_METRICS[name](pred, truth, region) for name in task.metrics})
    return scores


def summary_keys(task: Task) -> list:
    """The image-task scores a summary holds, in table order."""
    return list(task.metrics) + ([f"{name}_region" for name in task.metrics] if task.region_folder else [])


def summarise(task: Task, dataset: PreparedDataset, cases: dict, class_ids, protocol: str) -> dict:
    summary = {
        "dataset": dataset.name,
        "task": dataset.task,
        "modality": dataset.modality,
        "protocol": protocol,
        "cases": len(cases),
    }
    if task.target_is_label:
        summary.update(label_summary(dataset, cases, class_ids))
    else:
        for key in summary_keys(task):
            values = [r[key] for r in cases.values() if key in r]
            if values:
                # An exact slice has infinite PSNR: capped, so one such case does not make the mean infinite.
                summary[key] = metrics.nanmean(
                    [metrics.capped(v) for v in values] if key.startswith("psnr") else values
                )
    summary["per_case"] = cases
    return summary


def label_summary(dataset: PreparedDataset, cases: dict, class_ids) -> dict:
    names = dataset.classes
    classes = {
        str(c): {
            "name": names.get(c, str(c)),
            "dice": metrics.nanmean(r["dice"][c] for r in cases.values()),
            "hd95": metrics.nanmean(r["hd95"][c] for r in cases.values()),
            "hd95_undefined_cases": sum(math.isnan(r["hd95"][c]) for r in cases.values()),
        }
        for c in class_ids
    }
    return {
        "classes": classes,
        "dice": metrics.nanmean(v["dice"] for v in classes.values()),
        "hd95": metrics.nanmean(v["hd95"] for v in classes.values()),
    }
