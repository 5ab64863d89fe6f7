"""Data safety: what prepare may delete and where it may write, the names and splits a manifest may hold,
damaged slices, a full or read-only disk, and NaN voxels. Each bad input gets one line that names it."""

import errno
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from datasets import prepare
from datasets.canvas import InContextDataset
from datasets.manifest import PreparedDataset, read_png
from datasets.mixture import Mixture, MixtureEntry
from datasets.verify import verify_root
from tests.helpers import CANVAS, labelled_volume, policy, save_nifti, write_msd
from util.cli import UsageError

CASES = ("c0", "c1", "c2")


# ---------------------------------------------------------------- helpers


def write_source(root):
    """Three segmentation cases c0, c1, c2 in the nnU-Net layout."""
    write_msd(
        root, {case_id: labelled_volume(ids_on_slices={1: 1, 2: 1}, seed=seed) for seed, case_id in enumerate(CASES)}
    )


def run_prepare(source, out, dataset, *extra):
    return prepare.main(
        [
            "msd",
            "--root",
            str(source),
            "--out",
            str(out),
            "--dataset",
            str(dataset),
            "--modality",
            "CT",
            "--size",
            "8",
            *map(str, extra),
        ]
    )


def error_lines(capsys):
    """The `error: ...` lines on stderr (tqdm draws its progress bars there too)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]


def files_under(folder):
    """Every file and folder below `folder`, relative to it, with file contents: a snapshot to compare."""
    snapshot = {}
    for parent, folders, files in os.walk(folder):
        for name in folders:
            snapshot[os.path.relpath(os.path.join(parent, name), folder)] = None
        for name in files:
            with open(os.path.join(parent, name), "rb") as handle:
                snapshot[os.path.relpath(os.path.join(parent, name), folder)] = handle.read()
    return snapshot


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared root holding dataset DS: c0, c1 train, c2 test."""
    tmp_path = tmp_path_factory.mktemp("safety")
    write_source(tmp_path / "src")
    (tmp_path / "test_cases.txt").write_text("c2\n")
    assert run_prepare(tmp_path / "src", tmp_path / "out", "DS", "--test_cases", tmp_path / "test_cases.txt") == 0
    return tmp_path / "out"


@pytest.fixture
def dataset_copy(prepared, tmp_path):
    """A copy of DS to edit, in a prepared root of its own."""
    shutil.copytree(prepared / "DS", tmp_path / "out" / "DS")
    return tmp_path / "out" / "DS"


def edit_manifest(dataset_dir, edit):
    path = dataset_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


# ---------------------------------------------------------------- 1. --dataset and --overwrite


@pytest.mark.parametrize("name", ["..", "", "../../x", "sub/DS", ".hidden", "ABSOLUTE"])
def test_a_dataset_name_that_is_not_a_plain_folder_name_is_refused(tmp_path, capsys, name):
    write_source(tmp_path / "src")
    out = tmp_path / "root" / "out"
    (out / "Other").mkdir(parents=True)
    (out / "Other" / "manifest.json").write_text(json.dumps({"dataset": "Other"}))
    (tmp_path / "root" / "beside.txt").write_text("a file next to --out")
    name = str(tmp_path / "elsewhere") if name == "ABSOLUTE" else name
    before = files_under(tmp_path)

    assert run_prepare(tmp_path / "src", out, name, "--overwrite") == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and errors[0].startswith(f"error: --dataset {json.dumps(name)}: not a plain folder name")
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("contents", ["unrelated files", "another dataset's manifest", "a file"])
@pytest.mark.parametrize("overwrite", [True, False])
def test_a_folder_that_is_not_a_preparation_of_the_dataset_is_left_alone(tmp_path, capsys, contents, overwrite):
    write_source(tmp_path / "src")
    dataset_dir = tmp_path / "out" / "DS"
    if contents == "a file":
        dataset_dir.parent.mkdir()
        dataset_dir.write_text("not a folder")
    else:
        (dataset_dir / "image" / "c0").mkdir(parents=True)
        (dataset_dir / "image" / "c0" / "notes.txt").write_text("someone's own files")
    if contents == "another dataset's manifest":
        (dataset_dir / "manifest.json").write_text(json.dumps({"dataset": "Other"}))
    before = files_under(tmp_path)

    assert run_prepare(tmp_path / "src", tmp_path / "out", "DS", *(["--overwrite"] if overwrite else [])) == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and errors[0].startswith(f"error: {dataset_dir}: ")
    assert "refusing to" in errors[0]
    assert files_under(tmp_path) == before


