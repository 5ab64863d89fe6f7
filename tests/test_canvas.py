"""The training dataset: canvases for every task and label encoding, from data made by the prepare tool."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from datasets import prepare
from datasets.canvas import (
    Augment, InContextDataset, Mixture, MixtureEntry, load_mixture, random_palette, render_labels,
)
from masking_generator import TASKS, MaskPolicy

CANVAS = (64, 32)  # two 32x32 pairs; a 4x2 token grid
SLICE = 40  # prepared slice size, so crops move
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def save(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), str(path))


def segmentation_case(seed, depth=6):
    """Every slice holds class 1 (left half) and class 2 (right half) inside a body."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 50, size=(SLICE, SLICE, depth)).astype(np.float32)
    label = np.zeros((SLICE, SLICE, depth), dtype=np.int16)
    label[4:20, 4:36] = 1
    label[20:36, 4:36] = 2
    return image, label


def prepare_all(root):
    out = root / "prepared"
    for i in range(3):
        image, label = segmentation_case(i, depth=1 if i == 2 else 6)  # case 2 has a single slice
        save(root / "seg" / "imagesTr" / f"c{i}.nii.gz", image)
        save(root / "seg" / "labelsTr" / f"c{i}.nii.gz", label)
    for i in range(2):
        base = np.random.default_rng(10 + i).uniform(0, 100, size=(SLICE, SLICE, 4)).astype(np.float32)
        case = root / "brats" / f"B-{i}"
        for contrast, volume in (("t1c", base), ("t2w", 100 - base)):
            save(case / f"B-{i}-{contrast}.nii.gz", volume)
        save(root / "ldct" / "low" / f"p{i}.nii.gz", base + np.random.default_rng(i).normal(0, 10, base.shape))
        save(root / "ldct" / "full" / f"p{i}.nii.gz", base)
        hole = np.zeros(base.shape, np.uint8)
        hole[10:30, 10:30, 1:3] = 1
        local = root / "local" / f"L-{i}"
        save(local / f"L-{i}-t1n.nii.gz", base)
        save(local / f"L-{i}-t1n-voided.nii.gz", base * (1 - hole))
        save(local / f"L-{i}-mask.nii.gz", hole)
    common = ["--out", str(out), "--size", str(SLICE), "--test_fraction", "0"]
    assert prepare.main(["msd", "--root", str(root / "seg"), "--dataset", "Seg", "--modality", "CT", *common]) == 0
    assert prepare.main(["brats-synthesis", "--root", str(root / "brats"), "--source", "t1c", "--target", "t2w",
                         "--dataset", "Synth", *common]) == 0
    assert prepare.main(["denoising", "--root", str(root / "ldct"), "--low_dose", "low/*.nii.gz",
                         "--normal_dose", "full/*.nii.gz", "--modality", "CT", "--dataset", "Denoise",
                         *common]) == 0
    assert prepare.main(["brats-inpainting", "--root", str(root / "local"), "--dataset", "Inpaint", *common]) == 0
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_all(tmp_path_factory.mktemp("canvas"))


def policy(half_mask_ratio=0.0):
    return MaskPolicy(input_size=(4, 2), num_mask_patches=3, min_mask_patches_per_block=1,
                      max_mask_patches_per_block=2, half_mask_ratio=half_mask_ratio)


def dataset(prepared, names=None, **kwargs):
    mixture = kwargs.pop("mixture", None) or Mixture.of([str(prepared)], names)
    return InContextDataset(mixture, kwargs.pop("mask_policy", policy()), input_size=CANVAS, **kwargs)


