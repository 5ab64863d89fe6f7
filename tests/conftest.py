"""Fixtures that several test modules share. Plain helpers and constants are in tests/helpers.py,
which the test modules import themselves."""

import numpy as np
import pytest
from PIL import Image

# The helpers assert too (assert_same_weights, the dataset builders): let pytest explain their failures.
pytest.register_assert_rewrite("tests.helpers")

import predict  # noqa: E402  (after the rewrite is registered, like the helpers)
from tests.helpers import (  # noqa: E402
    SIDE,
    CopyContextModel,
    blob_labels,
    prepare_all,
    save_placed_nifti,
    save_png,
    stand_in_loader,
    toy_segmentation,
)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """toy_segmentation's data, prepared: the path of the prepared root, as a string."""
    return str(toy_segmentation(tmp_path_factory.mktemp("toy")))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Seg, Synth, Denoise, Inpaint (tests/test_canvas.py's data, from prepare_all)."""
    return str(prepare_all(tmp_path_factory.mktemp("mixed")))


@pytest.fixture
def copy_model(monkeypatch, tmp_path):
    """A checkpoint path for predict.py whose 'model' is the perfect stand-in that paints the context
    target."""
    monkeypatch.setattr(predict, "load_checkpoint", stand_in_loader(CopyContextModel()))
    checkpoint = tmp_path / "stand_in.pth"
    checkpoint.write_bytes(b"")
    return str(checkpoint)


@pytest.fixture
def predict_inputs(tmp_path):
    """Valid PNG and NIfTI context pairs for predict.py, plus a few broken ones."""
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
        "nifti": save_placed_nifti(tmp_path / "ctx.nii.gz", volume_labels * 100.0, affine),
        "nifti_label": save_placed_nifti(tmp_path / "ctx_seg.nii.gz", volume_labels, affine),
        "nifti_shifted_label": save_placed_nifti(
            tmp_path / "shifted_seg.nii.gz", volume_labels, affine + np.pad([[0, 0, 0, 2.0]], ((0, 3), (0, 0)))
        ),
        "nifti_empty_label": save_placed_nifti(tmp_path / "empty_seg.nii.gz", volume_labels * 0, affine),
    }
    Image.fromarray(np.zeros((SIDE, SIDE, 2), np.uint8), mode="LA").save(files["png_grey_alpha"])
    files["out_png"], files["out_nifti"] = str(tmp_path / "out.png"), str(tmp_path / "out.nii.gz")
    return files
