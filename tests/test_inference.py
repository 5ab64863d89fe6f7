"""Inference core and metrics: decoding recovers ids exactly, the metrics' conventions hold."""

import math

import numpy as np
import pytest
import torch

from inference import Predictor
from label_encoding import inference_palette, nearest_colour, random_palette, render_labels, smallest_gap
from metrics import PSNR_CAP, capped, dice_per_class, hd95_per_class, nanmean, psnr, ssim
from models_mvg import mvg_vit_tiny_patch16
from tests.helpers import HALF, CopyContextModel, blob_labels

# ---------------------------------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize("encoding,num_classes", [("random_colors", 3), ("random_colors", 150), ("grey", 25)])
def test_nearest_colour_recovers_ids_exactly(encoding, num_classes):
    ids = np.arange(num_classes + 1).repeat(4)[None].repeat(3, axis=0)  # every class, background too
    foreground = np.arange(1, num_classes + 1)
    colours = np.concatenate([np.zeros((1, 3), np.uint8), inference_palette(foreground, encoding)])
    lut = np.zeros((num_classes + 1, 3), np.uint8)
    lut[foreground] = colours[1:]
    picture = lut[ids].transpose(2, 0, 1).astype(np.float32)
    noisy = picture + np.random.default_rng(0).normal(0, 1.0, picture.shape)
    decoded = np.concatenate([[0], foreground])[nearest_colour(noisy, colours)]
    np.testing.assert_array_equal(decoded, ids)


@pytest.mark.parametrize("num_classes", [2, 3, 5, 13])
def test_inference_palettes_lie_further_apart_than_training_draws(num_classes):
    # A prediction decodes by its nearest colour: the wider the gaps, the less a blend decodes wrong.
    foreground = np.arange(1, num_classes + 1)
    inference = [smallest_gap(inference_palette(foreground, "random_colors", seed)) for seed in range(20)]
    training = [smallest_gap(random_palette(num_classes, np.random.default_rng(seed))) for seed in range(20)]
    assert all(i >= t for i, t in zip(inference, training))  # the same first draws, and more of them
    assert np.mean(inference) > 1.25 * np.mean(training)
    again = inference_palette(foreground, "random_colors", 3)
    again[:] = 0  # a caller's copy: the next query's palette is unchanged
    assert smallest_gap(inference_palette(foreground, "random_colors", 3)) == inference[3]


def test_training_renders_decode_with_their_own_colours():
    rng = np.random.default_rng(3)
    label = blob_labels(8)
    (picture,) = render_labels([label], "random_colors", rng)
    present = np.unique(label)
    colours = picture.reshape(3, -1).T[[np.flatnonzero(label.ravel() == c)[0] for c in present]]
    np.testing.assert_array_equal(present[nearest_colour(picture.astype(np.float32), colours)], label)


@pytest.mark.parametrize("encoding", ["random_colors", "grey", "binary"])
def test_predictor_round_trip_with_a_perfect_model(encoding):
    label = blob_labels(4)
    image = (label * 40 + 10).astype(np.uint8)
    predictor = Predictor(CopyContextModel(), label_encoding=encoding, batch_size=2)
    out = predictor.segment([(image, label)], [image, image, image])
    assert len(out) == 3
    for decoded in out:
        np.testing.assert_array_equal(decoded, label)


def test_predictor_restores_the_query_size_and_prompt_lists():
    label = blob_labels(3, shape=(60, 50))
    image = (label * 50).astype(np.uint8)
    predictor = Predictor(CopyContextModel(), num_prompts=2)
    (decoded,) = predictor.segment([[(image, label), (image, label)]], [image])
    assert decoded.shape == (60, 50)
    assert (decoded == label).mean() > 0.95  # only boundary pixels move through the 32x32 canvas
    grey = np.linspace(0, 255, 32 * 32).reshape(32, 32).astype(np.uint8)
    (translated,) = Predictor(CopyContextModel()).translate([(grey, grey)], [grey])
    assert translated.dtype == np.uint8 and np.abs(translated.astype(int) - grey).max() <= 1
    with pytest.raises(ValueError, match="num_prompts"):
        predictor.segment([(image, label)], [image])
    with pytest.raises(ValueError, match="no class other than background"):
        Predictor(CopyContextModel()).segment([(image, np.zeros_like(label))], [image])
    with pytest.raises(ValueError, match=r"0\.\.255"):
        Predictor(CopyContextModel()).translate([(grey * 2.0, grey)], [grey])


