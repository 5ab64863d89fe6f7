"""Which target tokens of an in-context canvas are hidden behind the mask token.

AR mode ("half mask") hides every token of the bottom half, i.e. the whole query target, which is
predicted in one pass from the context pair: the setting used at inference. MIM mode hides a fixed
number of tokens anywhere in the target grid, placed as BEiT-style rectangular blocks. MaskPolicy
picks the mode per sample: the tasks the registry marks always_autoregressive (segmentation) always
train in AR mode, the other tasks only sometimes. All randomness comes from a numpy Generator passed
in, so masks are reproducible per sample.
"""

import math
import operator
from typing import NamedTuple

import numpy as np

import tasks
from tasks import TASK_NAMES

# MaskPolicy's default: the tasks whose every sample hides the whole query target.
ALWAYS_AUTOREGRESSIVE = tuple(task.name for task in tasks.TASKS.values() if task.always_autoregressive)

# BEiT gives each block this many tries to land somewhere useful before block placement stops.
MAX_TRIES_PER_BLOCK = 10


class Block(NamedTuple):
    """One accepted block: its rectangle, the area and aspect it was drawn from, its new cells."""

    top: int
    left: int
    height: int
    width: int
    area: float
    aspect: float
    added: int


def _require(condition, message):
    if not condition:
        raise ValueError(message)


def _grid_size(input_size):
    """(H, W) as ints, accepting any pair of integers (numpy ones included) and nothing else."""
    try:
        height, width = (operator.index(n) for n in input_size)
    except (TypeError, ValueError):
        height = width = 0
    _require(height > 0 and width > 0, f"input_size must be two positive ints (H, W) in tokens, got {input_size!r}")
    return height, width


def _adjust_count(mask, target, rng):
    """Flip uniformly random cells of `mask` in place until exactly `target` are True."""
    excess = int(mask.sum()) - target
    if excess == 0:
        return
    # Too many: turn off random masked cells. Too few: turn on random unmasked ones.
    candidates = np.flatnonzero(mask == (excess > 0))
    chosen = rng.choice(candidates, size=abs(excess), replace=False)
    mask[np.unravel_index(chosen, mask.shape)] = excess < 0


class MaskingGenerator:
    """BEiT block masking: exactly `num_masking_patches` cells of an (H, W) token grid."""

    def __init__(
        self, input_size, num_masking_patches, min_num_patches=16, max_num_patches=None, min_aspect=0.3, max_aspect=None
    ):
        self.height, self.width = _grid_size(input_size)
        num_cells = self.height * self.width
        _require(
            1 <= num_masking_patches <= num_cells,
            f"num_masking_patches must be in [1, {num_cells}] for a {self.height}x{self.width} "
            f"grid, got {num_masking_patches}",
        )
        _require(min_num_patches >= 1, f"min_num_patches must be >= 1, got {min_num_patches}")
        max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        _require(
            max_num_patches >= min_num_patches,
            f"max_num_patches ({max_num_patches}; defaults to num_masking_patches) must be "
            f">= min_num_patches ({min_num_patches})",
        )
        _require(min_aspect > 0, f"min_aspect must be > 0, got {min_aspect}")
        max_aspect = 1 / min_aspect if max_aspect is None else max_aspect
        _require(max_aspect >= min_aspect, f"max_aspect ({max_aspect}) must be >= min_aspect ({min_aspect})")

        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches
        self.min_aspect = min_aspect
        self.max_aspect = max_aspect
        # Log-uniform aspect: a block and its transpose are equally likely.
        self.log_aspect_range = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self):
        return (
            f"MaskingGenerator(grid={self.height}x{self.width}, count={self.num_masking_patches}, "
            f"block_area={self.min_num_patches}..{self.max_num_patches}, "
            f"aspect={self.min_aspect:.3g}..{self.max_aspect:.3g})"
        )

    def _place_block(self, mask, budget, rng):
        """Try to mask one block adding 1..budget new cells; return it as a Block, or None."""
        for _ in range(MAX_TRIES_PER_BLOCK):
            # As in BEiT the area is drawn between the two bounds even once the budget has fallen
            # below min_num_patches; the budget check below still holds such a block to its budget.
            area = rng.uniform(*sorted((self.min_num_patches, budget)))
            aspect = math.exp(rng.uniform(*self.log_aspect_range))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            # Strictly smaller than the grid, as BEiT: no block spans the full height or width.
            if h >= self.height or w >= self.width:
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            window = mask[top : top + h, left : left + w]
            added = h * w - int(window.sum())
            if 0 < added <= budget:
                window[...] = True
                return Block(top, left, h, w, area, aspect, added)
        return None

    def _generate(self, rng):
        """Place blocks until the count is reached or a block fails; return (mask, blocks).

        The mask holds only the blocks' cells, at most num_masking_patches of them; __call__
        tops it up to the exact count.
        """
        mask = np.zeros((self.height, self.width), dtype=bool)
        blocks = []
        count = 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            block = self._place_block(mask, budget, rng)
            if block is None:
                break
            blocks.append(block)
            count += block.added
        return mask, blocks

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask, _ = self._generate(rng)
        # Blocks stop short when no try fits the budget; random cells then make the count exact, so
        # every MIM sample hides the same number of tokens.
        _adjust_count(mask, self.num_masking_patches, rng)
        return mask


