"""What the demo shows: the per-label-set table, the context-switching matrix and picture, and the
learning curve (scripts/demo.py runs the stages and hands their results here)."""

import json
import os
import resource

import numpy as np
from PIL import Image, ImageDraw

from datasets.manifest import PreparedDataset, read_png
from datasets.mni_demo import LABEL_SETS
from evaluation.contexts import ContextPicker
from evaluation.reports import grid_picture
from inference import Predictor, load_checkpoint
from metrics import dice_per_class, nanmean
from util.cli import log
from util.files import atomic_output

BASELINES = {"copy_context": "copy the context label", "intensity": "intensity classifier"}
SPECIALIST = "specialist"
SWITCH_PICTURE, CURVE_PICTURE = "context_switch.png", "learning_curve.png"


def label_set_name(dataset: str) -> str:
    return dataset.removeprefix("MNI_")


def foreground_ids(dataset: PreparedDataset) -> list[int]:
    return sorted(c for c in dataset.classes if c != 0)


def mean_foreground_dice(prediction, truth, class_ids) -> float:
    return nanmean(list(dice_per_class(prediction, truth, class_ids).values()))


# ---------------------------------------------------------------- context switching


def held_out_queries(dataset: PreparedDataset, fast: bool) -> list[tuple[str, int]]:
    cases = dataset.case_ids("test")[: 1 if fast else None]
    return [(case, index) for case in cases for index in dataset.slice_indices(case)]


def read_pair(dataset: PreparedDataset, case: str, index: int) -> tuple:
    """(image, target) of one prepared slice."""
    return tuple(
        read_png(dataset.slice_path(folder, case, index)) for folder in (dataset.input_folder, dataset.target_folder)
    )


def mean_dice_over_slices(predictions, truths, class_ids) -> float:
    return float(np.mean([mean_foreground_dice(p, t, class_ids) for p, t in zip(predictions, truths)]))


def context_switch(checkpoint, prepared, label_datasets, out, fast, num_prompts=1):
    """Every held-out query slice predicted once per label set, each time with that set's context
    pairs (the num_prompts most alike training slices, as in the evaluation). Returns {"matrix":
    {context set: {truth set: mean Dice over the slices}}, "picture": path}: the diagonal is the task
    the context shows, the rest how much of another task's answer the prediction holds."""
    model, settings = load_checkpoint(checkpoint, {"label_encoding": None}, required=("label_encoding",))
    predictor = Predictor(model, label_encoding=settings["label_encoding"], num_prompts=num_prompts)
    sets = {name: PreparedDataset(os.path.join(prepared, name)) for name in label_datasets}
    queries = held_out_queries(sets[label_datasets[0]], fast)
    # The label sets share their images, so one set's query pictures serve them all.
    images, _ = zip(*(read_pair(sets[label_datasets[0]], c, i) for c, i in queries))
    truths, pairs, predictions = {}, {}, {}
    for name, dataset in sets.items():
        truths[name] = [read_pair(dataset, c, i)[1] for c, i in queries]
        picker = ContextPicker(dataset, "retrieval", k=num_prompts, seed=0)
        pairs[name] = [
            [read_pair(dataset, *picked) for picked in picker.pick(c, i, image)]
            for (c, i), image in zip(queries, images)
        ]
        predictions[name] = predictor.segment(pairs[name], list(images))
    matrix = {
        shown: {
            truth: mean_dice_over_slices(predictions[shown], truths[truth], foreground_ids(sets[truth]))
            for truth in sets
        }
        for shown in sets
    }
    k = len(queries) // 2
    rows = [
        (
            name,
            grid_picture(
                True, pairs[name][k][0], images[k], predictions[name][k], truths[name][k], foreground_ids(sets[name])
            ),
        )
        for name in sets
    ]
    picture = os.path.join(out, SWITCH_PICTURE)
    save_picture(stack_with_titles(rows), picture)
    return {"matrix": matrix, "picture": picture, "query": "{} slice {}".format(*queries[k])}


def stack_with_titles(rows, title_height=16) -> Image.Image:
    """Strips one above the other, each under a line naming its label set."""
    width = max(strip.width for _, strip in rows)
    height = sum(strip.height + title_height for _, strip in rows)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    top = 0
    for title, strip in rows:
        draw.text((4, top + 2), f"context from {label_set_name(title)}", fill="black")
        canvas.paste(strip, (0, top + title_height))
        top += title_height + strip.height
    return canvas


def save_picture(picture: Image.Image, path: str):
    with atomic_output(path) as handle:
        picture.save(handle, format="PNG")


# ---------------------------------------------------------------- learning curve


def curve_table(curve: dict, label_datasets) -> dict:
    """{"steps": [...], "<set>": {"MVG": [...], baseline: [...]}} of foreground mean Dice."""
    table = {"steps": sorted(curve)}
    for name in label_datasets:
        rows = [curve[step][name, "foreground"] for step in table["steps"]]
        table[name] = {"MVG": [r["dice"] for r in rows]}
        for baseline in BASELINES:
            table[name][baseline] = [r["baselines"][baseline]["dice"] for r in rows]
    return table


