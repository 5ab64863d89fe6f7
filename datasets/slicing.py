"""Volumes to the slices datasets.prepare writes, and predicted slices back onto the volume's grid.

datasets.prepare and predict.py both go through here, so a volume given to predict.py is seen as the
PNG slices prepare writes from it, pixel for pixel. Forward (read_volumes, then SlicedVolumes.picture):

    read       any format of datasets/readers.py; trailing size-1 axes are dropped, a 2D picture is one
               slice, a 4D image gives its --channel volume (4D labels and masks are refused); formats
               that store no geometry take the --spacing affine
    check      labels and masks hold whole, non-negative ids (label_ids); an image's NaN and infinite
               voxels become its smallest finite value (counted, for the caller to report)
    reorient   to RAS, flips and permutations only (datasets/geometry.py)
    normalise  per image folder to [0, 1] (datasets/intensity.py); a target on the input's scale
               (tasks.Task.target_on_input_scale) takes the input's parameters
    slice      picture = flipud(slice.T) along the axis, brought to size x size by the ResizePlan of the
               input's slice shape (size 0: each slice keeps its own size): 8-bit grey for images, 0/255
               for masks, ids in the smallest PNG type for labels (label_dtype)

Back (SliceGrid.put_back): each predicted picture undoes the plan (nearest neighbour for labels), the
pictures are stacked at their slice indices, reoriented from RAS to the original voxel order and shaped
as the file was; SlicedVolumes.put_back also gives the values the task's target has in a volume. A
prepared case's grid comes from its manifest record (SliceGrid.from_record).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tasks import Task

from . import geometry, intensity
from .readers import FORMATS_WITHOUT_SPACING, InputError, Source, read_header, read_volume, volume_format

AXIS_NAMES = {index: name for name, index in geometry.AXES.items()}
IMAGE, LABEL, MASK = "image", "label", "mask"  # the kinds of a folder (tasks.py)


@dataclass(frozen=True)
class SliceSettings:
    """How volumes become slices: the shared flags of datasets.prepare and predict.py."""

    axis: int
    size: int  # slices become size x size; 0 keeps each slice's own size
    intensity: intensity.IntensitySettings
    fit: str = "stretch"
    channel: int | None = None
    spacing: np.ndarray | None = None  # the --spacing affine of formats that store no geometry
    affine_tolerance: float = 1e-3  # mm, between the volumes of a case or context pair

    @property
    def axis_name(self) -> str:
        return AXIS_NAMES[self.axis]

    @classmethod
    def from_args(cls, args, size: int, modality: str | None, **more) -> "SliceSettings":
        """From the flags add_slicing_arguments and intensity.add_intensity_arguments add."""
        return cls(
            axis=geometry.AXES[args.axis],
            size=size,
            channel=args.channel,
            intensity=intensity.IntensitySettings.from_args(args, modality),
            **more,
        )


def add_slicing_arguments(group, channel_note=""):
    """--axis and --channel, which datasets.prepare and predict.py share."""
    group.add_argument(
        "--axis", choices=sorted(geometry.AXES), default="axial", help="slicing axis of the RAS-reoriented volume"
    )
    group.add_argument(
        "--channel", type=int, help=f"index into the 4th axis of 4D images (4D is refused without it){channel_note}"
    )


# ---------------------------------------------------------------- reading one volume as 3D


def effective_shape(shape, kind, channel, where):
    """The 3D shape a volume has once trailing size-1 axes are dropped, 2D becomes one slice and a 4D
    image gives the --channel volume. Refuses what cannot become 3D."""
    shape = list(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    if len(shape) == 2:
        shape.append(1)
    if len(shape) == 4:
        if kind != IMAGE:
            raise InputError(f"{where}: {kind} volume is 4D {tuple(shape)}; expected 3D")
        if channel is None:
            raise InputError(
                f"{where}: image is 4D {tuple(shape)}; choose the channel/time index with --channel (0..{shape[3] - 1})"
            )
        if not 0 <= channel < shape[3]:
            raise InputError(
                f"{where}: --channel {channel} is outside 0..{shape[3] - 1} of the 4D shape {tuple(shape)}"
            )
        shape.pop()
    if len(shape) != 3:
        raise InputError(f"{where}: shape {tuple(shape)} is not a 2D or 3D volume")
    return tuple(shape)


def placed_affine(source: Source, affine, settings: SliceSettings):
    """The file's own affine, or the --spacing one for formats that store no geometry."""
    if settings.spacing is not None and volume_format(source.path) in FORMATS_WITHOUT_SPACING:
        return np.asarray(settings.spacing)
    return affine


def header_3d(source: Source, kind: str, settings: SliceSettings, where: str):
    """(3D shape, affine) from the header alone, so every input can be checked before any is read."""
    shape, affine = read_header(source)
    return effective_shape(shape, kind, settings.channel, where), placed_affine(source, affine, settings)


