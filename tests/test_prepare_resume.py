"""datasets.prepare over several runs: the slices test cases keep, resuming, interruptions, verify,
parallel workers, and the cases that are skipped or refused."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from datasets import case_processing, output_folder
from datasets.manifest import read_png, slice_position
from datasets.verify import verify_root
from tests.helpers import common, dataset_at, labelled_volume, png, run, save_nifti, write_msd

# ---------------------------------------------------------------- the slices test cases keep


def write_partly_labelled_cases(root, count=3):
    """Cases p0, p1, ... of 6 axial slices with foreground on slices 1 and 3 only."""
    write_msd(root, {f"p{i}": labelled_volume(ids_on_slices={1: 1, 3: 1}, seed=i) for i in range(count)})


def prepare_with_test_case(tmp_path, name, test_case, *extra):
    """Prepares tmp_path/src into tmp_path/out/name with test_case as the only test case."""
    (tmp_path / "test_cases.txt").write_text(test_case + "\n")
    return run(
        "msd",
        "--root",
        tmp_path / "src",
        *common(tmp_path / "out", name),
        "--modality",
        "CT",
        "--test_cases",
        tmp_path / "test_cases.txt",
        *extra,
    )


def case_files(tmp_path, name, folder, case_id):
    return sorted(os.listdir(tmp_path / "out" / name / folder / case_id))


def edit_manifest(dataset_dir, edit):
    path = os.path.join(dataset_dir, "manifest.json")
    with open(path) as handle:
        manifest = json.load(handle)
    edit(manifest)
    with open(path, "w") as handle:
        json.dump(manifest, handle)


def test_test_cases_keep_every_slice_and_list_their_foreground(tmp_path):
    write_partly_labelled_cases(tmp_path / "src")
    assert prepare_with_test_case(tmp_path, "W", "p2") == 0
    dataset = dataset_at(tmp_path / "out", "W")
    assert dataset.slice_indices("p2") == list(range(6)) and dataset.case("p2")["foreground_slices"] == [1, 3]
    assert dataset.foreground_slice_indices("p2") == [1, 3]
    every_slice = [f"{index:04d}.png" for index in range(6)]
    assert case_files(tmp_path, "W", "image", "p2") == case_files(tmp_path, "W", "label", "p2") == every_slice
    assert not png(dataset, "label", "p2", 0).any() and png(dataset, "label", "p2", 3).any()
    for train_case in ("p0", "p1"):  # as before: the labelled slices only
        assert dataset.slice_indices(train_case) == dataset.case(train_case)["foreground_slices"] == [1, 3]
        assert case_files(tmp_path, "W", "image", train_case) == ["0001.png", "0003.png"]
    assert dataset.slice_position("p2", 3) == slice_position(3, 6) == 3.5 / 6
    assert verify_root(tmp_path / "out")[1] == []

    # --test_slices foreground: test cases keep their labelled slices only, as train cases do.
    assert prepare_with_test_case(tmp_path, "F", "p2", "--test_slices", "foreground") == 0
    foreground_only = dataset_at(tmp_path / "out", "F")
    for case_id in ("p0", "p1", "p2"):
        assert foreground_only.slice_indices(case_id) == foreground_only.foreground_slice_indices(case_id) == [1, 3]
        assert case_files(tmp_path, "F", "label", case_id) == ["0001.png", "0003.png"]
    assert foreground_only.case("p0") == dataset.case("p0") and foreground_only.case_ids("test") == ["p2"]

    # A manifest written before foreground_slices existed kept foreground slices only.
    edit_manifest(tmp_path / "out" / "F", lambda manifest: manifest["cases"]["p2"].pop("foreground_slices"))
    assert dataset_at(tmp_path / "out", "F").foreground_slice_indices("p2") == [1, 3]


def test_a_test_case_without_foreground_is_kept_whole(tmp_path, capsys):
    write_msd(tmp_path / "src", {"full": labelled_volume(ids_on_slices={1: 1}), "empty": labelled_volume()})
    assert prepare_with_test_case(tmp_path, "E", "empty") == 0
    assert "1 test cases without foreground, kept whole" in capsys.readouterr().out
    dataset = dataset_at(tmp_path / "out", "E")
    assert dataset.case_ids("test") == ["empty"] and dataset.manifest["skipped"] == {}
    assert dataset.slice_indices("empty") == list(range(6)) and dataset.foreground_slice_indices("empty") == []
    assert dataset.case("empty")["label_ids"] == [0]
    assert verify_root(tmp_path / "out")[1] == []
    # Without the whole-volume protocol nothing of it would be evaluated: skipped as before.
    capsys.readouterr()
    assert prepare_with_test_case(tmp_path, "S", "empty", "--test_slices", "foreground") == 0
    assert "warning: case 'empty' skipped: no foreground" in capsys.readouterr().err
    assert dataset_at(tmp_path / "out", "S").case_ids() == ["full"]


def test_a_rerun_prepares_again_the_cases_whose_kept_slices_change(tmp_path, monkeypatch):
    write_partly_labelled_cases(tmp_path / "src")
    assert prepare_with_test_case(tmp_path, "R", "p2", "--test_slices", "foreground") == 0
    prepared = []
    original = case_processing.prepare_case
    monkeypatch.setattr(
        case_processing, "prepare_case", lambda case, *a: prepared.append(case.case_id) or original(case, *a)
    )
    assert prepare_with_test_case(tmp_path, "R", "p2") == 0  # the test case now keeps every slice
    assert prepared == ["p2"] and dataset_at(tmp_path / "out", "R").slice_indices("p2") == list(range(6))
    assert prepare_with_test_case(tmp_path, "R", "p0") == 0  # p0 becomes the test case, p2 a train case
    assert sorted(prepared) == ["p0", "p2", "p2"]
    assert case_files(tmp_path, "R", "label", "p2") == ["0001.png", "0003.png"]  # no slice left behind
    assert verify_root(tmp_path / "out")[1] == []

    # A record from before foreground_slices existed (foreground slices only) still fits a train case.
    meta = tmp_path / "out" / "R" / "meta" / "p1.json"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "foreground_slices"}))
    assert prepare_with_test_case(tmp_path, "R", "p0") == 0
    assert len(prepared) == 3 and dataset_at(tmp_path / "out", "R").case("p1")["foreground_slices"] == [1, 3]

    # Interrupted while a finished case is prepared again: its old record is gone, so it is not reused.
    def interrupted(path, picture):
        raise KeyboardInterrupt

    monkeypatch.setattr(output_folder, "write_png", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_with_test_case(tmp_path, "R", "p1")
    assert not os.path.exists(tmp_path / "out" / "R" / "meta" / "p1.json")


def test_verify_checks_the_foreground_slices(tmp_path, capsys):
    write_partly_labelled_cases(tmp_path / "src", count=2)
    assert prepare_with_test_case(tmp_path, "V", "p1") == 0

    def tamper(manifest):
        manifest["cases"]["p0"]["foreground_slices"] = [1]
        manifest["cases"]["p1"]["foreground_slices"] = [3, 9]

    edit_manifest(tmp_path / "out" / "V", tamper)
    assert run("verify", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert "case 'p0': a train case keeps slices without foreground [3]" in error
    assert "case 'p1': foreground_slices [9] are not among its slices" in error


def test_slice_position_is_the_centre_of_the_slice_share():
    assert slice_position(0, 1) == 0.5
    assert [slice_position(index, 4) for index in range(4)] == [0.125, 0.375, 0.625, 0.875]
    with pytest.raises(ValueError, match="outside a volume of 4 slices"):
        slice_position(4, 4)


def test_one_slice_case(tmp_path):
    image, label = labelled_volume(shape=(8, 8, 1), ids_on_slices={0: 4})
    write_msd(tmp_path / "src", {"one": (image, label)})
    assert run("msd", "--root", tmp_path / "src", *common(tmp_path / "out", "S"), "--modality", "CT") == 0
    assert dataset_at(tmp_path / "out", "S").case("one")["slices"] == [0]


def test_corrupt_file_is_named(tmp_path, capsys):
    write_msd(tmp_path / "src", {"ok": labelled_volume(ids_on_slices={1: 1})})
    (tmp_path / "src" / "imagesTr" / "bad.nii.gz").write_bytes(b"not a nifti file at all")
    save_nifti(tmp_path / "src" / "labelsTr" / "bad.nii.gz", labelled_volume()[1])
    assert run("msd", "--root", tmp_path / "src", *common(tmp_path / "out", "C"), "--modality", "CT") == 2
    assert "bad.nii.gz: cannot read" in capsys.readouterr().err


# ---------------------------------------------------------------- resume, interruption, verify


def test_resume_skips_finished_cases_and_refuses_other_settings(tmp_path, monkeypatch, capsys):
    write_msd(tmp_path / "src", {f"c{i}": labelled_volume(ids_on_slices={1: 1}, seed=i) for i in range(3)})
    args = ["msd", "--root", tmp_path / "src", *common(tmp_path / "out", "R"), "--modality", "CT"]
    assert run(*args) == 0
    prepared = []
    original = case_processing.prepare_case
    monkeypatch.setattr(
        case_processing, "prepare_case", lambda case, *a: prepared.append(case.case_id) or original(case, *a)
    )
    os.remove(tmp_path / "out" / "R" / "meta" / "c1.json")
    assert run(*args, "--workers", 1) == 0
    assert prepared == ["c1"]
    first_test_cases = dataset_at(tmp_path / "out", "R").case_ids("test")
    assert run(*args, "--test_fraction", 0.5) == 0  # splits may change on a rerun
    test_cases = dataset_at(tmp_path / "out", "R").case_ids("test")
    # Only the case that became a test case is prepared again, as it now keeps every slice.
    assert len(test_cases) == 2 and prepared == ["c1", *sorted(set(test_cases) - set(first_test_cases))]
    assert run(*args[:-2], "--modality", "CT", "--size", 16) == 2
    assert "other settings (size)" in capsys.readouterr().err
    assert run(*args[:-2], "--modality", "CT", "--size", 16, "--overwrite") == 0


def test_interrupted_case_leaves_nothing_behind(tmp_path, monkeypatch):
    write_msd(tmp_path / "src", {"i": labelled_volume(ids_on_slices={1: 1, 2: 1, 3: 1})})
    args = ["msd", "--root", tmp_path / "src", *common(tmp_path / "out", "I"), "--modality", "CT"]
    writes = []
    real_write = output_folder.write_png

    def failing_write(path, picture):
        writes.append(path)
        if len(writes) == 4:
            raise KeyboardInterrupt
        real_write(path, picture)

    monkeypatch.setattr(output_folder, "write_png", failing_write)
    with pytest.raises(KeyboardInterrupt):
        run(*args)
    dataset_dir = tmp_path / "out" / "I"
    assert not os.path.exists(dataset_dir / "image" / "i") and not os.path.exists(dataset_dir / "label" / "i")
    assert not os.listdir(dataset_dir / ".partial") and not os.listdir(dataset_dir / "meta")
    monkeypatch.setattr(output_folder, "write_png", real_write)
    # A run killed between moving the folders into place: a case folder without its record.
    os.makedirs(dataset_dir / "image" / "i")
    (dataset_dir / "image" / "i" / "0009.png").write_bytes(b"stale")
    assert run(*args) == 0
    assert sorted(os.listdir(dataset_dir / "image" / "i")) == ["0001.png", "0002.png", "0003.png"]
    assert verify_root(tmp_path / "out")[1] == []


def test_verify_passes_on_good_output_and_fails_on_tampering(tmp_path, capsys):
    write_msd(
        tmp_path / "src",
        {f"v{i}": labelled_volume(ids_on_slices={1: 1, 2: 2}, seed=i) for i in range(2)},
        {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "a", "2": "b"}},
    )
    assert run("msd", "--root", tmp_path / "src", *common(tmp_path / "out", "T")) == 0
    assert run("verify", tmp_path / "out") == 0
    assert "T: segmentation, CT, 2 cases" in capsys.readouterr().out
    dataset_dir = tmp_path / "out" / "T"
    os.remove(dataset_dir / "image" / "v0" / "0001.png")
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(dataset_dir / "label" / "v1" / "0002.png")
    Image.fromarray(np.zeros((5, 8), np.uint8)).save(dataset_dir / "image" / "v1" / "0001.png")
    os.makedirs(dataset_dir / "label" / "stray")
    assert run("verify", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert "v0/0001.png: missing" in error and "label ids [7]" in error
    assert "size [5, 8]" in error and "stray: case folder not in the manifest" in error


def test_parallel_workers_match_a_single_worker(tmp_path):
    write_msd(tmp_path / "src", {f"p{i}": labelled_volume(ids_on_slices={i % 4: 1}, seed=i) for i in range(4)})
    for workers, name in ((1, "one"), (2, "two")):
        assert (
            run(
                "msd",
                "--root",
                tmp_path / "src",
                *common(tmp_path / "out", name),
                "--modality",
                "CT",
                "--workers",
                workers,
            )
            == 0
        )
    one, two = dataset_at(tmp_path / "out", "one"), dataset_at(tmp_path / "out", "two")
    assert one.manifest["cases"] == two.manifest["cases"]
    for pair_one, pair_two in zip(one.pairs(), two.pairs()):
        assert np.array_equal(read_png(pair_one.input_path), read_png(pair_two.input_path))
