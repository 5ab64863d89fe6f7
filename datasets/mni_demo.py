"""A real, small, offline segmentation case: the MNI152 2009 (ICBM 152 nonlinear symmetric 09a) T1
template with a grey/white matter label built from the tissue probability maps that the nilearn wheel
ships in nilearn/datasets/data/ (1 mm, 197 x 233 x 189; nothing is downloaded).

Label: 0 background, 1 grey matter, 2 white matter. A voxel takes the tissue with the larger
probability when that probability exceeds TISSUE_THRESHOLD (0.5), else background. The packaged maps
store probabilities as 0..255. nilearn packages no CSF map, so there is no CSF class.

The case is written in the nnU-Net / Decathlon layout, so it prepares like any such dataset:

    from datasets.mni_demo import write_mni152_tissue_case
    write_mni152_tissue_case("demo/mni")   # demo/mni/{imagesTr,labelsTr}/mni152.nii.gz, dataset.json
    python -m datasets.prepare msd --root demo/mni --out demo/prepared --dataset MNI152
"""

import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import nibabel as nib
import numpy as np

TISSUE_THRESHOLD = 0.5
CLASS_NAMES = {0: "background", 1: "grey matter", 2: "white matter"}
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def nilearn_data_folder():
    """nilearn's packaged data folder, found without importing nilearn (slow, and not needed)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the MNI152 demo case needs the files of the nilearn wheel: pip install nilearn")
    return os.path.join(next(iter(spec.submodule_search_locations)), "datasets", "data")


def load_template(name):
    path = os.path.join(nilearn_data_folder(), TEMPLATE_FILES[name])
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not in this nilearn installation")
    return nib.load(path)


def tissue_labels(grey_probability, white_probability, threshold=TISSUE_THRESHOLD):
    """0 / 1 (grey) / 2 (white) from two probability maps in [0, 1]."""
    white_wins = white_probability > grey_probability
    winner_probability = np.where(white_wins, white_probability, grey_probability)
    labels = np.where(white_wins, 2, 1).astype(np.uint8)
    return np.where(winner_probability > threshold, labels, 0).astype(np.uint8)


def write_mni152_tissue_case(out_dir, case_id="mni152"):
    """Writes <out_dir>/imagesTr/<case_id>.nii.gz (T1), <out_dir>/labelsTr/<case_id>.nii.gz and a
    dataset.json naming the classes; returns (image path, label path)."""
    t1, grey, white = (load_template(name) for name in ("t1", "gm", "wm"))
    labels = tissue_labels(grey.get_fdata() / 255.0, white.get_fdata() / 255.0)
    image_path = os.path.join(out_dir, "imagesTr", f"{case_id}.nii.gz")
    label_path = os.path.join(out_dir, "labelsTr", f"{case_id}.nii.gz")
    for path in (image_path, label_path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj), t1.affine, t1.header), image_path)
    label_header = grey.header.copy()
    label_header.set_data_dtype(np.uint8)
    label_header.set_slope_inter(1.0, 0.0)
    nib.save(nib.Nifti1Image(labels, grey.affine, label_header), label_path)
    description = {
        "name": "MNI152 2009 tissue",
        "modality": {"0": "MRI"},
        "file_ending": ".nii.gz",
        "labels": {str(i): name for i, name in CLASS_NAMES.items()},
        "numTraining": 1,
    }
    with open(os.path.join(out_dir, "dataset.json"), "w") as handle:
        json.dump(description, handle, indent=1)
    return image_path, label_path


# ---------------------------------------------------------------- the README demo's datasets
#
# The one template volume is cut into axial slabs that serve as cases: slabs of SLAB_SLICES slices
# separated by SLAB_GAP unused slices, every TEST_EVERY-th slab held out. No test slice then has a
# training slice closer than SLAB_GAP + 1 slices, so neighbouring-slice leakage cannot inflate scores.
#
# Several label sets are drawn on the same slabs, and their class ids collide on purpose: 1 is CSF in
# one set, the whole brain in another, the left hemisphere in a third, the cerebral territory in a
# fourth. A query slice alone therefore does not say which label it should get; only the context
# pair does.

SLAB_SLICES = 8
SLAB_GAP = 6
TEST_EVERY = 3
CSF_QUANTILE = 0.35  # brain voxels darker than this T1 quantile and neither grey nor white: "CSF-ish"
ENVELOPE_PROBABILITY = 0.1  # grey + white probability above this, holes filled: the brain
NOISE_FRACTION = 0.06  # Rician noise sigma as a fraction of the T1's 99th percentile
VOID_RADIUS_MM = (8.0, 14.0)  # radius range of the region removed from each slab for inpainting
# Each slab is placed in its own in-plane pose, as different subjects lie in a scanner: copies of one
# template in one position would let "copy the context label" score like an atlas without registration.
POSE_DEGREES, POSE_SHIFT_MM, POSE_SCALE = 12.0, 8.0, 0.08  # rotation, shift and size change at most
TRAINING_POSES = 3  # cases per training slab, each in a pose of its own


class TemplateMaps:
    """The template's T1 and tissue probabilities (0..1) on its own grid, with the derived masks the
    label sets are drawn from."""

    def __init__(self):
        t1_image, grey, white = (load_template(name) for name in ("t1", "gm", "wm"))
        self.image = t1_image
        self.t1 = np.asarray(t1_image.dataobj, dtype=np.float32)
        self.grey = grey.get_fdata(dtype=np.float32) / 255.0
        self.white = white.get_fdata(dtype=np.float32) / 255.0
        # The template's affine is diagonal and RAS: world x < 0 is the subject's left.
        columns = np.arange(self.t1.shape[0]) * t1_image.affine[0, 0] + t1_image.affine[0, 3]
        self.is_left = (columns < 0)[:, None, None]
        self.envelope = brain_envelope(self.grey, self.white)
        self.noise_sigma = NOISE_FRACTION * np.percentile(self.t1, 99)
        self.tissue = demo_tissue_labels(self.t1, self.grey, self.white, self.envelope)


def brain_envelope(grey_probability, white_probability):
    """Where grey or white matter is at all likely, holes filled slice by slice: the brain with its
    ventricles and sulci."""
    from scipy import ndimage

    likely = (grey_probability + white_probability) > ENVELOPE_PROBABILITY
    return np.stack([ndimage.binary_fill_holes(likely[:, :, z]) for z in range(likely.shape[2])], axis=2)


def demo_tissue_labels(t1, grey_probability, white_probability, envelope):
    """0 background, 1 CSF-ish, 2 grey matter, 3 white matter.

    Grey and white matter as in `tissue_labels`. CSF-ish: inside the brain envelope where neither
    tissue wins and the T1 is darker than its CSF_QUANTILE quantile over the envelope: ventricles and
    sulci."""
    tissue = tissue_labels(grey_probability, white_probability)
    dark = t1 < np.quantile(t1[envelope], CSF_QUANTILE)
    labels = np.where(tissue > 0, tissue + 1, 0).astype(np.uint8)
    labels[envelope & dark & (tissue == 0)] = 1
    return labels


@dataclass(frozen=True)
class LabelSet:
    """One segmentation task on the demo's slabs: its prepared dataset is MNI_<name>."""

    name: str
    classes: dict  # {class id: name}, background 0 left out
    draw: Callable[[TemplateMaps], np.ndarray]  # the label volume on the template grid
    by_intensity: bool  # whether the T1 intensity alone tells its classes apart

    @property
    def dataset(self) -> str:
        return f"MNI_{self.name}"