def read_3d(source: Source, kind: str, settings: SliceSettings, where: str):
    """(3D array in the file's voxel order, affine, the shape a volume written back takes)."""
    data, affine = read_volume(source)
    shape = effective_shape(data.shape, kind, settings.channel, where)
    written_shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        data = data[..., settings.channel]
        written_shape = shape
    return data.reshape(shape), placed_affine(source, affine, settings), tuple(written_shape)


def label_ids(data, where):
    """Integer ids from a label volume; float files must hold whole numbers."""
    if not np.issubdtype(data.dtype, np.integer):
        if not np.isfinite(data).all():
            raise InputError(f"{where}: label volume holds NaN or infinite values")
        rounded = np.rint(data)
        if np.abs(data - rounded).max() > 1e-3:
            raise InputError(
                f"{where}: label volume holds non-integer values, e.g. {data[np.abs(data - rounded) > 1e-3].ravel()[0]}"
            )
        data = rounded
    data = data.astype(np.int32)
    if data.size and data.min() < 0:
        raise InputError(f"{where}: label volume holds negative ids ({data.min()})")
    return data


def label_dtype(largest: int):
    """The smallest type that holds ids up to `largest`: PNGs take 8 or 16 bits, NIfTI also int32."""
    return np.uint8 if largest <= 255 else np.uint16 if largest <= 65535 else np.int32


def remap_labels(labels, label_map):
    if not label_map:
        return labels
    remapped = labels.copy()
    for old, new in label_map.items():
        remapped[labels == old] = new
    return remapped


# ---------------------------------------------------------------- back onto the original grid


@dataclass(frozen=True)
class SliceGrid:
    """Where a volume's slices go back to: its voxel grid as read, the slicing axis and the plan."""

    original_affine: np.ndarray
    written_shape: tuple[int, ...]  # the file's shape (a 4D file: its 3D channel volume)
    canonical_shape: tuple[int, int, int]
    axis: int
    plan: geometry.ResizePlan | None  # None: the slices kept their own size

    @classmethod
    def from_record(cls, record: dict) -> "SliceGrid":
        """The grid of a prepared case, from its manifest record."""
        return cls(
            np.asarray(record["original"]["affine"]),
            tuple(record["original"]["shape"]),
            tuple(record["canonical"]["shape"]),
            record["slice_axis"],
            geometry.ResizePlan.from_json(record["resize"]),
        )

    def slice_back(self, picture, is_label: bool):
        """A predicted picture -> the canonical slice's in-plane voxel order and size."""
        if self.plan is not None:
            picture = (
                geometry.unresize_nearest(picture, self.plan)
                if is_label
                else geometry.unresize_intensity(picture, self.plan)
            )
        return geometry.display_to_slice(picture)

    def put_back(self, pictures: Mapping[int, np.ndarray], is_label: bool, fill=0):
        """{slice index: picture} -> a volume on the original grid (int64 labels or float32 values);
        slices without a picture hold `fill`."""
        canonical = np.full(self.canonical_shape, fill, dtype=np.int64 if is_label else np.float32)
        for index, picture in pictures.items():
            np.moveaxis(canonical, self.axis, 0)[index] = self.slice_back(np.asarray(picture), is_label)
        return geometry.from_canonical(canonical, self.original_affine).reshape(self.written_shape)


# ---------------------------------------------------------------- the volumes of a case or context pair


