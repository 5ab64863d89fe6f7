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
    python predict.py --task image --checkpoint mvg_large.pth --modality MRI \\
        --context_image ctx_t1c.nii.gz --context_target ctx_t2w.nii.gz --query t1c.nii.gz --output t2w.nii.gz
    # ... and denoising, whose target shares the input's scale, written back in Hounsfield units
    python predict.py --task image --target_on_input_scale --checkpoint mvg_large.pth --modality CT \\
        --context_image low_dose.nii.gz --context_target full_dose.nii.gz --query low.nii.gz --output denoised.nii.gz

How inputs become model slices. Volumes (.nii, .nii.gz; also .mhd/.mha, DICOM files and DICOM series
folders, written out as NIfTI) go through the steps of datasets.prepare,
so a volume given here and the PNG slices prepare writes from it are seen alike: reoriented to RAS
(flips and permutations only), intensities normalised per volume as --modality/--normalization say
(CT window, MR percentiles over the body, min-max otherwise; datasets/intensity.py), sliced along
--axis (picture = flipud(slice.T): anterior or superior at the top) and stretched to --slice_size
squared, the size of the prepared slices, so the model sees the pixels it was trained on (default: the
size the checkpoint's training data had, else the paper's 512; --slice_size 0 skips this step and saves
one interpolation). The model, canvas, depth and label encoding also come from the checkpoint's record
(a contradicting flag needs --force). The predictor then meets each slice at the scale of the training
crops, in overlapping windows (--scale training; inference.py), or resizes it whole to the canvas half
(--scale fit), and brings its prediction back to the slice's size. PNGs are taken to be such prepared slices
already and are used at their own size: 8-bit grey or RGB (averaged to grey), 16-bit grey images
min-max scaled to 8 bits; label PNGs hold class ids (8- or 16-bit grey, or palette indices).

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
the context's class ids, as uint8, uint16 or int32, whichever is smallest. Images are uint8 on the
8-bit scale of the prepared slices; with --target_on_input_scale (denoising, inpainting: datasets.prepare
scales their targets with the input's parameters, and so does this script with volume context
targets) they are mapped back to the query's units as float32, low + value / 255 * (high - low) with the
query's own window/percentile range, so values outside that range, clipped when preparing, stay clipped.
A synthesis target has a scale of its own that the query does not tell, hence the 8-bit scale there.
"""
import argparse
import gzip
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from datasets import geometry, intensity
from datasets.canvas import LABEL_ENCODINGS, MAX_GREY_CLASS
from datasets.prepare import label_ids
from datasets.readers import (DICOM_FILE_EXTENSIONS, PICTURE_EXTENSIONS, InputError, Source, check_lossless,
                              read_volume)
from datasets.manifest import slice_position
from inference import PRECISIONS, SCALES, Predictor, load_checkpoint
from models_mvg import ATTENTION_PATHS
from util.cli import run_main
from util.files import atomic_output

PNG_SUFFIXES = PICTURE_EXTENSIONS  # read as PNGs are; what is written is always a PNG
VOLUME_SUFFIXES = ('.nii', '.nii.gz')  # what volumes are written as
# Read like NIfTI (datasets/readers.py): MetaImage, a single DICOM file, and a folder holding a DICOM series.
OTHER_VOLUME_SUFFIXES = ('.mhd', '.mha') + DICOM_FILE_EXTENSIONS
AFFINE_TOLERANCE = 1e-3  # mm, datasets.prepare's default --affine_tolerance between an image and its label
DEFAULT_SLICE_SIZE = 512  # the paper's prepared slices, for checkpoints that do not record theirs
UNPLACED_POSITION = 0.5  # a PNG has no position along the axis: it counts as the middle slice
AXIS_NAMES = {index: name for name, index in geometry.AXES.items()}


def get_args_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n', 1)[0], epilog=__doc__.split('\n\n', 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    inputs = parser.add_argument_group('inputs and output')
    inputs.add_argument('--task', choices=['segmentation', 'image'], default='segmentation',
                        help='segmentation (class ids) or an image task: synthesis, denoising, inpainting')
    inputs.add_argument('--context_image', nargs='+', required=True, metavar='PATH',
                        help='context images, PNG or NIfTI; several give several context pairs')
    inputs.add_argument('--context_label', '--context_target', dest='context_target', nargs='+',
                        required=True, metavar='PATH',
                        help='their labels (segmentation) or target images (image tasks), same order, '
                             'same size or voxel grid')
    inputs.add_argument('--context_slices', nargs='+', metavar='INDEX',
                        help='slices of each context volume to use: indices along --axis of the RAS '
                             'volume, or auto:K for K labelled (image tasks: non-black) slices spread '
                             'over the labelled range (default: auto:max(3, --num_prompts))')
    inputs.add_argument('--query', required=True, metavar='PATH', help='query PNG or NIfTI volume')
    inputs.add_argument('--output', required=True, metavar='PATH',
                        help='where to write: .png for a PNG query, .nii or .nii.gz for a volume; never one '
                             'of the inputs, and an existing file only with --overwrite')
    inputs.add_argument('--overwrite', action='store_true', help='replace --output if it exists')

    slicing = parser.add_argument_group('volumes: slicing and intensities (as datasets.prepare)')
    slicing.add_argument('--axis', choices=sorted(geometry.AXES), default='axial', help='slicing axis')
    slicing.add_argument('--slice_size', type=int, default=None,
                         help='slices are stretched to this size squared, the size of the prepared '
                              'training slices (default: the size the checkpoint records, else 512); 0 keeps '
                              'each slice at its own size')
    slicing.add_argument('--modality', help='CT (HU window), MRI (percentiles) or anything else (min-max); '
                                            'needed for volumes unless --normalization is given')
    intensity.add_intensity_arguments(slicing)
    slicing.add_argument('--target_on_input_scale', action='store_true',
                         help='image tasks whose target shares the input\'s intensities (denoising, '
                              'inpainting): scale context targets with their image\'s parameters and '
                              'write volume predictions in the query\'s units')

    model = parser.add_argument_group('model and inference')
    model.add_argument('--checkpoint', required=True, help='model checkpoint (.pth)')
    model.add_argument('--model', help='model factory name, e.g. mvg_vit_large_patch16 (default: the '
                                       'one the checkpoint names)')
    model.add_argument('--input_size', type=int, nargs=2, metavar=('HEIGHT', 'WIDTH'),
                       help='canvas size (default: the checkpoint\'s, else 896 448)')
    model.add_argument('--depth', type=int,
                       help='number of transformer blocks (default: the checkpoint\'s, else the factory\'s)')
    model.add_argument('--num_prompts', type=int, default=1, help='context pairs per query slice')
    model.add_argument('--ensemble', choices=['features', 'outputs', 'both'], default='features',
                       help='how several prompts are combined')
    model.add_argument('--label_encoding', choices=LABEL_ENCODINGS, default=None,
                       help='how context labels are drawn for the model (default: the one the checkpoint '
                            'records; needed for checkpoints that record none)')
    model.add_argument('--force', action='store_true',
                       help='use --model/--input_size/--depth/--label_encoding/--slice_size even where they '
                            'contradict the checkpoint')
    model.add_argument('--attention', choices=ATTENTION_PATHS, default='auto',
                       help='how attention adds the relative-position bias (all exact); auto: the fastest for '
                            'the device')
    model.add_argument('--scale', choices=SCALES, default='training',
                       help='training: slices at the scale of the training crops, in overlapping windows; '
                            'fit: each slice resized whole to the canvas half (faster, objects smaller)')
    model.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                       help='cuda, cuda:1, cpu, ... (default: cuda when available)')
    model.add_argument('--precision', choices=sorted(PRECISIONS), default='fp32',
                       help='bf16 is faster on recent GPUs')
    model.add_argument('--batch_size', type=int, default=8,
                       help='query slices per forward pass (each with --num_prompts canvases)')
    return parser


# ---------------------------------------------------------------------------------------------------
# files


@dataclass
class Volume:
    """A 3D volume as read, with what is needed to write a prediction on its grid."""
    data: np.ndarray
    affine: np.ndarray
    file_shape: Tuple[int, ...]
    header: Optional[nib.Nifti1Header]


def file_kind(path: str, flag: str) -> str:
    lower = path.lower()
    if lower.endswith(PNG_SUFFIXES):
        return 'png'
    if lower.endswith(VOLUME_SUFFIXES + OTHER_VOLUME_SUFFIXES) or os.path.isdir(path):
        return 'volume'
    raise InputError(f"{flag} {path}: unknown format; expected {', '.join(PNG_SUFFIXES + VOLUME_SUFFIXES)}, "
                     f"{', '.join(OTHER_VOLUME_SUFFIXES)} or a DICOM series folder")


def read_png_array(path: str, flag: str, convert_palette: bool) -> np.ndarray:
    if not os.path.isfile(path):
        raise InputError(f"{flag} {path}: file not found")
    try:
        with Image.open(path) as png:
            if convert_palette and png.mode == 'P':
                png = png.convert('RGB')
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
    return intensity.to_uint8(intensity.normalise(picture, intensity.fit_parameters(picture, 'minmax')))


def read_png_label(path: str, flag: str) -> np.ndarray:
    check_lossless(path, f"{flag} {path}")
    label = read_png_array(path, flag, convert_palette=False)
    if label.dtype == bool:  # a 1-bit PNG: a binary mask of class 1
        label = label.astype(np.uint8)
    if label.ndim != 2 or label.dtype.kind not in 'iu':
        raise InputError(f"{flag} {path}: a label PNG holds class ids (8- or 16-bit grey, or palette "
                         f"indices), got an array of shape {label.shape} ({label.dtype})")
    return label_ids(label, f"{flag} {path}")


def read_volume_3d(path: str, flag: str) -> Volume:
    """The volume with trailing singleton axes dropped (a 2D NIfTI becomes one slice)."""
    data, affine = read_volume(Source(path))
    file_shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise InputError(f"{flag} {path}: shape {file_shape} is not a 3D volume")
    header = nib.load(path).header if path.lower().endswith(VOLUME_SUFFIXES) else None
    return Volume(data, affine, file_shape, header)


# ---------------------------------------------------------------------------------------------------
# volumes -> prepared slices and back


def intensity_method(args, path: str) -> str:
    if args.normalization != 'auto':
        return args.normalization
    if args.modality is None:
        raise InputError(f"{path}: volumes need --modality (CT, MRI or other) or --normalization to "
                         f"scale intensities the way the training data were")
    return intensity.default_method(args.modality)


def fit_intensity(data: np.ndarray, args, path: str) -> Tuple[np.ndarray, dict]:
    """The volume with NaN/inf replaced, and the [low, high] that maps it to [0, 1]."""
    data, replaced = intensity.replace_non_finite(data)
    if replaced:
        print(f"warning: {path}: {replaced} NaN or infinite voxels, set to the volume's smallest finite "
              f"value before normalising", file=sys.stderr)
    parameters = intensity.fit_parameters(data, intensity_method(args, path), args.window, args.percentiles,
                                          args.percentile_region)
    return data, parameters


def slice_plan(volume: np.ndarray, axis: int, slice_size: int) -> Optional[dict]:
    """How each slice is stretched to slice_size squared (None: slices keep their size)."""
    if slice_size == 0:
        return None
    rows, cols = geometry.slice_for_display(volume, axis, 0).shape
    return geometry.fit_plan(rows, cols, slice_size, 'stretch')


def prepared_image(volume01: np.ndarray, axis: int, index: int, plan: Optional[dict]) -> np.ndarray:
    picture = geometry.slice_for_display(volume01, axis, index)
    return intensity.to_uint8(picture if plan is None else geometry.resize_intensity(picture, plan))


def prepared_label(labels: np.ndarray, axis: int, index: int, plan: Optional[dict]) -> np.ndarray:
    picture = geometry.slice_for_display(labels, axis, index)
    return picture if plan is None else geometry.resize_nearest(picture, plan)


def restored_slice(picture: np.ndarray, plan: Optional[dict], is_label: bool) -> np.ndarray:
    """A predicted picture back to the in-plane voxel order and size of the RAS volume's slice."""
    if plan is not None:
        picture = (geometry.unresize_nearest(picture, plan) if is_label
                   else geometry.unresize_intensity(picture.astype(np.float32), plan))
    return geometry.display_to_slice(picture)


