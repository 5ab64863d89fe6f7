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

SLAB_SLICES = 8
SLAB_GAP = 6
TEST_EVERY = 3
DEMO_CLASS_NAMES = {0: "background", 1: "csf", 2: "grey matter", 3: "white matter"}
CSF_QUANTILE = 0.35  # brain voxels darker than this T1 quantile and neither grey nor white: "CSF-ish"
NOISE_FRACTION = 0.06  # Rician noise sigma as a fraction of the T1's 99th percentile


def demo_tissue_labels(t1, grey_probability, white_probability):
    """0 background, 1 CSF-ish, 2 grey matter, 3 white matter.

    Grey and white matter as in `tissue_labels`. CSF-ish: inside the brain envelope (grey or white
    probability above 0.1, holes filled slice by slice) where neither tissue wins and the T1 is
    darker than its CSF_QUANTILE quantile over the envelope: ventricles and sulci."""
    from scipy import ndimage

    tissue = tissue_labels(grey_probability, white_probability)
    envelope = (grey_probability + white_probability) > 0.1
    envelope = np.stack([ndimage.binary_fill_holes(envelope[:, :, z]) for z in range(envelope.shape[2])], axis=2)
    dark = t1 < np.quantile(t1[envelope], CSF_QUANTILE)
    labels = np.where(tissue > 0, tissue + 1, 0).astype(np.uint8)
    labels[envelope & dark & (tissue == 0)] = 1
    return labels


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


def _save_slab(path, volume, affine, header, z0, dtype):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ np.array([0, 0, z0]) + affine[:3, 3]  # the slab keeps its place
    slab_header = header.copy()
    slab_header.set_data_dtype(dtype)
    slab_header.set_slope_inter(1.0, 0.0)
    nib.save(nib.Nifti1Image(volume.astype(dtype), shifted, slab_header), path)


def write_demo_sources(out_dir, seed=0):
    """Writes the demo's two source datasets from the template and returns their folders:
    <out_dir>/tissue/{imagesTr,labelsTr}/slabNN.nii.gz + dataset.json    (segmentation, MSD layout)
    <out_dir>/denoise/{noisy,clean}/slabNN.nii.gz                          (Rician-noise denoising)
    <out_dir>/test_cases.txt                                               (held-out slab ids)
    """
    t1_image, grey, white = (load_template(name) for name in ("t1", "gm", "wm"))
    t1 = np.asarray(t1_image.dataobj, dtype=np.float32)
    labels = demo_tissue_labels(t1, grey.get_fdata() / 255.0, white.get_fdata() / 255.0)
    noisy = rician_noise(t1, NOISE_FRACTION * np.percentile(t1, 99), np.random.default_rng(seed))
    tissue, denoise = os.path.join(out_dir, "tissue"), os.path.join(out_dir, "denoise")
    test_ids = []
    for number, (z0, z1) in enumerate(slab_ranges(labels)):
        case_id = f"slab{number:02d}"
        if number % TEST_EVERY == TEST_EVERY - 1:
            test_ids.append(case_id)
        block = slice(z0, z1)
        volumes = {
            os.path.join(tissue, "imagesTr"): (t1, np.float32),
            os.path.join(tissue, "labelsTr"): (labels, np.uint8),
            os.path.join(denoise, "noisy"): (noisy, np.float32),
            os.path.join(denoise, "clean"): (t1, np.float32),
        }
        for folder, (volume, dtype) in volumes.items():
            path = os.path.join(folder, f"{case_id}.nii.gz")
            _save_slab(path, volume[:, :, block], t1_image.affine, t1_image.header, z0, dtype)
    description = {
        "name": "MNI152 2009 tissue slabs",
        "modality": {"0": "MRI"},
        "file_ending": ".nii.gz",
        "labels": {str(i): name for i, name in DEMO_CLASS_NAMES.items()},
    }
    with open(os.path.join(tissue, "dataset.json"), "w") as handle:
        json.dump(description, handle, indent=1)
    test_cases = os.path.join(out_dir, "test_cases.txt")
    with open(test_cases, "w") as handle:
        handle.write("\n".join(test_ids) + "\n")
    return tissue, denoise, test_cases
