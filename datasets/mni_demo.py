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
    return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")


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
    description = {"name": "MNI152 2009 tissue", "modality": {"0": "MRI"}, "file_ending": ".nii.gz",
                   "labels": {str(i): name for i, name in CLASS_NAMES.items()}, "numTraining": 1}
    with open(os.path.join(out_dir, "dataset.json"), "w") as handle:
        json.dump(description, handle, indent=1)
    return image_path, label_path