# ---------------------------------------------------------------------------------------------------
# context pairs


@dataclass
class ContextPair:
    image: np.ndarray      # uint8 prepared slice
    target: np.ndarray     # class ids, or uint8 target slice
    position: float        # relative position along the axis, in [0, 1]


def parse_context_slices(values: Optional[Sequence[str]], num_prompts: int):
    """('auto', K) or ('indices', [i, ...]) from the --context_slices words."""
    if not values:
        return 'auto', max(3, num_prompts)
    if len(values) == 1 and values[0].startswith('auto:'):
        count = values[0][len('auto:'):]
        if not count.isdigit() or int(count) < 1:
            raise InputError(f"--context_slices {values[0]}: expected auto:K with K a positive integer")
        return 'auto', int(count)
    try:
        return 'indices', [int(v) for v in values]
    except ValueError:
        raise InputError(f"--context_slices {' '.join(values)}: expected slice indices or auto:K") from None


def usable_slices(targets: np.ndarray, axis: int) -> np.ndarray:
    """Slices whose label holds a foreground class (image tasks: whose target is not all black)."""
    other_axes = tuple(a for a in range(3) if a != axis)
    return np.flatnonzero((targets > 0).any(axis=other_axes))


def spread_over_range(usable: np.ndarray, count: int) -> List[int]:
    """`count` usable slices, nearest to evenly spaced points from the first to the last one."""
    chosen = []
    for point in np.linspace(usable[0], usable[-1], min(count, len(usable))):
        remaining = np.setdiff1d(usable, chosen)
        chosen.append(int(remaining[np.abs(remaining - point).argmin()]))
    return sorted(chosen)


