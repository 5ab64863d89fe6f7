"""Which prepared datasets a training run draws from, and how often: a mixture.

`load_mixture` reads a JSON file, `Mixture.of` builds one from prepared roots by a named recipe of
MIXTURE_RECIPES: "balanced", every dataset an equal share, or "paper", the authors' list of slices.
`build_source` turns one entry into the cases and slices InContextDataset (datasets/canvas.py) draws from.
"""

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tasks import TASK_NAMES, TASKS, Task
from util.cli import UsageError

from .manifest import PreparedDataset, SlicePair, find_datasets, read_json_object


class MixtureError(UsageError, ValueError):
    """A mixture that cannot be built from the given files and settings (one line, naming the file)."""


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
class Source:
    """A dataset of the mixture, ready to sample from."""

    name: str
    task: Task
    swap_prob: float
    cases: list[str]  # sorted
    slices: dict[str, list[SlicePair]]  # case -> its kept slices
    slice_size: tuple[int, int]  # rows, cols of every slice file (the manifest's size)
    # Where each case's slices start when all the dataset's slices are numbered case by case: a number
    # drawn over all slices finds its case by binary search (uniform slice sampling).
    slice_starts: np.ndarray = field(init=False)
    num_slices: int = field(init=False)

    def __post_init__(self):
        counts = [len(self.slices[case]) for case in self.cases]
        self.slice_starts = np.cumsum([0] + counts[:-1])
        self.num_slices = sum(counts)


def build_source(entry: MixtureEntry, split: str) -> Source:
    dataset = PreparedDataset(entry.path)
    task = TASKS.get(dataset.task)
    if task is None:
        raise MixtureError(f"{entry.path}: unknown task '{dataset.task}' in manifest; expected one of {TASK_NAMES}")
    cases = dataset.case_ids(split)
    if not cases:
        raise no_cases_error(entry, dataset, split)
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
    return Source(dataset.name, task, swap, sorted(slices), slices, tuple(dataset.manifest["size"]))


def no_cases_error(entry: MixtureEntry, dataset: PreparedDataset, split: str) -> MixtureError:
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
