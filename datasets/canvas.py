"""The training dataset: prepared slice datasets -> 896x448 in-context canvases.

Each item is a query pair and a context pair of the same dataset and task, each randomly cropped to
half the canvas (448x448 by default) on its own, stacked context on top:

    imgs  (3, H, W)   context image over query image, ImageNet-normalised, grey replicated to 3 channels
    tgts  (3, H, W)   context target over query target, rendered and normalised the same way
    mask  (L,)        bool, True where a target token is hidden (masking_generator.MaskPolicy)
    valid (1, H, W)   loss weight per pixel: the task's background_weight on the background of a label
                      target (0.1 for segmentation), 1 elsewhere
    task, dataset     int ids into tasks.TASK_NAMES and into the dataset's `names`, for per-task logging

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

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from label_encoding import LABEL_ENCODINGS, render_labels
from masking_generator import MaskPolicy, sample_rng
from pixels import resize_picture, to_normalised_tensor, training_scale_size
from tasks import TASK_NAMES, TASKS, Task
from util.cli import UsageError

from .manifest import PreparedDataset, SlicePair, find_datasets, read_json_object, read_png


class MixtureError(UsageError, ValueError):
    """A mixture that cannot be built from the given files and settings (one line, naming the file)."""


# Where an item's context pair comes from: another slice of the query's case, or another case.
CONTEXT_FROM = ("same_case", "other_case")


# ---------------------------------------------------------------------------------------------------
# the mixture


@dataclass
class MixtureEntry:
    """One prepared dataset in the mixture.

    weight          relative share; with balance "datasets" the share of the dataset itself, with
                    "slices" a multiplier of its number of slices (the authors' list repetition)
    case_fraction   use only this fraction of the training cases (the first ones in sorted order)
    case_stride     use every n-th training case
    num_cases       use only the first n training cases in sorted order, after the stride (few-shot)
    swap_prob       probability that input and target swap roles (default: the task's, tasks.Task.swap_prob;
                    synthesis learns both directions)
    """

    path: str
    weight: float = 1.0
    case_fraction: float = 1.0
    case_stride: int = 1
    num_cases: int = 0
    swap_prob: float | None = None


BALANCES = ("datasets", "slices")
SLICE_SAMPLINGS = ("per_case", "uniform")


@dataclass
class Mixture:
    """Which prepared datasets an InContextDataset draws from, and how often.

    balance          "datasets": each dataset's share is its weight; "slices": its weight times its
                     number of (kept) training slices, as if every slice were listed `weight` times
    slice_sampling   how a dataset's query slice is drawn: "per_case" a case uniformly, then one of its
                     slices (slices of short cases come up more often); "uniform" every slice of the
                     dataset equally likely, the authors' list of slices
    recipe           the MIXTURE_RECIPES name the mixture was built with, "custom" otherwise
    """

    entries: list[MixtureEntry]
    balance: str = "datasets"
    slice_sampling: str = "per_case"
    recipe: str = "custom"

    @classmethod
    def of(
        cls,
        roots: Sequence[str],
        names: Sequence[str] | None = None,
        balance: str | None = None,
        recipe: str = "balanced",
    ):
        """Every prepared dataset under the roots (or only `names`), set up by its task as `recipe`
        (a MIXTURE_RECIPES name) says. `balance` None takes the recipe's; a recipe that stands for one
        balance ("paper": "slices") refuses another, since the mix would no longer be the recipe's."""
        if recipe not in MIXTURE_RECIPES:
            raise MixtureError(f"unknown mixture recipe '{recipe}'; choose one of {sorted(MIXTURE_RECIPES)}")
        settings = MIXTURE_RECIPES[recipe]
        found = {os.path.basename(p): p for root in roots for p in find_datasets(root)}
        if not found:
            raise MixtureError(
                f"no prepared dataset (a folder with manifest.json) under {list(roots)}; "
                "prepare data with `python -m datasets.prepare`"
            )
        missing = sorted(set(names or ()) - set(found))
        if missing:
            raise MixtureError(f"datasets {missing} not found under {list(roots)}; found {sorted(found)}")
        chosen = names or sorted(found)
        entries = [settings.entry(found[name], PreparedDataset(found[name]).task) for name in chosen]
        return cls(entries, settings.pick_balance(recipe, balance), settings.slice_sampling, recipe)


@dataclass(frozen=True)
class TaskSettings:
    """What a recipe gives every prepared dataset of one task (see MixtureEntry)."""

    weight: float = 1.0
    case_fraction: float = 1.0
    case_stride: int = 1


@dataclass(frozen=True)
class MixtureRecipe:
    """How `Mixture.of` sets up the prepared datasets it finds, by their task.

    balance          the balance the recipe stands for, or None to leave it to the caller ("datasets"
                     unless asked otherwise)
    slice_sampling   see Mixture
    tasks            settings per task; a task not listed gets weight 1 and every training case
    """

    balance: str | None = None
    slice_sampling: str = "per_case"
    tasks: dict[str, TaskSettings] = field(default_factory=dict)

    def entry(self, path: str, task: str) -> MixtureEntry:
        settings = self.tasks.get(task, TaskSettings())
        return MixtureEntry(
            path, weight=settings.weight, case_fraction=settings.case_fraction, case_stride=settings.case_stride
        )

    def pick_balance(self, name: str, asked: str | None) -> str:
        if self.balance is None:
            return asked or "datasets"
        if asked not in (None, self.balance):
            raise MixtureError(
                f"mixture recipe '{name}' stands for balance '{self.balance}'; got balance "
                f"'{asked}' (leave balance out, or use recipe 'balanced')"
            )
        return self.balance


MIXTURE_RECIPES = {
    # Every dataset an equal share whatever its size; a case, then one of its slices.
    "balanced": MixtureRecipe(),
    # The authors' training list: every training slice once, segmentation datasets twice, half the
    # inpainting (BraTS-Local) cases and every fourth synthesis (BraTS-GLI) case; samples from it are
    # uniform over the list, so every listed slice is equally likely.
    "paper": MixtureRecipe(
        balance="slices",
        slice_sampling="uniform",
        tasks={
            "segmentation": TaskSettings(weight=2),
            "inpainting": TaskSettings(case_fraction=0.5),
            "synthesis": TaskSettings(case_stride=4),
        },
    ),
}


def load_mixture(path: str) -> Mixture:
    """Reads a mixture file:

        {"balance": "slices", "slice_sampling": "uniform",
         "datasets": [{"path": "data/ACDC", "weight": 2},
                      {"path": "data/BraTS_Local", "case_fraction": 0.5},
                      {"path": "data/BraTS_GLI", "case_stride": 4}]}

    Relative paths are taken from the file's folder.
    """
    spec = read_json_object(path)
    known = set(MixtureEntry.__dataclass_fields__)
    entries = []
    for i, item in enumerate(spec.get("datasets", [])):
        unknown = set(item) - known
        if unknown or "path" not in item:
            raise MixtureError(f"{path}: datasets[{i}] needs 'path' and takes only {sorted(known)}; got {sorted(item)}")
        item = dict(item, path=os.path.join(os.path.dirname(os.path.abspath(path)), item["path"]))
        entries.append(MixtureEntry(**item))
    if not entries:
        raise MixtureError(f"{path}: the mixture lists no datasets")
    return Mixture(entries, spec.get("balance", "datasets"), spec.get("slice_sampling", "per_case"))


@dataclass
class _Source:
    """A dataset of the mixture, ready to sample from."""

    name: str
    task: Task
    swap_prob: float
    cases: list[str]  # sorted
    slices: dict[str, list[SlicePair]]  # case -> its kept slices
    # Where each case's slices start when all the dataset's slices are numbered case by case: a number
    # drawn over all slices finds its case by binary search (uniform slice sampling).
    slice_starts: np.ndarray = field(init=False)
    num_slices: int = field(init=False)

    def __post_init__(self):
        counts = [len(self.slices[case]) for case in self.cases]
        self.slice_starts = np.cumsum([0] + counts[:-1])
        self.num_slices = sum(counts)


def _build_source(entry: MixtureEntry, split: str) -> _Source:
    dataset = PreparedDataset(entry.path)
    task = TASKS.get(dataset.task)
    if task is None:
        raise MixtureError(f"{entry.path}: unknown task '{dataset.task}' in manifest; expected one of {TASK_NAMES}")
    cases = dataset.case_ids(split)
    if not cases:
        raise _no_cases_error(entry, dataset, split)
    if not 0 < entry.case_fraction <= 1 or entry.case_stride < 1:
        raise MixtureError(f"{entry.path}: case_fraction must be in (0, 1] and case_stride >= 1")
    cases = cases[:: entry.case_stride]
    cases = cases[: max(1, round(len(cases) * entry.case_fraction))]
    if entry.num_cases:
        cases = cases[: entry.num_cases]
    slices = {}
    for case in cases:
        pairs = [
            SlicePair(
                dataset.name,
                case,
                i,
                dataset.slice_path(dataset.input_folder, case, i),
                dataset.slice_path(dataset.target_folder, case, i),
            )
            for i in dataset.slice_indices(case)
        ]
        if pairs:
            slices[case] = pairs
    if not slices:
        raise MixtureError(
            f"{entry.path}: its {len(cases)} {split} cases list no slices; run "
            f"`python -m datasets.verify {os.path.dirname(entry.path)}`"
        )
    # Checked up front, cheaply: the first pair of every case exists (`python -m datasets.verify` checks all).
    missing = [
        p for pairs in slices.values() for p in (pairs[0].input_path, pairs[0].target_path) if not os.path.exists(p)
    ]
    if missing:
        raise MixtureError(
            f"{entry.path}: {len(missing)} slice files listed in the manifest are missing, "
            f"e.g. {missing[0]}; run `python -m datasets.verify {os.path.dirname(entry.path)}`"
        )
    swap = entry.swap_prob if entry.swap_prob is not None else task.swap_prob
    return _Source(dataset.name, task, swap, sorted(slices), slices)


def _no_cases_error(entry: MixtureEntry, dataset: PreparedDataset, split: str) -> MixtureError:
    """Why a dataset has no case in the split: which splits its cases are in instead."""
    sizes = Counter(dataset.case(case_id)["split"] for case_id in dataset.case_ids())
    if not sizes:
        held = "the manifest lists no cases"
    elif len(sizes) == 1:
        ((other, count),) = sizes.items()
        held = f"all its {count} cases are {other}"
    else:
        held = "its cases are " + ", ".join(f"{count} {other}" for other, count in sorted(sizes.items()))
    return MixtureError(
        f"{entry.path}: dataset '{dataset.name}' has no {split} case ({held}); prepare it again "
        f"with a {split} split (--test_fraction, --test_cases) or leave it out of the mixture"
    )


# ---------------------------------------------------------------------------------------------------
# augmentation


@dataclass
class Augment:
    """Geometric augmentation, the same for the image and target of a pair.

    crop_size: each pair is randomly cropped to it (resized up first when a side is smaller);
    scale_jitter s: the pair is first scaled by a factor in [1 - s, 1 + s]; hflip/vflip: probabilities.
    Returns C-contiguous arrays, whatever flips and crops were taken.
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
        # Crops and flips are views (flips with negative strides, which torch refuses): hand on copies.
        return np.ascontiguousarray(image), np.ascontiguousarray(target)


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
        self.sources = [_build_source(entry, split) for entry in mixture.entries]
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
        self.epoch = 0
        self.samples_per_epoch = samples_per_epoch or self.num_slices

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

    def _pick_query(self, source: _Source, rng: np.random.Generator) -> tuple[int, int]:
        """(position of the query's case in source.cases, position of the slice in its case)."""
        if self.mixture.slice_sampling == "uniform":
            number = int(rng.integers(source.num_slices))
            case_position = int(np.searchsorted(source.slice_starts, number, side="right")) - 1
            return case_position, number - int(source.slice_starts[case_position])
        case_position = int(rng.integers(len(source.cases)))
        return case_position, int(rng.integers(len(source.slices[source.cases[case_position]])))

    def _pick_pairs(self, source: _Source, rng: np.random.Generator) -> tuple[SlicePair, SlicePair]:
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
        images, targets = [], []
        for pair in (choice.context, choice.query):
            input_path, target_path = pair.input_path, pair.target_path
            if choice.swap:
                input_path, target_path = target_path, input_path
            image, target = self.augment(read_png(input_path), read_png(target_path), target_is_label, rng)
            images.append(image)
            targets.append(target)
        if target_is_label:
            targets = render_labels(targets, self.label_encoding, rng)
            # Background is what stays black (with "binary" also the classes not drawn).
            drawn = np.concatenate([t.any(axis=0) for t in targets])
            valid = np.where(drawn, np.float32(1.0), np.float32(source.task.background_weight))
        else:
            valid = np.ones(self.input_size, dtype=np.float32)
        mask, _ = self.mask_policy(source.task.name, rng)
        return {
            "imgs": to_normalised_tensor(images),
            "tgts": to_normalised_tensor(targets),
            "mask": torch.from_numpy(mask.reshape(-1)),
            "valid": torch.from_numpy(valid)[None],
            "task": TASK_NAMES.index(source.task.name),
            "dataset": choice.source_id,
        }
