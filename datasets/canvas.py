"""The training dataset: prepared slice datasets -> 896x448 in-context canvases.

Each item is a query pair and a context pair of the same dataset and task, each randomly cropped to
half the canvas (448x448 by default) on its own, stacked context on top. A DataLoader worker only
crops, copies and draws labels, in 8-bit pixels:

    imgs  (1, H, W)   uint8, context image over query image (grey)
    tgts  (3, H, W)   uint8, context target over query target: a grey image replicated to 3 channels,
                      or a label map drawn in the label encoding
    background_weight float32 (), the loss weight of the target's black pixels: the task's
                      background_weight for a label target (0.1 for segmentation) unless the dataset
                      is given one, 1 for an image
    mask  (L,)        bool, True where a target token is hidden (masking_generator.MaskPolicy)
    task, dataset     int ids into tasks.TASK_NAMES and into the dataset's `names`, for per-task logging

and `to_model_inputs` turns a batch of them, on the device, into what the model takes: imgs and tgts
(B, 3, H, W) float32, ImageNet-normalised as pixels.to_normalised_tensor does (the same values, bit
for bit), and valid (B, 1, H, W), 1 where the target is drawn and background_weight where it is black.
Slice files are decoded once per run into a cache shared by the workers (datasets.slice_cache).

Which datasets take part, and how often, is a mixture (`load_mixture` reads a JSON file, `Mixture.of`
builds one from prepared roots by a named recipe of MIXTURE_RECIPES: "balanced", every dataset an
equal share, or "paper", the authors' list of slices). Every random choice of an item (dataset,
slices, crops, colours, mask) comes from one numpy Generator seeded by (seed, epoch, index), so an
item is the same whichever worker or rank builds it, and weighted sampling needs no sampler of its
own: any index sharding (DistributedSampler, a plain range) sees the mixture's weights.

What differs between tasks (label or image target, swapping input and target, background weight)
comes from the task registry (tasks.py); label targets are drawn in a label encoding
(label_encoding.py), pixels normalised as pixels.py does.
"""

from dataclasses import dataclass

import numpy as np
import torch

from label_encoding import LABEL_ENCODINGS, draw_labels
from masking_generator import MaskPolicy, sample_rng
from pixels import normalise, resize_picture, training_scale_size
from tasks import TASK_NAMES

from .manifest import SlicePair
from .mixture import BALANCES, SLICE_SAMPLINGS, Mixture, MixtureError, Source, build_source
from .slice_cache import SliceCache

# Where an item's context pair comes from: another slice of the query's case, or another case.
CONTEXT_FROM = ("same_case", "other_case")

# Decoded slices kept per training process (shared by its DataLoader workers): 2 GiB hold 8192 slice
# files of 512x512 at 8 bits (4096 image-target pairs); memory is taken only as slices are stored.
SLICE_CACHE_BYTES = 2 * 2**30


# ---------------------------------------------------------------------------------------------------
# augmentation


@dataclass
class Augment:
    """Geometric augmentation, the same for the image and target of a pair.

    crop_size: each pair is randomly cropped to it (resized up first when a side is smaller);
    scale_jitter s: the pair is first scaled by a factor in [1 - s, 1 + s]; hflip/vflip: probabilities.
    Returns views of the (resized) slices where it can: the crop is copied once, into the canvas.
    """

    crop_size: tuple[int, int] = (448, 448)
    scale_jitter: float = 0.0
    hflip: float = 0.0
    vflip: float = 0.0

    def __call__(self, image: np.ndarray, target: np.ndarray, target_is_label: bool, rng: np.random.Generator):
        scale = 1.0 + rng.uniform(-self.scale_jitter, self.scale_jitter) if self.scale_jitter else 1.0
        size = training_scale_size(image.shape[:2], self.crop_size, scale)
        image = resize_picture(image, size, is_label=False)
        target = resize_picture(target, size, is_label=target_is_label)
        top = int(rng.integers(0, image.shape[0] - self.crop_size[0] + 1))
        left = int(rng.integers(0, image.shape[1] - self.crop_size[1] + 1))
        window = (slice(top, top + self.crop_size[0]), slice(left, left + self.crop_size[1]))
        image, target = image[window], target[window]
        if self.hflip and rng.random() < self.hflip:
            image, target = image[:, ::-1], target[:, ::-1]
        if self.vflip and rng.random() < self.vflip:
            image, target = image[::-1], target[::-1]
        return image, target


# ---------------------------------------------------------------------------------------------------
# the dataset


@dataclass(frozen=True)
class Choice:
    """What an item shows, chosen before any pixel is read."""

    source_id: int  # into InContextDataset.sources / names
    query: SlicePair
    context: SlicePair
    swap: bool  # synthesis: input and target trade roles