# ---------------------------------------------------------------- 2. names in a manifest, case ids from sources


def rename_case(old, new):
    def edit(manifest):
        manifest["cases"][new] = manifest["cases"].pop(old)
        for case_ids in manifest["splits"].values():
            case_ids[:] = [new if case_id == old else case_id for case_id in case_ids]

    return edit


def rename_folder(old, new):
    def edit(manifest):
        manifest["folders"][new] = manifest["folders"].pop(old)
        for key in ("input_folder", "target_folder"):
            manifest[key] = new if manifest[key] == old else manifest[key]

    return edit


def set_key(key, value):
    return lambda manifest: manifest.update({key: value})


@pytest.mark.parametrize(
    "edit, name",
    [
        (rename_case("c0", "../../../../tmp/x"), "../../../../tmp/x"),
        (rename_case("c0", ".."), ".."),
        (rename_case("c0", "/tmp/x"), "/tmp/x"),
        (rename_case("c0", ""), ""),
        (rename_folder("image", "../image"), "../image"),
        (rename_folder("label", "/tmp"), "/tmp"),
        (set_key("input_folder", "../../x"), "../../x"),
        (set_key("target_folder", ".."), ".."),
        (set_key("dataset", "../x"), "../x"),
    ],
    ids=[
        "case ../../../../tmp/x",
        "case ..",
        "case /tmp/x",
        "case ''",
        "folders ../image",
        "folders /tmp",
        "input_folder ../../x",
        "target_folder ..",
        "dataset ../x",
    ],
)
def test_manifest_names_that_could_lead_outside_the_dataset_are_refused(dataset_copy, edit, name):
    edit_manifest(dataset_copy, edit)
    with pytest.raises(UsageError) as refused:
        PreparedDataset(str(dataset_copy))
    message = str(refused.value)
    assert message.startswith(f"{dataset_copy / 'manifest.json'}: ") and json.dumps(name) in message
    assert "not a plain name" in message and "\n" not in message


def test_case_ids_with_spaces_and_brackets_are_kept(tmp_path):
    """Public sets name files like "benign (1).png": such names are one folder level and safe."""
    image, label = labelled_volume(ids_on_slices={1: 1})
    save_nifti(tmp_path / "src" / "img" / "imgbenign (1).nii.gz", image)
    save_nifti(tmp_path / "src" / "label" / "labelbenign (1).nii.gz", label)
    assert (
        prepare.main(
            [
                "glob",
                "--root",
                str(tmp_path / "src"),
                "--images",
                "img/img*.nii.gz",
                "--labels",
                "label/label*.nii.gz",
                "--modality",
                "CT",
                "--out",
                str(tmp_path / "out"),
                "--dataset",
                "DS",
                "--size",
                "8",
                "--test_fraction",
                "0",
            ]
        )
        == 0
    )
    assert PreparedDataset(str(tmp_path / "out" / "DS")).case_ids() == ["benign (1)"]