def raw_pixels(tensor):
    """Normalised (3, H, W) -> uint8-valued (H, W, 3) numpy."""
    return ((tensor * STD + MEAN) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def colours(picture):
    flat = picture.reshape(-1, 3)
    return {tuple(c) for c in np.unique(flat[flat.any(axis=1)], axis=0)}


def test_segmentation_canvas_shapes_mask_valid_and_shared_colours(prepared):
    data = dataset(prepared, ["Seg"])
    for index in range(20):
        item = data[index]
        assert item["imgs"].shape == item["tgts"].shape == (3, *CANVAS)
        assert item["task"] == TASKS.index("segmentation") and data.names[item["dataset"]] == "Seg"
        mask = item["mask"].reshape(4, 2)
        assert mask[2:].all() and not mask[:2].any()  # segmentation: whole query target hidden
        target = raw_pixels(item["tgts"])
        top, bottom = colours(target[:32]), colours(target[32:])
        assert top == bottom and len(top) == 2  # classes 1 and 2, one colour each, in both pairs
        background = ~target.any(axis=2)
        expected_valid = np.where(background, 0.1, 1.0)
        np.testing.assert_allclose(item["valid"][0].numpy(), expected_valid)
        image = raw_pixels(item["imgs"])
        assert (image[..., 0] == image[..., 1]).all()  # grey replicated to three channels


def test_other_tasks_use_image_targets_and_mim_masks(prepared):
    data = dataset(prepared, ["Synth", "Denoise", "Inpaint"], mask_policy=policy(half_mask_ratio=0.0))
    seen = set()
    for index in range(40):
        item = data[index]
        seen.add(TASKS[item["task"]])
        assert item["mask"].sum() == 3  # MIM: exactly num_mask_patches
        assert torch.all(item["valid"] == 1)
    assert seen == {"synthesis", "denoising", "inpainting"}


def test_grey_and_binary_encodings(prepared):
    grey = dataset(prepared, ["Seg"], label_encoding="grey")
    levels = set(np.unique(raw_pixels(grey[0]["tgts"])[..., 0]).tolist())
    assert levels == {0, 10, 20}
    binary = dataset(prepared, ["Seg"], label_encoding="binary")
    for index in range(5):
        item = binary[index]
        target = raw_pixels(item["tgts"])
        assert colours(target) == {(255, 255, 255)}
        white = target.all(axis=2)
        np.testing.assert_allclose(item["valid"][0].numpy(), np.where(white, 1.0, 0.1))


def test_render_labels_many_classes_and_limits():
    rng = np.random.default_rng(0)
    ids = np.arange(1200, dtype=np.uint16).reshape(30, 40)
    first, second = render_labels([ids, ids[::-1]], "random_colors", rng)
    assert first.shape == (3, 30, 40) and first.dtype == np.uint8
    assert (first[:, 0, 0] == 0).all()  # background black
    assert len(colours(first.transpose(1, 2, 0))) == 1199  # every class its own colour
    np.testing.assert_array_equal(first[:, ::-1], second)  # same class, same colour in both maps
    with pytest.raises(ValueError, match="grey"):
        render_labels([ids], "grey", rng)
    with pytest.raises(ValueError, match="unknown label encoding"):
        render_labels([ids], "rainbow", rng)
    palette = random_palette(5, np.random.default_rng(1))
    assert palette.shape == (5, 3) and palette.any(axis=1).all()


def test_items_are_deterministic_per_seed_epoch_index_and_across_workers(prepared):
    data = dataset(prepared)
    a, b = data[7], data[7]
    for key in ("imgs", "tgts", "mask", "valid"):
        assert torch.equal(a[key], b[key])
    data.set_epoch(1)
    assert not torch.equal(data[7]["imgs"], a["imgs"])
    direct = [data[i]["imgs"] for i in range(6)]
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2,
                                         sampler=torch.utils.data.SequentialSampler(range(6)))
    batched = torch.cat([batch["imgs"] for batch in loader])
    assert torch.equal(batched, torch.stack(direct))


def test_mixture_weights_and_balance(prepared):
    mixture = Mixture([MixtureEntry(str(prepared / "Seg"), weight=3), MixtureEntry(str(prepared / "Denoise"))])
    data = dataset(prepared, mixture=mixture)
    np.testing.assert_allclose(data.probabilities, [0.75, 0.25])
    drawn = np.array([data[i]["dataset"] for i in range(400)])
    assert abs((drawn == 0).mean() - 0.75) < 0.08
    by_slices = dataset(prepared, mixture=Mixture(mixture.entries, balance="slices"))
    counts = np.array([sum(map(len, s.slice_paths.values())) for s in by_slices.sources])
    np.testing.assert_allclose(by_slices.probabilities, counts * [3, 1] / (counts * [3, 1]).sum())