def test_predictor_runs_a_real_tiny_model():
    torch.manual_seed(0)
    model = mvg_vit_tiny_patch16(input_size=(64, 32), depth=4)
    label = blob_labels(2)
    image = (label * 60).astype(np.uint8)
    out = Predictor(model, batch_size=3).segment([(image, label)], [image] * 4)
    assert all(o.shape == HALF and set(np.unique(o)) <= {0, 1, 2} for o in out)


# ---------------------------------------------------------------------------------------------------
# metrics


def test_dice_perfect_partial_and_empty_conventions():
    truth = np.zeros((10, 10, 4), np.int64)
    truth[2:6, 2:6] = 1
    assert dice_per_class(truth, truth, [1]) == {1: 1.0}
    pred = np.zeros_like(truth)
    pred[2:6, 4:8] = 1
    overlap = ((pred == 1) & (truth == 1)).sum()
    expected = 2 * overlap / ((pred == 1).sum() + (truth == 1).sum())
    assert math.isclose(dice_per_class(pred, truth, [1])[1], expected, rel_tol=1e-6)
    scores = dice_per_class(pred, truth, [1, 2, 3])
    assert math.isnan(scores[2])  # absent in both: not scored
    pred[0, 0, 0] = 3
    assert dice_per_class(pred, truth, [3])[3] == 0.0  # predicted but absent in the truth
    assert math.isclose(nanmean(scores.values()), expected, rel_tol=1e-6)


def test_hd95_uses_spacing_and_reports_empty_as_nan():
    truth = np.zeros((20, 20, 20), np.int64)
    truth[5:15, 5:15, 5:15] = 1
    shifted = np.roll(truth, 3, axis=2)
    iso = hd95_per_class(shifted, truth, [1], spacing=(1, 1, 1))[1]
    assert 2.5 <= iso <= 3.0 + 1e-6
    stretched = hd95_per_class(shifted, truth, [1], spacing=(1, 1, 2.5))[1]
    assert math.isclose(stretched, 2.5 * iso, rel_tol=1e-5)
    assert hd95_per_class(truth, truth, [1])[1] == 0.0
    assert math.isnan(hd95_per_class(np.zeros_like(truth), truth, [1])[1])


def test_psnr_and_ssim():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 256, size=(3, 32, 32)).astype(np.float64)
    assert psnr(truth, truth) == math.inf and capped(psnr(truth, truth)) == PSNR_CAP
    one_off = truth + 1
    assert math.isclose(psnr(one_off, truth), 20 * math.log10(255), rel_tol=1e-9)
    assert math.isclose(ssim(truth, truth), 1.0, abs_tol=1e-6)
    slightly, very = (np.clip(truth + rng.normal(0, sd, truth.shape), 0, 255) for sd in (5, 60))
    assert ssim(very, truth) < ssim(slightly, truth) < 0.999
    mask = np.zeros(truth.shape, bool)
    mask[:, 8:24, 8:24] = True
    damaged = truth.copy()
    damaged[mask] = 0
    assert psnr(damaged, truth, mask) < psnr(damaged, truth)
    assert ssim(damaged, truth, mask) < ssim(damaged, truth)
    assert math.isnan(psnr(truth, truth, np.zeros_like(mask)))


def test_load_checkpoint_reads_our_and_the_authors_checkpoints(tmp_path):
    import argparse

    from inference import load_checkpoint
    from util.cli import UsageError

    torch.manual_seed(0)
    model = mvg_vit_tiny_patch16(input_size=(64, 32), depth=4).eval()
    imgs, tgts = torch.randn(1, 3, 64, 32), torch.randn(1, 3, 64, 32)
    ours, authors, bare = tmp_path / "ours.pth", tmp_path / "authors.pth", tmp_path / "bare.pth"
    torch.save({"model": model.state_dict(), "args": {"model": "mvg_vit_tiny_patch16", "input_size": [64, 32]}}, ours)
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model="mvg_vit_tiny_patch16")}, authors)
    torch.save(model.state_dict(), bare)
    expected = model.predict(imgs, tgts)
    flags = {"model": "mvg_vit_tiny_patch16", "input_size": (64, 32), "depth": 4}
    for path in (ours, authors, bare):
        loaded, settings = load_checkpoint(str(path), flags)
        torch.testing.assert_close(loaded.eval().predict(imgs, tgts), expected)
        assert settings["depth"] == 4 and settings["input_size"] == [64, 32]
    with pytest.raises(UsageError, match="does not fit mvg_vit_tiny_patch16 with 12 blocks"):
        load_checkpoint(str(ours), {})  # the default depth 12 has blocks the checkpoint lacks
    with pytest.raises(UsageError, match="does not record its model"):
        load_checkpoint(str(bare), {})
    with pytest.raises(UsageError, match="pass --label_encoding"):
        load_checkpoint(str(authors), {"depth": 4, "label_encoding": None}, required=("label_encoding",))


