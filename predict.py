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

import gzip
import os
import sys
from collections.abc import Callable, Sequence

import nibabel as nib
import numpy as np
from PIL import Image
from tqdm import tqdm

from datasets import intensity, slicing
from datasets.manifest import slice_position
from datasets.readers import InputError
from flags import add_model_flags, add_prompt_flags, add_runtime_flags
from inference import Predictor, load_checkpoint
from label_encoding import LABEL_ENCODINGS
from predict_contexts import UNPLACED_POSITION, ContextPair, load_contexts, nearest_contexts
from predict_contexts import volume_contexts as volume_contexts  # re-exported for tests/test_prepare_slicing.py
from predict_inputs import file_kind, read_png_image, warn_non_finite
from tasks import TASK_NAMES, Task, get_task
from util.cli import docstring_parser, log, run_main
from util.files import atomic_output
from util.runtime import resolve_precision

WRITTEN_VOLUME_SUFFIXES = (".nii", ".nii.gz")
DEFAULT_SLICE_SIZE = 512  # the paper's prepared slices, for checkpoints that do not record theirs


def get_args_parser():
    parser = docstring_parser(__doc__)
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

    add_volume_and_model_flags(
        parser,
        "volumes: slicing and intensities (as datasets.prepare)",
        slice_size_help="the size of the prepared training slices (default: the size the checkpoint records, "
        "else 512; another needs --force); 0 keeps each slice at its own size",
        modality_flag=True,
    )
    return parser


def add_volume_and_model_flags(parser, volumes_title: str, slice_size_help: str, modality_flag: bool):
    """The flags of reading volumes as prepare does and of the model, shared with the browser app."""
    volumes = parser.add_argument_group(volumes_title)
    slicing.add_slicing_arguments(volumes)
    volumes.add_argument(
        "--slice_size", type=int, default=None, help=f"slices are stretched to this size squared: {slice_size_help}"
    )
    if modality_flag:
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
    predictor: Predictor,
    task: Task,
    queries: Sequence[np.ndarray],
    contexts: Sequence[list[tuple]],
    on_progress: Callable[[int, int], None] | None = None,
) -> list[np.ndarray]:
    """One batch at a time, so only a batch of full-size float predictions is held in memory;
    on_progress(done, total) after each batch."""
    step = predictor.batch_size
    predictions = []
    for start in tqdm(range(0, len(queries), step), desc="predicting", unit="batch", disable=None):
        predictions += predictor.run(task, contexts[start : start + step], queries[start : start + step])
        if on_progress is not None:
            on_progress(len(predictions), len(queries))
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


def check_volume_and_model_flags(args):
    """The values of add_volume_and_model_flags' flags that argparse's types let through."""
    if args.slice_size is not None and args.slice_size < 0:
        raise InputError(f"--slice_size {args.slice_size}: expected a positive size, or 0 for the slices' own")
    for flag, value in (("--num_prompts", args.num_prompts), ("--batch_size", args.batch_size)):
        if value < 1:
            raise InputError(f"{flag} {value}: expected at least 1")


def run(args):
    check_volume_and_model_flags(args)
    task = get_task(args.task, "--task")
    args.precision = resolve_precision(args.precision, args.device, inference=True)
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
