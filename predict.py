"""Prediction on your own data: a few context pairs (image + label, or image + target image) and a
query in; the query's label or target image out, as a PNG or as a NIfTI volume on the query's grid.

Examples:

    # segment a CT volume from three labelled axial slices of another (or the same) labelled volume
    python predict.py --checkpoint mvg_large.pth --modality CT \\
        --context_image ctx.nii.gz --context_label ctx_seg.nii.gz --context_slices 40 55 70 \\
        --query scan.nii.gz --output scan_seg.nii.gz

    # five labelled slices spread over the labelled range, the three nearest ones per query slice
    python predict.py --checkpoint mvg_large.pth --modality MRI --context_slices auto:5 \\
        --num_prompts 3 --ensemble features --context_image a.nii.gz --context_label a_seg.nii.gz \\
        --query b.nii.gz --output b_seg.nii.gz

    # prepared PNG slices (as written by datasets.prepare): one label PNG out
    python predict.py --checkpoint mvg_large.pth --context_image ctx.png --context_label ctx_label.png \\
        --query query.png --output query_label.png

    # image tasks: synthesis (T1c -> T2w) written on the 8-bit scale of the prepared slices ...
    python predict.py --task synthesis --checkpoint mvg_large.pth --modality MRI \\
        --context_image ctx_t1c.nii.gz --context_target ctx_t2w.nii.gz --query t1c.nii.gz --output t2w.nii.gz
    # ... and denoising, whose target shares the input's scale, written back in Hounsfield units
    python predict.py --task denoising --checkpoint mvg_large.pth --modality CT \\
        --context_image low_dose.nii.gz --context_target full_dose.nii.gz --query low.nii.gz --output denoised.nii.gz

--task names the task (tasks.py): segmentation (the default) predicts class ids; synthesis, denoising
and inpainting predict images.

How inputs become model slices. Volumes (.nii, .nii.gz; also MetaImage, NRRD, DICOM files and DICOM
series folders, written out as NIfTI) go through datasets/slicing.py, the very path datasets.prepare
writes its PNGs through, so a volume given here and the slices prepare writes from it are the same
pixels: reoriented to RAS (flips and permutations only), intensities normalised per volume as
--modality/--normalization say (CT window, MR percentiles over the body, min-max otherwise;
datasets/intensity.py), sliced along --axis (picture = flipud(slice.T): anterior or superior at the top;
4D images need --channel) and stretched to --slice_size squared, the size of the prepared slices, so the
model sees the pixels it was trained on (default: the size the checkpoint's training data had, else the
paper's 512; --slice_size 0 skips this step and saves one interpolation). The model, canvas, depth and
label encoding also come from the checkpoint's record (a contradicting flag needs --force). The predictor
then meets each slice at the scale of the training crops, in overlapping windows (--scale training;
inference.py), or resizes it whole to the canvas half (--scale fit), and brings its prediction back to the
slice's size. PNGs are taken to be such prepared slices already and are used at their own size: 8-bit
grey or RGB (averaged to grey), 16-bit grey images min-max scaled to 8 bits; label PNGs hold class ids
(8- or 16-bit grey, or palette indices).

Which context pairs a query gets. Every context PNG gives one pair, every context volume the slices
--context_slices names: indices along --axis of the RAS volume (the slice numbers in the file names
datasets.prepare writes), or auto:K for K labelled slices spread evenly over the labelled range.
Each query slice gets the --num_prompts pairs nearest to it in relative position along the axis,
(index + 0.5) / number of slices, so with one prompt a slice near one end of the query is predicted
from the context slice nearest the same end of its volume: anatomy at similar heights looks alike
more than anatomy far apart. PNGs have no position and count as the middle; ties keep the order the
contexts were given in.

How predictions are written. A PNG query gives a PNG: class ids as 8-bit grey (16-bit when an id
exceeds 255), or the 8-bit grey image. A volume query gives a NIfTI volume with the query's shape,
affine and header (data type set to the output's): every slice is predicted, resized back to the
slice's own size (nearest neighbour for labels), stacked and reoriented back from RAS. Labels keep
the context's class ids, as uint8, uint16 or int32, whichever is smallest. Images of a task whose target
is on the input's scale (denoising, inpainting: datasets.prepare scales their targets with the input's
parameters, and so does this script with volume context targets) are mapped back to the query's units as
float32, low + value / 255 * (high - low) with the query's own window/percentile range, so values outside
that range, clipped when preparing, stay clipped. A synthesis target has a scale of its own that the
query does not tell, so it is written as uint8 on the 8-bit scale of the prepared slices.
"""

import argparse
import gzip
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from PIL import Image
from tqdm import tqdm

