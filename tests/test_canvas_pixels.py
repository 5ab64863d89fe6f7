"""8-bit canvases from the workers, normalised where the model runs (datasets.canvas.to_model_inputs):
the model meets the values the previous path gave it, bit for bit. That path (bench.bench_data's
PreviousPath, kept for the speed comparison) decoded every slice, drew labels with render_labels and
built float32 canvases and valid maps in the worker. Compared for every task, label encoding,
augmentation and context policy, through DataLoader workers sharing the slice cache."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from bench.bench_data import PreviousPath
from datasets import prepare
from datasets.canvas import Augment, InContextDataset, to_model_inputs
from datasets.mixture import Mixture
from label_encoding import FEW_IDS, TAKE_BLOCK, draw_labels, render_labels
from pixels import MEAN_255, STD_255, normalise, to_normalised_tensor
from tests.helpers import CANVAS, SLICE, policy, save

CPU = torch.device("cpu")
KEYS = ("imgs", "tgts", "valid", "mask", "task", "dataset")
CROP = (CANVAS[0] // 2, CANVAS[1])
JITTERED = Augment(crop_size=CROP, scale_jitter=0.3, hflip=0.5, vflip=0.5)


@pytest.fixture(scope="module")
def many_classes(tmp_path_factory):
    """A segmentation dataset whose slices hold 300 class ids: 16-bit label files, and more ids than
    draw_labels compares one by one."""
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(5)
    for i in range(2):
        image = rng.normal(0, 50, size=(SLICE, SLICE, 3)).astype(np.float32)
        label = (np.arange(SLICE * SLICE).reshape(SLICE, SLICE, 1) % 300 + 1).repeat(3, axis=2).astype(np.int16)
        save(root / "seg" / "imagesTr" / f"m{i}.nii.gz", image)
        save(root / "seg" / "labelsTr" / f"m{i}.nii.gz", label)
    out = root / "prepared"
    common = ["--out", str(out), "--size", str(SLICE), "--test_fraction", "0", "--modality", "CT"]
    assert prepare.main(["msd", "--root", str(root / "seg"), "--dataset", "Many", *common]) == 0
    return str(out)


def pair(root, names=None, **kwargs):
    """The current dataset and the previous path over the same settings."""

    def build():
        return InContextDataset(Mixture.of([root], names), policy(half_mask_ratio=0.5), input_size=CANVAS, **kwargs)

    return build(), PreviousPath(build())


def assert_same_inputs(current_batch, previous_items):
    got = to_model_inputs(current_batch, CPU)
    expected = default_collate(previous_items)
    for key in KEYS:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key


SETTINGS = {
    "segmentation, random colours, jitter and flips": (["Seg"], dict(augment=JITTERED)),
    "segmentation, grey, context from another case": (["Seg"], dict(label_encoding="grey", context_from="other_case")),
    "segmentation, binary": (["Seg"], dict(label_encoding="binary", augment=JITTERED)),
    "image targets (synthesis both ways, denoising, inpainting)": (None, dict(augment=JITTERED, seed=7)),
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_model_sees_the_previous_paths_values_bit_for_bit(mixed, setting):
    names, kwargs = SETTINGS[setting]
    current, previous = pair(mixed, names, **kwargs)
    for epoch in (0, 3):
        current.set_epoch(epoch)
        previous.dataset.set_epoch(epoch)
        indices = range(16)
        assert_same_inputs(default_collate([current[i] for i in indices]), [previous[i] for i in indices])
    tasks = {current.sources[current.choose(i).source_id].task.name for i in range(16)}
    assert len(tasks) == (1 if names else 4)


def test_the_same_through_data_loader_workers_and_their_shared_cache(mixed):
    current, previous = pair(mixed, augment=JITTERED)
    indices = list(range(24))
    for epoch in (0, 1):  # the second epoch's workers find the slices the first one's stored
        current.set_epoch(epoch)
        previous.dataset.set_epoch(epoch)
        loader = DataLoader(current, batch_size=8, num_workers=2, sampler=indices, multiprocessing_context="fork")
        for number, batch in enumerate(loader):
            assert_same_inputs(batch, [previous[i] for i in indices[8 * number : 8 * number + 8]])
    assert current.slice_cache.cached_slices() > 0  # filled by the workers, seen here


@pytest.mark.parametrize("encoding", ["random_colors", "binary"])
def test_many_classes_and_16_bit_labels(many_classes, encoding):
    current, previous = pair(many_classes, label_encoding=encoding, augment=JITTERED)
    assert current.slice_cache.read(current.sources[0].slices["m0"][0].target_path).dtype == np.uint16
    assert_same_inputs(default_collate([current[i] for i in range(6)]), [previous[i] for i in range(6)])


def test_draw_labels_draws_what_render_labels_draws():
    """The same pictures and the same random draws afterwards, for few ids and many, 8 and 16 bits,
    and flipped views."""
    rng = np.random.default_rng(1)
    maps = {
        "few": [rng.integers(0, 4, (20, 24), dtype=np.uint8) for _ in range(2)],
        "few, query without class 3": [
            rng.integers(0, 4, (20, 24), dtype=np.uint8),
            rng.integers(0, 3, (20, 24), dtype=np.uint8),
        ],
        "tall: drawn in blocks of rows": [rng.integers(0, 3, (1300, 24), dtype=np.uint8)[::-1] for _ in range(2)],
        "many, 16-bit, flipped": [
            rng.integers(0, 700, (20, 24)).astype(np.uint16)[::-1],
            rng.integers(0, 700, (20, 24)).astype(np.uint16)[:, ::-1],
        ],
    }
    assert max(int(m.max()) for m in maps["many, 16-bit, flipped"]) >= FEW_IDS
    assert maps["tall: drawn in blocks of rows"][0].size > 2 * TAKE_BLOCK
    for name, labels in maps.items():
        for encoding in ("random_colors", "grey", "binary"):
            if encoding == "grey" and name.startswith("many"):
                continue  # grey stops at class 25
            expected_rng, rng_here = np.random.default_rng(9), np.random.default_rng(9)
            expected = render_labels(labels, encoding, expected_rng)
            out = [np.empty((3, *label.shape), np.uint8) for label in labels]
            draw_labels(labels, encoding, rng_here, out)
            for got, want in zip(out, expected):
                np.testing.assert_array_equal(got, want, err_msg=f"{name}, {encoding}")
            assert rng_here.random() == expected_rng.random()


def test_normalising_on_the_device_keeps_the_operation_order():
    """Every pixel value in every channel equals pixels.to_normalised_tensor's; and the comparison can
    fail: multiplying by the reciprocal of the std, a common rewrite, changes some values."""
    pixels = torch.arange(256, dtype=torch.uint8).view(16, 16)
    expected = to_normalised_tensor([pixels.numpy()])[None]
    assert torch.equal(normalise(pixels[None, None]), expected)
    assert torch.equal(normalise(pixels.expand(3, 16, 16)[None]), expected)
    reciprocal = (pixels.float() - MEAN_255) * (1 / STD_255)
    assert not torch.equal(reciprocal[None], expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_normalising_on_a_gpu_gives_the_same_bits(mixed):
    current, previous = pair(mixed, augment=JITTERED)
    batch = default_collate([current[i] for i in range(16)])
    on_gpu = to_model_inputs({key: value.pin_memory() for key, value in batch.items()}, torch.device("cuda"))
    expected = default_collate([previous[i] for i in range(16)])
    for key in KEYS:
        assert on_gpu[key].is_cuda and torch.equal(on_gpu[key].cpu(), expected[key]), key
