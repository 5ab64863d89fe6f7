"""Tests of masking_generator: block masking (MIM), the AR half mask, per-sample seeding and MaskPolicy."""

import math
import random

import numpy as np
import pytest

from masking_generator import MaskingGenerator, MaskPolicy, _adjust_count, ar_mask, sample_rng
from tasks import TASK_NAMES, TASKS

RECIPE = dict(input_size=(56, 28), num_masking_patches=256, min_num_patches=16, max_num_patches=128)

# (input_size, num_masking_patches, min_num_patches, max_num_patches)
CONFIGS = [
    ((56, 28), 256, 16, 128),  # the training recipe
    ((56, 28), 784, 16, 128),  # as many cells as the AR half mask
    ((14, 7), 1, 1, None),
    ((14, 7), 10, 4, None),
    ((14, 7), 49, 4, 16),
    ((14, 7), 97, 4, None),
    ((14, 7), 98, 4, None),  # the whole grid
    ((14, 7), 98, 16, None),
    ((7, 7), 49, 4, 16),
    ((1, 10), 5, 1, None),  # no block can be strictly lower than the grid: all cells come from the top-up
]
CONFIG_IDS = [f"{h}x{w}-n{n}-{lo}..{hi}" for (h, w), n, lo, hi in CONFIGS]


def make_generator(input_size, n, min_patches, max_patches):
    return MaskingGenerator(input_size, n, min_num_patches=min_patches, max_num_patches=max_patches)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_mask_has_exactly_the_requested_count(config):
    generator = make_generator(*config)
    for index in range(150):
        mask = generator(sample_rng(3, 0, index))
        assert mask.shape == config[0]
        assert mask.dtype == np.bool_
        assert int(mask.sum()) == config[1]


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_every_block_follows_the_placement_rule(config):
    generator = make_generator(*config)
    height, width = config[0]
    n = generator.num_masking_patches
    for index in range(100):
        block_mask, blocks = generator._generate(sample_rng(5, 1, index))
        replay = np.zeros_like(block_mask)
        for block in blocks:
            count = int(replay.sum())
            budget = min(n - count, generator.max_num_patches)
            low, high = sorted((generator.min_num_patches, budget))
            assert low <= block.area <= high
            assert generator.min_aspect * (1 - 1e-9) <= block.aspect <= generator.max_aspect * (1 + 1e-9)
            # The rectangle is the drawn area and aspect, rounded side by side.
            assert block.height == round(math.sqrt(block.area * block.aspect))
            assert block.width == round(math.sqrt(block.area / block.aspect))
            # Rounding is monotone, so the realised aspect stays within the rounded bounds.
            lowest = round(math.sqrt(block.area * generator.min_aspect)) / round(
                math.sqrt(block.area / generator.min_aspect)
            )
            highest = round(math.sqrt(block.area * generator.max_aspect)) / round(
                math.sqrt(block.area / generator.max_aspect)
            )
            assert lowest <= block.height / block.width <= highest
            # Inside the grid and strictly smaller than it in both directions.
            assert 1 <= block.height < height and 1 <= block.width < width
            assert 0 <= block.top <= height - block.height
            assert 0 <= block.left <= width - block.width
            replay[block.top : block.top + block.height, block.left : block.left + block.width] = True
            new_cells = int(replay.sum()) - count
            assert new_cells == block.added
            assert 1 <= new_cells <= budget
        assert np.array_equal(replay, block_mask)
        assert int(block_mask.sum()) <= n


def test_recipe_masks_come_mostly_from_blocks():
    # The exact count holds even if no block were ever placed, so check that blocks do the work and
    # that the final top-up only adds cells around them.
    generator = MaskingGenerator(**RECIPE)
    from_blocks = []
    tall = wide = 0
    for index in range(300):
        block_mask, blocks = generator._generate(sample_rng(7, 0, index))
        final = generator(sample_rng(7, 0, index))
        assert not np.any(block_mask & ~final)
        from_blocks.append(int(block_mask.sum()))
        assert len(blocks) >= 2  # budget of 256 with blocks of at most ~128 cells
        tall += sum(b.height > b.width for b in blocks)
        wide += sum(b.width > b.height for b in blocks)
    assert np.mean(from_blocks) >= 0.95 * RECIPE["num_masking_patches"]
    # Log-uniform aspect: tall and wide blocks are about equally common.
    assert 0.35 < tall / (tall + wide) < 0.65


@pytest.mark.parametrize("start", ["empty", "full", "random"])
@pytest.mark.parametrize("target", [0, 1, 20, 49])
def test_adjust_count_flips_only_cells_of_the_excess_state(start, target):
    rng = np.random.default_rng(11)
    before = {"empty": np.zeros((7, 7), bool), "full": np.ones((7, 7), bool), "random": rng.random((7, 7)) < 0.5}[start]
    mask = before.copy()
    _adjust_count(mask, target, rng)
    assert int(mask.sum()) == target
    if target >= before.sum():
        assert np.all(mask[before])  # only switched cells on
    else:
        assert not np.any(mask[~before])  # only switched cells off


