"""The training dataset: canvases for every task and label encoding, from data made by the prepare tool."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from datasets import prepare
from datasets.canvas import Augment, InContextDataset, to_model_inputs
from datasets.mixture import Mixture, MixtureEntry, load_mixture
from label_encoding import random_palette, render_labels
from masking_generator import MaskPolicy, sample_rng
from tasks import TASK_NAMES, TASKS
from tests.helpers import CANVAS, SLICE, policy, prepare_all, save, segmentation_case
from util.cli import UsageError

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_all(tmp_path_factory.mktemp("canvas"))


def dataset(prepared, names=None, **kwargs):
    mixture = kwargs.pop("mixture", None) or Mixture.of([str(prepared)], names)
    return InContextDataset(mixture, kwargs.pop("mask_policy", policy()), input_size=CANVAS, **kwargs)


def raw_pixels(tensor):
    """Normalised (3, H, W) -> uint8-valued (H, W, 3) numpy."""
    return ((tensor * STD + MEAN) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def model_view(item):
    """One item as the model meets it: to_model_inputs of a batch of one, the batch dimension dropped."""
    batch = to_model_inputs(torch.utils.data.default_collate([item]), CPU)
    return {key: value[0] for key, value in batch.items()}


def colours(picture):
    flat = picture.reshape(-1, 3)
    return {tuple(c) for c in np.unique(flat[flat.any(axis=1)], axis=0)}


def test_segmentation_canvas_shapes_mask_valid_and_shared_colours(prepared):
    data = dataset(prepared, ["Seg"])
    for index in range(20):
        item = data[index]
        assert item["imgs"].shape == (1, *CANVAS) and item["tgts"].shape == (3, *CANVAS)
        assert item["imgs"].dtype == item["tgts"].dtype == torch.uint8
        assert item["task"] == TASK_NAMES.index("segmentation") and data.names[item["dataset"]] == "Seg"
        mask = item["mask"].reshape(4, 2)
        assert mask[2:].all() and not mask[:2].any()  # segmentation: whole query target hidden
        item = model_view(item)
        assert item["imgs"].shape == item["tgts"].shape == (3, *CANVAS) and item["valid"].shape == (1, *CANVAS)
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
        item = model_view(data[index])
        seen.add(TASK_NAMES[item["task"]])
        assert item["mask"].sum() == 3  # MIM: exactly num_mask_patches
        assert torch.all(item["valid"] == 1)
    assert seen == {"synthesis", "denoising", "inpainting"}


def test_grey_and_binary_encodings(prepared):
    grey = dataset(prepared, ["Seg"], label_encoding="grey")
    levels = set(np.unique(grey[0]["tgts"].numpy()).tolist())
    assert levels == {0, 10, 20}
    binary = dataset(prepared, ["Seg"], label_encoding="binary")
    for index in range(5):
        item = model_view(binary[index])
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
    with pytest.raises(UsageError, match="grey"):
        render_labels([ids], "grey", rng)
    with pytest.raises(ValueError, match="unknown label encoding"):
        render_labels([ids], "rainbow", rng)
    palette = random_palette(5, np.random.default_rng(1))
    assert palette.shape == (5, 3) and palette.any(axis=1).all()


def test_items_are_deterministic_per_seed_epoch_index_and_across_workers(prepared):
    data = dataset(prepared)
    a, b = data[7], data[7]
    for key in ("imgs", "tgts", "mask", "background_weight"):
        assert torch.equal(a[key], b[key])
    data.set_epoch(1)
    assert not torch.equal(data[7]["imgs"], a["imgs"])
    direct = [data[i]["imgs"] for i in range(6)]
    loader = torch.utils.data.DataLoader(
        data, batch_size=2, num_workers=2, sampler=torch.utils.data.SequentialSampler(range(6))
    )
    batched = torch.cat([batch["imgs"] for batch in loader])
    assert torch.equal(batched, torch.stack(direct))


def test_mixture_weights_and_balance(prepared):
    mixture = Mixture([MixtureEntry(str(prepared / "Seg"), weight=3), MixtureEntry(str(prepared / "Denoise"))])
    data = dataset(prepared, mixture=mixture)
    np.testing.assert_allclose(data.probabilities, [0.75, 0.25])
    drawn = np.array([data[i]["dataset"] for i in range(400)])
    assert abs((drawn == 0).mean() - 0.75) < 0.08
    by_slices = dataset(prepared, mixture=Mixture(mixture.entries, balance="slices"))
    counts = np.array([sum(map(len, s.slices.values())) for s in by_slices.sources])
    np.testing.assert_allclose(by_slices.probabilities, counts * [3, 1] / (counts * [3, 1]).sum())


def test_mixture_file_case_subsets_and_errors(prepared, tmp_path):
    spec = {
        "balance": "slices",
        "datasets": [
            {"path": os.path.relpath(prepared / "Seg", tmp_path), "weight": 2, "case_stride": 2},
            {"path": os.path.relpath(prepared / "Synth", tmp_path), "case_fraction": 0.5, "swap_prob": 1.0},
        ],
    }
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
    a, b = model_view(forward[3]), model_view(backward[3])
    assert torch.equal(a["imgs"], b["tgts"]) and torch.equal(a["tgts"], b["imgs"])


def test_task_settings_come_from_the_registry(prepared, monkeypatch):
    data = dataset(prepared, ["Seg", "Synth", "Denoise"])
    assert [source.swap_prob for source in data.sources] == [
        TASKS[name].swap_prob for name in ("segmentation", "synthesis", "denoising")
    ]
    monkeypatch.setitem(TASKS, "segmentation", dataclasses.replace(TASKS["segmentation"], background_weight=0.25))
    item = model_view(dataset(prepared, ["Seg"])[0])
    background = ~raw_pixels(item["tgts"]).any(axis=2)
    np.testing.assert_allclose(item["valid"][0].numpy(), np.where(background, 0.25, 1.0))


def test_a_run_can_set_the_background_weight_of_label_targets(prepared):
    """--background_weight replaces the task's weight on label targets and leaves images at 1."""
    data = dataset(prepared, ["Seg", "Denoise"], background_weight=0.5)
    weights = {data.names[item["dataset"]]: float(item["background_weight"]) for item in (data[i] for i in range(12))}
    assert weights == {"Seg": 0.5, "Denoise": 1.0}
    item = model_view(dataset(prepared, ["Seg"], background_weight=0.5)[0])
    background = ~raw_pixels(item["tgts"]).any(axis=2)
    np.testing.assert_allclose(item["valid"][0].numpy(), np.where(background, 0.5, 1.0))


