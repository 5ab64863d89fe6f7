"""Helpers and constants that several test modules share (fixtures built from them are in
tests/conftest.py): source volumes in the layouts datasets.prepare reads, the prepare tool on the
command line, tiny prepared datasets, stand-ins for a trained model, predict.py's inputs and command
line, training runs and weights, and the entry points' one-line errors."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import main_pretrain
import predict
from datasets import prepare
from datasets.manifest import PreparedDataset, read_png
from masking_generator import MaskPolicy
from util.cli import UsageError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- source volumes and files


def save(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), str(path))


def save_nifti(path, data, affine=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)
    return path


def labelled_volume(shape=(8, 8, 6), ids_on_slices=None, seed=0):
    """A float image and an int label volume; ids_on_slices: {axial index: class id} painted as a
    small block in that slice."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 20.0, size=shape).astype(np.float32)
    label = np.zeros(shape, dtype=np.int16)
    for z, class_id in (ids_on_slices or {}).items():
        label[2:5, 3:6, z] = class_id
    return image, label


def write_msd(root, cases, description=None, images="imagesTr", labels="labelsTr", suffix=""):
    """cases: {case id: (image, label[, affine])}."""
    for case_id, (image, label, *affine) in cases.items():
        save_nifti(os.path.join(root, images, f"{case_id}{suffix}.nii.gz"), image, *affine)
        save_nifti(os.path.join(root, labels, f"{case_id}.nii.gz"), label, *affine)
    if description is not None:
        with open(os.path.join(root, "dataset.json"), "w") as handle:
            json.dump(description, handle)


def write_dicom_series(folder, volume_hu, spacing=(0.7, 0.8), thickness=2.5, origin=(-10.0, -20.0, 30.0)):
    """One CT slice per file, written in reverse order so the reader has to sort by position."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    os.makedirs(folder)
    series = generate_uid()
    for k in reversed(range(volume_hu.shape[2])):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = (
            CTImageStorage,
            meta.MediaStorageSOPInstanceUID,
            series,
        )
        ds.Modality, ds.Rows, ds.Columns = "CT", volume_hu.shape[1], volume_hu.shape[0]
        ds.PixelSpacing = list(spacing)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * thickness]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.ascontiguousarray((volume_hu[:, :, k].T + 1024).astype(np.int16)).tobytes()
        ds.save_as(os.path.join(folder, f"slice{k:03d}.dcm"), enforce_file_format=True)
    return pydicom


def real_dicom(name):
    """A file of the pydicom-data package (real scans), or a skip when it is not installed."""
    spec = importlib.util.find_spec("data_store")
    if spec is None:
        pytest.skip("pip install pydicom-data for the real-scan DICOM tests")
    return os.path.join(spec.submodule_search_locations[0], "data", name)


# ---------------------------------------------------------------- the prepare tool and what it writes


def run(*argv):
    return prepare.main([str(a) for a in argv])


def common(out, dataset, size=8, *extra):
    return ["--out", out, "--dataset", dataset, "--size", size, *extra]


def dataset_at(out, name):
    return PreparedDataset(os.path.join(out, name))


def png(dataset, folder, case_id, index):
    return read_png(dataset.slice_path(folder, case_id, index))


# ---------------------------------------------------------------- tiny prepared datasets and canvases

CANVAS = (64, 32)  # two 32x32 pairs; a 4x2 token grid
SLICE = 40  # prepared slice size, so crops move


def segmentation_case(seed, depth=6):
    """Every slice holds class 1 (left half) and class 2 (right half) inside a body."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 50, size=(SLICE, SLICE, depth)).astype(np.float32)
    label = np.zeros((SLICE, SLICE, depth), dtype=np.int16)
    label[4:20, 4:36] = 1
    label[20:36, 4:36] = 2
    return image, label


def prepare_all(root):
    out = root / "prepared"
    for i in range(3):
        image, label = segmentation_case(i, depth=1 if i == 2 else 6)  # case 2 has a single slice
        save(root / "seg" / "imagesTr" / f"c{i}.nii.gz", image)
        save(root / "seg" / "labelsTr" / f"c{i}.nii.gz", label)
    for i in range(2):
        base = np.random.default_rng(10 + i).uniform(0, 100, size=(SLICE, SLICE, 4)).astype(np.float32)
        case = root / "brats" / f"B-{i}"
        for contrast, volume in (("t1c", base), ("t2w", 100 - base)):
            save(case / f"B-{i}-{contrast}.nii.gz", volume)
        save(root / "ldct" / "low" / f"p{i}.nii.gz", base + np.random.default_rng(i).normal(0, 10, base.shape))
        save(root / "ldct" / "full" / f"p{i}.nii.gz", base)
        hole = np.zeros(base.shape, np.uint8)
        hole[10:30, 10:30, 1:3] = 1
        local = root / "local" / f"L-{i}"
        save(local / f"L-{i}-t1n.nii.gz", base)
        save(local / f"L-{i}-t1n-voided.nii.gz", base * (1 - hole))
        save(local / f"L-{i}-mask.nii.gz", hole)
    common = ["--out", str(out), "--size", str(SLICE), "--test_fraction", "0"]
    assert prepare.main(["msd", "--root", str(root / "seg"), "--dataset", "Seg", "--modality", "CT", *common]) == 0
    assert (
        prepare.main(
            [
                "brats-synthesis",
                "--root",
                str(root / "brats"),
                "--source",
                "t1c",
                "--target",
                "t2w",
                "--dataset",
                "Synth",
                *common,
            ]
        )
        == 0
    )
    assert (
        prepare.main(
            [
                "denoising",
                "--root",
                str(root / "ldct"),
                "--low_dose",
                "low/*.nii.gz",
                "--normal_dose",
                "full/*.nii.gz",
                "--modality",
                "CT",
                "--dataset",
                "Denoise",
                *common,
            ]
        )
        == 0
    )
    assert prepare.main(["brats-inpainting", "--root", str(root / "local"), "--dataset", "Inpaint", *common]) == 0
    return out


