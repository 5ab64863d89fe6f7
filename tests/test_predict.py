"""predict.py end to end: NIfTI round trips through RAS and back on a non-RAS grid, PNG in / PNG out,
a real tiny checkpoint on CPU, and the errors users see for bad inputs."""

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import predict
from inference import Predictor
from models_mvg import mvg_vit_tiny_patch16
from tests.helpers import HALF, CopyContextModel, blob_labels, stand_in_loader, write_dicom_series

SIDE = HALF[0]  # in-plane size that goes through the stand-in model's canvas without any resize
CLASS_IDS = (1, 2, 300)  # 300 needs 16 bits


# ---------------------------------------------------------------------------------------------------
# helpers


def save_png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def save_nifti(path, data, affine):
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=2)
    nib.save(image, path)
    return str(path)


def canonical_labels(shape, labelled_slices, seed=0):
    """RAS label volume with different blobs of CLASS_IDS on each labelled axial slice."""
    labels = np.zeros(shape, dtype=np.int16)
    rng = np.random.default_rng(seed)
    for z in labelled_slices:
        for class_id in CLASS_IDS:
            x, y = rng.integers(0, shape[0] - 7), rng.integers(0, shape[1] - 7)
            labels[x : x + 7, y : y + 7, z] = class_id
    return labels


def inferior_left_anterior(canonical):
    """The RAS volume stored with voxel axes (I, L, A), and an affine for that order, a little oblique
    (8 degrees about the vertical) so the reorientation has to pick the nearest axes."""
    stored = canonical.transpose(2, 0, 1)[::-1, ::-1, :]
    axes = np.array([[0, -1, 0], [0, 0, 1], [-3.0, 0, 0]])  # columns: voxel axis i, j, k in mm
    angle = np.deg2rad(8)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ axes
    affine[:3, 3] = [12.0, -30.0, 45.0]
    return np.ascontiguousarray(stored), affine


def ct_image_for(labels, seed=0):
    """Hounsfield-like intensities that follow the labels, with noise."""
    rng = np.random.default_rng(seed)
    return (-50.0 + 40.0 * (labels > 0) + 0.1 * labels + rng.normal(0, 10, labels.shape)).astype(np.float32)


@pytest.fixture
def copy_model(monkeypatch, tmp_path):
    """A checkpoint path whose 'model' is the perfect stand-in that paints the context target."""
    monkeypatch.setattr(predict, "load_checkpoint", stand_in_loader(CopyContextModel()))
    checkpoint = tmp_path / "stand_in.pth"
    checkpoint.write_bytes(b"")
    return str(checkpoint)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = mvg_vit_tiny_patch16(input_size=(64, 32), depth=4)
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pth"
    torch.save(
        {
            "model": model.state_dict(),
            "args": {"model": "mvg_vit_tiny_patch16", "input_size": [64, 32], "label_encoding": "random_colors"},
        },
        path,
    )
    return str(path)


def run_predict(*argv):
    return predict.main([str(a) for a in argv])


# ---------------------------------------------------------------------------------------------------
# volumes


