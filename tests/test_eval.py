"""main_eval.py end to end on tiny prepared data: files, tables, context choice, perfect-model scores,
what a checkpoint records, one-line errors. Whole volumes: tests/test_eval_volumes.py."""

import json
import math

import numpy as np
import pytest
import torch

import main_eval
from datasets import prepare
from datasets.manifest import PreparedDataset
from evaluation.contexts import CONTEXT_POLICIES, ContextPicker
from models_mvg import mvg_vit_tiny_patch16
from tests.helpers import SLICE, CopyContextModel, save, segmentation_case, stand_in_loader


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    for i in range(4):
        image, label = segmentation_case(i, depth=5)
        save(root / "acdc" / "imagesTr" / f"c{i}.nii.gz", image)
        save(root / "acdc" / "labelsTr" / f"c{i}.nii.gz", label)
        base = np.random.default_rng(i).uniform(0, 100, size=(SLICE, SLICE, 3)).astype(np.float32)
        save(root / "ldct" / "low" / f"p{i}.nii.gz", base + np.random.default_rng(9).normal(0, 10, base.shape))
        save(root / "ldct" / "full" / f"p{i}.nii.gz", base)
    common = ["--out", str(root / "prepared"), "--size", str(SLICE), "--test_fraction", "0.5", "--seed", "1"]
    assert prepare.main(["msd", "--root", str(root / "acdc"), "--dataset", "ACDC", "--modality", "MRI", *common]) == 0
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
                "LDCT",
                *common,
            ]
        )
        == 0
    )
    return root / "prepared"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = mvg_vit_tiny_patch16(input_size=(64, 32))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(
        {
            "model": model.state_dict(),
            "args": {"model": "mvg_vit_tiny_patch16", "input_size": [64, 32], "label_encoding": "random_colors"},
        },
        path,
    )
    return path