def choose_context_slices(selection, targets: np.ndarray, axis: int, where: str, task: str) -> List[int]:
    usable = usable_slices(targets, axis)
    if not len(usable):
        content = 'class other than background (0)' if task == 'segmentation' else 'intensity above black'
        raise InputError(f"{where}: holds no {content} on any slice; a context needs at least one "
                         f"{'labelled' if task == 'segmentation' else 'non-black'} slice")
    mode, value = selection
    if mode == 'auto':
        if value > len(usable):
            print(f"{where}: --context_slices auto:{value} but only {len(usable)} labelled slices; "
                  f"using all of them", file=sys.stderr)
        return spread_over_range(usable, value)
    count = targets.shape[axis]
    for index in value:
        if not 0 <= index < count:
            raise InputError(f"--context_slices {index} is outside 0..{count - 1}, the slices of {where} "
                             f"along the {AXIS_NAMES[axis]} axis")
        if index not in usable:
            raise InputError(f"--context_slices {index}: slice {index} of {where} holds "
                             f"{'no label (background only)' if task == 'segmentation' else 'only black'}")
    return list(value)


def volume_contexts(image_path: str, target_path: str, selection, args) -> List[ContextPair]:
    axis = geometry.AXES[args.axis]
    image, target = read_volume_3d(image_path, '--context_image'), read_volume_3d(target_path, '--context_label')
    if not geometry.grids_match(image.data.shape, image.affine, target.data.shape, target.affine, AFFINE_TOLERANCE):
        raise InputError(f"--context_image {image_path} and --context_label {target_path}: the voxel grids "
                         f"differ (shapes {image.data.shape} vs {target.data.shape}; largest affine "
                         f"difference {np.abs(image.affine - target.affine).max():.4g} mm)")
    image_data, image_parameters = fit_intensity(image.data, args, image_path)
    image01 = intensity.normalise(image_data, image_parameters)
    if args.task == 'segmentation':
        targets = label_ids(target.data, f"--context_label {target_path}")
    else:
        target_data, target_parameters = fit_intensity(target.data, args, target_path)
        scale = image_parameters if args.target_on_input_scale else target_parameters
        targets = intensity.normalise(target_data, scale)
    image01, _ = geometry.to_canonical(image01, image.affine)
    targets, _ = geometry.to_canonical(targets, image.affine)
    indices = choose_context_slices(selection, targets, axis, target_path, args.task)
    plan = slice_plan(image01, axis, args.slice_size)
    count = image01.shape[axis]
    pairs = []
    for index in indices:
        if args.task == 'segmentation':
            target_slice = prepared_label(targets, axis, index, plan)
        else:
            target_slice = prepared_image(targets, axis, index, plan)
        pairs.append(ContextPair(prepared_image(image01, axis, index, plan), target_slice, slice_position(index, count)))
    return pairs