def ar_mask(input_size) -> np.ndarray:
    """The AR "half mask": True on every token of the bottom half (the query target)."""
    height, width = _grid_size(input_size)
    _require(height % 2 == 0, f"input_size height must be even to split into context and query halves, got {height}")
    mask = np.zeros((height, width), dtype=bool)
    mask[height // 2 :] = True
    return mask


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """A Generator that depends only on (seed, epoch, index), not on which worker or rank asks."""
    words = []
    for name, value in (("seed", seed), ("epoch", epoch), ("index", index)):
        value = operator.index(value)
        _require(0 <= value < 2**64, f"{name} must be in [0, 2**64), got {value}")
        # SeedSequence splits a large int into as many 32-bit words as it needs, so (2**32, 0, 0)
        # and (0, 1, 0) would seed the same stream; two fixed words per value keep tuples distinct.
        words += [value & 0xFFFFFFFF, value >> 32]
    return np.random.default_rng(np.random.SeedSequence(words))


class MaskPolicy:
    """Per-sample choice between the AR half mask and MIM block masking, by task: the tasks named in
    always_ar_tasks (by default those tasks.py marks always_autoregressive) always take the AR half
    mask, the others with probability half_mask_ratio."""

    def __init__(
        self,
        input_size=(56, 28),
        num_mask_patches=256,
        min_mask_patches_per_block=16,
        max_mask_patches_per_block=128,
        half_mask_ratio=0.1,
        always_ar_tasks=ALWAYS_AUTOREGRESSIVE,
    ):
        height, width = _grid_size(input_size)
        _require(
            1 <= num_mask_patches <= height * width,
            f"num_mask_patches must be in [1, {height * width}], got {num_mask_patches}",
        )
        _require(
            min_mask_patches_per_block >= 1,
            f"min_mask_patches_per_block must be >= 1, got {min_mask_patches_per_block}",
        )
        _require(
            max_mask_patches_per_block >= min_mask_patches_per_block,
            f"max_mask_patches_per_block ({max_mask_patches_per_block}) must be >= "
            f"min_mask_patches_per_block ({min_mask_patches_per_block})",
        )
        _require(0.0 <= half_mask_ratio <= 1.0, f"half_mask_ratio must be in [0, 1], got {half_mask_ratio}")
        # A bare string would otherwise be read as a collection of one-letter task names.
        _require(
            not isinstance(always_ar_tasks, str) and set(always_ar_tasks) <= set(TASK_NAMES),
            f"always_ar_tasks must be a collection of task names from {TASK_NAMES}, got {always_ar_tasks!r}",
        )

        self.input_size = (height, width)
        self.half_mask_ratio = half_mask_ratio
        self.always_ar_tasks = tuple(always_ar_tasks)
        self._ar_mask = ar_mask(self.input_size)  # also checks that the height splits in two
        self.mim = MaskingGenerator(
            self.input_size,
            num_mask_patches,
            min_num_patches=min_mask_patches_per_block,
            max_num_patches=max_mask_patches_per_block,
        )

    def __repr__(self):
        return (
            f"MaskPolicy(grid={self.input_size[0]}x{self.input_size[1]}, "
            f"always_ar={list(self.always_ar_tasks)}, half_mask_ratio={self.half_mask_ratio}, "
            f"mim={self.mim.num_masking_patches} cells in blocks of "
            f"{self.mim.min_num_patches}..{self.mim.max_num_patches})"
        )

    def __call__(self, task: str, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
        """Return (mask of shape (H, W), True where hidden; whether it is the AR half mask)."""
        # An unknown name would silently train in the wrong mode, e.g. a misspelt segmentation.
        _require(task in TASK_NAMES, f"task must be one of {TASK_NAMES}, got {task!r}")
        is_ar = task in self.always_ar_tasks or bool(rng.random() < self.half_mask_ratio)
        if is_ar:
            return self._ar_mask.copy(), True
        return self.mim(rng), False
