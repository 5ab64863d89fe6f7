"""The files and tables main_eval.py writes: per-case CSVs, results.md (each protocol's tables beside the
paper's numbers), the before/after comparison of two results.json, picture grids and predicted slices."""

import csv
import json
import math
import os

import numpy as np
from PIL import Image

import metrics
from label_encoding import inference_palette
from pixels import resize_picture
from tasks import get_task
from util.cli import UsageError
from util.files import atomic_output, path_below

PROTOCOLS = {"foreground": "foreground slices (the paper's protocol)", "volume": "whole volumes"}

# Paper, Table 2 (segmentation score, 0-1) in its column order: name keys match prepared dataset
# names case- and punctuation-insensitively.
PAPER_SEGMENTATION = [
    (("amosct", "amos"), "AMOS CT", 0.73, 0.52, 0.20, 0.87),
    (("word",), "WORD", 0.74, 0.48, 0.29, 0.90),
    (("btcv",), "BTCV", 0.73, 0.45, 0.37, 0.91),
    (("amosmri", "amosmr"), "AMOS MRI", 0.74, 0.51, 0.25, 0.88),
    (("microsegnet",), "MicroSegNet", 0.91, 0.69, 0.71, 0.97),
    (("promise12", "promise"), "PROMISE12", 0.85, 0.68, 0.55, 0.93),
    (("chestdefect", "chestxray", "defect"), "Chest defect", 0.79, 0.50, 0.55, 0.90),
    (("acdc",), "ACDC", 0.85, 0.52, 0.54, 0.90),
    (("la", "leftatrium"), "LA", 0.81, 0.55, 0.57, 0.89),
]
# Read off the paper's chart, approximately (dB).
PAPER_IMAGE_PSNR = {"denoising": 33.0, "inpainting": 34.0, "synthesis": 24.0}


def is_label_summary(summary: dict) -> bool:
    return get_task(summary["task"], f"dataset {summary['dataset']}").target_is_label