def test_binary_pass_weighs_contexts_without_the_class_as_evidence_of_absence():
    image = np.full(HALF, 90, np.uint8)
    ring = np.zeros(HALF, np.int64)
    ring[4:28, 4:28] = 1
    with_small = ring.copy()
    with_small[12:20, 12:20] = 2
    # Class 2 in one context of three: the copy is a third as bright there, below half, so the two
    # contexts without it outvote it; shown by two of three, it is painted.
    predictor = Predictor(CopyContextModel(), label_encoding="binary", num_prompts=3)
    outvoted, painted = predictor.segment(
        [
            [(image, ring), (image, with_small), (image, ring)],
            [(image, with_small), (image, ring), (image, with_small)],
        ],
        [image, image],
    )
    np.testing.assert_array_equal(outvoted, ring)
    np.testing.assert_array_equal(painted, with_small)


# ---------------------------------------------------------------------------------------------------
# each query decoded with its own context's colours


class SwapQueriesModel(CopyContextModel):
    """Paints each query half with the context target of the OTHER canvas of a batch of two: what a
    query receives then shows only classes of the other query's context."""

    def predict(self, imgs, tgts, num_prompts=1, ensemble="features"):
        return tgts.flip(0)[:, :, : HALF[0]]


@pytest.mark.parametrize("encoding", ["random_colors", "grey", "binary"])
def test_a_query_never_receives_a_class_only_another_querys_context_shows(encoding):
    first, second = np.zeros(HALF, np.int64), np.zeros(HALF, np.int64)
    first[4:20, 4:20] = 1
    second[10:30, 8:28] = 2
    image = np.full(HALF, 90, np.uint8)
    predictor = Predictor(SwapQueriesModel(), label_encoding=encoding, batch_size=2)
    out_first, out_second = predictor.segment([[(image, first)], [(image, second)]], [image, image])
    assert set(np.unique(out_first)) <= {0, 1}
    assert set(np.unique(out_second)) <= {0, 2}


# ---------------------------------------------------------------------------------------------------
# slices meet the canvas at the training scale


class RecordingModel(CopyContextModel):
    def __init__(self):
        super().__init__()
        self.seen = []

    def predict(self, imgs, tgts, num_prompts=1, ensemble="features"):
        self.seen.append(imgs.clone())
        return super().predict(imgs, tgts, num_prompts, ensemble)


def test_training_scale_covers_a_larger_slice_with_unresized_windows():
    from inference import window_starts
    from pixels import to_normalised_tensor

    label = blob_labels(3, shape=(60, 50))
    image = np.random.default_rng(1).integers(0, 256, size=(60, 50)).astype(np.uint8)
    model = RecordingModel()
    (decoded,) = Predictor(model, batch_size=16).segment([(image, label)], [image])
    np.testing.assert_array_equal(decoded, label)  # no resizing anywhere: exact
    assert window_starts(60, 32) == [0, 28] and window_starts(50, 32) == [0, 18]
    canvases = torch.cat(model.seen)
    assert len(canvases) == 4
    expected = to_normalised_tensor([image[28:60, 18:50], image[28:60, 18:50]])
    torch.testing.assert_close(canvases[3], expected)  # context and query windows at the same place
    (fitted,) = Predictor(CopyContextModel(), scale="fit").segment([(image, label)], [image])
    assert (fitted != label).any()  # the whole slice squeezed into 32x32 and back loses edges


def test_training_scale_enlarges_a_smaller_slice_like_the_training_crop():
    from pixels import training_scale_size

    assert training_scale_size((20, 40), (32, 32)) == (32, 64)
    assert training_scale_size((512, 512), (448, 448)) == (512, 512)
    label = blob_labels(2, shape=(20, 40))
    image = (label * 70).astype(np.uint8)
    model = RecordingModel()
    (decoded,) = Predictor(model).segment([(image, label)], [image])
    assert decoded.shape == (20, 40) and (decoded == label).mean() > 0.95
    assert len(torch.cat(model.seen)) == 2  # 32x64 at training scale: two 32x32 windows


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_label_resize_takes_the_pixel_under_each_centre_whatever_the_label_type(dtype):
    from pixels import resize_picture

    labels = np.random.default_rng(0).integers(0, 200, (512, 512))
    resized = resize_picture(labels.astype(dtype), (448, 448), is_label=True)
    centres = np.floor((np.arange(448) + 0.5) * 512 / 448).astype(int)
    np.testing.assert_array_equal(resized, labels[np.ix_(centres, centres)])
    assert resized.dtype == dtype