from datasets import intensity, slicing
from datasets.manifest import slice_position
from datasets.readers import HDF5_EXTENSIONS, PICTURE_EXTENSIONS, VOLUME_FILE_EXTENSIONS, InputError, check_lossless
from flags import add_model_flags, add_prompt_flags, add_runtime_flags
from inference import Predictor, load_checkpoint
from label_encoding import LABEL_ENCODINGS, check_grey_ids
from tasks import TASK_NAMES, Task, get_task
from util.cli import ArgumentParser, log, run_main, warn
from util.files import atomic_output
from util.runtime import resolve_precision

# Pictures are read as prepared slices; what is written for a picture query is always a PNG.
VOLUME_SUFFIXES = tuple(
    suffix
    for suffix in VOLUME_FILE_EXTENSIONS  # HDF5 holds arrays under keys: no flag here
    if suffix not in PICTURE_EXTENSIONS + HDF5_EXTENSIONS
)
WRITTEN_VOLUME_SUFFIXES = (".nii", ".nii.gz")
DEFAULT_SLICE_SIZE = 512  # the paper's prepared slices, for checkpoints that do not record theirs
UNPLACED_POSITION = 0.5  # a PNG has no position along the axis: it counts as the middle slice


def get_args_parser():
    parser = ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inputs = parser.add_argument_group("inputs and output")
    inputs.add_argument(
        "--task",
        choices=TASK_NAMES,
        default="segmentation",
        help="what the context pairs show: segmentation (class ids) or an image task",
    )
    inputs.add_argument(
        "--context_image",
        nargs="+",
        required=True,
        metavar="PATH",
        help="context images, PNG or volume; several give several context pairs",
    )
    inputs.add_argument(
        "--context_label",
        "--context_target",
        dest="context_target",
        nargs="+",
        required=True,
        metavar="PATH",
        help="their labels (segmentation) or target images (image tasks), same order, same size or voxel grid",
    )
    inputs.add_argument(
        "--context_slices",
        nargs="+",
        metavar="INDEX",
        help="slices of each context volume to use: indices along --axis of the RAS "
        "volume, or auto:K for K labelled (image tasks: non-black) slices spread "
        "over the labelled range (default: auto:max(3, --num_prompts))",
    )
    inputs.add_argument("--query", required=True, metavar="PATH", help="query PNG or volume")
    inputs.add_argument(
        "--output",
        required=True,
        metavar="PATH",
        help="where to write: .png for a PNG query, .nii or .nii.gz for a volume; never one "
        "of the inputs, and an existing file only with --overwrite",
    )
    inputs.add_argument("--overwrite", action="store_true", help="replace --output if it exists")

    volumes = parser.add_argument_group("volumes: slicing and intensities (as datasets.prepare)")
    slicing.add_slicing_arguments(volumes)
    volumes.add_argument(
        "--slice_size",
        type=int,
        default=None,
        help="slices are stretched to this size squared, the size of the prepared "
        "training slices (default: the size the checkpoint records, else 512; another "
        "needs --force); 0 keeps each slice at its own size",
    )
    volumes.add_argument(
        "--modality",
        help="CT (HU window), MRI (percentiles) or anything else (min-max); "
        "needed for volumes unless --normalization is given",
    )
    intensity.add_intensity_arguments(volumes)

    model = parser.add_argument_group("model and inference")
    model.add_argument("--checkpoint", required=True, help="model checkpoint (.pth)")
    add_model_flags(model)
    add_prompt_flags(model)
    add_runtime_flags(model)
    model.add_argument(
        "--batch_size", type=int, default=8, help="query slices per forward pass (each with --num_prompts canvases)"
    )
    return parser


# ---------------------------------------------------------------------------------------------------
# files


def file_kind(path: str, flag: str) -> str:
    lower = path.lower()
    if lower.endswith(PICTURE_EXTENSIONS):
        return "png"
    if lower.endswith(VOLUME_SUFFIXES) or os.path.isdir(path):
        return "volume"
    raise InputError(
        f"{flag} {path}: unknown format; expected {', '.join(PICTURE_EXTENSIONS + VOLUME_SUFFIXES)} "
        f"or a DICOM series folder"
    )


def read_png_array(path: str, flag: str, convert_palette: bool) -> np.ndarray:
    if not os.path.isfile(path):
        raise InputError(f"{flag} {path}: file not found")
    try:
        with Image.open(path) as png:
            if convert_palette and png.mode == "P":
                png = png.convert("RGB")
            return np.asarray(png)
    except OSError as error:
        raise InputError(f"{flag} {path}: cannot read ({error})") from error