def _hemispheres(maps: TemplateMaps) -> np.ndarray:
    return np.where(maps.envelope, np.where(maps.is_left, 1, 2), 0).astype(np.uint8)


# The 300 regions of interest of Seitzman et al. (2018), which the nilearn wheel ships: centres in
# MNI mm, and an anatomical code per centre (0 midline, 1 left and 2 right cortex, 3 hippocampus,
# 4 amygdala, 5 basal ganglia, 6 thalamus, 7 cerebellum), grouped here into the classes of `regions`.
SEITZMAN_CENTRES = "seitzman_2018_ROIs_300inVol_MNI_allInfo.txt"
SEITZMAN_ANATOMY = "seitzman_2018_ROIs_anatomicalLabels.txt"
REGION_OF_ANATOMY = np.array([1, 1, 1, 2, 2, 2, 2, 3], dtype=np.uint8)


def seitzman_rois() -> tuple[np.ndarray, np.ndarray]:
    """(300, 3) ROI centres in MNI mm and their (300,) anatomical codes."""
    folder = nilearn_data_folder()
    centres = np.loadtxt(os.path.join(folder, SEITZMAN_CENTRES), skiprows=1, usecols=(0, 1, 2))
    codes = np.loadtxt(os.path.join(folder, SEITZMAN_ANATOMY), skiprows=1, dtype=np.int64)
    if len(centres) != len(codes) or codes.min() < 0 or codes.max() >= len(REGION_OF_ANATOMY):
        raise ValueError(
            f"{folder}: the Seitzman 2018 ROI files do not match ({len(centres)} centres, {len(codes)} codes)"
        )
    return centres, codes


