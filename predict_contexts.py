"""The context pairs of predict.py: which slices of each context volume become pairs
(--context_slices: indices, or auto:K spread over the labelled range), PNG pairs, and the pairs
nearest to each query slice in relative position along the axis (predict.py's docstring says how
users see this)."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from datasets import slicing
from datasets.manifest import slice_position
from datasets.readers import InputError
from label_encoding import check_grey_ids
from predict_inputs import file_kind, read_png_image, read_png_label, warn_non_finite
from tasks import Task
from util.cli import warn

UNPLACED_POSITION = 0.5  # a PNG has no position along the axis: it counts as the middle slice


@dataclass
class ContextPair:
    image: np.ndarray  # uint8 prepared slice
    target: np.ndarray  # class ids, or uint8 target slice
    position: float  # relative position along the axis, in [0, 1]


def parse_context_slices(values: Sequence[str] | None, num_prompts: int):
    """('auto', K) or ('indices', [i, ...]) from the --context_slices words."""
    if not values:
        return "auto", max(3, num_prompts)
    if len(values) == 1 and values[0].startswith("auto:"):
        count = values[0][len("auto:") :]
        if not count.isdigit() or int(count) < 1:
            raise InputError(f"--context_slices {values[0]}: expected auto:K with K a positive integer")
        return "auto", int(count)
    try:
        return "indices", [int(v) for v in values]
    except ValueError:
        raise InputError(f"--context_slices {' '.join(values)}: expected slice indices or auto:K") from None


def spread_over_range(usable: np.ndarray, count: int) -> list[int]:
    """`count` usable slices, nearest to evenly spaced points from the first to the last one."""
    chosen = []
    for point in np.linspace(usable[0], usable[-1], min(count, len(usable))):
        remaining = np.setdiff1d(usable, chosen)
        chosen.append(int(remaining[np.abs(remaining - point).argmin()]))
    return sorted(chosen)


def choose_context_slices(
    selection, usable: np.ndarray, count: int, axis_name: str, where: str, task: Task
) -> list[int]:
    """The context slices of a volume of `count` slices, of which `usable` hold a label (image tasks:
    intensity above black)."""
    if not len(usable):
        content = "class other than background (0)" if task.target_is_label else "intensity above black"
        raise InputError(
            f"{where}: holds no {content} on any slice; a context needs at least one "
            f"{'labelled' if task.target_is_label else 'non-black'} slice"
        )
    mode, value = selection
    if mode == "auto":
        if value > len(usable):
            warn(f"{where}: --context_slices auto:{value} but only {len(usable)} labelled slices; using all of them")
        return spread_over_range(usable, value)
    for index in value:
        if not 0 <= index < count:
            raise InputError(
                f"--context_slices {index} is outside 0..{count - 1}, the slices of {where} along the {axis_name} axis"
            )
        if index not in usable:
            raise InputError(
                f"--context_slices {index}: slice {index} of {where} holds "
                f"{'no label (background only)' if task.target_is_label else 'only black'}"
            )
    return list(value)


def volume_contexts(
    image_path: str, target_path: str, selection, task: Task, settings, where: tuple[str, str] | None = None
) -> list[ContextPair]:
    """The selected slices of a context volume pair; `where` names the two inputs in messages (default:
    predict.py's flags and the paths)."""
    where = where or (f"--context_image {image_path}", f"--context_label {target_path}")
    pair = slicing.read_pair(image_path, target_path, task, settings, where)
    warn_non_finite(pair, {task.input_folder: image_path, task.target_folder: target_path})
    usable = np.flatnonzero(pair.above_background(task.target_folder).any(axis=pair.in_plane_axes))
    indices = choose_context_slices(selection, usable, pair.num_slices, settings.axis_name, where[1], task)
    return [
        ContextPair(
            pair.picture(task.input_folder, index),
            pair.picture(task.target_folder, index),
            slice_position(index, pair.num_slices),
        )
        for index in indices
    ]


def png_context(image_path: str, target_path: str, task: Task) -> ContextPair:
    image = read_png_image(image_path, "--context_image")
    if task.target_is_label:
        target = read_png_label(target_path, "--context_label")
        if not target.any():
            raise InputError(f"--context_label {target_path}: holds no class other than background (0)")
    else:
        target = read_png_image(target_path, "--context_target")
    if image.shape != target.shape:
        raise InputError(
            f"--context_image {image_path} and --context_label {target_path}: sizes differ "
            f"({image.shape} vs {target.shape})"
        )
    return ContextPair(image, target, UNPLACED_POSITION)


def load_contexts(args, task: Task, settings) -> list[ContextPair]:
    if len(args.context_image) != len(args.context_target):
        raise InputError(
            f"{len(args.context_image)} --context_image files but {len(args.context_target)} "
            f"--context_label files; give one label per image"
        )
    selection = parse_context_slices(args.context_slices, args.num_prompts)
    pairs, volumes = [], 0
    for image_path, target_path in zip(args.context_image, args.context_target):
        image_kind, target_kind = file_kind(image_path, "--context_image"), file_kind(target_path, "--context_label")
        if image_kind != target_kind:
            raise InputError(
                f"--context_image {image_path} and --context_label {target_path}: one is a PNG, "
                f"the other a volume; a pair must be both"
            )
        if image_kind == "png":
            pairs.append(png_context(image_path, target_path, task))
        else:
            pairs.extend(volume_contexts(image_path, target_path, selection, task, settings))
            volumes += 1
    if args.context_slices and not volumes:
        raise InputError("--context_slices chooses slices of context volumes, but every context is a PNG")
    if args.num_prompts > len(pairs):
        raise InputError(
            f"--num_prompts {args.num_prompts} needs at least that many context pairs; the contexts give {len(pairs)}"
        )
    if task.target_is_label and args.label_encoding == "grey":
        check_grey_ids(max(int(p.target.max()) for p in pairs), "--context_label")
    return pairs


def nearest_contexts(position: float, pairs: Sequence[ContextPair], count: int) -> list[tuple]:
    """The `count` pairs nearest in relative position; sorted() is stable, so ties keep the given order."""
    order = sorted(range(len(pairs)), key=lambda i: abs(pairs[i].position - position))
    return [(pairs[i].image, pairs[i].target) for i in order[:count]]