def read_png_image(path: str, flag: str) -> np.ndarray:
    """An 8-bit grey picture from a grey, RGB(A) or palette PNG; 16-bit grey is min-max scaled."""
    picture = read_png_array(path, flag, convert_palette=True)
    if picture.ndim == 3 and picture.shape[2] in (3, 4):
        return np.round(picture[..., :3].astype(np.float32).mean(axis=2)).astype(np.uint8)
    if picture.ndim != 2:
        raise InputError(f"{flag} {path}: expected a 2D grey or RGB PNG, got an array of shape {picture.shape}")
    if picture.dtype == np.uint8:
        return picture
    picture = picture.astype(np.float32)
    return intensity.to_uint8(intensity.normalise(picture, intensity.fit_parameters(picture, "minmax")))


def read_png_label(path: str, flag: str) -> np.ndarray:
    check_lossless(path, f"{flag} {path}")
    label = read_png_array(path, flag, convert_palette=False)
    if label.dtype == bool:  # a 1-bit PNG: a binary mask of class 1
        label = label.astype(np.uint8)
    if label.ndim != 2 or label.dtype.kind not in "iu":
        raise InputError(
            f"{flag} {path}: a label PNG holds class ids (8- or 16-bit grey, or palette "
            f"indices), got an array of shape {label.shape} ({label.dtype})"
        )
    ids = slicing.label_ids(label, f"{flag} {path}")
    # In the type prepare writes, as for volume contexts: the predictor meets the same arrays either way.
    return ids.astype(slicing.label_dtype(int(ids.max()) if ids.size else 0))


def warn_non_finite(volumes: slicing.SlicedVolumes, paths: dict):
    for folder, count in volumes.non_finite.items():
        if count:
            warn(
                f"{paths[folder]}: {count} NaN or infinite voxels, set to the volume's smallest finite value "
                f"before normalising"
            )


# ---------------------------------------------------------------------------------------------------
# context pairs


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


def volume_contexts(image_path: str, target_path: str, selection, task: Task, settings) -> list[ContextPair]:
    pair = slicing.read_pair(
        image_path, target_path, task, settings, (f"--context_image {image_path}", f"--context_label {target_path}")
    )
    warn_non_finite(pair, {task.input_folder: image_path, task.target_folder: target_path})
    usable = np.flatnonzero(pair.above_background(task.target_folder).any(axis=pair.in_plane_axes))
    indices = choose_context_slices(selection, usable, pair.num_slices, settings.axis_name, target_path, task)
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


# ---------------------------------------------------------------------------------------------------
# prediction and output


def load_model_and_settings(args, task: Task):
    """The model, with --model/--input_size/--depth/--label_encoding/--slice_size resolved against what
    the checkpoint records (args updated in place: contexts are read with them)."""
    flags = {
        "model": args.model,
        "input_size": args.input_size,
        "depth": args.depth,
        "label_encoding": args.label_encoding,
        "slice_size": args.slice_size,
    }
    required = ("label_encoding",) if task.target_is_label else ()
    model, settings = load_checkpoint(args.checkpoint, flags, args.force, required=required)
    model.set_attention(args.attention)
    args.label_encoding = settings["label_encoding"] or LABEL_ENCODINGS[0]
    args.slice_size = DEFAULT_SLICE_SIZE if settings["slice_size"] is None else settings["slice_size"]
    return model


def build_predictor(args, model) -> Predictor:
    return Predictor(
        model,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        label_encoding=args.label_encoding,
        num_prompts=args.num_prompts,
        ensemble=args.ensemble,
        scale=args.scale,
    )


def predict_slices(
    predictor: Predictor, task: Task, queries: Sequence[np.ndarray], contexts: Sequence[list[tuple]]
) -> list[np.ndarray]:
    """One batch at a time, so only a batch of full-size float predictions is held in memory."""
    run = predictor.segment if task.target_is_label else predictor.translate
    step = predictor.batch_size
    predictions = []
    for start in tqdm(range(0, len(queries), step), desc="predicting", unit="batch", disable=None):
        predictions += run(contexts[start : start + step], queries[start : start + step])
    return predictions


def predict_png(args, task: Task, predictor: Predictor, pairs: list[ContextPair]) -> np.ndarray:
    query = read_png_image(args.query, "--query")
    (prediction,) = predict_slices(
        predictor, task, [query], [nearest_contexts(UNPLACED_POSITION, pairs, args.num_prompts)]
    )
    if task.target_is_label:
        if prediction.max() > 65535:
            raise InputError(f"--output {args.output}: class id {prediction.max()} does not fit a 16-bit PNG")
        prediction = prediction.astype(slicing.label_dtype(int(prediction.max())))
    with atomic_output(args.output) as handle:
        Image.fromarray(prediction).save(handle, format="PNG")
    return prediction