def png_context(image_path: str, target_path: str, task: str) -> ContextPair:
    image = read_png_image(image_path, '--context_image')
    if task == 'segmentation':
        target = read_png_label(target_path, '--context_label')
        if not target.any():
            raise InputError(f"--context_label {target_path}: holds no class other than background (0)")
    else:
        target = read_png_image(target_path, '--context_target')
    if image.shape != target.shape:
        raise InputError(f"--context_image {image_path} and --context_label {target_path}: sizes differ "
                         f"({image.shape} vs {target.shape})")
    return ContextPair(image, target, UNPLACED_POSITION)


def load_contexts(args) -> List[ContextPair]:
    if len(args.context_image) != len(args.context_target):
        raise InputError(f"{len(args.context_image)} --context_image files but {len(args.context_target)} "
                         f"--context_label files; give one label per image")
    selection = parse_context_slices(args.context_slices, args.num_prompts)
    pairs, volumes = [], 0
    for image_path, target_path in zip(args.context_image, args.context_target):
        image_kind, target_kind = file_kind(image_path, '--context_image'), file_kind(target_path, '--context_label')
        if image_kind != target_kind:
            raise InputError(f"--context_image {image_path} and --context_label {target_path}: one is a PNG, "
                             f"the other a volume; a pair must be both")
        if image_kind == 'png':
            pairs.append(png_context(image_path, target_path, args.task))
        else:
            pairs.extend(volume_contexts(image_path, target_path, selection, args))
            volumes += 1
    if args.context_slices and not volumes:
        raise InputError("--context_slices chooses slices of context volumes, but every context is a PNG")
    if args.num_prompts > len(pairs):
        raise InputError(f"--num_prompts {args.num_prompts} needs at least that many context pairs; "
                         f"the contexts give {len(pairs)}")
    if args.task == 'segmentation' and args.label_encoding == 'grey':
        largest = max(int(p.target.max()) for p in pairs)
        if largest > MAX_GREY_CLASS:
            raise InputError(f"--label_encoding grey draws ids up to {MAX_GREY_CLASS}; the context labels hold "
                             f"id {largest}")
    return pairs


