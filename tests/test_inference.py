"""Inference core and metrics: decoding recovers ids exactly, the metrics' conventions hold."""
import math

import numpy as np
import pytest
import torch

from datasets.canvas import render_labels
from inference import Predictor, inference_palette, nearest_colour
from metrics import PSNR_CAP, capped, dice_per_class, hd95_per_class, nanmean, psnr, ssim
from models_mvg import mvg_vit_tiny_patch16

HALF = (32, 32)


class CopyContextModel(torch.nn.Module):
    """Stands in for a perfect model on self-context: paints the context target as the query's."""

    img_size = (2 * HALF[0], HALF[1])

    def predict(self, imgs, tgts, num_prompts=1, ensemble='features'):
        out = tgts.clone()
        out[:, :, HALF[0]:] = tgts[:, :, :HALF[0]]
        return out.view(-1, num_prompts, *out.shape[1:]).mean(1)


def blob_labels(num_classes, shape=HALF, seed=0):
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.int64)
    for c in range(1, num_classes + 1):
        r, col = rng.integers(0, shape[0] - 6), rng.integers(0, shape[1] - 6)
        label[r:r + 6, col:col + 6] = c
    return label


# ---------------------------------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize('encoding,num_classes', [('random_colors', 3), ('random_colors', 150), ('grey', 25)])
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


def test_training_renders_decode_with_their_own_colours():
    rng = np.random.default_rng(3)
    label = blob_labels(8)
    (picture,) = render_labels([label], 'random_colors', rng)
    present = np.unique(label)
    colours = picture.reshape(3, -1).T[[np.flatnonzero(label.ravel() == c)[0] for c in present]]
    np.testing.assert_array_equal(present[nearest_colour(picture.astype(np.float32), colours)], label)


@pytest.mark.parametrize('encoding', ['random_colors', 'grey', 'binary'])
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
    with pytest.raises(ValueError, match='num_prompts'):
        predictor.segment([(image, label)], [image])
    with pytest.raises(ValueError, match='no class other than background'):
        Predictor(CopyContextModel()).segment([(image, np.zeros_like(label))], [image])
    with pytest.raises(ValueError, match='0..255'):
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


def test_load_model_reads_our_and_the_authors_checkpoints(tmp_path):
    import argparse
    from inference import load_model
    torch.manual_seed(0)
    model = mvg_vit_tiny_patch16(input_size=(64, 32), depth=4).eval()
    imgs, tgts = torch.randn(1, 3, 64, 32), torch.randn(1, 3, 64, 32)
    ours, authors, bare = tmp_path / 'ours.pth', tmp_path / 'authors.pth', tmp_path / 'bare.pth'
    torch.save({'model': model.state_dict(), 'args': {'model': 'mvg_vit_tiny_patch16', 'input_size': [64, 32]}}, ours)
    torch.save({'model': model.state_dict(), 'args': argparse.Namespace(model='mvg_vit_tiny_patch16')}, authors)
    torch.save(model.state_dict(), bare)
    expected = model.predict(imgs, tgts)
    for path in (ours, authors, bare):
        loaded = load_model(str(path), model_name='mvg_vit_tiny_patch16', input_size=(64, 32), depth=4).eval()
        torch.testing.assert_close(loaded.predict(imgs, tgts), expected)
    with pytest.raises(ValueError, match='missing keys'):
        load_model(str(ours))  # the default depth 12 has blocks the checkpoint lacks
    with pytest.raises(ValueError, match='does not name its model'):
        load_model(str(bare))
