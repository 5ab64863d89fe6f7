"""Tests of datasets.prepare / verify / manifest on small synthetic volumes in every layout, plus the
real MNI152 template packaged with nilearn. More in tests/test_prepare_*.py (resuming and the slices
cases keep, optional readers, the layout registry, the slicing path prepare and predict.py share); the
helpers they share are in tests/helpers.py."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from datasets import geometry, intensity, prepare
from datasets.manifest import find_datasets
from datasets.sources import glob_by_case
from datasets.verify import verify_root
from tests.helpers import common, dataset_at, labelled_volume, png, run, save_nifti, write_msd

# ---------------------------------------------------------------- segmentation layouts


def test_msd_with_dataset_json_keeps_exactly_the_labelled_slices(tmp_path, capsys):
    cases = {f"liver_{i}": labelled_volume(ids_on_slices={1: 1, 3: 2, 4: 1}, seed=i) for i in range(5)}
    description = {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "tumour"}}
    write_msd(tmp_path / "src", cases, description)
    save_nifti(tmp_path / "src" / "imagesTs" / "liver_99.nii.gz", cases["liver_0"][0])  # MSD: no labelsTs
    (tmp_path / "src" / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"macOS metadata")
    assert run("msd", "--root", tmp_path / "src", *common(tmp_path / "out", "Liver"), "--test_fraction", 0.4) == 0
    assert "imagesTs has no labelsTs" in capsys.readouterr().out

    dataset = dataset_at(tmp_path / "out", "Liver")
    assert dataset.task == "segmentation" and dataset.modality == "CT"
    assert dataset.classes == {0: "background", 1: "liver", 2: "tumour"}
    assert len(dataset.case_ids("test")) == 2 and len(dataset.case_ids("train")) == 3
    record = dataset.case("liver_0")
    assert record["slices"] == [1, 3, 4]
    assert record["intensity"]["image"] == {"method": "window", "low": -100.0, "high": 200.0}
    assert np.unique(png(dataset, "label", "liver_0", 3)).tolist() == [0, 2]
    assert sorted(os.listdir(tmp_path / "out" / "Liver" / "image" / "liver_0")) == ["0001.png", "0003.png", "0004.png"]
    assert len(dataset.pairs("train")) == 3 * 3 and len(dataset.pairs("test")) == 2 * 6  # test cases: all slices
    assert verify_root(tmp_path / "out")[1] == []


def test_nnunet_v2_channel_suffix_source_splits_and_label_style(tmp_path):
    src = tmp_path / "src"
    for split, names in (("Tr", ["a", "b"]), ("Ts", ["c"])):
        for name in names:
            image, label = labelled_volume(ids_on_slices={2: 1})
            save_nifti(src / f"images{split}" / f"{name}_0000.nii.gz", image)
            save_nifti(src / f"images{split}" / f"{name}_0001.nii.gz", np.full(image.shape, 7.0, np.float32))
            save_nifti(src / f"labels{split}" / f"{name}.nii.gz", label)
    with open(src / "dataset.json", "w") as handle:
        json.dump(
            {"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "organ": 1, "region": [1]}}, handle
        )
    assert run("msd", "--root", src, *common(tmp_path / "out", "V2"), "--channel", 1) == 0
    dataset = dataset_at(tmp_path / "out", "V2")
    assert dataset.classes == {0: "background", 1: "organ"}
    assert dataset.manifest["splits"] == {"test": ["c"], "train": ["a", "b"]}
    assert dataset.case("a")["sources"]["image"].endswith("a_0001.nii.gz")
    # The _0001 files are constant, so they come out black (a constant volume has no range).
    assert dataset.modality == "MRI" and png(dataset, "image", "a", 2).max() == 0


def test_msd_without_dataset_json_needs_the_modality(tmp_path, capsys):
    write_msd(tmp_path / "src", {"case_1": labelled_volume(ids_on_slices={0: 1})})
    assert run("msd", "--root", tmp_path / "src", *common(tmp_path / "out", "X")) == 2
    assert "--modality" in capsys.readouterr().err
    assert run("msd", "--root", tmp_path / "src", *common(tmp_path / "out", "X"), "--modality", "US") == 0
    record = dataset_at(tmp_path / "out", "X").case("case_1")
    assert record["intensity"]["image"]["method"] == "minmax"
    assert dataset_at(tmp_path / "out", "X").classes == {0: "background", 1: "class_1"}


def test_glob_mode_case_ids_and_16_bit_labels(tmp_path):
    src = tmp_path / "BTCV"
    for number in ("0001", "0002"):
        image, label = labelled_volume(ids_on_slices={1: 300, 2: 5})
        save_nifti(src / "img" / f"img{number}.nii.gz", image)
        save_nifti(src / "label" / f"label{number}.nii.gz", label)
    assert (
        run(
            "glob",
            "--root",
            src,
            "--images",
            "img/img*.nii.gz",
            "--labels",
            "label/label*.nii.gz",
            "--modality",
            "CT",
            *common(tmp_path / "out", "BTCV"),
            "--test_fraction",
            0,
        )
        == 0
    )
    dataset = dataset_at(tmp_path / "out", "BTCV")
    assert dataset.case_ids() == ["0001", "0002"]
    assert dataset.case("0001")["label_bits"] == 16
    with Image.open(dataset.slice_path("label", "0001", 1)) as picture:
        assert picture.mode.startswith("I")
    assert np.unique(png(dataset, "label", "0001", 1)).tolist() == [0, 300]
    assert np.unique(png(dataset, "label", "0001", 2)).tolist() == [0, 5]
    assert png(dataset, "label", "0001", 2).dtype == np.uint16
    assert set(dataset.classes) == {0, 5, 300}
    assert verify_root(tmp_path / "out")[1] == []


def test_glob_mode_reports_unmatched_files(tmp_path, capsys):
    image, label = labelled_volume(ids_on_slices={1: 1})
    save_nifti(tmp_path / "img" / "img01.nii.gz", image)
    save_nifti(tmp_path / "img" / "img02.nii.gz", image)
    save_nifti(tmp_path / "lab" / "lab01.nii.gz", label)
    assert (
        run(
            "glob",
            "--root",
            tmp_path,
            "--images",
            "img/img*.nii.gz",
            "--labels",
            "lab/lab*.nii.gz",
            "--modality",
            "CT",
            *common(tmp_path / "out", "G"),
        )
        == 2
    )
    assert "case '02': no label file" in capsys.readouterr().err


def test_splits_from_test_globs_or_a_test_case_list(tmp_path, capsys):
    for folder, name in (("train", "a"), ("train", "b"), ("test", "c"), ("test", "a")):
        image, label = labelled_volume(ids_on_slices={1: 1})
        save_nifti(tmp_path / folder / f"{name}.nii.gz", image)
        save_nifti(tmp_path / folder / f"{name}_seg.nii.gz", label)
    args = [
        "glob",
        "--root",
        tmp_path,
        "--images",
        "train/?.nii.gz",
        "--labels",
        "train/?_seg.nii.gz",
        "--modality",
        "CT",
        *common(tmp_path / "out", "Sp"),
    ]
    assert run(*args, "--test_images", "test/?.nii.gz", "--test_labels", "test/?_seg.nii.gz") == 2
    assert "case id 'a' occurs twice" in capsys.readouterr().err
    assert run(*args, "--test_images", "test/[c].nii.gz", "--test_labels", "test/[c]_seg.nii.gz") == 0
    assert dataset_at(tmp_path / "out", "Sp").manifest["splits"] == {"test": ["c"], "train": ["a", "b"]}
    (tmp_path / "test_ids.txt").write_text("b\n")
    assert run(*args, "--test_cases", tmp_path / "test_ids.txt", "--overwrite") == 0
    assert dataset_at(tmp_path / "out", "Sp").manifest["splits"] == {"test": ["b"], "train": ["a"]}


def test_glob_wildcards_give_case_ids(tmp_path):
    for relative in ("Case00.mhd", "Case00_segmentation.mhd", "p1/mri_norm2.h5", "sub/x_a_b.nii"):
        os.makedirs(os.path.dirname(tmp_path / relative), exist_ok=True)
        (tmp_path / relative).write_text("")
    assert list(glob_by_case(str(tmp_path), "Case??.mhd", "images")) == ["00"]
    assert list(glob_by_case(str(tmp_path), "Case??_segmentation.mhd", "labels")) == ["00"]
    assert list(glob_by_case(str(tmp_path), "*/mri_norm2.h5", "images")) == ["p1"]
    assert list(glob_by_case(str(tmp_path), "**/x_*_*.nii", "images")) == ["a_b"]


def test_acdc_frames_splits_and_class_names(tmp_path):
    for split, patient in (("training", "patient001"), ("training", "patient002"), ("testing", "patient101")):
        for frame in ("01", "12"):
            image, label = labelled_volume(ids_on_slices={0: 1, 2: 3})
            save_nifti(tmp_path / split / patient / f"{patient}_frame{frame}.nii.gz", image)
            save_nifti(tmp_path / split / patient / f"{patient}_frame{frame}_gt.nii.gz", label)
        save_nifti(tmp_path / split / patient / f"{patient}_4d.nii.gz", np.zeros((8, 8, 6, 3), np.float32))
    assert run("acdc", "--root", tmp_path, *common(tmp_path / "out", "ACDC")) == 0
    dataset = dataset_at(tmp_path / "out", "ACDC")
    assert dataset.case_ids("test") == ["patient101_frame01", "patient101_frame12"]
    assert len(dataset.case_ids("train")) == 4
    assert dataset.classes[3] == "left ventricle"
    assert dataset.case("patient001_frame01")["slices"] == [0, 2]


def test_label_map_merges_and_drops_classes(tmp_path):
    write_msd(
        tmp_path / "src",
        {"c": labelled_volume(ids_on_slices={0: 1, 1: 2, 2: 3})},
        {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "kidney", "2": "cyst", "3": "x"}},
    )
    assert run("msd", "--root", tmp_path / "src", *common(tmp_path / "out", "K"), "--label_map", "2:1,3:0") == 0
    dataset = dataset_at(tmp_path / "out", "K")
    assert dataset.case("c")["slices"] == [0, 1]
    assert np.unique(png(dataset, "label", "c", 1)).tolist() == [0, 1]
    assert dataset.classes == {0: "background", 1: "kidney"}


# ---------------------------------------------------------------- geometry


def test_flipped_and_permuted_affine_is_reoriented_to_ras(tmp_path):
    # Stored voxel axes: i -> inferior (2 mm), j -> left (1.5 mm), k -> anterior (1.5 mm).
    affine = np.array([[0, -1.5, 0, 10], [0, 0, 1.5, -20], [-2.0, 0, 0, 30], [0, 0, 0, 1]])
    shape = (4, 6, 6)
    image = np.full(shape, 100.0, np.float32)
    label = np.zeros(shape, np.uint8)
    marker = (1, 2, 4)
    label[marker] = 9
    write_msd(tmp_path / "src", {"m": (image, label, affine)})
    assert run("msd", "--root", tmp_path / "src", *common(tmp_path / "out", "M", 6), "--modality", "CT") == 0

    # Independently: canonical voxel = (world - lowest world corner of the grid) / spacing.
    corners = np.array(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:]
    marker_world = affine[:3, :3] @ np.array(marker) + affine[:3, 3]
    x, y, z = np.rint((marker_world - world.min(axis=1)) / np.array([1.5, 1.5, 2.0])).astype(int)

    record = dataset_at(tmp_path / "out", "M").case("m")
    assert record["original"]["axcodes"] == "ILA" and record["canonical"]["axcodes"] == "RAS"
    assert record["canonical"]["shape"] == [6, 6, 4] and record["slices"] == [z]
    assert np.allclose(np.asarray(record["canonical"]["affine"])[:3, 3], world.min(axis=1))
    picture = png(dataset_at(tmp_path / "out", "M"), "label", "m", z)
    assert np.argwhere(picture == 9).tolist() == [[6 - 1 - y, x]]


def test_oblique_affine_matches_nibabel_closest_canonical(tmp_path):
    angle = np.deg2rad(12)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, -1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.0, 1.0, 3.0])
    label = np.zeros((6, 6, 5), np.uint8)
    label[1, 4, 3] = 1
    path = save_nifti(tmp_path / "src" / "labelsTr" / "o.nii.gz", label, affine)
    save_nifti(tmp_path / "src" / "imagesTr" / "o.nii.gz", np.ones((6, 6, 5), np.float32), affine)
    assert run("msd", "--root", tmp_path / "src", *common(tmp_path / "out", "O", 6), "--modality", "CT") == 0
    reference = nib.as_closest_canonical(nib.load(path))
    x, y, z = np.argwhere(np.asarray(reference.dataobj) == 1)[0]
    record = dataset_at(tmp_path / "out", "O").case("o")
    assert record["slices"] == [z]
    assert np.allclose(record["canonical"]["affine"], reference.affine)
    assert np.argwhere(png(dataset_at(tmp_path / "out", "O"), "label", "o", z) == 1).tolist() == [[5 - y, x]]


def test_mismatched_grids_are_refused_naming_the_case(tmp_path, capsys):
    image, label = labelled_volume(ids_on_slices={1: 1})
    save_nifti(tmp_path / "imagesTr" / "good.nii.gz", image)
    save_nifti(tmp_path / "labelsTr" / "good.nii.gz", label)
    save_nifti(tmp_path / "imagesTr" / "shifted.nii.gz", image)
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    save_nifti(tmp_path / "labelsTr" / "shifted.nii.gz", label, shifted)
    save_nifti(tmp_path / "imagesTr" / "small.nii.gz", image)
    save_nifti(tmp_path / "labelsTr" / "small.nii.gz", label[:, :, :4])
    assert run("msd", "--root", tmp_path, *common(tmp_path / "out", "B"), "--modality", "CT") == 2
    error = capsys.readouterr().err
    assert "case 'shifted'" in error and "case 'small'" in error and "case 'good'" not in error
    assert not os.path.exists(tmp_path / "out" / "B")
    assert (
        run(
            "msd",
            "--root",
            tmp_path,
            *common(tmp_path / "out", "B"),
            "--modality",
            "CT",
            "--affine_tolerance",
            1,
            "--source_splits",
            "Tr:train",
        )
        == 2
    )


def test_four_dimensional_images_need_a_channel(tmp_path, capsys):
    image, label = labelled_volume(ids_on_slices={2: 1})
    volume = np.stack([image, image * 0 + 5.0, image], axis=-1)
    volume[..., 1][label > 0] = 50.0
    write_msd(tmp_path / "src", {"four": (volume, label)})
    assert run("msd", "--root", tmp_path / "src", *common(tmp_path / "out", "F"), "--modality", "US") == 2
    error = capsys.readouterr().err
    assert "case 'four'" in error and "is 4D" in error and "--channel" in error
    assert (
        run("msd", "--root", tmp_path / "src", *common(tmp_path / "out", "F"), "--modality", "US", "--channel", 1) == 0
    )
    picture = png(dataset_at(tmp_path / "out", "F"), "image", "four", 2)
    assert set(np.unique(picture).tolist()) == {0, 255}


def test_nans_become_background_before_normalisation(tmp_path):
    image, label = labelled_volume(ids_on_slices={1: 1})
    image[0, 0, :] = np.nan
    image[1, 0, 1] = np.inf
    write_msd(tmp_path / "src", {"n": (image, label)})
    assert run("msd", "--root", tmp_path / "src", *common(tmp_path / "out", "N"), "--modality", "MRI") == 0
    record = dataset_at(tmp_path / "out", "N").case("n")
    assert record["non_finite_voxels"] == {"image": 7}
    assert np.isfinite(record["intensity"]["image"]["low"])
    assert png(dataset_at(tmp_path / "out", "N"), "image", "n", 1)[-1, 0] == 0


def test_empty_label_case_is_skipped_with_a_warning(tmp_path, capsys):
    write_msd(
        tmp_path / "src", {"full": labelled_volume(ids_on_slices={1: 1}), "empty": labelled_volume(ids_on_slices={})}
    )
    assert run("msd", "--root", tmp_path / "src", *common(tmp_path / "out", "E"), "--modality", "CT") == 0
    assert "warning: case 'empty' skipped: no foreground" in capsys.readouterr().err
    dataset = dataset_at(tmp_path / "out", "E")
    assert dataset.case_ids() == ["full"] and list(dataset.manifest["skipped"]) == ["empty"]
    assert not os.path.exists(tmp_path / "out" / "E" / "image" / "empty")
    assert verify_root(tmp_path / "out")[1] == []


# ---------------------------------------------------------------- image-to-image tasks


def brats_case(root, case_id, suffixes, shape=(8, 8, 5)):
    rng = np.random.default_rng(len(case_id))
    volumes = {}
    for suffix in suffixes:
        volume = np.zeros(shape, np.float32)
        volume[1:7, 1:7, 1:4] = rng.uniform(50, 500, size=(6, 6, 3))
        volumes[suffix] = volume
        save_nifti(root / case_id / f"{case_id}-{suffix}.nii.gz", volume)
    return volumes


def test_brats_synthesis_writes_one_folder_per_contrast(tmp_path):
    for case_id in ("BraTS-GLI-00000-000", "BraTS-GLI-00001-000"):
        brats_case(tmp_path / "src", case_id, ["t1c", "t1n", "t2f", "t2w", "seg"])
    assert (
        run(
            "brats-synthesis",
            "--root",
            tmp_path / "src",
            "--source",
            "t1c",
            "--target",
            "t2w",
            *common(tmp_path / "out", "GLI"),
        )
        == 0
    )
    dataset = dataset_at(tmp_path / "out", "GLI")
    assert (dataset.task, dataset.input_folder, dataset.target_folder) == ("synthesis", "t1c", "t2w")
    record = dataset.case("BraTS-GLI-00000-000")
    assert record["slices"] == [1, 2, 3]
    assert record["intensity"]["t1c"]["low"] != record["intensity"]["t2w"]["low"]
    assert os.path.isdir(tmp_path / "out" / "GLI" / "t2w" / "BraTS-GLI-00000-000")
    assert dataset.classes == {} and verify_root(tmp_path / "out")[1] == []


def test_brats_inpainting_with_mask_fallback(tmp_path):
    case_id = "BraTS-GLI-00002-000"
    volumes = brats_case(tmp_path / "src", case_id, ["t1n"])
    mask = np.zeros((8, 8, 5), np.uint8)
    mask[3:5, 3:5, 2] = 1
    save_nifti(tmp_path / "src" / case_id / f"{case_id}-mask-healthy.nii.gz", mask)
    save_nifti(tmp_path / "src" / case_id / f"{case_id}-t1n-voided.nii.gz", volumes["t1n"] * (1 - mask))
    assert (
        run("brats-inpainting", "--root", tmp_path / "src", *common(tmp_path / "out", "Local"), "--min_mask_pixels", 1)
        == 0
    )
    dataset = dataset_at(tmp_path / "out", "Local")
    record = dataset.case(case_id)
    assert record["sources"]["mask"].endswith("-mask-healthy.nii.gz") and record["slices"] == [2]
    assert record["intensity"]["image"] == record["intensity"]["target"]
    hole = png(dataset, "mask", case_id, 2) == 255
    assert hole.sum() == 4 and (png(dataset, "image", case_id, 2)[hole] == 0).all()
    # One intensity scale for the pair: outside the hole, input and target are the same picture.
    assert np.array_equal(png(dataset, "target", case_id, 2)[~hole], png(dataset, "image", case_id, 2)[~hole])
    assert verify_root(tmp_path / "out")[1] == []


def test_brats_inpainting_missing_file_names_the_case(tmp_path, capsys):
    brats_case(tmp_path / "src", "BraTS-GLI-00003-000", ["t1n-voided", "t1n"])
    assert run("brats-inpainting", "--root", tmp_path / "src", *common(tmp_path / "out", "L")) == 2
    assert "case 'BraTS-GLI-00003-000': no BraTS-GLI-00003-000-mask.nii.gz or" in capsys.readouterr().err


def test_denoising_pairs_share_the_ct_window(tmp_path):
    for case_id in ("L067", "L096"):
        normal = np.full((8, 8, 4), -1000.0, np.float32)
        normal[2:6, 2:6, :] = 50.0
        low = normal + np.random.default_rng(0).normal(0, 30, normal.shape).astype(np.float32)
        save_nifti(tmp_path / "src" / case_id / "quarter.nii.gz", low)
        save_nifti(tmp_path / "src" / case_id / "full.nii.gz", normal)
    assert (
        run(
            "denoising",
            "--root",
            tmp_path / "src",
            "--low_dose",
            "*/quarter.nii.gz",
            "--normal_dose",
            "*/full.nii.gz",
            *common(tmp_path / "out", "LDCT"),
        )
        == 0
    )
    dataset = dataset_at(tmp_path / "out", "LDCT")
    assert dataset.case_ids() == ["L067", "L096"] and dataset.modality == "CT"
    assert dataset.case("L067")["intensity"]["target"] == {"method": "window", "low": -100.0, "high": 200.0}
    target = png(dataset, "target", "L067", 0)
    assert target[4, 4] == round(150 / 300 * 255) and target[0, 0] == 0


# ---------------------------------------------------------------- intensities and resizing


def test_percentile_clipping_uses_the_body():
    volume = np.zeros((10, 10, 10), np.float32)
    volume[2:8, 2:8, 2:8] = np.linspace(1, 100, 216).reshape(6, 6, 6)
    body = intensity.fit_parameters(volume, "percentile", region="body")
    whole = intensity.fit_parameters(volume, "percentile", region="volume")
    assert body["low"] > 1 and whole["low"] == 0
    assert intensity.normalise(volume, body).max() == 1.0


def test_resizing_uses_area_down_and_bilinear_up():
    checker = np.indices((8, 8)).sum(axis=0) % 2
    plan = geometry.fit_plan(8, 8, 4, "stretch")
    assert np.allclose(geometry.resize_intensity(checker.astype(np.float32), plan), 0.5)
    ramp = geometry.resize_intensity(np.array([[0.0, 1.0]], np.float32), geometry.fit_plan(1, 2, 4, "stretch"))
    assert ramp.shape == (4, 4) and np.all(np.diff(ramp[0]) >= 0) and 0 < ramp[0, 1] < 1
    labels = geometry.resize_nearest(np.array([[0, 3], [300, 4]]), geometry.fit_plan(2, 2, 4, "stretch"))
    assert set(np.unique(labels).tolist()) == {0, 3, 4, 300}


# ---------------------------------------------------------------- the real MNI152 template


def test_mni152_tissue_case_prepares_with_matching_geometry(tmp_path):
    from datasets.mni_demo import write_mni152_tissue_case

    image_path, label_path = write_mni152_tissue_case(str(tmp_path / "mni"))
    labels = np.asarray(nib.load(label_path).dataobj)
    assert set(np.unique(labels).tolist()) == {0, 1, 2} and (labels == 2).sum() > (labels == 1).sum() / 3
    assert run("msd", "--root", tmp_path / "mni", *common(tmp_path / "out", "MNI152", 64)) == 0
    dataset = dataset_at(tmp_path / "out", "MNI152")
    record = dataset.case("mni152")
    image = nib.load(image_path)
    assert dataset.modality == "MRI" and dataset.classes == {0: "background", 1: "grey matter", 2: "white matter"}
    assert record["original"]["shape"] == list(image.shape) == [197, 233, 189]
    assert np.allclose(record["original"]["affine"], image.affine)
    assert np.allclose(record["canonical"]["affine"], nib.as_closest_canonical(image).affine)
    with_foreground = np.flatnonzero((labels > 0).any(axis=(0, 1))).tolist()
    assert record["slices"] == with_foreground
    middle = png(dataset, "label", "mni152", with_foreground[len(with_foreground) // 2])
    assert middle.shape == (64, 64) and set(np.unique(middle).tolist()) == {0, 1, 2}
    assert verify_root(tmp_path / "out")[1] == []
    assert [os.path.basename(d) for d in find_datasets(tmp_path / "out")] == ["MNI152"]


def test_help_is_available(capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--help"])
    assert exit_info.value.code == 0 and "brats-inpainting" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        prepare.main(["verify", "--help"])
    assert "python -m datasets.verify" in capsys.readouterr().out
