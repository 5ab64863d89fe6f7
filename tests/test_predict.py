"""predict.py end to end with a stand-in for a perfect model: NIfTI round trips through RAS and back on
a non-RAS grid, DICOM series, image tasks written in the query's units, PNG in / PNG out. A real tiny
checkpoint: tests/test_predict_checkpoints.py; bad inputs and outputs: tests/test_predict_errors.py."""

import re

import nibabel as nib
import numpy as np
from PIL import Image

import predict_contexts
from tests.helpers import SIDE, blob_labels, run_predict, save_placed_nifti, save_png, write_dicom_series

CLASS_IDS = (1, 2, 300)  # 300 needs 16 bits


# ---------------------------------------------------------------------------------------------------
# helpers


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


# ---------------------------------------------------------------------------------------------------
# volumes


def test_nifti_round_trip_through_ras_on_a_non_ras_grid(copy_model, tmp_path):
    truth = canonical_labels((SIDE, SIDE, 12), labelled_slices=range(2, 10))
    stored_labels, affine = inferior_left_anterior(truth)
    assert nib.aff2axcodes(affine) == ("I", "L", "A")
    image = save_placed_nifti(tmp_path / "ct.nii.gz", ct_image_for(stored_labels), affine)
    labels = save_placed_nifti(tmp_path / "ct_seg.nii.gz", stored_labels, affine)
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
    image = save_placed_nifti(tmp_path / "mr.nii.gz", (truth * 100 + 50).astype(np.float32), affine)
    labels = save_placed_nifti(tmp_path / "mr_seg.nii.gz", truth, affine)
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
    for z in predict_contexts.spread_over_range(np.arange(1, 5), 3):  # the context slices: 1, 2 and 4
        assert (predicted[:, :, z] == truth[:, :, z]).mean() > 0.97  # 40x28 -> 512 -> 32 -> 512 -> 40x28


def test_dicom_series_query_is_predicted_as_its_nifti_twin(copy_model, tmp_path):
    """A DICOM series folder as the query gives the same NIfTI prediction, on the same grid, as the
    NIfTI file holding the same voxels and affine."""
    from datasets import readers

    truth = canonical_labels((SIDE, SIDE, 6), labelled_slices=range(1, 5))
    write_dicom_series(tmp_path / "series", np.rint(ct_image_for(truth)))
    voxels, affine = readers.read_volume(readers.Source(str(tmp_path / "series")))
    twin = save_placed_nifti(tmp_path / "twin.nii.gz", voxels, affine)
    labels = save_placed_nifti(tmp_path / "twin_seg.nii.gz", truth.astype(np.uint16), affine)
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
    assert predict_contexts.spread_over_range(np.array([4, 5, 6, 7, 8, 9, 10]), 3) == [4, 7, 10]
    assert predict_contexts.spread_over_range(np.array([2, 3, 20]), 2) == [2, 20]
    assert predict_contexts.spread_over_range(np.array([2, 3]), 5) == [2, 3]


def test_image_task_volume_written_back_in_the_query_units(copy_model, tmp_path):
    rng = np.random.default_rng(1)
    low_dose = rng.uniform(-300, 400, (SIDE, SIDE, 4)).astype(np.float32)
    full_dose = np.clip(low_dose * 0.5, -100, 200).astype(np.float32)
    affine = np.diag([0.7, 0.7, 2.0, 1.0])
    low = save_placed_nifti(tmp_path / "low.nii.gz", low_dose, affine)
    full = save_placed_nifti(tmp_path / "full.nii.gz", full_dose, affine)
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
    source, target = (
        save_placed_nifti(tmp_path / "t1.nii.gz", t1, affine),
        save_placed_nifti(tmp_path / "t2.nii.gz", t2, affine),
    )
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
    four = save_placed_nifti(tmp_path / "four.nii.gz", np.stack([image * 0, image], axis=-1), affine)
    context = save_placed_nifti(tmp_path / "ctx.nii.gz", image, affine)
    context_labels = save_placed_nifti(tmp_path / "ctx_seg.nii.gz", labels, affine)
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
