"""main_eval.py's whole-volume protocol beside the foreground slices, and the relative slice position
that the position context policy shares with predict.py; the rest of evaluation: tests/test_eval.py."""

import json
import math

import numpy as np
import pytest

import main_eval
from datasets import prepare
from datasets.manifest import PreparedDataset
from evaluation.contexts import ContextPicker
from tests.helpers import SLICE, CopyContextModel, save, segmentation_case, stand_in_loader

# ---------------------------------------------------------------------------------------------------
# whole volumes beside foreground slices


@pytest.fixture(scope="module")
def gapped(tmp_path_factory):
    """Cases of 8 slices labelled on slices 1, 2, 5 and 6 only (a gap, and empty ends)."""
    root = tmp_path_factory.mktemp("gapped")
    for i in range(4):
        image, label = segmentation_case(i, depth=8)
        label[..., [0, 3, 4, 7]] = 0
        save(root / "src" / "imagesTr" / f"c{i}.nii.gz", image)
        save(root / "src" / "labelsTr" / f"c{i}.nii.gz", label)
    assert (
        prepare.main(
            [
                "msd",
                "--root",
                str(root / "src"),
                "--dataset",
                "Gapped",
                "--modality",
                "MRI",
                "--out",
                str(root / "prepared"),
                "--size",
                str(SLICE),
                "--test_fraction",
                "0.5",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    return root / "prepared"


def test_whole_volume_protocol_counts_false_positives_on_empty_slices(gapped, tmp_path, monkeypatch):
    monkeypatch.setattr(main_eval, "load_checkpoint", stand_in_loader(CopyContextModel()))
    out = tmp_path / "eval"
    assert main_eval.main(["--checkpoint", "unused", "--data_path", str(gapped), "--output_dir", str(out)]) == 0
    foreground, volume = json.loads((out / "results.json").read_text())["datasets"]
    assert (foreground["protocol"], volume["protocol"]) == ("foreground", "volume")
    # Painting the context label is exact on the 4 labelled slices, and a false positive on the other 4
    # of each volume: Dice 2 * 4 / (8 + 4) per class.
    assert foreground["dice"] == 1.0 and foreground["hd95"] == 0.0
    assert math.isclose(volume["dice"], 2 / 3, rel_tol=1e-6)
    case = next(iter(volume["per_case"].values()))
    assert sorted(map(int, case["contexts"])) == list(range(8))
    only = tmp_path / "foreground_only"
    assert (
        main_eval.main(
            [
                "--checkpoint",
                "unused",
                "--data_path",
                str(gapped),
                "--output_dir",
                str(only),
                "--protocol",
                "foreground",
            ]
        )
        == 0
    )
    (alone,) = json.loads((only / "results.json").read_text())["datasets"]
    assert alone["dice"] == 1.0 and sorted(map(int, next(iter(alone["per_case"].values()))["contexts"])) == [1, 2, 5, 6]


def test_whole_volume_protocol_needs_every_slice(tmp_path, monkeypatch, capsys):
    root = tmp_path / "src"
    image, label = segmentation_case(0, depth=4)
    label[..., 0] = 0
    for i in range(2):
        save(root / "imagesTr" / f"c{i}.nii.gz", image)
        save(root / "labelsTr" / f"c{i}.nii.gz", label)
    assert (
        prepare.main(
            [
                "msd",
                "--root",
                str(root),
                "--dataset",
                "Kept",
                "--modality",
                "MRI",
                "--out",
                str(tmp_path / "prepared"),
                "--size",
                str(SLICE),
                "--test_fraction",
                "0.5",
                "--test_slices",
                "foreground",
            ]
        )
        == 0
    )
    monkeypatch.setattr(main_eval, "load_checkpoint", stand_in_loader(CopyContextModel()))
    argv = ["--checkpoint", "unused", "--data_path", str(tmp_path / "prepared"), "--output_dir", str(tmp_path / "e")]
    assert main_eval.main(argv + ["--protocol", "volume"]) == 2
    assert "--test_slices all" in capsys.readouterr().err
    assert main_eval.main(argv) == 0  # auto: the foreground protocol alone
    assert [d["protocol"] for d in json.loads((tmp_path / "e" / "results.json").read_text())["datasets"]] == [
        "foreground"
    ]


# ---------------------------------------------------------------------------------------------------
# one relative slice position for evaluation and prediction


def test_position_context_uses_the_slice_position_in_the_volume(gapped):
    """One definition of a slice's relative position, (index + 0.5) / slices, shared with predict.py: a
    training case labelled on slices 1, 2, 5, 6 of 8 gives slice 1 to a query at slice 1 of its own
    8 (the labelled-range definition would have given slice 2)."""
    import predict
    from datasets.manifest import slice_position

    dataset = PreparedDataset(str(gapped / "Gapped"))
    query_case = dataset.case_ids("test")[0]
    picker = ContextPicker(dataset, "position", k=1, seed=0)
    ((case, index),) = picker.pick(query_case, 1, np.zeros((SLICE, SLICE), np.uint8))
    assert dataset.slice_indices(case) == [1, 2, 5, 6] and index == 1
    assert predict.slice_position is slice_position and slice_position(1, 8) == 1.5 / 8