def test_nifti_round_trip_through_ras_on_a_non_ras_grid(copy_model, tmp_path):
    truth = canonical_labels((SIDE, SIDE, 12), labelled_slices=range(2, 10))
    stored_labels, affine = inferior_left_anterior(truth)
    assert nib.aff2axcodes(affine) == ("I", "L", "A")
    image = save_nifti(tmp_path / "ct.nii.gz", ct_image_for(stored_labels), affine)
    labels = save_nifti(tmp_path / "ct_seg.nii.gz", stored_labels, affine)
    output = tmp_path / "out" / "ct_pred.nii.gz"
    assert (
        run_predict(
            "--checkpoint",
            copy_model,
            "--context_image",
            image,
            "--context_label",
            labels,
            "--context_slices",
            3,
            6,
            9,
            "--query",
            image,
            "--output",
            output,
            "--modality",
            "CT",
            "--slice_size",
            0,
            "--batch_size",
            5,
        )
        == 0
    )

    written, query = nib.load(output), nib.load(image)
    np.testing.assert_allclose(written.affine, query.affine)
    assert written.shape == query.shape
    assert (written.header["qform_code"], written.header["sform_code"]) == (1, 2)
    assert written.get_data_dtype() == np.uint16
    assert written.header.get_slope_inter() == (None, None)  # nibabel's way of saying: not scaled
    predicted = np.asarray(written.dataobj)
    # Every query slice is painted with the context slice nearest in position: 3 up to slice 4,
    # 6 from 5 to 7, 9 from 8 on; on the context slices themselves that is the truth.
    nearest = [3 if z <= 4 else 6 if z <= 7 else 9 for z in range(12)]
    expected, _ = inferior_left_anterior(truth[:, :, nearest])
    np.testing.assert_array_equal(predicted, expected)
    assert set(np.unique(predicted)) == {0, *CLASS_IDS}


def test_nifti_at_the_prepared_slice_size_with_auto_context_slices(copy_model, tmp_path):
    truth = np.zeros((40, 28, 6), np.uint8)
    truth[5:20, 4:14, 1:5] = 1
    truth[24:36, 12:26, 2:5] = 2
    affine = np.diag([-1.2, 0.8, 2.5, 1.0])  # x runs to the left: flipped on the way to RAS
    image = save_nifti(tmp_path / "mr.nii.gz", (truth * 100 + 50).astype(np.float32), affine)
    labels = save_nifti(tmp_path / "mr_seg.nii.gz", truth, affine)
    output = tmp_path / "mr_pred.nii"
    run_predict(
        "--checkpoint",
        copy_model,
        "--context_image",
        image,
        "--context_label",
        labels,
        "--context_slices",
        "auto:3",
        "--query",
        image,
        "--output",
        output,
        "--modality",
        "MRI",
    )
    predicted = np.asarray(nib.load(output).dataobj)
    assert predicted.shape == truth.shape and predicted.dtype == np.uint8
    for z in predict.spread_over_range(np.arange(1, 5), 3):  # the context slices: 1, 2 and 4
        assert (predicted[:, :, z] == truth[:, :, z]).mean() > 0.97  # 40x28 -> 512 -> 32 -> 512 -> 40x28


def test_dicom_series_query_is_predicted_as_its_nifti_twin(copy_model, tmp_path):
    """A DICOM series folder as the query gives the same NIfTI prediction, on the same grid, as the
    NIfTI file holding the same voxels and affine."""
    from datasets import readers

    truth = canonical_labels((SIDE, SIDE, 6), labelled_slices=range(1, 5))
    write_dicom_series(tmp_path / "series", np.rint(ct_image_for(truth)))
    voxels, affine = readers.read_volume(readers.Source(str(tmp_path / "series")))
    twin = save_nifti(tmp_path / "twin.nii.gz", voxels, affine)
    labels = save_nifti(tmp_path / "twin_seg.nii.gz", truth.astype(np.uint16), affine)
    common = (
        "--checkpoint",
        copy_model,
        "--context_image",
        twin,
        "--context_label",
        labels,
        "--context_slices",
        2,
        "--modality",
        "CT",
        "--slice_size",
        0,
    )
    run_predict(*common, "--query", twin, "--output", tmp_path / "from_nifti.nii.gz")
    run_predict(*common, "--query", tmp_path / "series", "--output", tmp_path / "from_dicom.nii.gz")
    from_nifti, from_dicom = nib.load(tmp_path / "from_nifti.nii.gz"), nib.load(tmp_path / "from_dicom.nii.gz")
    np.testing.assert_array_equal(np.asarray(from_dicom.dataobj), np.asarray(from_nifti.dataobj))
    np.testing.assert_allclose(from_dicom.affine, affine)
    assert nib.aff2axcodes(from_dicom.affine) == ("L", "P", "S")
    assert set(np.unique(np.asarray(from_dicom.dataobj))) == {0, *CLASS_IDS}