def test_adjust_count_writes_through_a_non_contiguous_mask():
    base = np.zeros((7, 5), dtype=bool)
    _adjust_count(base.T, 12, np.random.default_rng(0))
    assert int(base.sum()) == 12


@pytest.mark.parametrize(
    "input_size, n, min_patches, max_patches, draws", [((56, 28), 256, 16, 128, 3000), ((14, 7), 10, 4, None, 1500)]
)
def test_mim_masks_reach_every_cell_and_both_halves(input_size, n, min_patches, max_patches, draws):
    generator = make_generator(input_size, n, min_patches, max_patches)
    rng = np.random.default_rng(13)
    hits = sum(generator(rng).astype(int) for _ in range(draws))
    # A corner needs a block at the very corner: about 0.5% of recipe masks, hence the many draws.
    assert np.all(hits > 0)
    height, _width = input_size
    assert 0.45 < hits[: height // 2].sum() / hits.sum() < 0.55
    # Blocks cover the border less than the middle, but the rule is mirror-symmetric: an off-by-one
    # in the placement range would starve the last row or column only.
    rows, cols = hits.sum(axis=1), hits.sum(axis=0)
    assert rows.min() > 0.1 * rows.mean() and cols.min() > 0.1 * cols.mean()
    assert 0.6 < rows[0] / rows[-1] < 1 / 0.6
    assert 0.6 < cols[0] / cols[-1] < 1 / 0.6


@pytest.mark.parametrize("input_size", [(56, 28), (2, 1), (14, 7), (4, 9)])
def test_ar_mask_is_exactly_the_bottom_half(input_size):
    mask = ar_mask(input_size)
    height, width = input_size
    assert mask.shape == input_size and mask.dtype == np.bool_
    assert int(mask.sum()) == height * width // 2
    assert not mask[: height // 2].any()
    assert mask[height // 2 :].all()


@pytest.mark.parametrize("input_size", [(55, 28), (1, 4), (0, 4), (4, -1), (4,), (4.0, 2)])
def test_ar_mask_rejects_bad_sizes(input_size):
    with pytest.raises(ValueError, match="input_size"):
        ar_mask(input_size)


def test_same_seed_epoch_index_gives_the_same_masks():
    generator = MaskingGenerator(**RECIPE)
    policy = MaskPolicy(half_mask_ratio=0.5)
    for seed, epoch, index in [(0, 0, 0), (1, 3, 17), (2**40, 99, 123456)]:
        assert np.array_equal(generator(sample_rng(seed, epoch, index)), generator(sample_rng(seed, epoch, index)))
        for task in TASK_NAMES:
            mask_a, ar_a = policy(task, sample_rng(seed, epoch, index))
            mask_b, ar_b = policy(task, sample_rng(np.int64(seed), np.int32(epoch), np.uint64(index)))
            assert ar_a == ar_b and np.array_equal(mask_a, mask_b)


def test_masks_do_not_use_or_touch_global_random_state():
    generator = MaskingGenerator(**RECIPE)
    masks = []
    for global_seed in (1, 2):
        random.seed(global_seed)
        np.random.seed(global_seed)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        masks.append(generator(sample_rng(0, 0, 0)))
        assert random.getstate() == python_state
        assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    assert np.array_equal(*masks)


def test_different_index_or_epoch_gives_different_masks():
    generator = MaskingGenerator(**RECIPE)
    for draw in range(5):
        base = generator(sample_rng(0, draw, draw))
        assert not np.array_equal(base, generator(sample_rng(0, draw, draw + 1)))
        assert not np.array_equal(base, generator(sample_rng(0, draw + 1, draw)))
        assert not np.array_equal(base, generator(sample_rng(1, draw, draw)))


def test_sample_rng_keeps_tuples_with_large_values_apart():
    # Tuples that would share their 32-bit words if large values were split naively.
    pairs = [((2**32, 0, 0), (0, 1, 0)), ((0, 2**32, 0), (0, 0, 1)), ((0, 0, 2**32), (0, 0, 0))]
    for first, second in pairs:
        assert sample_rng(*first).integers(2**62) != sample_rng(*second).integers(2**62)


@pytest.mark.parametrize("args, name", [((-1, 0, 0), "seed"), ((0, -1, 0), "epoch"), ((0, 0, 2**64), "index")])
def test_sample_rng_rejects_out_of_range_values(args, name):
    with pytest.raises(ValueError, match=name):
        sample_rng(*args)


def test_segmentation_is_always_ar():
    policy = MaskPolicy(half_mask_ratio=0.0)
    expected = ar_mask((56, 28))
    for index in range(200):
        mask, is_ar = policy("segmentation", sample_rng(0, 0, index))
        assert is_ar is True
        assert np.array_equal(mask, expected)


def test_half_mask_ratio_zero_never_picks_ar_for_other_tasks():
    policy = MaskPolicy(num_mask_patches=300, half_mask_ratio=0.0)
    for index in range(300):
        task = ("synthesis", "inpainting", "denoising")[index % 3]
        mask, is_ar = policy(task, sample_rng(0, 0, index))
        assert is_ar is False
        assert mask.shape == (56, 28) and int(mask.sum()) == 300


def test_half_mask_ratio_one_always_picks_ar():
    policy = MaskPolicy(half_mask_ratio=1.0)
    expected = ar_mask((56, 28))
    for index in range(300):
        mask, is_ar = policy(TASK_NAMES[index % len(TASK_NAMES)], sample_rng(0, 0, index))
        assert is_ar is True
        assert np.array_equal(mask, expected)


def test_ar_fraction_matches_half_mask_ratio():
    ratio, draws = 0.25, 2000
    policy = MaskPolicy(half_mask_ratio=ratio)
    ar_count = 0
    for index in range(draws):
        mask, is_ar = policy("denoising", sample_rng(21, 0, index))
        ar_count += is_ar
        assert int(mask.sum()) == (784 if is_ar else 256)
    # 4.5 binomial standard deviations: about 0.044 here.
    tolerance = 4.5 * math.sqrt(ratio * (1 - ratio) / draws)
    assert abs(ar_count / draws - ratio) < tolerance


def test_by_default_the_registry_says_which_tasks_are_always_ar():
    policy = MaskPolicy(half_mask_ratio=0.0)
    for name, task in TASKS.items():
        assert policy(name, sample_rng(0, 0, 0))[1] is task.always_autoregressive, name


def test_policy_honours_custom_always_ar_tasks():
    policy = MaskPolicy(half_mask_ratio=0.0, always_ar_tasks=("denoising",))
    rng = sample_rng(0, 0, 0)
    assert policy("denoising", rng)[1] is True
    assert policy("segmentation", rng)[1] is False


def test_policy_returns_a_fresh_ar_mask_each_call():
    policy = MaskPolicy()
    mask, _ = policy("segmentation", sample_rng(0, 0, 0))
    mask[:] = False
    again, _ = policy("segmentation", sample_rng(0, 0, 0))
    assert int(again.sum()) == 784


def test_policy_rejects_unknown_task():
    with pytest.raises(ValueError, match="task"):
        MaskPolicy()("segmantation", sample_rng(0, 0, 0))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(input_size=(0, 28), num_masking_patches=10), "input_size"),
        (dict(input_size=(56,), num_masking_patches=10), "input_size"),
        (dict(input_size=(56, 28), num_masking_patches=0), "num_masking_patches"),
        (dict(input_size=(56, 28), num_masking_patches=1569), "num_masking_patches"),
        (dict(input_size=(56, 28), num_masking_patches=256, min_num_patches=0), "min_num_patches"),
        (dict(input_size=(56, 28), num_masking_patches=256, min_num_patches=64, max_num_patches=32), "max_num_patches"),
        (dict(input_size=(56, 28), num_masking_patches=10), "max_num_patches"),  # default max 10 < min 16
        (dict(input_size=(56, 28), num_masking_patches=256, min_aspect=0.0), "min_aspect"),
        (dict(input_size=(56, 28), num_masking_patches=256, min_aspect=0.5, max_aspect=0.4), "max_aspect"),
    ],
)
def test_generator_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MaskingGenerator(**kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(input_size=(55, 28)), "input_size"),
        (dict(input_size=(56, 0)), "input_size"),
        (dict(num_mask_patches=0), "num_mask_patches"),
        (dict(num_mask_patches=2000), "num_mask_patches"),
        (dict(min_mask_patches_per_block=0), "min_mask_patches_per_block"),
        (dict(min_mask_patches_per_block=64, max_mask_patches_per_block=32), "max_mask_patches_per_block"),
        (dict(half_mask_ratio=-0.1), "half_mask_ratio"),
        (dict(half_mask_ratio=1.5), "half_mask_ratio"),
        (dict(half_mask_ratio=float("nan")), "half_mask_ratio"),
        (dict(always_ar_tasks="segmentation"), "always_ar_tasks"),
        (dict(always_ar_tasks=("segmentation", "detection")), "always_ar_tasks"),
    ],
)
def test_policy_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MaskPolicy(**kwargs)


def test_reprs_name_the_settings():
    text = repr(MaskPolicy(half_mask_ratio=0.3))
    for part in ("56x28", "segmentation", "0.3", "256", "16..128"):
        assert part in text
    assert "14x7" in repr(MaskingGenerator((14, 7), 20, min_num_patches=4))