def test_eval_end_to_end_with_a_random_tiny_model(prepared, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        main_eval.main(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--data_path",
                str(prepared),
                "--output_dir",
                str(out),
                "--device",
                "cpu",
                "--grids",
                "2",
                "--save_predictions",
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert [(d["dataset"], d["protocol"]) for d in results["datasets"]] == [
        ("ACDC", "foreground"),
        ("ACDC", "volume"),
        ("LDCT", "foreground"),
        ("LDCT", "volume"),
    ]
    by_name = {d["dataset"]: d for d in results["datasets"] if d["protocol"] == "foreground"}
    assert results["settings"]["label_encoding"] == "random_colors" and results["settings"]["scale"] == "training"
    assert results["settings"]["settings_source"] == "training arguments"
    acdc = by_name["ACDC"]
    assert acdc["cases"] == 2 and set(acdc["classes"]) == {"1", "2"}
    assert 0.0 <= acdc["dice"] <= 1.0
    assert math.isfinite(by_name["LDCT"]["psnr"]) and -1 <= by_name["LDCT"]["ssim"] <= 1
    table = (out / "results.md").read_text()
    assert "| ACDC | 2 |" in table and "0.85 | 0.52 | 0.54 | 0.90" in table  # beside the paper's numbers
    assert "denoising" in capsys.readouterr().out
    assert (out / "ACDC_foreground_cases.csv").read_text().startswith("case,mean_dice,dice_1,dice_2,hd95_1,hd95_2")
    assert (out / "ACDC_volume_cases.csv").is_file()
    assert "# Scored on foreground slices (the paper's protocol)" in table and "# Scored on whole volumes" in table
    assert len(list((out / "grids").glob("ACDC_*.png"))) == 2
    case = PreparedDataset(str(prepared / "ACDC")).case_ids("test")[0]
    assert len(list((out / "predictions" / "ACDC" / case).glob("*.png"))) == 5
    train_cases = set(PreparedDataset(str(prepared / "ACDC")).case_ids("train"))
    for record in acdc["per_case"].values():
        assert all(c in train_cases for picks in record["contexts"].values() for c, _ in picks)


def test_a_perfect_model_scores_dice_one(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(main_eval, "load_checkpoint", stand_in_loader(CopyContextModel()))
    out = tmp_path / "eval"
    main_eval.main(
        [
            "--checkpoint",
            "unused",
            "--data_path",
            str(prepared),
            "--output_dir",
            str(out),
            "--context_policy",
            "retrieval",
            "--num_prompts",
            "2",
            "--baselines",
        ]
    )
    acdc, _, ldct, _ = json.loads((out / "results.json").read_text())["datasets"]
    assert acdc["dice"] > 0.95  # every case has the same two-class layout; only resizing blurs edges
    assert acdc["hd95"] <= 1.5  # mm, spacing 1 mm at 40 px
    # Copying the context label is exactly right here; intensities are noise, so the classifier is not.
    assert acdc["baselines"]["copy_context"]["dice"] == 1.0
    assert acdc["baselines"]["intensity"]["dice"] < 0.8
    assert set(ldct["baselines"]) == {"identity"} and ldct["baselines"]["identity"]["psnr"] > 0
    assert "ACDC: baseline copy_context | 2 | 1.000" in (out / "results.md").read_text()


@pytest.mark.parametrize("policy", CONTEXT_POLICIES)
def test_context_policies_use_training_cases_and_are_seeded(prepared, policy):
    dataset = PreparedDataset(str(prepared / "ACDC"))
    picker = ContextPicker(dataset, policy, k=2, seed=3)
    query_case = dataset.case_ids("test")[0]
    index = dataset.slice_indices(query_case)[1]
    image = np.full((SLICE, SLICE), 7, np.uint8)
    first = picker.pick(query_case, index, image)
    assert len(first) == 2 and all(c in dataset.case_ids("train") for c, _ in first)
    assert ContextPicker(dataset, policy, k=2, seed=3).pick(query_case, index, image) == first
    if policy == "position":  # same relative position: the same slice number in these equal cases
        assert all(s == index for _, s in first)


def test_few_shot_context_cases(prepared):
    dataset = PreparedDataset(str(prepared / "ACDC"))
    picker = ContextPicker(dataset, "random", k=1, seed=0, context_cases=1)
    assert picker.cases == dataset.case_ids("train")[:1]


def test_unknown_dataset_is_a_one_line_error(prepared, capsys):
    assert main_eval.main(["--checkpoint", "x", "--data_path", str(prepared), "--datasets", "Nope"]) == 2
    assert capsys.readouterr().err.strip() == f"error: --datasets Nope: not found under {prepared}"


def test_eval_script_runs_one_task_and_fails_loudly(prepared, tiny_checkpoint, tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    script = os.path.join(os.path.dirname(main_eval.__file__), "scripts", "eval_seg.sh")
    out = tmp_path / "seg"
    done = subprocess.run(
        ["bash", script, str(tiny_checkpoint), str(prepared), str(out), "--grids", "0"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    datasets = json.loads((out / "results.json").read_text())["datasets"]
    assert {d["dataset"] for d in datasets} == {"ACDC"}  # the segmentation datasets only
    missing = subprocess.run(
        ["bash", script, str(tmp_path / "none.pth"), str(prepared)], capture_output=True, text=True, env=env
    )
    assert missing.returncode == 2 and "checkpoint not found" in missing.stderr


def test_compare_prints_before_and_after(tmp_path, capsys):
    for name, dice in (("before", 0.5), ("after", 0.75)):
        (tmp_path / f"{name}.json").write_text(
            json.dumps({"datasets": [{"dataset": "ACDC", "dice": dice, "hd95": 4.0}]})
        )
    assert main_eval.main(["--compare", str(tmp_path / "before.json"), str(tmp_path / "after.json")]) == 0
    assert "| ACDC | foreground | dice | 0.5000 | 0.7500 | +0.2500 |" in capsys.readouterr().out
    assert main_eval.main(["--data_path", str(tmp_path)]) == 2
    assert "--checkpoint and --data_path are required" in capsys.readouterr().err


def test_fewshot_adaptation_script_end_to_end(prepared, tiny_checkpoint, tmp_path):
    import os
    import subprocess
    import sys

    env = dict(
        os.environ,
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        EPOCHS="1",
        SAMPLES_PER_EPOCH="4",
        BATCH="2",
        DEVICE="cpu",
        EVAL_FLAGS="--grids 0",
    )
    script = os.path.join(os.path.dirname(main_eval.__file__), "scripts", "adapt_fewshot.sh")
    out = tmp_path / "adapt"
    done = subprocess.run(
        [
            "bash",
            script,
            str(tiny_checkpoint),
            str(prepared),
            "ACDC",
            "1",
            str(out),
            "--num_workers",
            "0",
            "--log_dir",
            "",
            "--num_mask_patches",
            "2",
            "--min_mask_patches_per_block",
            "1",
            "--max_mask_patches_per_block",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("before", "after"):
        record = json.loads((out / stage / "results.json").read_text())["datasets"][0]
        train_cases = PreparedDataset(str(prepared / "ACDC")).case_ids("train")[:1]
        assert all(
            c in train_cases for r in record["per_case"].values() for picks in r["contexts"].values() for c, _ in picks
        )
    mixture = json.loads((out / "mixture.json").read_text())
    assert mixture["datasets"][0]["num_cases"] == 1
    assert "| ACDC | foreground | dice |" in (out / "before_after.md").read_text()
    after = json.loads((out / "after" / "results.json").read_text())["settings"]
    assert (after["settings_source"], after["label_encoding"]) == ("record", "random_colors")


# ---------------------------------------------------------------------------------------------------
# a checkpoint knows how it is used


def train_tiny(prepared, out, *flags):
    import main_pretrain

    main_pretrain.main(
        [
            "--model",
            "mvg_vit_tiny_patch16",
            "--input_size",
            "64",
            "32",
            "--batch_size",
            "2",
            "--samples_per_epoch",
            "2",
            "--epochs",
            "1",
            "--num_workers",
            "0",
            "--device",
            "cpu",
            "--log_dir",
            "",
            "--num_mask_patches",
            "2",
            "--min_mask_patches_per_block",
            "1",
            "--max_mask_patches_per_block",
            "2",
            "--data_path",
            str(prepared),
            "--output_dir",
            str(out),
            *flags,
        ]
    )
    return out / "checkpoint-last.pth"


def test_the_checkpoint_records_how_its_canvases_were_made(prepared, tmp_path, capsys):
    from util.checkpoint import load_weights_only

    checkpoint = train_tiny(prepared, tmp_path / "run", "--depth", "4", "--label_encoding", "grey")
    record = load_weights_only(str(checkpoint))["canvas_record"]
    assert (record["model"], record["input_size"], record["depth"]) == ("mvg_vit_tiny_patch16", [64, 32], 4)
    assert record["label_encoding"] == "grey" and record["slice_size"] == SLICE
    assert record["datasets"]["ACDC"]["task"] == "segmentation" and record["datasets"]["LDCT"]["task"] == "denoising"
    assert set(record["datasets"]["ACDC"]["classes"]) == {0, 1, 2}

    base = [
        "--checkpoint",
        str(checkpoint),
        "--data_path",
        str(prepared),
        "--device",
        "cpu",
        "--grids",
        "0",
        "--max_cases",
        "1",
        "--tasks",
        "segmentation",
    ]
    assert main_eval.main(base + ["--output_dir", str(tmp_path / "plain")]) == 0
    settings = json.loads((tmp_path / "plain" / "results.json").read_text())["settings"]
    assert (settings["label_encoding"], settings["depth"], settings["settings_source"]) == ("grey", 4, "record")
    capsys.readouterr()
    assert main_eval.main(base + ["--output_dir", str(tmp_path / "x"), "--label_encoding", "random_colors"]) == 2
    assert "--label_encoding random_colors contradicts" in capsys.readouterr().err
    assert (
        main_eval.main(
            base + ["--output_dir", str(tmp_path / "forced"), "--label_encoding", "random_colors", "--force"]
        )
        == 0
    )
    forced = json.loads((tmp_path / "forced" / "results.json").read_text())["settings"]
    assert forced["label_encoding"] == "random_colors"

    # Finetuning takes the same settings from the checkpoint, so the new run records them again.
    finetuned = train_tiny(prepared, tmp_path / "finetune", "--finetune", str(checkpoint))
    again = load_weights_only(str(finetuned))["canvas_record"]
    assert (again["label_encoding"], again["depth"]) == ("grey", 4)


def test_a_checkpoint_without_a_record_needs_the_flags(prepared, tmp_path, capsys):
    import argparse

    torch.manual_seed(0)
    path = tmp_path / "authors.pth"
    torch.save(
        {
            "model": mvg_vit_tiny_patch16(input_size=(64, 32), depth=4).state_dict(),
            "args": argparse.Namespace(model="mvg_vit_tiny_patch16", input_size=[64, 32]),
        },
        path,
    )
    base = [
        "--checkpoint",
        str(path),
        "--data_path",
        str(prepared),
        "--device",
        "cpu",
        "--grids",
        "0",
        "--max_cases",
        "1",
        "--tasks",
        "segmentation",
        "--depth",
        "4",
        "--output_dir",
        str(tmp_path / "e"),
    ]
    assert main_eval.main(base) == 2
    assert "does not record its label encoding" in capsys.readouterr().err
    assert main_eval.main(base + ["--label_encoding", "grey"]) == 0


def test_an_output_folder_that_cannot_be_written_is_one_error_line(prepared, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(main_eval, "load_checkpoint", stand_in_loader(CopyContextModel()))
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    assert main_eval.main(["--checkpoint", "unused", "--data_path", str(prepared), "--output_dir", str(blocked)]) == 2
    assert f"--output_dir {blocked}/grids: cannot write there" in capsys.readouterr().err
    assert blocked.read_text() == "not a folder"


def test_evaluation_writes_are_atomic(prepared, tmp_path, monkeypatch, capsys):
    """A full disk while results are written leaves the earlier results whole and no temporary files."""
    import errno

    monkeypatch.setattr(main_eval, "load_checkpoint", stand_in_loader(CopyContextModel()))
    out = tmp_path / "eval"
    argv = [
        "--checkpoint",
        "unused",
        "--data_path",
        str(prepared),
        "--output_dir",
        str(out),
        "--grids",
        "0",
        "--tasks",
        "segmentation",
    ]
    assert main_eval.main(argv) == 0
    earlier = (out / "results.json").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr("os.fsync", full_disk)
        assert main_eval.main(argv) == 2
    assert "the disk is full" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == earlier
    assert not list(out.rglob("*.tmp"))


def test_a_damaged_slice_is_one_error_line_naming_it(prepared, tmp_path, monkeypatch, capsys):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(prepared, damaged)
    dataset = PreparedDataset(str(damaged / "ACDC"))
    case = dataset.case_ids("test")[0]
    broken = dataset.slice_path(dataset.input_folder, case, dataset.slice_indices(case)[0])
    with open(broken, "r+b") as handle:
        handle.truncate(60)
    monkeypatch.setattr(main_eval, "load_checkpoint", stand_in_loader(CopyContextModel()))
    assert (
        main_eval.main(
            [
                "--checkpoint",
                "unused",
                "--data_path",
                str(damaged),
                "--output_dir",
                str(tmp_path / "e"),
                "--tasks",
                "segmentation",
            ]
        )
        == 2
    )
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bar's own line
    assert error.startswith("error: ") and f"{broken}: not a readable PNG" in error
    assert "datasets.prepare verify" in error


def test_copy_context_votes_over_several_contexts():
    from evaluation.baselines import copy_context

    first = np.array([[1, 2], [3, 0]], dtype=np.uint8)
    second = np.array([[1, 5], [4, 0]], dtype=np.uint8)
    third = np.array([[2, 5], [6, 7]], dtype=np.uint8)
    query = np.zeros((2, 2), dtype=np.uint8)
    image = np.zeros((2, 2), dtype=np.uint8)
    (voted,) = copy_context([query], [[(image, first), (image, second), (image, third)]], None)
    # Two votes win; where all three differ the first (most alike) context decides.
    np.testing.assert_array_equal(voted, [[1, 5], [3, 0]])
    assert voted.dtype == np.uint8
    (single,) = copy_context([query], [[(image, third)]], None)
    np.testing.assert_array_equal(single, third)
