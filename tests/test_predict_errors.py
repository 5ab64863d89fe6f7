"""predict.py's errors for bad inputs, flags and outputs: one line each, and an output is never an
input, never silently replaced and never torn."""

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import predict
from inference import Predictor
from tests.helpers import save_placed_nifti
from util import runtime

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
def test_clear_errors(case, predict_inputs, copy_model, capsys):
    argv, message = ERRORS[case]
    argv = [predict_inputs.get(word, word) for word in argv]
    assert predict.main(["--checkpoint", copy_model, *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_tasks_come_from_the_registry_and_precision_auto_is_resolved(predict_inputs, copy_model, capsys, monkeypatch):
    argv = [
        "--checkpoint",
        copy_model,
        "--context_image",
        predict_inputs["png"],
        "--context_label",
        predict_inputs["png_label"],
        "--query",
        predict_inputs["png"],
        "--output",
        predict_inputs["out_png"],
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
    for native_bf16, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda native=native_bf16: native)
        assert predict.main([*argv, "--device", "cpu", "--overwrite"]) == 0
        assert built.pop()["precision"] == expected


# ---------------------------------------------------------------------------------------------------
# outputs: never an input, never silently replaced, never torn


def test_inputs_survive_an_output_aimed_at_them(predict_inputs, copy_model):
    before = {name: Path(predict_inputs[name]).read_bytes() for name in ("nifti", "png_label")}
    predict.main(
        [
            "--checkpoint",
            copy_model,
            "--context_image",
            predict_inputs["nifti"],
            "--context_label",
            predict_inputs["nifti_label"],
            "--query",
            predict_inputs["nifti"],
            "--output",
            predict_inputs["nifti"],
            "--modality",
            "CT",
        ]
    )
    predict.main(
        [
            "--checkpoint",
            copy_model,
            "--context_image",
            predict_inputs["png"],
            "--context_label",
            predict_inputs["png_label"],
            "--query",
            predict_inputs["png"],
            "--output",
            predict_inputs["png_label"],
        ]
    )
    assert {name: Path(predict_inputs[name]).read_bytes() for name in before} == before


def test_an_existing_output_needs_overwrite_and_a_failed_write_keeps_it(
    predict_inputs, copy_model, monkeypatch, capsys
):
    import errno

    argv = [
        "--checkpoint",
        copy_model,
        "--context_image",
        predict_inputs["nifti"],
        "--context_label",
        predict_inputs["nifti_label"],
        "--query",
        predict_inputs["nifti"],
        "--output",
        predict_inputs["out_nifti"],
        "--modality",
        "CT",
    ]
    assert predict.main(argv) == 0
    first = Path(predict_inputs["out_nifti"]).read_bytes()
    capsys.readouterr()
    assert predict.main(argv) == 2
    assert "exists; choose another path, or add --overwrite" in capsys.readouterr().err

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full_disk)
        assert predict.main(argv + ["--overwrite"]) == 2
    assert "the disk is full" in capsys.readouterr().err
    assert Path(predict_inputs["out_nifti"]).read_bytes() == first  # the earlier output, whole
    assert not [n for n in os.listdir(os.path.dirname(predict_inputs["out_nifti"])) if n.endswith(".tmp")]
    assert predict.main(argv + ["--overwrite"]) == 0


def test_non_finite_voxels_are_reported(predict_inputs, copy_model, tmp_path, capsys):
    data = np.asarray(nib.load(predict_inputs["nifti"]).dataobj).astype(np.float32)
    data[0, 0, 0], data[1, 0, 0] = np.nan, np.inf
    query = save_placed_nifti(tmp_path / "nan.nii.gz", data, nib.load(predict_inputs["nifti"]).affine)
    assert (
        predict.main(
            [
                "--checkpoint",
                copy_model,
                "--context_image",
                predict_inputs["nifti"],
                "--context_label",
                predict_inputs["nifti_label"],
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
