"""predict.py with a real tiny checkpoint on the CPU: PNG and NIfTI queries, a checkpoint that does not
fit the model, and settings that a training run's record supplies."""

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import predict
from models_mvg import mvg_vit_tiny_patch16
from tests.helpers import blob_labels, run_predict, save_placed_nifti, save_png


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
    volume = save_placed_nifti(tmp_path / "ctx.nii.gz", (labels * 70.0).astype(np.float32), affine)
    volume_labels = save_placed_nifti(tmp_path / "ctx_seg.nii.gz", labels, affine)
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


def test_checkpoint_that_does_not_fit_the_model(tiny_checkpoint, predict_inputs, capsys):
    argv = [
        "--context_image",
        predict_inputs["png"],
        "--context_label",
        predict_inputs["png_label"],
        "--query",
        predict_inputs["png"],
        "--output",
        predict_inputs["out_png"],
        "--device",
        "cpu",
    ]
    assert predict.main(["--checkpoint", tiny_checkpoint, *argv]) == 2  # the factory's 12 blocks, the checkpoint's 4
    assert "does not fit mvg_vit_tiny_patch16 with 12 blocks" in capsys.readouterr().err
    assert predict.main(["--checkpoint", "missing.pth", *argv]) == 2
    assert "--checkpoint missing.pth: file not found" in capsys.readouterr().err


def test_depth_recorded_by_training_needs_no_flag(tmp_path, predict_inputs):
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
                predict_inputs["png"],
                "--context_label",
                predict_inputs["png_label"],
                "--query",
                predict_inputs["png"],
                "--output",
                predict_inputs["out_png"],
                "--device",
                "cpu",
            ]
        )
        == 0
    )