class InContextDataset(torch.utils.data.Dataset):
    """Canvases drawn from a mixture of prepared datasets (see module docstring)."""

    def __init__(
        self,
        mixture: Mixture,
        mask_policy: MaskPolicy,
        split: str = "train",
        input_size: tuple[int, int] = (896, 448),
        label_encoding: str = "random_colors",
        context_from: str = "same_case",
        augment: Augment | None = None,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        patch_size: int = 16,
        slice_cache_bytes: int = SLICE_CACHE_BYTES,
        background_weight: float | None = None,
    ):
        if label_encoding not in LABEL_ENCODINGS:
            raise ValueError(f"label_encoding must be one of {LABEL_ENCODINGS}, got '{label_encoding}'")
        if context_from not in CONTEXT_FROM:
            raise ValueError(f"context_from must be one of {CONTEXT_FROM}, got '{context_from}'")
        if input_size[0] % 2 or input_size[0] // 2 % patch_size or input_size[1] % patch_size:
            raise MixtureError(
                f"input_size {tuple(input_size)} must stack two pairs of whole {patch_size}-pixel patches"
            )
        grid = (input_size[0] // patch_size, input_size[1] // patch_size)
        if tuple(mask_policy.input_size) != grid:
            raise ValueError(
                f"mask_policy grid {mask_policy.input_size} does not match input_size "
                f"{tuple(input_size)} / patch {patch_size} = {grid}"
            )
        if mixture.balance not in BALANCES:
            raise MixtureError(f"mixture balance must be one of {BALANCES}, got '{mixture.balance}'")
        if mixture.slice_sampling not in SLICE_SAMPLINGS:
            raise MixtureError(
                f"mixture slice_sampling must be one of {SLICE_SAMPLINGS}, got '{mixture.slice_sampling}'"
            )
        self.mixture = mixture
        self.sources = [build_source(entry, split) for entry in mixture.entries]
        self.names = [source.name for source in self.sources]
        counts = np.array([source.num_slices for source in self.sources], dtype=np.float64)
        weights = np.array([entry.weight for entry in mixture.entries], dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise MixtureError(f"mixture weights must be >= 0 with a positive sum, got {weights.tolist()}")
        shares = weights * counts if mixture.balance == "slices" else weights
        self.probabilities = shares / shares.sum()
        self.num_slices = int(counts.sum())
        self.mask_policy = mask_policy
        self.input_size = tuple(input_size)
        self.label_encoding = label_encoding
        self.context_from = context_from
        self.augment = augment or Augment(crop_size=(input_size[0] // 2, input_size[1]))
        if tuple(self.augment.crop_size) != (input_size[0] // 2, input_size[1]):
            raise ValueError(
                f"augment crop_size {self.augment.crop_size} must be half the canvas "
                f"{(input_size[0] // 2, input_size[1])}"
            )
        self.seed = seed
        self.background_weight = background_weight
        self.epoch = 0
        self.samples_per_epoch = samples_per_epoch or self.num_slices
        self.slice_cache = self._slice_cache(slice_cache_bytes)

    def _slice_cache(self, budget_bytes: int) -> SliceCache:
        """A cache for every slice file the mixture lists, mapped no larger than they can need (2 bytes
        a pixel, as for 16-bit labels)."""
        paths, largest = [], 0
        for source in self.sources:
            pairs = [pair for pairs in source.slices.values() for pair in pairs]
            paths += [path for pair in pairs for path in (pair.input_path, pair.target_path)]
            largest += 2 * len(pairs) * 2 * source.slice_size[0] * source.slice_size[1]
        return SliceCache(paths, min(budget_bytes, largest))

    def set_epoch(self, epoch: int):
        """Items depend on the epoch; call before each epoch (DataLoader workers must not persist)."""
        self.epoch = epoch

    def __len__(self):
        return self.samples_per_epoch

    def describe(self) -> str:
        mixture = self.mixture
        lines = [
            f"{len(self.sources)} datasets, {self.num_slices} slices, {len(self)} canvases per epoch, "
            f"labels '{self.label_encoding}', context from '{self.context_from}', {self.mask_policy}",
            f"mixture recipe '{mixture.recipe}': balance '{mixture.balance}', "
            f"query slices drawn '{mixture.slice_sampling}'",
        ]
        for source, p in zip(self.sources, self.probabilities):
            lines.append(
                f"  {source.name:<24} {source.task.name:<13} cases {len(source.cases):>5}  "
                f"slices {source.num_slices:>7}  share {p:.3f}"
            )
        return "\n".join(lines)

    def _pick_query(self, source: Source, rng: np.random.Generator) -> tuple[int, int]:
        """(position of the query's case in source.cases, position of the slice in its case)."""
        if self.mixture.slice_sampling == "uniform":
            number = int(rng.integers(source.num_slices))
            case_position = int(np.searchsorted(source.slice_starts, number, side="right")) - 1
            return case_position, number - int(source.slice_starts[case_position])
        case_position = int(rng.integers(len(source.cases)))
        return case_position, int(rng.integers(len(source.slices[source.cases[case_position]])))

    def _pick_pairs(self, source: Source, rng: np.random.Generator) -> tuple[SlicePair, SlicePair]:
        """(query pair, context pair)."""
        query_position, query_index = self._pick_query(source, rng)
        query_slices = source.slices[source.cases[query_position]]
        if self.context_from == "other_case" and len(source.cases) > 1:
            other = int(rng.integers(len(source.cases) - 1))
            other += other >= query_position  # any case but the query's
            context_slices = source.slices[source.cases[other]]
            return query_slices[query_index], context_slices[rng.integers(len(context_slices))]
        if len(query_slices) == 1:  # a one-slice case is its own context, cropped independently
            return query_slices[0], query_slices[0]
        context_index = int(rng.integers(len(query_slices) - 1))
        context_index += context_index >= query_index  # any other slice of the case
        return query_slices[query_index], query_slices[context_index]

    def choose(self, index: int) -> Choice:
        """The dataset, slices and direction of item `index` in this epoch, without reading pixels."""
        return self._choose(sample_rng(self.seed, self.epoch, index))

    def _choose(self, rng: np.random.Generator) -> Choice:
        source_id = int(rng.choice(len(self.sources), p=self.probabilities))
        source = self.sources[source_id]
        query, context = self._pick_pairs(source, rng)
        swap = bool(rng.random() < source.swap_prob)  # always drawn: the rest of the item must not depend on it
        return Choice(source_id, query, context, swap)

    def __getitem__(self, index: int) -> dict:
        rng = sample_rng(self.seed, self.epoch, index)
        choice = self._choose(rng)  # the item's further draws continue on the same generator
        source = self.sources[choice.source_id]
        target_is_label = source.task.target_is_label
        imgs = np.empty((1, *self.input_size), dtype=np.uint8)
        tgts = np.empty((3, *self.input_size), dtype=np.uint8)
        halves = (slice(0, self.input_size[0] // 2), slice(self.input_size[0] // 2, None))
        labels = []
        read = self.slice_cache.read
        for rows, pair in zip(halves, (choice.context, choice.query)):
            input_path, target_path = pair.input_path, pair.target_path
            if choice.swap:
                input_path, target_path = target_path, input_path
            image, target = self.augment(read(input_path), read(target_path), target_is_label, rng)
            imgs[0, rows] = image
            if target_is_label:
                labels.append(target)
            else:
                tgts[:, rows] = target  # grey replicated to three channels
        if target_is_label:
            draw_labels(labels, self.label_encoding, rng, [tgts[:, rows] for rows in halves])
        mask, _ = self.mask_policy(source.task.name, rng)
        background_weight = 1.0
        if target_is_label:
            background_weight = (
                source.task.background_weight if self.background_weight is None else self.background_weight
            )
        return {
            "imgs": torch.from_numpy(imgs),
            "tgts": torch.from_numpy(tgts),
            "background_weight": torch.tensor(background_weight, dtype=torch.float32),
            "mask": torch.from_numpy(mask.reshape(-1)),
            "task": TASK_NAMES.index(source.task.name),
            "dataset": choice.source_id,
        }


def to_model_inputs(batch: dict, device) -> dict:
    """A batch of InContextDataset items (collated) on the device as the model takes them: imgs and
    tgts normalised (B, 3, H, W) float32; valid (B, 1, H, W) float32, 1 where the target is drawn and
    background_weight where it stays black (the background; with "binary" also the classes not drawn);
    mask, task and dataset as they are.

    Converting here rather than in the workers leaves them a seventh of the bytes to write and send
    (uint8, one grey channel for the images, no valid map) and gives the float work to the device."""
    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    pixels = batch.pop("tgts")
    background = batch.pop("background_weight").view(-1, 1, 1, 1)
    return {
        **batch,
        "imgs": normalise(batch["imgs"]),
        "tgts": normalise(pixels),
        # any() of uint8 is uint8, which where() takes as a condition only with a deprecation warning.
        "valid": torch.where(pixels.any(dim=1, keepdim=True).bool(), 1.0, background),
    }