@pytest.mark.parametrize("stem", ["..", ".", ".x", " b"])
def test_prepare_refuses_case_ids_that_are_not_plain_names(tmp_path, capsys, stem):
    image, label = labelled_volume(ids_on_slices={1: 1})
    save_nifti(tmp_path / "src" / "img" / f"img{stem}.nii.gz", image)
    save_nifti(tmp_path / "src" / "label" / f"label{stem}.nii.gz", label)
    status = prepare.main(
        [
            "glob",
            "--root",
            str(tmp_path / "src"),
            "--images",
            "img/img*.nii.gz",
            "--labels",
            "label/label*.nii.gz",
            "--modality",
            "CT",
            "--size",
            "8",
            "--out",
            str(tmp_path / "out"),
            "--dataset",
            "G",
        ]
    )
    errors = error_lines(capsys)
    assert status == 2 and len(errors) == 1
    assert errors[0].startswith(f"error: case id {json.dumps(stem)} from ") and "not a plain name" in errors[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 3. splits


def mark_every_case(split):
    return lambda manifest: manifest.update(splits={split: sorted(manifest["cases"])})


def drop_from_splits(case_id):
    def edit(manifest):
        for case_ids in manifest["splits"].values():
            if case_id in case_ids:
                case_ids.remove(case_id)

    return edit


def list_also_under(case_id, split):
    return lambda manifest: manifest["splits"].setdefault(split, []).append(case_id)


@pytest.mark.parametrize(
    "edit, named",
    [
        (mark_every_case("test"), '"c0"'),
        (drop_from_splits("c1"), '"c1"'),
        (list_also_under("c2", "train"), '"c2"'),
        (list_also_under("c9", "test"), '"c9"'),
    ],
    ids=[
        "every case test in splits",
        "a case missing from splits",
        "a case under two splits",
        "splits lists an unknown case",
    ],
)
def test_splits_that_disagree_with_the_cases_are_refused_and_reported(dataset_copy, edit, named):
    edit_manifest(dataset_copy, edit)
    with pytest.raises(UsageError) as refused:
        PreparedDataset(str(dataset_copy))
    message = str(refused.value)
    assert message.startswith(f"{dataset_copy / 'manifest.json'}: ") and "'splits'" in message
    assert named in message and "\n" not in message
    assert verify_root(str(dataset_copy.parent))[1] == [message]


def test_training_on_a_dataset_whose_cases_are_all_test_names_it(tmp_path):
    write_source(tmp_path / "src")
    assert run_prepare(tmp_path / "src", tmp_path / "out", "AllTest", "--test_fraction", 1) == 0
    mixture = Mixture([MixtureEntry(str(tmp_path / "out" / "AllTest"))])
    with pytest.raises(UsageError) as refused:
        InContextDataset(mixture, policy(), split="train", input_size=CANVAS)
    message = str(refused.value)
    assert "dataset 'AllTest' has no train case (all its 3 cases are test)" in message and "\n" not in message


# ---------------------------------------------------------------- 4. damaged slices


def damaged(picture_bytes, damage):
    if damage == "truncated":
        return picture_bytes[: len(picture_bytes) // 2]
    if damage == "empty":
        return b""
    if damage == "not a PNG":
        return b"<html>not found</html>"
    return picture_bytes[:60] + bytes(40) + picture_bytes[100:]  # garbled compressed data


@pytest.mark.parametrize("damage", ["truncated", "empty", "not a PNG", "garbled"])
def test_a_damaged_slice_names_the_file_and_the_check_to_run(tmp_path, damage):
    path = tmp_path / "root" / "DS" / "image" / "c0" / "0001.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(damaged(path.read_bytes(), damage))
    with pytest.raises(UsageError) as refused:
        read_png(str(path))
    message = str(refused.value)
    assert message.startswith(f"{path}: not a readable PNG") and "\n" not in message
    assert f"run `python -m datasets.prepare verify {tmp_path / 'root'}`" in message


# ---------------------------------------------------------------- 5. full disk, read-only output


@pytest.mark.parametrize("written", ["prepare_settings.json", ".png", os.path.join("meta", "c0.json"), "manifest.json"])
def test_a_full_disk_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch, written):
    write_source(tmp_path / "src")
    real_replace = os.replace

    def replace_on_a_full_disk(source, destination, *args, **kwargs):
        if str(destination).endswith(written):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(destination))
        return real_replace(source, destination, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace_on_a_full_disk)
    assert run_prepare(tmp_path / "src", tmp_path / "out", "DS") == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and errors[0].endswith(f"{written}: cannot write (the disk is full)")
    assert not [name for name in files_under(tmp_path / "out") if name.endswith(".tmp")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the full disk test stands in")
def test_a_read_only_output_folder_is_one_line_naming_it(tmp_path, capsys):
    write_source(tmp_path / "src")
    (tmp_path / "out").mkdir()
    os.chmod(tmp_path / "out", 0o555)
    try:
        assert run_prepare(tmp_path / "src", tmp_path / "out", "DS") == 2
    finally:
        os.chmod(tmp_path / "out", 0o755)
    errors = error_lines(capsys)
    assert len(errors) == 1 and errors[0].startswith(f"error: {tmp_path / 'out' / 'DS'}")
    assert errors[0].endswith("cannot write (no permission to write there (read-only folder?))")


# ---------------------------------------------------------------- 6. NaN and infinite voxels


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_reported_once_per_case(tmp_path, capsys, value):
    write_source(tmp_path / "src")
    image_path = tmp_path / "src" / "imagesTr" / "c1.nii.gz"
    image, _ = labelled_volume(ids_on_slices={1: 1, 2: 1}, seed=1)
    image[0, 0, :] = value  # 6 voxels, one per slice
    save_nifti(image_path, image)
    assert run_prepare(tmp_path / "src", tmp_path / "out", "DS") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        f"warning: case 'c1': NaN or infinite voxels (6 in {image_path}), set to the volume's "
        f"smallest finite value before normalising"
    ]