def test_auto_context_slices_spread_over_the_labelled_range():
    assert predict.spread_over_range(np.array([4, 5, 6, 7, 8, 9, 10]), 3) == [4, 7, 10]
    assert predict.spread_over_range(np.array([2, 3, 20]), 2) == [2, 20]
    assert predict.spread_over_range(np.array([2, 3]), 5) == [2, 3]


def test_image_task_volume_written_back_in_the_query_units(copy_model, tmp_path):
    rng = np.random.default_rng(1)
    low_dose = rng.uniform(-300, 400, (SIDE, SIDE, 4)).astype(np.float32)
    full_dose = np.clip(low_dose * 0.5, -100, 200).astype(np.float32)
    affine = np.diag([0.7, 0.7, 2.0, 1.0])
    low = save_nifti(tmp_path / "low.nii.gz", low_dose, affine)
    full = save_nifti(tmp_path / "full.nii.gz", full_dose, affine)
    output = tmp_path / "denoised.nii.gz"
    run_predict(
        "--task",
        "denoising",
        "--checkpoint",
        copy_model,
        "--context_image",
        low,
        "--context_target",
        full,
        "--context_slices",
        0,
        1,
        2,
        3,
        "--query",
        low,
        "--output",
        output,
        "--modality",
        "CT",
        "--slice_size",
        0,
    )
    written = nib.load(output)
    assert written.get_data_dtype() == np.float32
    step = 300 / 255  # one grey level of the [-100, 200] window
    np.testing.assert_allclose(written.get_fdata(), full_dose, atol=step / 2 + 1e-3)


def test_synthesis_volume_is_written_on_the_8_bit_scale(copy_model, tmp_path):
    """A synthesis target has a scale of its own that the query does not tell: uint8, as prepared."""
    rng = np.random.default_rng(2)
    t1, t2 = rng.uniform(0, 800, (2, SIDE, SIDE, 3)).astype(np.float32)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    source, target = save_nifti(tmp_path / "t1.nii.gz", t1, affine), save_nifti(tmp_path / "t2.nii.gz", t2, affine)
    output = tmp_path / "synth.nii.gz"
    assert (
        run_predict(
            "--task",
            "synthesis",
            "--checkpoint",
            copy_model,
            "--context_image",
            source,
            "--context_target",
            target,
            "--context_slices",
            0,
            1,
            2,
            "--query",
            source,
            "--output",
            output,
            "--modality",
            "MRI",
            "--slice_size",
            0,
        )
        == 0
    )
    written = nib.load(output)
    assert written.get_data_dtype() == np.uint8 and written.shape == t2.shape
    low, high = np.percentile(t2[t2 > t2.min()], [0.5, 99.5])  # the target's own scale, over its body
    expected = np.round(np.clip((t2 - low) / (high - low), 0, 1) * 255)
    np.testing.assert_allclose(written.get_fdata(), expected, atol=1)


def test_a_4d_query_needs_a_channel_and_is_written_as_that_channel(copy_model, tmp_path, capsys):
    labels = canonical_labels((SIDE, SIDE, 4), labelled_slices=range(4))
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    image = ct_image_for(labels)
    four = save_nifti(tmp_path / "four.nii.gz", np.stack([image * 0, image], axis=-1), affine)
    context = save_nifti(tmp_path / "ctx.nii.gz", image, affine)
    context_labels = save_nifti(tmp_path / "ctx_seg.nii.gz", labels, affine)
    argv = [
        "--checkpoint",
        copy_model,
        "--context_image",
        context,
        "--context_label",
        context_labels,
        "--context_slices",
        1,
        "--query",
        four,
        "--output",
        tmp_path / "pred.nii.gz",
        "--modality",
        "CT",
        "--slice_size",
        0,
    ]
    assert run_predict(*argv) == 2
    assert re.search(r"--query .*four.nii.gz: image is 4D .* with --channel \(0..1\)", capsys.readouterr().err)
    assert run_predict(*argv, "--channel", 1) == 0
    written = nib.load(tmp_path / "pred.nii.gz")
    assert written.shape == labels.shape
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.repeat(labels[:, :, 1:2], 4, axis=2))