def write_case_csv(out_dir: str, summary: dict):
    rows = []
    for case_id, result in summary["per_case"].items():
        row = {"case": case_id}
        if is_label_summary(summary):
            row["mean_dice"] = result["mean_dice"]
            row.update({f"dice_{c}": v for c, v in result["dice"].items()})
            row.update({f"hd95_{c}": v for c, v in result["hd95"].items()})
        else:
            row.update({k: v for k, v in result.items() if k != "contexts"})
        rows.append(row)
    if not rows:
        return
    with atomic_output(path_below(out_dir, f"{summary['dataset']}_{summary['protocol']}_cases.csv"), "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _normalised(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def paper_row(name: str):
    key = _normalised(name)
    return next((row for row in PAPER_SEGMENTATION if key in row[0]), None)


def fmt(value, digits=3):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_tables(summaries: list) -> str:
    """The tables of every protocol present, each under a heading that names it."""
    parts = []
    for protocol, title in PROTOCOLS.items():
        chosen = [s for s in summaries if s.get("protocol", "foreground") == protocol]
        if chosen:
            parts.append(f"# Scored on {title}\n\n" + protocol_tables(chosen))
    return "\n".join(parts)


def protocol_tables(summaries: list) -> str:
    segmentation = [s for s in summaries if is_label_summary(s)]
    order = {row[1]: i for i, row in enumerate(PAPER_SEGMENTATION)}
    segmentation.sort(key=lambda s: (order.get((paper_row(s["dataset"]) or (None, ""))[1], len(order)), s["dataset"]))
    lines = []
    if segmentation:
        lines += [
            "## Segmentation (Dice 0-1, HD95 mm; per case in 3D, mean over classes)",
            "",
            "| dataset | cases | Dice | HD95 | paper MVG | Painter | UniverSeg | nnU-Net |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in segmentation:
            paper = paper_row(s["dataset"])
            reported = " | ".join(fmt(v, 2) for v in paper[2:]) if paper else "- | - | - | -"
            lines.append(f"| {s['dataset']} | {s['cases']} | {fmt(s['dice'])} | {fmt(s['hd95'], 2)} | {reported} |")
            for name, b in s.get("baselines", {}).items():
                lines.append(
                    f"| {s['dataset']}: baseline {name} | {b['cases']} | {fmt(b['dice'])} | "
                    f"{fmt(b['hd95'], 2)} | - | - | - | - |"
                )
        lines += [
            "",
            "### Per class",
            "",
            "| dataset | class | Dice | HD95 | cases without HD95 |",
            "|---|---|---|---|---|",
        ]
        for s in segmentation:
            for label, classes in [(s["dataset"], s["classes"])] + [
                (f"{s['dataset']}: baseline {name}", b["classes"]) for name, b in s.get("baselines", {}).items()
            ]:
                for c, v in classes.items():
                    lines.append(
                        f"| {label} | {c} {v['name']} | {fmt(v['dice'])} | {fmt(v['hd95'], 2)} | "
                        f"{v['hd95_undefined_cases']} |"
                    )
    images = [s for s in summaries if not is_label_summary(s)]
    if images:
        lines += [
            "",
            f"## Image tasks (PSNR dB, exact = {metrics.PSNR_CAP:.0f}; SSIM 0-1)",
            "",
            "| dataset | task | cases | PSNR | SSIM | PSNR in region | SSIM in region | paper PSNR (approx.) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in images:
            lines.append(
                f"| {s['dataset']} | {s['task']} | {s['cases']} | {fmt(s.get('psnr'), 2)} | "
                f"{fmt(s.get('ssim'))} | {fmt(s.get('psnr_region'), 2)} | {fmt(s.get('ssim_region'))} | "
                f"{fmt(PAPER_IMAGE_PSNR.get(s['task']), 0)} |"
            )
            for name, b in s.get("baselines", {}).items():
                lines.append(
                    f"| {s['dataset']}: baseline {name} | {s['task']} | {b['cases']} | {fmt(b.get('psnr'), 2)} | "
                    f"{fmt(b.get('ssim'))} | {fmt(b.get('psnr_region'), 2)} | {fmt(b.get('ssim_region'))} | - |"
                )
    return "\n".join(lines) + "\n"


def compare_results(before_path: str, after_path: str) -> str:
    """A before/after table of the headline numbers of two results.json files."""

    def headline(path):
        try:
            with open(path) as handle:
                datasets = json.load(handle)["datasets"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UsageError(f"--compare {path}: not a results.json of main_eval.py ({error})") from error
        return {
            (d["dataset"], d.get("protocol", "foreground")): {
                k: d[k] for k in ("dice", "hd95", "psnr", "ssim") if k in d
            }
            for d in datasets
        }

    before, after = headline(before_path), headline(after_path)
    lines = ["| dataset | protocol | metric | before | after | change |", "|---|---|---|---|---|---|"]
    for name, protocol in sorted(set(before) & set(after)):
        for metric, value in before[name, protocol].items():
            new = after[name, protocol].get(metric, float("nan"))
            lines.append(f"| {name} | {protocol} | {metric} | {value:.4f} | {new:.4f} | {new - value:+.4f} |")
    return "\n".join(lines) + "\n"


def save_grids(out_dir, dataset, case_id, run, is_label: bool, class_ids, count: int) -> int:
    """Up to `count` grids of the case's foreground slices, spread over them; returns how many."""
    candidates = run.selected("foreground") or list(range(len(run.indices)))
    shown = np.unique(np.linspace(0, len(candidates) - 1, num=min(count, len(candidates))).round().astype(int))
    for position in shown:
        j = candidates[position]
        grid = grid_picture(is_label, run.contexts[j][0], run.queries[j], run.preds[j], run.truths[j], class_ids)
        with atomic_output(path_below(out_dir, "grids", f"{dataset.name}_{case_id}_{run.indices[j]}.png")) as handle:
            grid.save(handle, format="PNG")
    return len(shown)


def grid_picture(is_label: bool, context, query, prediction, truth, class_ids) -> Image.Image:
    """context image | context target | query | prediction | truth, as one RGB strip; labels are
    shown in fixed display colours whatever encoding the model used."""
    lut = np.zeros((max([0, *class_ids]) + 1, 3), np.uint8)
    if class_ids:
        lut[class_ids] = inference_palette(class_ids, "random_colors")

    def rgb(picture, is_label):
        return lut[np.minimum(picture, len(lut) - 1)] if is_label else np.repeat(picture[..., None], 3, axis=2)

    def fit(picture, is_label):
        return resize_picture(picture, query.shape, is_label)

    tiles = [
        rgb(fit(context[0], False), False),
        rgb(fit(context[1], is_label), is_label),
        rgb(query, False),
        rgb(prediction, is_label),
        rgb(truth, is_label),
    ]
    return Image.fromarray(np.concatenate(tiles, axis=1).astype(np.uint8))


def save_predictions(out_dir, dataset, case_id, indices, preds):
    folder = path_below(out_dir, "predictions", dataset.name, case_id)
    digits = dataset.case(case_id)["slice_digits"]
    for index, pred in zip(indices, preds):
        array = pred.astype(np.uint16 if pred.max() > 255 else np.uint8)
        with atomic_output(os.path.join(folder, f"{index:0{digits}d}.png")) as handle:
            Image.fromarray(array).save(handle, format="PNG")