def nearest_contexts(position: float, pairs: Sequence[ContextPair], count: int) -> List[tuple]:
    """The `count` pairs nearest in relative position; sorted() is stable, so ties keep the given order."""
    order = sorted(range(len(pairs)), key=lambda i: abs(pairs[i].position - position))
    return [(pairs[i].image, pairs[i].target) for i in order[:count]]


# ---------------------------------------------------------------------------------------------------
# prediction and output


def load_model_and_settings(args):
    """The model, with --model/--input_size/--depth/--label_encoding/--slice_size resolved against what
    the checkpoint records (args updated in place: contexts are read with them)."""
    flags = {'model': args.model, 'input_size': args.input_size, 'depth': args.depth,
             'label_encoding': args.label_encoding, 'slice_size': args.slice_size}
    required = ('label_encoding',) if args.task == 'segmentation' else ()
    model, settings = load_checkpoint(args.checkpoint, flags, args.force, required=required)
    model.set_attention(args.attention)
    args.label_encoding = settings['label_encoding'] or LABEL_ENCODINGS[0]
    args.slice_size = DEFAULT_SLICE_SIZE if settings['slice_size'] is None else settings['slice_size']
    return model


def build_predictor(args, model) -> Predictor:
    return Predictor(model, device=args.device, precision=args.precision, batch_size=args.batch_size,
                     label_encoding=args.label_encoding, num_prompts=args.num_prompts, ensemble=args.ensemble,
                     scale=args.scale)


def predict_slices(predictor: Predictor, task: str, queries: Sequence[np.ndarray],
                   contexts: Sequence[List[tuple]]) -> List[np.ndarray]:
    """One batch at a time, so only a batch of full-size float predictions is held in memory."""
    run = predictor.segment if task == 'segmentation' else predictor.translate
    step = predictor.batch_size
    predictions = []
    for start in tqdm(range(0, len(queries), step), desc='predicting', unit='batch', disable=None):
        predictions += run(contexts[start:start + step], queries[start:start + step])
    return predictions


def label_dtype(labels: np.ndarray):
    largest = int(labels.max()) if labels.size else 0
    return np.uint8 if largest <= 255 else np.uint16 if largest <= 65535 else np.int32


def predict_png(args, predictor: Predictor, pairs: List[ContextPair]) -> np.ndarray:
    query = read_png_image(args.query, '--query')
    (prediction,) = predict_slices(predictor, args.task, [query],
                                   [nearest_contexts(UNPLACED_POSITION, pairs, args.num_prompts)])
    if args.task == 'segmentation':
        if prediction.max() > 65535:
            raise InputError(f"--output {args.output}: class id {prediction.max()} does not fit a 16-bit PNG")
        prediction = prediction.astype(label_dtype(prediction))
    with atomic_output(args.output) as handle:
        Image.fromarray(prediction).save(handle, format='PNG')
    return prediction