# ---------------------------------------------------------------------------------------------------
# PNGs


def test_png_image_task_reproduces_the_context_target(copy_model, tmp_path):
    image = np.tile(np.linspace(0, 255, SIDE), (SIDE, 1)).astype(np.uint8)
    target = image[::-1].copy()
    context = save_png(tmp_path / "ctx.png", np.stack([image] * 3, axis=2))  # RGB becomes grey
    context_target = save_png(tmp_path / "ctx_target.png", target)
    output = tmp_path / "pred.png"
    run_predict(
        "--task",
        "synthesis",
        "--checkpoint",
        copy_model,
        "--context_image",
        context,
        "--context_target",
        context_target,
        "--query",
        context,
        "--output",
        output,
    )
    predicted = np.asarray(Image.open(output))
    assert predicted.dtype == np.uint8 and predicted.shape == target.shape
    assert np.abs(predicted.astype(int) - target).max() <= 1

    Image.fromarray(image).save(tmp_path / "query.bmp")  # other picture formats are read alike
    run_predict(
        "--task",
        "synthesis",
        "--checkpoint",
        copy_model,
        "--context_image",
        context,
        "--context_target",
        context_target,
        "--query",
        tmp_path / "query.bmp",
        "--output",
        output,
    )
    np.testing.assert_array_equal(np.asarray(Image.open(output)), predicted)