def _regions(maps: TemplateMaps) -> np.ndarray:
    """Every brain voxel takes the class of its nearest Seitzman ROI centre: the territories of the
    cerebral, subcortical and cerebellar ROIs, which only position and anatomy tell apart."""
    from scipy.spatial import cKDTree

    centres, codes = seitzman_rois()
    inside = np.argwhere(maps.envelope)
    nearest = cKDTree(centres).query(nib.affines.apply_affine(maps.image.affine, inside))[1]
    labels = np.zeros(maps.envelope.shape, np.uint8)
    labels[tuple(inside.T)] = REGION_OF_ANATOMY[codes[nearest]]
    return labels


LABEL_SETS = {
    label_set.name: label_set
    for label_set in (
        LabelSet("tissue", {1: "csf", 2: "grey matter", 3: "white matter"}, lambda maps: maps.tissue, True),
        LabelSet("brain", {1: "brain"}, lambda maps: maps.envelope.astype(np.uint8), True),
        LabelSet("hemispheres", {1: "left", 2: "right"}, _hemispheres, False),
        LabelSet("regions", {1: "cerebral", 2: "subcortical", 3: "cerebellar"}, _regions, False),
    )
}


def rician_noise(volume, sigma, rng):
    """Magnitude-MR noise: |volume + complex Gaussian noise|."""
    real = volume + rng.normal(0.0, sigma, volume.shape)
    imaginary = rng.normal(0.0, sigma, volume.shape)
    return np.sqrt(real**2 + imaginary**2).astype(np.float32)


def slab_ranges(labels):
    """(first, last + 1) axial ranges of the slabs, over the slices that hold brain."""
    with_brain = np.flatnonzero(labels.reshape(-1, labels.shape[2]).any(axis=0))
    start, stop = int(with_brain[0]), int(with_brain[-1]) + 1
    return [(z, z + SLAB_SLICES) for z in range(start, stop - SLAB_SLICES + 1, SLAB_SLICES + SLAB_GAP)]