def toy_segmentation(root):
    """A segmentation anyone can learn: the label is where the CT image is bright."""
    rng = np.random.default_rng(0)
    for case in range(3):
        image = rng.normal(-100, 10, size=(40, 40, 5)).astype(np.float32)
        for z in range(5):
            top, left = rng.integers(2, 20, size=2)
            height, width = rng.integers(8, 18, size=2)
            image[top : top + height, left : left + width, z] = rng.normal(150, 10, size=(height, width))
        save(root / "toy" / "imagesTr" / f"t{case}.nii.gz", image)
        save(root / "toy" / "labelsTr" / f"t{case}.nii.gz", (image > 25).astype(np.int16))
    out = root / "prepared"
    assert (
        prepare.main(
            [
                "msd",
                "--root",
                str(root / "toy"),
                "--dataset",
                "Toy",
                "--modality",
                "CT",
                "--out",
                str(out),
                "--size",
                "40",
                "--test_fraction",
                "0",
            ]
        )
        == 0
    )
    return out


def policy(half_mask_ratio=0.0):
    return MaskPolicy(
        input_size=(4, 2),
        num_mask_patches=3,
        min_mask_patches_per_block=1,
        max_mask_patches_per_block=2,
        half_mask_ratio=half_mask_ratio,
    )


# ---------------------------------------------------------------- a stand-in for a perfect model

HALF = (32, 32)


class CopyContextModel(torch.nn.Module):
    """Stands in for a perfect model on self-context: paints the context target as the query's."""

    img_size = (2 * HALF[0], HALF[1])

    def set_attention(self, path):  # the entry points choose the attention path of real models
        self.attention = path

    def predict(self, imgs, tgts, num_prompts=1, ensemble="features"):
        out = tgts[:, :, : HALF[0]]
        return out.reshape(-1, num_prompts, *out.shape[1:]).mean(1)


def stand_in_loader(model, label_encoding="random_colors"):
    """Replaces inference.load_checkpoint in an entry point: (model, settings) whatever the path; the
    settings are the flags given, else what a record of the stand-in would say."""
    recorded = {
        "model": "stand-in",
        "input_size": list(model.img_size),
        "depth": 0,
        "label_encoding": label_encoding,
        "slice_size": None,
    }

    def load(path, flags, force=False, required=()):
        given = {name: value for name, value in flags.items() if value is not None}
        return model, {**recorded, **given, "settings_source": "record"}

    return load


def blob_labels(num_classes, shape=HALF, seed=0):
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.int64)
    for c in range(1, num_classes + 1):
        r, col = rng.integers(0, shape[0] - 6), rng.integers(0, shape[1] - 6)
        label[r : r + 6, col : col + 6] = c
    return label


# ---------------------------------------------------------------- predict.py's inputs and command line

SIDE = HALF[0]  # in-plane size that goes through the stand-in model's canvas without any resize


def save_png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def save_placed_nifti(path, data, affine):
    """A NIfTI with qform code 1 and sform code 2, so that a header carried over to an output shows;
    returns the path as a string, ready for a command line."""
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=2)
    nib.save(image, path)
    return str(path)


def run_predict(*argv):
    return predict.main([str(a) for a in argv])


# ---------------------------------------------------------------- training runs and their weights

TINY = [
    "--device",
    "cpu",
    "--model",
    "mvg_vit_tiny_patch16",
    "--depth",
    "4",
    "--input_size",
    "64",
    "32",
    "--num_mask_patches",
    "3",
    "--min_mask_patches_per_block",
    "1",
    "--max_mask_patches_per_block",
    "2",
    "--num_workers",
    "0",
    "--log_dir",
    "",
    "--print_freq",
    "4",
    "--vis_every_steps",
    "0",
    "--save_every_steps",
    "0",
    "--warmup_epochs",
    "0.5",
]


def run_training(out, data, *extra):
    """main_pretrain on the CPU with the TINY settings, on the prepared root `data`, into `out`."""
    return main_pretrain.main([*TINY, "--data_path", data, "--output_dir", str(out), *extra])


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b, atol=0.0, rtol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=rtol, msg=lambda m, key=key: f"{key}: {m}")


# ---------------------------------------------------------------- one-line errors of the entry points


def run_module(*argv, env=None):
    """python -m argv... in the repository, with this interpreter (the venv's)."""
    return subprocess.run(
        [sys.executable, "-m", *map(str, argv)], cwd=REPO, capture_output=True, text=True, env=env, timeout=120
    )


def assert_one_error_line(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def usage_error(function, *args) -> str:
    """The message of the UsageError function(*args) raises; it must be one line."""
    with pytest.raises(UsageError) as caught:
        function(*args)
    message = str(caught.value)
    assert "\n" not in message
    return message