def predict_volume(args, predictor: Predictor, pairs: List[ContextPair]) -> np.ndarray:
    axis = geometry.AXES[args.axis]
    query = read_volume_3d(args.query, '--query')
    data, parameters = fit_intensity(query.data, args, args.query)
    volume01, _ = geometry.to_canonical(intensity.normalise(data, parameters), query.affine)
    plan = slice_plan(volume01, axis, args.slice_size)
    count = volume01.shape[axis]
    queries = [prepared_image(volume01, axis, k, plan) for k in range(count)]
    contexts = [nearest_contexts(slice_position(k, count), pairs, args.num_prompts) for k in range(count)]
    predictions = predict_slices(predictor, args.task, queries, contexts)

    is_label = args.task == 'segmentation'
    canonical = np.zeros(volume01.shape, dtype=np.int64 if is_label else np.float32)
    for k, picture in enumerate(predictions):
        np.moveaxis(canonical, axis, 0)[k] = restored_slice(picture, plan, is_label)
    volume = geometry.from_canonical(canonical, query.affine).reshape(query.file_shape)
    if is_label:
        volume = volume.astype(label_dtype(volume))
    elif args.target_on_input_scale:
        volume = (parameters['low'] + volume / 255.0 * (parameters['high'] - parameters['low'])).astype(np.float32)
    else:
        volume = np.clip(np.round(volume), 0, 255).astype(np.uint8)
    save_on_query_grid(volume, query, args.output)
    return volume


def save_on_query_grid(volume: np.ndarray, query: Volume, path: str):
    """The query's header and affine (qform and sform codes too), with the prediction's data type,
    no intensity scaling and no display range: the query's would not describe labels."""
    if query.header is None:  # a DICOM or MetaImage query: a fresh header placed by the affine
        header = nib.Nifti1Header()
        header.set_qform(query.affine, code=1)
        header.set_sform(query.affine, code=1)
    else:
        header = query.header.copy()
    header.set_data_dtype(volume.dtype)
    header.set_slope_inter(1.0, 0.0)
    header['cal_min'] = header['cal_max'] = 0
    contents = nib.Nifti1Image(volume, query.affine, header).to_bytes()
    if path.lower().endswith('.gz'):
        contents = gzip.compress(contents, compresslevel=6)
    with atomic_output(path) as handle:
        handle.write(contents)


def same_file(first: str, second: str) -> bool:
    """The same file, whatever the spelling: one path, a link to it, or a hard link of it."""
    if os.path.realpath(first) == os.path.realpath(second):
        return True
    return os.path.exists(first) and os.path.exists(second) and os.path.samefile(first, second)


def check_output_path(args, query_kind: str):
    output_kind = file_kind(args.output, '--output')
    wrong_suffix = not args.output.lower().endswith('.png' if query_kind == 'png' else VOLUME_SUFFIXES)
    if output_kind != query_kind or wrong_suffix:
        wanted = '.png' if query_kind == 'png' else ' or '.join(VOLUME_SUFFIXES)
        raise InputError(f"--output {args.output}: a {query_kind} query gives a {wanted} output")
    inputs = [('--query', args.query)] + [('--context_image', p) for p in args.context_image] + \
        [('--context_label', p) for p in args.context_target]
    for flag, path in inputs:
        if same_file(path, args.output):
            raise InputError(f"--output {args.output}: is the {flag} input; an input is never written over")
    if os.path.exists(args.output) and not args.overwrite:
        raise InputError(f"--output {args.output}: exists; choose another path, or add --overwrite to replace it")


def run(args):
    if args.slice_size is not None and args.slice_size < 0:
        raise InputError(f"--slice_size {args.slice_size}: expected a positive size, or 0 for the slices' own")
    for flag, value in (('--num_prompts', args.num_prompts), ('--batch_size', args.batch_size)):
        if value < 1:
            raise InputError(f"{flag} {value}: expected at least 1")
    query_kind = file_kind(args.query, '--query')
    check_output_path(args, query_kind)
    model = load_model_and_settings(args)
    pairs = load_contexts(args)
    predictor = build_predictor(args, model)
    if query_kind == 'png':
        prediction = predict_png(args, predictor, pairs)
    else:
        prediction = predict_volume(args, predictor, pairs)
    summary = (f"classes {sorted(int(i) for i in np.unique(prediction))}" if args.task == 'segmentation'
               else f"intensities {prediction.min():.4g}..{prediction.max():.4g}")
    print(f"wrote {args.output}: {prediction.shape} {prediction.dtype}, {summary}, "
          f"from {len(pairs)} context pairs")


def main(argv=None):
    return run_main(lambda argv: run(get_args_parser().parse_args(argv)), argv)


if __name__ == '__main__':
    sys.exit(main())