@dataclass
class SlicedVolumes:
    """Co-registered volumes ({folder: kind}, the input folder first) reoriented to RAS and normalised,
    ready to give any slice as datasets.prepare writes it."""

    settings: SliceSettings
    kinds: dict[str, str]
    volumes: dict[str, np.ndarray]  # canonical (RAS) arrays; images as read, NaN replaced
    parameters: dict[str, dict]  # intensity parameters of each image folder
    non_finite: dict[str, int]  # NaN and infinite voxels replaced, per image folder
    original_shape: tuple[int, int, int]  # the input's 3D shape and affine as read
    original_affine: np.ndarray
    written_shape: tuple[int, ...]  # the input file's shape, which a volume written back takes
    canonical_affine: np.ndarray
    grid: SliceGrid = field(init=False)

    def __post_init__(self):
        input_volume = self.volumes[self.input_folder]
        plan = None
        if self.settings.size:
            rows, cols = geometry.slice_for_display(input_volume, self.settings.axis, 0).shape
            plan = geometry.fit_plan(rows, cols, self.settings.size, self.settings.fit)
        self.grid = SliceGrid(
            np.asarray(self.original_affine), self.written_shape, input_volume.shape, self.settings.axis, plan
        )
        self._label_dtypes = {
            folder: label_dtype(int(volume.max()) if volume.size else 0)
            for folder, volume in self.volumes.items()
            if self.kinds[folder] == LABEL
        }

    @property
    def input_folder(self) -> str:
        return next(iter(self.kinds))

    @property
    def num_slices(self) -> int:
        return self.volumes[self.input_folder].shape[self.settings.axis]

    @property
    def in_plane_axes(self) -> tuple[int, int]:
        return tuple(a for a in range(3) if a != self.settings.axis)

    def above_background(self, folder: str) -> np.ndarray:
        """Boolean canonical volume: ids above 0 (labels, masks), or above black once normalised."""
        if self.kinds[folder] == IMAGE:
            return intensity.normalise(self.volumes[folder], self.parameters[folder]) > 0
        return self.volumes[folder] > 0

    def picture(self, folder: str, index: int) -> np.ndarray:
        """Slice `index` of `folder`, the array datasets.prepare writes as its PNG."""
        kind, plan = self.kinds[folder], self.grid.plan
        picture = geometry.slice_for_display(self.volumes[folder], self.settings.axis, index)
        if kind == IMAGE:
            picture = intensity.normalise(picture, self.parameters[folder])
            return intensity.to_uint8(picture if plan is None else geometry.resize_intensity(picture, plan))
        if plan is not None:
            picture = geometry.resize_nearest(picture, plan)
        if kind == MASK:
            return np.where(picture > 0, 255, 0).astype(np.uint8)
        return picture.astype(self._label_dtypes[folder])

    def pictures(self, folder: str) -> list[np.ndarray]:
        return [self.picture(folder, index) for index in range(self.num_slices)]

    def put_back(self, predictions: Sequence[np.ndarray], task: Task) -> np.ndarray:
        """A predicted picture per slice -> the volume on the input file's grid: class ids in the smallest
        type (label targets), the input's units (targets on its scale) or uint8 on the slices' 8-bit scale
        (a target with a scale of its own, which the input does not tell)."""
        volume = self.grid.put_back(dict(enumerate(predictions)), task.target_is_label)
        if task.target_is_label:
            return volume.astype(label_dtype(int(volume.max()) if volume.size else 0))
        if task.target_on_input_scale:
            return intensity.from_uint8_scale(volume, self.parameters[self.input_folder])
        return np.clip(np.round(volume), 0, 255).astype(np.uint8)


def read_volumes(
    sources: Mapping[str, Source],
    kinds: Mapping[str, str],
    settings: SliceSettings,
    where: Mapping[str, str],
    target_on_input_scale: bool = False,
    label_map: Mapping[int, int] | None = None,
) -> SlicedVolumes:
    """Reads the volumes of one case (or context pair), {folder: kind} with the input folder first;
    `where` names each folder's file in messages. Grids must agree within settings.affine_tolerance."""
    input_folder = next(iter(kinds))
    volumes, non_finite, parameters = {}, {}, {}
    for folder, kind in kinds.items():
        data, affine, written_shape = read_3d(sources[folder], kind, settings, where[folder])
        if folder == input_folder:
            original = (data.shape, affine, written_shape)
        else:
            check_same_grid(original[0], original[1], data.shape, affine, settings, where, input_folder, folder)
        if kind == IMAGE:
            data, non_finite[folder] = intensity.replace_non_finite(data)
            parameters[folder] = (
                parameters[input_folder]
                if target_on_input_scale and folder != input_folder
                else fitted_parameters(data, settings, where[folder])
            )
        else:
            data = label_ids(data, where[folder])
            if kind == LABEL:
                data = remap_labels(data, label_map)
        volumes[folder], canonical_affine = geometry.to_canonical(data, affine)
        if folder == input_folder:
            input_canonical_affine = canonical_affine
    return SlicedVolumes(settings, dict(kinds), volumes, parameters, non_finite, *original, input_canonical_affine)


def check_same_grid(shape, affine, other_shape, other_affine, settings, where, folder, other_folder):
    if not geometry.grids_match(shape, affine, other_shape, other_affine, settings.affine_tolerance):
        raise InputError(
            f"{where[folder]} and {where[other_folder]}: the voxel grids differ "
            f"({geometry.grid_difference(shape, affine, other_shape, other_affine)})"
        )


def fitted_parameters(volume, settings: SliceSettings, where: str) -> dict:
    if settings.intensity.method is None:
        raise InputError(
            f"{where}: volumes need --modality (CT, MRI or other) or --normalization to "
            f"scale intensities the way the training data were"
        )
    return settings.intensity.fit(volume)


def read_image(path: str, settings: SliceSettings, where: str) -> SlicedVolumes:
    """One image volume (a query): its slices as prepare writes them, and its grid to put predictions on."""
    return read_volumes({IMAGE: Source(path)}, {IMAGE: IMAGE}, settings, {IMAGE: where})


def read_pair(image: str, target: str, task: Task, settings: SliceSettings, where: tuple[str, str]) -> SlicedVolumes:
    """An input volume and its target (a context pair) as the task's input and target folders."""
    folders = (task.input_folder, task.target_folder)
    return read_volumes(
        dict(zip(folders, (Source(image), Source(target)))),
        {folder: task.folders[folder] for folder in folders},
        settings,
        dict(zip(folders, where)),
        task.target_on_input_scale,
    )