def test_context_policies_and_the_one_slice_case(prepared):
    data = dataset(prepared, ["Seg"], context_from="other_case")
    source = data.sources[0]
    for index in range(20):
        query, context = data._pick_pairs(source, np.random.default_rng(index))
        assert query.case_id != context.case_id
    same = dataset(prepared, ["Seg"], context_from="same_case")
    one_slice = source.slices["c2"]
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
    with pytest.raises(UsageError, match="missing"):
        dataset(copy, ["Denoise"])


# A flip probability that draws the same random numbers as a certain flip but never flips (rng.random()
# would have to return exactly 0), so an item built with it matches a flipped one in every other choice.
NEVER = 1e-300


@pytest.mark.parametrize("name", ["Seg", "Synth"])
def test_flipped_items_reach_a_batch_through_a_data_loader(prepared, name):
    crop = (CANVAS[0] // 2, CANVAS[1])
    flipped = dataset(prepared, [name], augment=Augment(crop_size=crop, hflip=1.0, vflip=1.0), seed=3)
    reference = dataset(prepared, [name], augment=Augment(crop_size=crop, hflip=NEVER, vflip=NEVER), seed=3)
    batch = to_model_inputs(next(iter(torch.utils.data.DataLoader(flipped, batch_size=4, num_workers=0))), CPU)
    assert batch["imgs"].shape == (4, 3, *CANVAS)
    for position in range(4):
        unflipped = model_view(reference[position])
        assert not torch.equal(batch["imgs"][position], unflipped["imgs"])
        for key in ("imgs", "tgts", "valid"):
            # context pair over query pair: each is flipped on its own, in both directions
            context, query = unflipped[key].split(crop[0], dim=1)
            expected = torch.cat([context.flip(1, 2), query.flip(1, 2)], dim=1)
            assert torch.equal(batch[key][position], expected), key
        assert torch.equal(batch["mask"][position], unflipped["mask"])


def write_recipe_sources(root):
    """The source volumes of prepare_recipe_tree, in the layouts of their datasets.prepare commands."""
    for i, depth in enumerate((2, 3, 5)):
        image, label = segmentation_case(i, depth)
        save(root / "seg" / "imagesTr" / f"c{i}.nii.gz", image)
        save(root / "seg" / "labelsTr" / f"c{i}.nii.gz", label)
    for i in range(8):
        base = np.random.default_rng(20 + i).uniform(0, 100, size=(SLICE, SLICE, 2 + i // 2)).astype(np.float32)
        for contrast, volume in (("t1c", base), ("t2w", 100 - base)):
            save(root / "brats" / f"S-{i}" / f"S-{i}-{contrast}.nii.gz", volume)
    for i in range(4):
        base = np.random.default_rng(30 + i).uniform(0, 100, size=(SLICE, SLICE, 2 + i)).astype(np.float32)
        hole = np.zeros(base.shape, np.uint8)
        hole[10:30, 10:30, 1] = 1
        for suffix, volume in (("t1n", base), ("t1n-voided", base * (1 - hole)), ("mask", hole)):
            save(root / "local" / f"L-{i}" / f"L-{i}-{suffix}.nii.gz", volume)
    for i, depth in enumerate((2, 5)):
        base = np.random.default_rng(40 + i).uniform(0, 100, size=(SLICE, SLICE, depth)).astype(np.float32)
        save(root / "ldct" / "low" / f"p{i}.nii.gz", base + 5)
        save(root / "ldct" / "full" / f"p{i}.nii.gz", base)


def prepare_recipe_tree(root):
    """One dataset per task, cases of different lengths: 3 segmentation cases (2, 3, 5 slices), 8
    synthesis cases (2 to 5 slices), 4 inpainting cases (2 to 5 slices), 2 denoising cases (2 and 5
    slices)."""
    write_recipe_sources(root)
    out = root / "prepared"
    common = ["--out", str(out), "--size", str(SLICE), "--test_fraction", "0"]
    commands = (
        ["msd", "--root", str(root / "seg"), "--dataset", "Seg", "--modality", "CT"],
        ["brats-synthesis", "--root", str(root / "brats"), "--source", "t1c", "--target", "t2w", "--dataset", "Synth"],
        ["brats-inpainting", "--root", str(root / "local"), "--dataset", "Inpaint"],
        ["denoising", "--root", str(root / "ldct"), "--low_dose", "low/*.nii.gz", "--normal_dose", "full/*.nii.gz"]
        + ["--modality", "CT", "--dataset", "Denoise"],
    )
    for command in commands:
        assert prepare.main([*command, *common]) == 0
    return out


@pytest.fixture(scope="module")
def recipe_tree(tmp_path_factory):
    return prepare_recipe_tree(tmp_path_factory.mktemp("recipes"))


def authors_slice_list(root):
    """{dataset: {case: [slice indices]}} as the authors' training list has it, read straight from the
    manifests: every training case, but only the first half of the inpainting cases (sorted) and every
    fourth synthesis case."""
    listed = {}
    for name in sorted(os.listdir(root)):
        with open(root / name / "manifest.json") as handle:
            manifest = json.load(handle)
        cases = sorted(c for c, record in manifest["cases"].items() if record["split"] == "train")
        if manifest["task"] == "inpainting":
            cases = cases[: len(cases) // 2]
        elif manifest["task"] == "synthesis":
            cases = cases[::4]
        listed[manifest["dataset"]] = (
            {case: manifest["cases"][case]["slices"] for case in cases},
            2.0 if manifest["task"] == "segmentation" else 1.0,
        )
    return listed


def query_probabilities(listed, slice_rule):
    """{(dataset, case, slice): probability}: a dataset's share is weight x its listed slices; inside it
    "listed" makes every slice equally likely, "case_first" draws a case, then one of its slices."""
    shares = {name: weight * sum(map(len, cases.values())) for name, (cases, weight) in listed.items()}
    total = sum(shares.values())
    probabilities = {}
    for name, (cases, _) in listed.items():
        num_slices = sum(map(len, cases.values()))
        for case, indices in cases.items():
            within = 1 / num_slices if slice_rule == "listed" else 1 / len(cases) / len(indices)
            probabilities.update({(name, case, index): shares[name] / total * within for index in indices})
    return probabilities


def test_paper_recipe_draws_every_listed_slice_equally_often(recipe_tree):
    listed = authors_slice_list(recipe_tree)
    lengths = {len(indices) for cases, _ in listed.values() for indices in cases.values()}
    assert len(lengths) > 2  # cases of different lengths, or both rules below would agree
    data = dataset(recipe_tree, mixture=Mixture.of([str(recipe_tree)], recipe="paper"), seed=11)
    draws = 20000
    counts = {}
    for index in range(draws):
        query = data.choose(index).query
        key = (query.dataset, query.case_id, query.index)
        counts[key] = counts.get(key, 0) + 1
    expected = query_probabilities(listed, "listed")
    assert set(counts) <= set(expected)  # no slice of a dropped case, nothing outside the list
    keys = sorted(expected)
    observed = [counts.get(key, 0) for key in keys]
    assert chisquare(observed, [draws * expected[key] for key in keys]).pvalue > 1e-3
    # The sample is large enough to tell this rule from drawing a case first.
    case_first = query_probabilities(listed, "case_first")
    assert chisquare(observed, [draws * case_first[key] for key in keys]).pvalue < 1e-9
    for index in range(3):
        assert data[index]["dataset"] == data.choose(index).source_id


def test_balanced_recipe_is_the_default_and_draws_a_case_then_a_slice(recipe_tree):
    default = dataset(recipe_tree, seed=4)
    assert default.mixture == Mixture.of([str(recipe_tree)], recipe="balanced")
    np.testing.assert_allclose(default.probabilities, 0.25)
    default.set_epoch(3)
    for index in range(40):
        # The draws of every item before recipes existed: dataset, then case, then slice.
        rng = sample_rng(4, 3, index)
        source = default.sources[rng.choice(4, p=default.probabilities)]
        case = source.cases[rng.integers(len(source.cases))]
        expected = source.slices[case][rng.integers(len(source.slices[case]))]
        assert default.choose(index).query == expected


def test_recipes_set_up_datasets_by_task_and_guard_the_balance(prepared, tmp_path):
    paper = Mixture.of([str(prepared)], recipe="paper")
    settings = {os.path.basename(e.path): (e.weight, e.case_fraction, e.case_stride) for e in paper.entries}
    assert settings == {"Seg": (2, 1, 1), "Synth": (1, 1, 4), "Inpaint": (1, 0.5, 1), "Denoise": (1, 1, 1)}
    assert (paper.balance, paper.slice_sampling) == ("slices", "uniform")
    assert Mixture.of([str(prepared)], recipe="paper", balance="slices") == paper
    with pytest.raises(ValueError, match="stands for balance 'slices'"):
        Mixture.of([str(prepared)], recipe="paper", balance="datasets")
    with pytest.raises(ValueError, match="unknown mixture recipe"):
        Mixture.of([str(prepared)], recipe="cookbook")
    balanced = Mixture.of([str(prepared)], balance="slices")
    assert balanced.balance == "slices" and {e.weight for e in balanced.entries} == {1}
    assert "recipe 'paper'" in dataset(prepared, mixture=paper).describe()
    (tmp_path / "mix.json").write_text(
        json.dumps({"slice_sampling": "uniform", "datasets": [{"path": os.path.relpath(prepared / "Seg", tmp_path)}]})
    )
    from_file = load_mixture(str(tmp_path / "mix.json"))
    assert from_file.slice_sampling == "uniform"
    assert "recipe 'custom'" in dataset(prepared, mixture=from_file).describe()
    with pytest.raises(ValueError, match="slice_sampling"):
        dataset(prepared, mixture=Mixture(paper.entries, slice_sampling="by_luck"))


def test_binary_draws_a_class_the_context_shows():
    rng = np.random.default_rng(0)
    context, query = np.array([[0, 2, 2]], np.uint8), np.array([[1, 2, 3]], np.uint8)
    for _ in range(20):
        drawn_context, drawn_query = render_labels([context, query], "binary", rng)
        np.testing.assert_array_equal(drawn_query[0], [[0, 255, 0]])  # 2: the only class in both maps
        np.testing.assert_array_equal(drawn_context[0], [[0, 255, 255]])
    # No class in common: any class of the query, each drawn some of the time.
    drawn = {
        int(render_labels([context, np.array([[1, 3]], np.uint8)], "binary", rng)[1][0, 0].argmax()) for _ in range(40)
    }
    assert drawn == {0, 1}
