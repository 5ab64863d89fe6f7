"""What the browser app (app.py) does, without gradio: the page's handlers call these functions, and
tests/test_app.py drives them directly.

    open      a query: a volume (NIfTI, MetaImage, NRRD, DICOM files or a series) read the way predict.py
              reads it (datasets/slicing.py, so the model sees the slices datasets.prepare would write),
              or a picture (PNG), which is taken as a prepared slice, as predict.py does
    show      one slice with a window/level, in the scan's own units (HU for CT), enlarged by a whole
              factor when small, with the drawn label or the prediction coloured over it
    context   brush strokes on one or two query slices (one colour per class), or chosen slices of a
              labelled volume (image + label, or image + target image for the image tasks)
    run       every slice predicted by inference.Predictor with the nearest context pairs in relative
              position (predict_contexts), a batch at a time with a progress callback
    measure   the volume of each predicted class in millilitres, from the query's voxel size
    download  the prediction as NIfTI on the query's grid with its affine and header
              (predict.save_on_query_grid), or as PNG for a picture query, plus the shown slice as a PNG

Nothing here writes beside an input: every file goes into a fresh folder under the app's own folder.

Slices are shown on the display grid (the volume's own in-plane voxels, oriented as datasets.prepare
orients its pictures: anterior or superior at the top); the model works on the prepared grid (stretched
to the checkpoint's slice size). Drawn labels go from the first to the second by the same nearest
neighbour resize that prepare applies to label volumes, so a slice painted by hand and the same slice
of a label file give the model the same context label.
"""

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

import predict
from datasets import geometry, intensity, slicing
from datasets.manifest import slice_position
from datasets.readers import DICOM_FILE_EXTENSIONS, InputError
from inference import Predictor
from label_encoding import check_grey_ids, nearest_colour, random_palette
from pixels import resize_picture
from predict_contexts import (
    UNPLACED_POSITION,
    ContextPair,
    nearest_contexts,
    parse_context_slices,
    png_context,
    volume_contexts,
)
from predict_inputs import VOLUME_SUFFIXES, file_kind, read_png_image
from tasks import Task, get_task
from util.runtime import resolve_precision

AUTO_MODALITY = "auto"
MODALITIES = (AUTO_MODALITY, "CT", "MRI", "other")
# Air is about -1000 HU, so a CT volume goes far below zero; MR and other scans stay near or above it.
CT_AIR_BELOW = -500.0