def slice_settings(args) -> slicing.SliceSettings:
    """How volumes become model slices: datasets.prepare's settings (stretched to --slice_size)."""
    return slicing.SliceSettings.from_args(args, args.slice_size, args.modality)


def read_query(path: str, settings: slicing.SliceSettings) -> slicing.SlicedVolumes:
    """The query volume: its slices as datasets.prepare writes them, and the grid predictions go back on."""
    query = slicing.read_image(path, settings, f"--query {path}")
    warn_non_finite(query, {slicing.IMAGE: path})
    return query


def predict_volume(args, task: Task, predictor: Predictor, pairs: list[ContextPair], settings) -> np.ndarray:
    query = read_query(args.query, settings)
    count = query.num_slices
    contexts = [nearest_contexts(slice_position(k, count), pairs, args.num_prompts) for k in range(count)]
    predictions = predict_slices(predictor, task, query.pictures(slicing.IMAGE), contexts)
    volume = query.put_back(predictions, task)
    save_on_query_grid(volume, query.grid.original_affine, args.query, args.output)
    return volume


def save_on_query_grid(volume: np.ndarray, affine: np.ndarray, query_path: str, path: str):
    """The query's header and affine (qform and sform codes too), with the prediction's data type,
    no intensity scaling and no display range: the query's would not describe labels."""
    if query_path.lower().endswith(WRITTEN_VOLUME_SUFFIXES):
        header = nib.load(query_path).header.copy()
    else:  # a DICOM, MetaImage or NRRD query: a fresh header placed by the affine
        header = nib.Nifti1Header()
        header.set_qform(affine, code=1)
        header.set_sform(affine, code=1)
    header.set_data_dtype(volume.dtype)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"] = header["cal_max"] = 0
    contents = nib.Nifti1Image(volume, affine, header).to_bytes()
    if path.lower().endswith(".gz"):
        contents = gzip.compress(contents, compresslevel=6)
    with atomic_output(path) as handle:
        handle.write(contents)


def same_file(first: str, second: str) -> bool:
    """The same file, whatever the spelling: one path, a link to it, or a hard link of it."""
    if os.path.realpath(first) == os.path.realpath(second):
        return True
    return os.path.exists(first) and os.path.exists(second) and os.path.samefile(first, second)


def check_output_path(args, query_kind: str):
    output_kind = file_kind(args.output, "--output")
    wrong_suffix = not args.output.lower().endswith(".png" if query_kind == "png" else WRITTEN_VOLUME_SUFFIXES)
    if output_kind != query_kind or wrong_suffix:
        wanted = ".png" if query_kind == "png" else " or ".join(WRITTEN_VOLUME_SUFFIXES)
        raise InputError(f"--output {args.output}: a {query_kind} query gives a {wanted} output")
    inputs = (
        [("--query", args.query)]
        + [("--context_image", p) for p in args.context_image]
        + [("--context_label", p) for p in args.context_target]
    )
    for flag, path in inputs:
        if same_file(path, args.output):
            raise InputError(f"--output {args.output}: is the {flag} input; an input is never written over")
    if os.path.exists(args.output) and not args.overwrite:
        raise InputError(f"--output {args.output}: exists; choose another path, or add --overwrite to replace it")


def run(args):
    if args.slice_size is not None and args.slice_size < 0:
        raise InputError(f"--slice_size {args.slice_size}: expected a positive size, or 0 for the slices' own")
    for flag, value in (("--num_prompts", args.num_prompts), ("--batch_size", args.batch_size)):
        if value < 1:
            raise InputError(f"{flag} {value}: expected at least 1")
    task = get_task(args.task, "--task")
    args.precision = resolve_precision(args.precision, args.device)
    query_kind = file_kind(args.query, "--query")
    check_output_path(args, query_kind)
    model = load_model_and_settings(args, task)
    settings = slice_settings(args)
    pairs = load_contexts(args, task, settings)
    predictor = build_predictor(args, model)
    if query_kind == "png":
        prediction = predict_png(args, task, predictor, pairs)
    else:
        prediction = predict_volume(args, task, predictor, pairs, settings)
    summary = (
        f"classes {sorted(int(i) for i in np.unique(prediction))}"
        if task.target_is_label
        else f"intensities {prediction.min():.4g}..{prediction.max():.4g}"
    )
    log(f"wrote {args.output}: {prediction.shape} {prediction.dtype}, {summary}, from {len(pairs)} context pairs")


def main(argv=None):
    return run_main(lambda argv: run(get_args_parser().parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