def test_mixture_file_case_subsets_and_errors(prepared, tmp_path):
    spec = {"balance": "slices", "datasets": [
        {"path": os.path.relpath(prepared / "Seg", tmp_path), "weight": 2, "case_stride": 2},
        {"path": os.path.relpath(prepared / "Synth", tmp_path), "case_fraction": 0.5, "swap_prob": 1.0}]}
    (tmp_path / "mix.json").write_text(json.dumps(spec))
    data = dataset(prepared, mixture=load_mixture(str(tmp_path / "mix.json")))
    assert [len(s.cases) for s in data.sources] == [2, 1]
    assert data.sources[0].cases == ["c0", "c2"]
    few = dataset(prepared, mixture=Mixture([MixtureEntry(str(prepared / "Seg"), num_cases=2)]))
    assert few.sources[0].cases == ["c0", "c1"]
    (tmp_path / "bad.json").write_text(json.dumps({"datasets": [{"path": "x", "colour": 1}]}))
    with pytest.raises(ValueError, match="colour"):
        load_mixture(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="not found"):
        Mixture.of([str(prepared)], ["Nope"])
    with pytest.raises(ValueError, match="label_encoding"):
        dataset(prepared, label_encoding="rainbow")
    with pytest.raises(ValueError, match="mask_policy grid"):
        dataset(prepared, mask_policy=MaskPolicy(input_size=(56, 28)))


def test_synthesis_swap_reverses_the_direction(prepared):
    # t2w = 100 - t1c, so the image is the bright inverse of the target whichever way round.
    forward = dataset(prepared, mixture=Mixture([MixtureEntry(str(prepared / "Synth"), swap_prob=0.0)]))
    backward = dataset(prepared, mixture=Mixture([MixtureEntry(str(prepared / "Synth"), swap_prob=1.0)]))
    a, b = forward[3], backward[3]
    assert torch.allclose(a["imgs"], b["tgts"]) and torch.allclose(a["tgts"], b["imgs"])


def test_context_policies_and_the_one_slice_case(prepared):
    data = dataset(prepared, ["Seg"], context="other_case")
    source = data.sources[0]
    for index in range(20):
        query, context = data._pick_pairs(source, np.random.default_rng(index))
        assert query[0].split(os.sep)[-2] != context[0].split(os.sep)[-2]
    same = dataset(prepared, ["Seg"], context="same_case")
    one_slice = source.slice_paths["c2"]
    assert len(one_slice) == 1
    rng = np.random.default_rng(0)
    picks = [same._pick_pairs(same.sources[0], rng) for _ in range(60)]
    assert (one_slice[0], one_slice[0]) in picks  # the one-slice case is its own context
    assert all(q != c for q, c in picks if q != one_slice[0])


def test_augment_crops_pairs_identically():
    rng = np.random.default_rng(0)
    image = np.arange(40 * 40, dtype=np.int64).reshape(40, 40)
    augment = Augment(crop_size=(32, 32), scale_jitter=0.0, hflip=0.5, vflip=0.5)
    for _ in range(10):
        out_image, out_target = augment(image, image.copy(), True, rng)
        assert out_image.shape == (32, 32)
        np.testing.assert_array_equal(out_image, out_target)
    small = np.zeros((20, 24), dtype=np.uint8)
    out_image, out_target = Augment(crop_size=(32, 32), scale_jitter=0.1)(small, small, True, rng)
    assert out_image.shape == out_target.shape == (32, 32)


def test_missing_slice_files_are_reported_up_front(prepared, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(prepared / "Denoise", copy / "Denoise")
    first = sorted((copy / "Denoise" / "image" / "p0").iterdir())[0]
    first.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        dataset(copy, ["Denoise"])