DISPLAY_SIDE = 448  # smaller slices are shown enlarged by a whole factor, so that strokes are easy to draw
OVERLAY_OPACITY = 0.45
# Saturated colours that stand out on grey. The model's palettes (label_encoding) are chosen for its
# nearest-colour decoding, not to be seen, so they are used only for ids beyond this list.
DISPLAY_COLOURS = np.array(
    [[230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [245, 130, 48], [145, 30, 180], [70, 240, 240]],
    dtype=np.uint8,
)
BRUSH_CLASSES = 6  # the brush offers classes 1..6, each in its display colour
PAINTED_ALPHA = 128  # brush pixels at least this opaque count as painted; the soft edge of a stroke does not


# ---------------------------------------------------------------------------------------------------
# the model


def load_predictor(args) -> Predictor:
    """The model the way predict.py loads it: model, canvas, depth, label encoding and slice size come from
    the checkpoint's record (args updated in place), a flag that contradicts it needs --force. The label
    encoding must be known, since drawing labels is what the app is for."""
    args.precision = resolve_precision(args.precision, args.device, inference=True)
    model = predict.load_model_and_settings(args, get_task("segmentation"))
    return predict.build_predictor(args, model)


def slice_settings(args, modality: str) -> slicing.SliceSettings:
    return slicing.SliceSettings.from_args(args, args.slice_size, modality)


# ---------------------------------------------------------------------------------------------------
# the query


@dataclass
class Query:
    """An opened query: a volume (sliced as predict.py slices it) or a picture (a prepared slice)."""

    path: str  # what was read; never written to
    name: str  # the file name without its extension, for the names of downloads
    modality: str  # the one used, "auto" resolved
    volume: slicing.SlicedVolumes | None = None  # None for a picture
    picture: np.ndarray | None = None  # a picture query: its 8-bit grey pixels
    guessed: bool = False  # the modality was guessed from the intensities ('auto')

    @property
    def is_picture(self) -> bool:
        return self.volume is None

    @property
    def num_slices(self) -> int:
        return 1 if self.is_picture else self.volume.num_slices

    def check_slice(self, index: int):
        if not 0 <= index < self.num_slices:
            raise InputError(f"slice {index} is outside 0..{self.num_slices - 1}, the slices of {self.name}")

    def model_slice(self, index: int) -> np.ndarray:
        """Slice `index` as the model reads it: the 8-bit picture datasets.prepare would write."""
        return self.picture if self.is_picture else self.volume.picture(slicing.IMAGE, index)

    def display_values(self, index: int) -> np.ndarray:
        """Slice `index` on the display grid, in the volume's own units (HU for CT)."""
        if self.is_picture:
            return self.picture.astype(np.float32)
        return geometry.slice_for_display(self.volume.volumes[slicing.IMAGE], self.volume.settings.axis, index)

    @property
    def display_shape(self) -> tuple[int, int]:
        return self.display_values(0).shape

    def value_range(self) -> tuple[float, float]:
        values = self.picture if self.is_picture else self.volume.volumes[slicing.IMAGE]
        return float(values.min()), float(values.max())

    def default_window(self) -> tuple[float, float]:
        """(level, width) of the intensities the model sees: its CT window, MR percentiles or min-max."""
        if self.is_picture:
            return 127.5, 255.0
        parameters = self.volume.parameters[slicing.IMAGE]
        low, high = parameters["low"], parameters["high"]
        return (low + high) / 2, max(high - low, 1e-6)

    def position(self, index: int) -> float:
        """Relative position along the axis, which decides the nearest context pairs (predict_contexts)."""
        return UNPLACED_POSITION if self.is_picture else slice_position(index, self.num_slices)

    def to_model_grid(self, label: np.ndarray) -> np.ndarray:
        """A label on the display grid -> the prepared grid, as datasets.prepare resizes label slices."""
        plan = None if self.is_picture else self.volume.grid.plan
        return label if plan is None else geometry.resize_nearest(label, plan)

    @property
    def voxel_ml(self) -> float | None:
        """Millilitres per voxel from the affine; None for a picture, which holds no pixel size."""
        if self.is_picture:
            return None
        return abs(float(np.linalg.det(self.volume.original_affine[:3, :3]))) / 1000.0

    def describe(self) -> str:
        if self.is_picture:
            rows, cols = self.picture.shape
            return f"{self.name}: a {rows}x{cols} picture, taken as a prepared slice"
        volume = self.volume
        sizes = "x".join(f"{s:.3g}" for s in geometry.voxel_sizes(volume.original_affine))
        shape = "x".join(str(n) for n in volume.original_shape)
        return (
            f"{self.name}: {shape} voxels of {sizes} mm, {volume.num_slices} {volume.settings.axis_name} slices; "
            f"{self.modality}{' (guessed: choose the modality if wrong)' if self.guessed else ''}, intensities "
            f"scaled as the model expects ({volume.parameters[slicing.IMAGE]['method']})"
        )


def file_name(path: str) -> str:
    """The name of a file or folder without its volume extension (scan.nii.gz -> scan)."""
    name = os.path.basename(os.path.normpath(path))
    for suffix in sorted((*VOLUME_SUFFIXES, ".png"), key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def gather_upload(paths: Sequence[str], work_dir: str, what: str) -> str:
    """The path to read from what the page uploaded: one file as it is; several files (the slices of a
    DICOM series, a MetaImage header and its data file) linked together into a fresh folder of the app's
    own, where they sit side by side as the readers expect. Returns that folder for a DICOM series."""
    paths = [p for p in paths or [] if p]
    if not paths:
        raise InputError(f"{what}: no file given")
    if len(paths) == 1:
        return paths[0]
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) != len(names):
        raise InputError(f"{what}: two of the files have the same name; a volume's files need names of their own")
    folder = tempfile.mkdtemp(prefix="upload-", dir=work_dir)
    for path, name in zip(paths, names):
        os.symlink(os.path.abspath(path), os.path.join(folder, name))
    volumes = [
        n for n in names if n.lower().endswith(VOLUME_SUFFIXES) and not n.lower().endswith(DICOM_FILE_EXTENSIONS)
    ]
    if len(volumes) > 1:
        raise InputError(f"{what}: {len(volumes)} volumes at once ({', '.join(sorted(volumes))}); give one")
    return os.path.join(folder, volumes[0]) if volumes else folder


def guess_modality(volume: np.ndarray) -> str:
    return "CT" if float(volume.min()) < CT_AIR_BELOW else "MRI"


def read_query_volume(path: str, args, modality: str, where: str) -> tuple[slicing.SlicedVolumes, str]:
    """(sliced volume, modality used). 'auto' reads with min-max scaling, looks at the intensities, then
    fits the guessed modality's scaling on the volume already in memory rather than reading it again."""
    volume = slicing.read_image(path, slice_settings(args, "other" if modality == AUTO_MODALITY else modality), where)
    if modality != AUTO_MODALITY:
        return volume, modality
    modality = guess_modality(volume.volumes[slicing.IMAGE])
    settings = slice_settings(args, modality)
    parameters = {slicing.IMAGE: settings.intensity.fit(volume.volumes[slicing.IMAGE])}
    return replace(volume, settings=settings, parameters=parameters), modality


def open_query(paths: Sequence[str], args, modality: str, work_dir: str) -> Query:
    path = gather_upload(paths, work_dir, "query")
    name = file_name(path)
    if os.path.isdir(path) or file_kind(os.path.basename(path), "query") == "volume":
        volume, used = read_query_volume(path, args, modality, f"query {name}")
        return Query(path, name, used, volume=volume, guessed=modality == AUTO_MODALITY)
    return Query(path, name, "picture", picture=read_png_image(path, f"query {name}"))


def non_finite_note(query: Query) -> str:
    count = 0 if query.is_picture else query.volume.non_finite.get(slicing.IMAGE, 0)
    return f" {count} NaN or infinite voxels were set to the volume's smallest value." if count else ""


# ---------------------------------------------------------------------------------------------------
# showing a slice


def window_to_uint8(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """level - width/2 becomes black, level + width/2 white."""
    width = max(float(width), 1e-6)
    return intensity.to_uint8((np.asarray(values, np.float32) - (level - width / 2)) / width)


def display_zoom(shape: Sequence[int]) -> int:
    return max(1, math.ceil(DISPLAY_SIDE / max(shape)))


def enlarge(picture: np.ndarray, zoom: int) -> np.ndarray:
    """Each pixel as a zoom x zoom block: voxels stay sharp squares."""
    return np.repeat(np.repeat(picture, zoom, axis=0), zoom, axis=1)


def class_colours(largest_id: int) -> np.ndarray:
    """(largest_id + 1, 3) colours indexed by class id; background (0) black."""
    extra = max(0, largest_id - len(DISPLAY_COLOURS))
    colours = [np.zeros((1, 3), np.uint8), DISPLAY_COLOURS[: max(largest_id, 0)]]
    if extra:
        colours.append(random_palette(extra, np.random.default_rng(0)))
    return np.concatenate(colours)


def colour_hex(class_id: int) -> str:
    return "#{:02x}{:02x}{:02x}".format(*class_colours(class_id)[class_id])


def overlay(grey: np.ndarray, labels: np.ndarray | None, opacity: float = OVERLAY_OPACITY) -> np.ndarray:
    """An (rows, cols, 3) picture: the grey slice, with each class blended in its colour."""
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if labels is None or not labels.any():
        return rgb
    colours = class_colours(int(labels.max()))[labels]
    blended = (1 - opacity) * rgb + opacity * colours
    return np.where(labels[..., None] > 0, np.round(blended), rgb).astype(np.uint8)


def render_slice(query: Query, index: int, level: float, width: float, labels: np.ndarray | None = None):
    """The slice as the page shows it: windowed, coloured by `labels` (display grid), enlarged."""
    query.check_slice(index)
    picture = overlay(window_to_uint8(query.display_values(index), level, width), labels)
    return enlarge(picture, display_zoom(picture.shape[:2]))


# ---------------------------------------------------------------------------------------------------
# contexts: brush strokes on query slices, or slices of a labelled volume


def strokes_to_label(layers: Sequence[np.ndarray | None], shape: Sequence[int]) -> np.ndarray:
    """Brush layers (RGBA pictures of the enlarged slice; later layers on top) -> class ids on the display
    grid of `shape`: each painted pixel takes the class whose brush colour is nearest."""
    label = None
    brush_colours = class_colours(BRUSH_CLASSES)[1:]
    for layer in layers:
        if layer is None:
            continue
        layer = np.asarray(layer)
        if layer.ndim != 3 or layer.shape[2] != 4:
            raise InputError(f"a brush layer should be an RGBA picture, got shape {layer.shape}")
        if label is None:
            label = np.zeros(layer.shape[:2], np.uint8)
        elif layer.shape[:2] != label.shape:
            raise InputError(f"brush layers of different sizes: {label.shape} and {layer.shape[:2]}")
        painted = layer[..., 3] >= PAINTED_ALPHA
        classes = nearest_colour(layer[..., :3].transpose(2, 0, 1), brush_colours) + 1
        label[painted] = classes[painted]
    if label is None:
        return np.zeros(tuple(shape), np.uint8)
    return resize_picture(label, tuple(shape), is_label=True)  # each voxel takes its block's centre


def label_layer(label: np.ndarray) -> np.ndarray:
    """A drawn label as an enlarged RGBA brush layer, so that a drawing can be amended later."""
    colours = class_colours(int(label.max()))[label]
    alpha = np.where(label > 0, 255, 0).astype(np.uint8)
    return enlarge(np.dstack([colours, alpha]), display_zoom(label.shape))


def check_drawn_label(label: np.ndarray, index: int):
    if not label.any():
        raise InputError(f"slice {index}: nothing is drawn; paint the structures with the brush first")


def drawn_contexts(query: Query, drawn: dict[int, np.ndarray]) -> list[ContextPair]:
    """A context pair per drawn query slice: the slice as the model reads it, and the drawing on its grid."""
    pairs = []
    for index, label in sorted(drawn.items()):
        check_drawn_label(label, index)
        pairs.append(ContextPair(query.model_slice(index), query.to_model_grid(label), query.position(index)))
    return pairs


@dataclass(frozen=True)
class LabelledContext:
    """Context files: an image and its label (or target image), uploaded, and which slices to use."""

    image_paths: tuple[str, ...]
    target_paths: tuple[str, ...]
    slices: str = "auto:3"  # slice indices, or auto:K labelled slices spread over the labelled range


def labelled_contexts(context: LabelledContext, task: Task, args, modality: str, work_dir: str) -> list[ContextPair]:
    """The context pairs of an uploaded pair, read as predict.py reads --context_image/--context_label
    (the same slicing and scaling as the query, grids checked, slices holding a label)."""
    image = gather_upload(context.image_paths, work_dir, "context image")
    target = gather_upload(context.target_paths, work_dir, "context label")
    where = (f"context image {file_name(image)}", f"context label {file_name(target)}")
    kinds = [
        "volume" if os.path.isdir(p) else file_kind(os.path.basename(p), w) for p, w in zip((image, target), where)
    ]
    if kinds[0] != kinds[1]:
        raise InputError(f"{where[0]} and {where[1]}: one is a picture, the other a volume; a pair must be both")
    if kinds[0] == "png":
        return [png_context(image, target, task)]
    selection = parse_context_slices(context.slices.split(), 1)
    return volume_contexts(image, target, selection, task, slice_settings(args, modality), where)


def describe_pairs(pairs: Sequence[ContextPair], task: Task) -> str:
    if not task.target_is_label:
        return f"{len(pairs)} context pair(s)"
    classes = sorted({int(c) for p in pairs for c in np.unique(p.target) if c})
    return f"{len(pairs)} context pair(s), classes {', '.join(map(str, classes))}"


# ---------------------------------------------------------------------------------------------------
# running the model


@dataclass
class Prediction:
    """A prediction of the whole query: on the query's grid as a download holds it, and as display slices."""

    task: Task
    values: np.ndarray  # a volume query: the file's grid (class ids, or the task's image values); a picture: 2D
    canonical: np.ndarray  # RAS (rows, cols, slices) for display: slice_for_display gives the slices
    axis: int

    def display_slice(self, index: int) -> np.ndarray:
        return geometry.slice_for_display(self.canonical, self.axis, index)


def predict_query(
    predictor: Predictor,
    task: Task,
    query: Query,
    pairs: Sequence[ContextPair],
    on_progress: Callable[[int, int], None] | None = None,
) -> Prediction:
    """Every slice of the query, predicted with its nearest pairs, a batch at a time; on_progress(done,
    total) after each batch."""
    check_pairs(pairs, task, predictor)
    count = query.num_slices
    contexts = [nearest_contexts(query.position(k), pairs, predictor.num_prompts) for k in range(count)]
    outputs = predict.predict_slices(
        predictor, task, [query.model_slice(k) for k in range(count)], contexts, on_progress
    )
    if query.is_picture:
        (output,) = outputs
        if task.target_is_label:
            output = output.astype(slicing.label_dtype(int(output.max())))
        return Prediction(task, output, geometry.display_to_slice(output)[:, :, None], axis=2)
    volume = query.volume
    values = volume.put_back(outputs, task)
    canonical, _ = geometry.to_canonical(values.reshape(volume.original_shape), volume.original_affine)
    return Prediction(task, values, canonical, volume.settings.axis)


def check_pairs(pairs: Sequence[ContextPair], task: Task, predictor: Predictor):
    if not pairs:
        how = (
            "draw a label on a slice or two, or give a labelled volume"
            if task.target_is_label
            else "give an image pair"
        )
        raise InputError(f"no context yet: {how}")
    if predictor.num_prompts > len(pairs):
        raise InputError(
            f"--num_prompts {predictor.num_prompts} needs at least that many context pairs; there are {len(pairs)}"
        )
    if task.target_is_label and predictor.label_encoding == "grey":
        check_grey_ids(max(int(p.target.max()) for p in pairs), "context label")


def class_volumes(labels: np.ndarray, voxel_ml: float | None) -> list[tuple[int, int, float | None]]:
    """(class id, voxels, millilitres) for each class other than background; millilitres None for a picture."""
    ids, counts = np.unique(labels, return_counts=True)
    return [(int(i), int(n), None if voxel_ml is None else n * voxel_ml) for i, n in zip(ids, counts) if i != 0]


# ---------------------------------------------------------------------------------------------------
# downloads


def output_folder(work_dir: str) -> str:
    """A fresh folder for one run's files, so that nothing the app wrote before is written over."""
    os.makedirs(work_dir, exist_ok=True)
    return tempfile.mkdtemp(prefix="prediction-", dir=work_dir)


def write_prediction(query: Query, prediction: Prediction, folder: str) -> str:
    """The prediction as predict.py writes it: NIfTI on the query's grid with its affine and header, or a
    PNG of class ids (8-bit, 16-bit above 255) or of the 8-bit image for a picture query."""
    if query.is_picture:
        path = os.path.join(folder, f"{query.name}_{prediction.task.name}.png")
        Image.fromarray(prediction.values).save(path)
        return path
    path = os.path.join(folder, f"{query.name}_{prediction.task.name}.nii.gz")
    predict.save_on_query_grid(prediction.values, query.volume.grid.original_affine, query.path, path)
    return path


def write_picture(picture: np.ndarray, folder: str, name: str) -> str:
    path = os.path.join(folder, f"{name}.png")
    Image.fromarray(picture).save(path)
    return path


# ---------------------------------------------------------------------------------------------------
# one browser tab's state


@dataclass
class Session:
    """What one browser tab has opened, drawn and predicted."""

    query: Query | None = None
    drawn: dict[int, np.ndarray] = field(default_factory=dict)  # slice index -> label on the display grid
    labelled: LabelledContext | None = None
    prediction: Prediction | None = None

    def require_query(self) -> Query:
        if self.query is None:
            raise InputError("open a query first: a volume or a picture")
        return self.query

    def open(self, paths: Sequence[str], args, modality: str, work_dir: str) -> Query:
        """A new query; what was drawn on the previous one and its prediction are dropped with it."""
        query = open_query(paths, args, modality, work_dir)
        self.query, self.drawn, self.prediction = query, {}, None
        return query

    def draw(self, index: int, layers: Sequence[np.ndarray | None]) -> np.ndarray:
        query = self.require_query()
        query.check_slice(index)
        label = strokes_to_label(layers, query.display_shape)
        check_drawn_label(label, index)
        self.drawn[index] = label
        return label

    def choose_labelled(self, context: LabelledContext, task: Task, args, work_dir: str) -> list[ContextPair]:
        """Checks the context files now (so that a problem shows at once) and keeps them for the run."""
        pairs = labelled_contexts(context, task, args, self.require_query().modality, work_dir)
        self.labelled = context
        return pairs

    def context_pairs(self, task: Task, args, work_dir: str) -> list[ContextPair]:
        """Drawn and labelled-volume pairs together; labelled volumes are read again, scaled as the query is."""
        query = self.require_query()
        if self.drawn and not task.target_is_label:
            raise InputError(f"drawn labels are contexts for segmentation; {task.name} needs an image pair")
        pairs = drawn_contexts(query, self.drawn)
        if self.labelled is not None:
            pairs += labelled_contexts(self.labelled, task, args, query.modality, work_dir)
        return pairs

    def run(self, predictor: Predictor, task: Task, args, work_dir: str, on_progress=None) -> Prediction:
        pairs = self.context_pairs(task, args, work_dir)
        self.prediction = predict_query(predictor, task, self.require_query(), pairs, on_progress)
        return self.prediction

    def view(self, index: int, level: float, width: float, show_prediction: bool = True) -> np.ndarray:
        """The shown picture: the slice with its drawn label, or with the prediction (segmentation), or
        the slice beside the predicted image (image tasks)."""
        query = self.require_query()
        prediction = self.prediction if show_prediction else None
        if prediction is None:
            return render_slice(query, index, level, width, self.drawn.get(index))
        if prediction.task.target_is_label:
            return render_slice(query, index, level, width, prediction.display_slice(index))
        predicted = prediction.display_slice(index).astype(np.float32)
        # Denoising and inpainting come back in the query's units and share its window; a synthesised
        # contrast has a scale of its own, the 8-bit one of the prepared slices.
        own_scale = (level, width) if prediction.task.target_on_input_scale else (127.5, 255.0)
        picture = np.hstack(
            [
                window_to_uint8(query.display_values(index), level, width),
                np.zeros((predicted.shape[0], 2), np.uint8),  # a dark line between the two
                window_to_uint8(predicted, *own_scale),
            ]
        )
        return enlarge(np.repeat(picture[..., None], 3, axis=2), display_zoom(predicted.shape))

    def volumes_table(self) -> list[list]:
        """Rows of (class, voxels, millilitres) for the page (no millilitres for a picture); none for image tasks."""
        if self.prediction is None or not self.prediction.task.target_is_label:
            return []
        rows = class_volumes(self.prediction.values, self.require_query().voxel_ml)
        return [[class_id, voxels, None if ml is None else round(float(ml), 3)] for class_id, voxels, ml in rows]

    def downloads(self, index: int, level: float, width: float, work_dir: str) -> list[str]:
        """The prediction file and the shown slice (with the prediction over it) as a PNG."""
        query = self.require_query()
        if self.prediction is None:
            raise InputError("nothing predicted yet: run the model first")
        folder = output_folder(work_dir)
        shown = write_picture(self.view(index, level, width), folder, f"{query.name}_slice{index}")
        return [write_prediction(query, self.prediction, folder), shown]