def draw_learning_curve(table: dict, label_datasets, path: str):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, len(label_datasets), figsize=(3.2 * len(label_datasets), 3), sharey=True)
    for axis, name in zip(np.atleast_1d(axes), label_datasets):
        axis.plot(table["steps"], table[name]["MVG"], "o-", label="MVG")
        for baseline, style in zip(BASELINES, ("--", ":")):
            axis.plot(table["steps"], table[name][baseline], style, label=BASELINES[baseline])
        axis.set_title(label_set_name(name))
        axis.set_xlabel("training step")
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("mean Dice, held-out slabs")
    np.atleast_1d(axes)[0].legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    with atomic_output(path) as handle:
        figure.savefig(handle, format="png", dpi=110)
    pyplot.close(figure)


# ---------------------------------------------------------------- the summary


def label_rows(results, label_datasets, specialists=None):
    """Markdown rows per label set and their mean, and the verdicts against every baseline (and the
    specialists, one model per label set, where they were trained): on the mean, and on each label
    set that intensity alone cannot solve."""
    names = dict(BASELINES) | ({SPECIALIST: "one model per label set"} if specialists else {})
    lines = [
        "| held-out slabs, mean Dice | MVG (this run) | " + " | ".join(names.values()) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    rows = {}
    for name in label_datasets:
        summary = results[name, "foreground"]
        rows[name] = {"MVG": summary["dice"]} | {b: summary["baselines"][b]["dice"] for b in BASELINES}
        if specialists:
            rows[name][SPECIALIST] = specialists[name]
        lines.append(f"| {label_set_name(name)} | " + " | ".join(f"{v:.3f}" for v in rows[name].values()) + " |")
    means = {key: float(np.mean([row[key] for row in rows.values()])) for key in ["MVG", *names]}
    lines.append("| **mean over label sets** | " + " | ".join(f"**{v:.3f}**" for v in means.values()) + " |")
    verdicts = [verdict("mean Dice", means, names)]
    for name in label_datasets:
        if not LABEL_SETS[label_set_name(name)].by_intensity:
            verdicts.append(verdict(f"{label_set_name(name)} (intensity cannot solve it)", rows[name], names))
    return lines, verdicts, means


def verdict(what: str, scores: dict, names: dict) -> str:
    beaten = [names[b] for b in names if scores["MVG"] > scores[b]]
    missed = [names[b] for b in names if scores["MVG"] <= scores[b]]
    text = f"{what}: MVG {scores['MVG']:.3f} beats {', '.join(beaten) or 'no baseline'}"
    return text + (f"; does NOT beat {', '.join(missed)}" if missed else "")


# dataset: (row title, input shown as the answer, the two scores shown and their formats)
IMAGE_ROWS = {
    "MNI_denoise": ("denoising PSNR (dB) / SSIM", "noisy input", (("psnr", ".2f"), ("ssim", ".3f"))),
    "MNI_inpaint": (
        "inpainting PSNR (dB) in the removed region / whole slice",
        "voided input",
        (("psnr_region", ".2f"), ("psnr", ".2f")),
    ),
}


def image_rows(results):
    lines = []
    for dataset, (title, identity, scores) in IMAGE_ROWS.items():
        summary = results.get((dataset, "foreground"))
        if summary:
            model, unchanged = (
                " / ".join(format(values[key], style) for key, style in scores)
                for values in (summary, summary["baselines"]["identity"])
            )
            lines.append(f"| {title} | {model} | {identity}: {unchanged} |")
    if lines:
        lines = ["| image task | MVG | input as the answer |", "|---|---|---|", *lines]
    return lines


def switch_rows(matrix):
    names = list(matrix)
    lines = [
        "| context shows \\ scored against | " + " | ".join(label_set_name(n) for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for shown in names:
        cells = [f"**{matrix[shown][t]:.3f}**" if t == shown else f"{matrix[shown][t]:.3f}" for t in names]
        lines.append(f"| {label_set_name(shown)} | " + " | ".join(cells) + " |")
    return lines


def write_summary(out, results, curve, switch, label_datasets, timings, specialists=None):
    table = curve_table(curve, label_datasets)
    draw_learning_curve(table, label_datasets, os.path.join(out, CURVE_PICTURE))
    with atomic_output(os.path.join(out, "curve.json"), mode="w") as handle:
        json.dump(table, handle, indent=1)
    labels, verdicts, _ = label_rows(results, label_datasets, specialists)
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    text = "\n".join(
        [
            *labels,
            "",
            *image_rows(results),
            "",
            f"Context switching (mean Dice per held-out slice; each row runs the same queries with a context "
            f"from one label set; picture: {switch['query']}):",
            "",
            *switch_rows(switch["matrix"]),
            "",
            *verdicts,
            "",
            f"time: {timing}; peak memory {peak:.2f} GiB",
            f"pictures: {os.path.join(out, SWITCH_PICTURE)} (context | context label | query | MVG | truth, "
            f"one row per label set), {os.path.join(out, CURVE_PICTURE)}",
            f"all tables: {os.path.join(out, 'eval', 'results.md')}; the curve's numbers: {os.path.join(out, 'curve.json')}",
        ]
    )
    with atomic_output(os.path.join(out, "summary.md"), mode="w") as handle:
        handle.write(text + "\n")
    log("\n" + text)