def void_region(envelope_slab, rng):
    """A cylinder through the whole slab (every slice has something to fill), centred on a random
    brain voxel of the slab's middle slice, its radius drawn from VOID_RADIUS_MM (1 mm voxels)."""
    middle = envelope_slab[:, :, envelope_slab.shape[2] // 2]
    candidates = np.argwhere(middle)
    centre = candidates[rng.integers(len(candidates))]
    radius = rng.uniform(*VOID_RADIUS_MM)
    rows, columns = np.ogrid[: middle.shape[0], : middle.shape[1]]
    disc = (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius**2
    return np.repeat(disc[:, :, None], envelope_slab.shape[2], axis=2)


@dataclass(frozen=True)
class Pose:
    """An in-plane rotation (degrees), shift (voxels, rows and columns of the slice) and scale about
    the slice centre, applied alike to every slice of a slab."""

    degrees: float = 0.0
    shift: tuple = (0.0, 0.0)
    scale: float = 1.0

    @classmethod
    def random(cls, rng) -> "Pose":
        return cls(
            float(rng.uniform(-POSE_DEGREES, POSE_DEGREES)),
            tuple(float(v) for v in rng.uniform(-POSE_SHIFT_MM, POSE_SHIFT_MM, size=2)),
            float(1.0 + rng.uniform(-POSE_SCALE, POSE_SCALE)),
        )

    def apply(self, volume, is_label: bool):
        """The slab seen in this pose: linear interpolation for images, nearest for labels and masks;
        what comes from outside the field of view is 0."""
        from scipy import ndimage

        angle = np.deg2rad(self.degrees)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        inverse = rotation.T / self.scale  # output voxel -> input voxel
        centre = (np.array(volume.shape[:2]) - 1) / 2.0
        offset = centre - inverse @ (centre + np.array(self.shift))
        order = 0 if is_label else 1
        moved = [
            ndimage.affine_transform(volume[:, :, z], inverse, offset=offset, order=order, mode="constant")
            for z in range(volume.shape[2])
        ]
        return np.stack(moved, axis=2).astype(volume.dtype)


def _save_slab(path, volume, affine, header, z0, dtype):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ np.array([0, 0, z0]) + affine[:3, 3]  # the slab keeps its place
    slab_header = header.copy()
    slab_header.set_data_dtype(dtype)
    slab_header.set_slope_inter(1.0, 0.0)
    nib.save(nib.Nifti1Image(volume.astype(dtype), shifted, slab_header), path)


@dataclass
class DemoSources:
    """Where write_demo_sources put each source dataset."""

    label_sets: dict  # {LabelSet name: MSD-layout folder}
    denoise: str  # noisy/, clean/
    inpaint: str  # BraTS layout: <case>/<case>-t1n-voided.nii.gz, -t1n.nii.gz, -mask.nii.gz
    test_cases: str  # held-out slab ids, one per line


def _describe(folder, label_set: LabelSet):
    description = {
        "name": f"MNI152 2009 slabs, {label_set.name}",
        "modality": {"0": "MRI"},
        "file_ending": ".nii.gz",
        "labels": {"0": "background", **{str(i): name for i, name in label_set.classes.items()}},
    }
    with open(os.path.join(folder, "dataset.json"), "w") as handle:
        json.dump(description, handle, indent=1)


def write_demo_sources(out_dir, label_sets=tuple(LABEL_SETS), seed=0, training_poses=TRAINING_POSES) -> DemoSources:
    """Writes the demo's source datasets from the template, one case per slab and pose:
    <out_dir>/<label set>/{imagesTr,labelsTr}/<case>.nii.gz + dataset.json   (segmentation, MSD layout)
    <out_dir>/denoise/{noisy,clean}/<case>.nii.gz                           (Rician-noise denoising)
    <out_dir>/inpaint/<case>/<case>-{t1n-voided,t1n,mask}.nii.gz            (a removed region, BraTS layout)
    <out_dir>/test_cases.txt                                                (held-out case ids)
    Held-out slabs are one case each (slabNN); every training slab is `training_poses` cases
    (slabNN, slabNN_pose1, ...), the same anatomy in different poses, as several subjects would be.
    """
    maps = TemplateMaps()
    rng = np.random.default_rng(seed)
    label_volumes = {name: LABEL_SETS[name].draw(maps) for name in label_sets}
    folders = {name: os.path.join(out_dir, name) for name in label_sets}
    sources = DemoSources(folders, os.path.join(out_dir, "denoise"), os.path.join(out_dir, "inpaint"), "")
    test_ids = []
    for number, slab in enumerate(slab_ranges(maps.tissue)):
        held_out = number % TEST_EVERY == TEST_EVERY - 1
        if held_out:
            test_ids.append(f"slab{number:02d}")
        for copy in range(1 if held_out else training_poses):
            case_id = f"slab{number:02d}" + (f"_pose{copy}" if copy else "")
            _write_case(sources, case_id, maps, label_volumes, slice(*slab), Pose.random(rng), rng)
    for name, folder in folders.items():
        _describe(folder, LABEL_SETS[name])
    sources.test_cases = os.path.join(out_dir, "test_cases.txt")
    with open(sources.test_cases, "w") as handle:
        handle.write("\n".join(test_ids) + "\n")
    return sources


def _write_case(sources: DemoSources, case_id, maps: TemplateMaps, label_volumes, block, pose: Pose, rng):
    """One slab in one pose, in every source dataset."""
    t1_slab = pose.apply(maps.t1[:, :, block], is_label=False)
    removed = void_region(pose.apply(maps.envelope[:, :, block], is_label=True), rng)
    noisy = rician_noise(t1_slab, maps.noise_sigma, rng)
    volumes = {os.path.join(sources.denoise, "noisy", case_id): (noisy, np.float32)}
    volumes[os.path.join(sources.denoise, "clean", case_id)] = (t1_slab, np.float32)
    brats_case = os.path.join(sources.inpaint, case_id, case_id)
    volumes[f"{brats_case}-t1n-voided"] = (np.where(removed, 0.0, t1_slab), np.float32)
    volumes[f"{brats_case}-t1n"] = (t1_slab, np.float32)
    volumes[f"{brats_case}-mask"] = (removed, np.uint8)
    for name, folder in sources.label_sets.items():
        volumes[os.path.join(folder, "imagesTr", case_id)] = (t1_slab, np.float32)
        labels = pose.apply(label_volumes[name][:, :, block], is_label=True)
        volumes[os.path.join(folder, "labelsTr", case_id)] = (labels, np.uint8)
    for path, (volume, dtype) in volumes.items():
        _save_slab(f"{path}.nii.gz", volume, maps.image.affine, maps.image.header, block.start, dtype)