def test_png_labels_keep_16_bit_ids(copy_model, tmp_path):
    label = blob_labels(2).astype(np.uint16) * 150  # ids 150 and 300
    image = save_png(tmp_path / "ctx.png", (label // 2).astype(np.uint8))
    context_label = save_png(tmp_path / "ctx_label.png", label)
    output = tmp_path / "pred.png"
    run_predict(
        "--checkpoint",
        copy_model,
        "--context_image",
        image,
        "--context_label",
        context_label,
        "--query",
        image,
        "--output",
        output,
    )
    np.testing.assert_array_equal(np.asarray(Image.open(output)), label)


# ---------------------------------------------------------------------------------------------------
# a real tiny model on CPU


def test_real_tiny_checkpoint_on_png_and_nifti_queries(tiny_checkpoint, tmp_path):
    label = blob_labels(2, shape=(40, 36))
    image = save_png(tmp_path / "ctx.png", (label * 80 + 20).astype(np.uint8))
    context_label = save_png(tmp_path / "ctx_label.png", label.astype(np.uint8))
    query = save_png(tmp_path / "query.png", np.roll(label * 80 + 20, 3, axis=1).astype(np.uint8))
    model_flags = ["--checkpoint", tiny_checkpoint, "--depth", 4, "--device", "cpu"]
    run_predict(
        *model_flags,
        "--context_image",
        image,
        "--context_label",
        context_label,
        "--query",
        query,
        "--output",
        tmp_path / "query_label.png",
    )
    predicted = np.asarray(Image.open(tmp_path / "query_label.png"))
    assert predicted.shape == (40, 36) and set(np.unique(predicted)) <= {0, 1, 2}

    labels = np.stack([blob_labels(2, shape=(20, 18), seed=z) for z in range(5)], axis=2).astype(np.uint8)
    affine = np.diag([1.0, -1.0, 3.0, 1.0])
    volume = save_nifti(tmp_path / "ctx.nii.gz", (labels * 70.0).astype(np.float32), affine)
    volume_labels = save_nifti(tmp_path / "ctx_seg.nii.gz", labels, affine)
    output = tmp_path / "query_seg.nii.gz"
    run_predict(
        *model_flags,
        "--context_image",
        volume,
        image,
        "--context_label",
        volume_labels,
        context_label,
        "--context_slices",
        "auto:2",
        "--num_prompts",
        2,
        "--ensemble",
        "both",
        "--query",
        volume,
        "--output",
        output,
        "--modality",
        "other",
        "--slice_size",
        24,
        "--batch_size",
        2,
    )
    written = nib.load(output)
    assert written.shape == labels.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}


# ---------------------------------------------------------------------------------------------------
# errors


@pytest.fixture
def inputs(tmp_path):
    """Valid PNG and NIfTI context pairs, plus a few broken ones."""
    label = blob_labels(2)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    volume_labels = np.zeros((SIDE, SIDE, 8), np.uint8)
    volume_labels[4:12, 4:12, 2:6] = 1
    files = {
        "png": save_png(tmp_path / "ctx.png", (label * 60).astype(np.uint8)),
        "png_label": save_png(tmp_path / "ctx_label.png", label.astype(np.uint8)),
        "png_label_small": save_png(tmp_path / "small_label.png", label[:30].astype(np.uint8)),
        "png_empty_label": save_png(tmp_path / "empty_label.png", np.zeros_like(label, np.uint8)),
        "png_grey_alpha": str(tmp_path / "grey_alpha.png"),
        "nifti": save_nifti(tmp_path / "ctx.nii.gz", volume_labels * 100.0, affine),
        "nifti_label": save_nifti(tmp_path / "ctx_seg.nii.gz", volume_labels, affine),
        "nifti_shifted_label": save_nifti(
            tmp_path / "shifted_seg.nii.gz", volume_labels, affine + np.pad([[0, 0, 0, 2.0]], ((0, 3), (0, 0)))
        ),
        "nifti_empty_label": save_nifti(tmp_path / "empty_seg.nii.gz", volume_labels * 0, affine),
    }
    Image.fromarray(np.zeros((SIDE, SIDE, 2), np.uint8), mode="LA").save(files["png_grey_alpha"])
    files["out_png"], files["out_nifti"] = str(tmp_path / "out.png"), str(tmp_path / "out.nii.gz")
    return files


ERRORS = {
    "png sizes": (
        ["--context_image", "png", "--context_label", "png_label_small", "--query", "png", "--output", "out_png"],
        "sizes differ",
    ),
    "nifti grids": (
        [
            "--context_image",
            "nifti",
            "--context_label",
            "nifti_shifted_label",
            "--query",
            "nifti",
            "--output",
            "out_nifti",
            "--modality",
            "CT",
        ],
        "voxel grids differ",
    ),
    "volume output not nifti": (
        [
            "--context_image",
            "nifti",
            "--context_label",
            "nifti_label",
            "--query",
            "nifti",
            "--output",
            "pred.mha",
            "--modality",
            "CT",
        ],
        r"--output pred.mha: a volume query",
    ),
    "unknown format": (
        ["--context_image", "png", "--context_label", "png_label", "--query", "scan.raw", "--output", "out_png"],
        r"--query scan.raw: unknown format",
    ),
    "jpeg label": (
        ["--context_image", "png", "--context_label", "mask.jpg", "--query", "png", "--output", "out_png"],
        r"--context_label mask.jpg: a label in JPEG",
    ),
    "picture output not png": (
        ["--context_image", "png", "--context_label", "png_label", "--query", "png", "--output", "pred.jpg"],
        r"--output pred.jpg: a png query gives a .png output",
    ),
    "png background only": (
        ["--context_image", "png", "--context_label", "png_empty_label", "--query", "png", "--output", "out_png"],
        r"empty_label.png: holds no class other than background",
    ),
    "nifti background only": (
        [
            "--context_image",
            "nifti",
            "--context_label",
            "nifti_empty_label",
            "--query",
            "nifti",
            "--output",
            "out_nifti",
            "--modality",
            "CT",
        ],
        r"empty_seg.nii.gz: holds no class other than background",
    ),
    "slice out of range": (
        [
            "--context_image",
            "nifti",
            "--context_label",
            "nifti_label",
            "--context_slices",
            "3",
            "8",
            "--query",
            "nifti",
            "--output",
            "out_nifti",
            "--modality",
            "CT",
        ],
        r"--context_slices 8 is outside 0..7",
    ),
    "slice unlabelled": (
        [
            "--context_image",
            "nifti",
            "--context_label",
            "nifti_label",
            "--context_slices",
            "1",
            "--query",
            "nifti",
            "--output",
            "out_nifti",
            "--modality",
            "CT",
        ],
        r"slice 1 of .*ctx_seg.nii.gz holds no label",
    ),
    "query not grey or RGB": (
        ["--context_image", "png", "--context_label", "png_label", "--query", "png_grey_alpha", "--output", "out_png"],
        r"--query .*grey_alpha.png: expected a 2D grey or RGB",
    ),
    "slices of PNGs": (
        [
            "--context_image",
            "png",
            "--context_label",
            "png_label",
            "--context_slices",
            "3",
            "--query",
            "png",
            "--output",
            "out_png",
        ],
        "every context is a PNG",
    ),
    "too few pairs": (
        [
            "--context_image",
            "png",
            "--context_label",
            "png_label",
            "--query",
            "png",
            "--output",
            "out_png",
            "--num_prompts",
            "2",
        ],
        r"--num_prompts 2 needs",
    ),
    "volume without modality": (
        ["--context_image", "nifti", "--context_label", "nifti_label", "--query", "nifti", "--output", "out_nifti"],
        r"--modality",
    ),
    "pair kinds": (
        ["--context_image", "png", "--context_label", "nifti_label", "--query", "png", "--output", "out_png"],
        "one is a PNG, the other a volume",
    ),
    "output is the query": (
        [
            "--context_image",
            "nifti",
            "--context_label",
            "nifti_label",
            "--query",
            "nifti",
            "--output",
            "nifti",
            "--modality",
            "CT",
        ],
        r"is the --query input; an input is never",
    ),
    "output is a context label": (
        ["--context_image", "png", "--context_label", "png_label", "--query", "png", "--output", "png_label"],
        r"is the --context_label input",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_clear_errors(case, inputs, copy_model, capsys):
    argv, message = ERRORS[case]
    argv = [inputs.get(word, word) for word in argv]
    assert predict.main(["--checkpoint", copy_model, *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_tasks_come_from_the_registry_and_precision_auto_is_resolved(inputs, copy_model, capsys, monkeypatch):
    argv = [
        "--checkpoint",
        copy_model,
        "--context_image",
        inputs["png"],
        "--context_label",
        inputs["png_label"],
        "--query",
        inputs["png"],
        "--output",
        inputs["out_png"],
    ]
    assert predict.main([*argv, "--task", "image"]) == 2
    assert "invalid choice: 'image'" in capsys.readouterr().err
    assert predict.main([*argv, "--target_on_input_scale"]) == 2  # the task says so now
    assert "unrecognized arguments: --target_on_input_scale" in capsys.readouterr().err
    assert predict.main([*argv, "--device", "cpu", "--precision", "fp16"]) == 2
    assert "--precision fp16 needs a CUDA device" in capsys.readouterr().err
    built = []
    monkeypatch.setattr(
        predict, "Predictor", lambda *a, **settings: built.append(settings) or Predictor(*a, **settings)
    )
    assert predict.main([*argv, "--device", "cpu"]) == 0
    assert built[0]["precision"] == "fp32"


def test_checkpoint_that_does_not_fit_the_model(tiny_checkpoint, inputs, capsys):
    argv = [
        "--context_image",
        inputs["png"],
        "--context_label",
        inputs["png_label"],
        "--query",
        inputs["png"],
        "--output",
        inputs["out_png"],
        "--device",
        "cpu",
    ]
    assert predict.main(["--checkpoint", tiny_checkpoint, *argv]) == 2  # the factory's 12 blocks, the checkpoint's 4
    assert "does not fit mvg_vit_tiny_patch16 with 12 blocks" in capsys.readouterr().err
    assert predict.main(["--checkpoint", "missing.pth", *argv]) == 2
    assert "--checkpoint missing.pth: file not found" in capsys.readouterr().err


def test_depth_recorded_by_training_needs_no_flag(tmp_path, inputs):
    torch.manual_seed(0)
    model = mvg_vit_tiny_patch16(input_size=(64, 32), depth=4)
    checkpoint = tmp_path / "trained.pth"
    torch.save(
        {
            "model": model.state_dict(),
            "args": {"model": "mvg_vit_tiny_patch16", "input_size": [64, 32], "depth": 4, "label_encoding": "grey"},
        },
        checkpoint,
    )
    assert (
        predict.main(
            [
                "--checkpoint",
                str(checkpoint),
                "--context_image",
                inputs["png"],
                "--context_label",
                inputs["png_label"],
                "--query",
                inputs["png"],
                "--output",
                inputs["out_png"],
                "--device",
                "cpu",
            ]
        )
        == 0
    )


# ---------------------------------------------------------------------------------------------------
# outputs: never an input, never silently replaced, never torn


def test_inputs_survive_an_output_aimed_at_them(inputs, copy_model):
    before = {name: Path(inputs[name]).read_bytes() for name in ("nifti", "png_label")}
    predict.main(
        [
            "--checkpoint",
            copy_model,
            "--context_image",
            inputs["nifti"],
            "--context_label",
            inputs["nifti_label"],
            "--query",
            inputs["nifti"],
            "--output",
            inputs["nifti"],
            "--modality",
            "CT",
        ]
    )
    predict.main(
        [
            "--checkpoint",
            copy_model,
            "--context_image",
            inputs["png"],
            "--context_label",
            inputs["png_label"],
            "--query",
            inputs["png"],
            "--output",
            inputs["png_label"],
        ]
    )
    assert {name: Path(inputs[name]).read_bytes() for name in before} == before


def test_an_existing_output_needs_overwrite_and_a_failed_write_keeps_it(inputs, copy_model, monkeypatch, capsys):
    import errno

    argv = [
        "--checkpoint",
        copy_model,
        "--context_image",
        inputs["nifti"],
        "--context_label",
        inputs["nifti_label"],
        "--query",
        inputs["nifti"],
        "--output",
        inputs["out_nifti"],
        "--modality",
        "CT",
    ]
    assert predict.main(argv) == 0
    first = Path(inputs["out_nifti"]).read_bytes()
    capsys.readouterr()
    assert predict.main(argv) == 2
    assert "exists; choose another path, or add --overwrite" in capsys.readouterr().err

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full_disk)
        assert predict.main(argv + ["--overwrite"]) == 2
    assert "the disk is full" in capsys.readouterr().err
    assert Path(inputs["out_nifti"]).read_bytes() == first  # the earlier output, whole
    assert not [n for n in os.listdir(os.path.dirname(inputs["out_nifti"])) if n.endswith(".tmp")]
    assert predict.main(argv + ["--overwrite"]) == 0


def test_non_finite_voxels_are_reported(inputs, copy_model, tmp_path, capsys):
    data = np.asarray(nib.load(inputs["nifti"]).dataobj).astype(np.float32)
    data[0, 0, 0], data[1, 0, 0] = np.nan, np.inf
    query = save_nifti(tmp_path / "nan.nii.gz", data, nib.load(inputs["nifti"]).affine)
    assert (
        predict.main(
            [
                "--checkpoint",
                copy_model,
                "--context_image",
                inputs["nifti"],
                "--context_label",
                inputs["nifti_label"],
                "--query",
                query,
                "--output",
                str(tmp_path / "o.nii.gz"),
                "--modality",
                "CT",
            ]
        )
        == 0
    )
    assert "nan.nii.gz: 2 NaN or infinite voxels" in capsys.readouterr().err
