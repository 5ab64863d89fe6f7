"""Which training slices serve as context pairs for a test query (main_eval.py --context_policy).

    fixed      the same K slices for every query (middle slice of K training cases)
    random     K random training slices per query
    position   per query, K training cases, each giving its slice nearest in relative position in its
               volume, (index + 0.5) / slices, the same definition as predict.py's
    retrieval  the K training slices whose 16x16 thumbnails are nearest to the query's (L2 after
               standardising each thumbnail), at most one per case
Every choice is seeded by (seed, dataset, case, slice), so it does not depend on the order of queries.
"""

import zlib

import numpy as np
from PIL import Image
from tqdm import tqdm

from datasets.manifest import PreparedDataset, read_png
from util.cli import UsageError

CONTEXT_POLICIES = ("fixed", "random", "position", "retrieval")
THUMBNAIL = 16


def _key(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def thumbnail(image: np.ndarray) -> np.ndarray:
    small = np.asarray(Image.fromarray(image).resize((THUMBNAIL, THUMBNAIL), Image.BOX), np.float32).ravel()
    return (small - small.mean()) / (small.std() + 1e-6)


class ContextPicker:
    """Chooses context slices (case id, slice index) from training cases; see the module docstring."""

    def __init__(self, dataset: PreparedDataset, policy: str, k: int, seed: int, context_cases: int = 0):
        self.dataset, self.policy, self.k, self.seed = dataset, policy, k, seed
        cases = dataset.case_ids("train")
        if context_cases:  # the first k in sorted order: the cases a mixture's num_cases trains on
            cases = cases[:context_cases]
        self.cases = [c for c in cases if dataset.slice_indices(c)]
        if not self.cases:
            raise UsageError(f"{dataset.dataset_dir}: no training case with slices to take contexts from")
        self.pool = [(c, i) for c in self.cases for i in dataset.slice_indices(c)]
        self.fixed = [(c, self._middle(c)) for c in self._choose_cases(np.random.default_rng(seed))]
        self.thumbnails = None
        if policy == "retrieval":
            self.thumbnails = np.stack(
                [
                    thumbnail(read_png(dataset.slice_path(dataset.input_folder, c, i)))
                    for c, i in tqdm(self.pool, desc=f"{dataset.name}: context thumbnails", leave=False)
                ]
            )

    def _middle(self, case):
        slices = self.dataset.slice_indices(case)
        return slices[len(slices) // 2]

    def _choose_cases(self, rng):
        """K cases, distinct while there are enough."""
        return rng.choice(self.cases, size=self.k, replace=len(self.cases) < self.k).tolist()

    def pick(self, case_id: str, index: int, query_image: np.ndarray):
        rng = np.random.default_rng([self.seed, _key(self.dataset.name, case_id, index)])
        if self.policy == "fixed":
            return self.fixed
        if self.policy == "random":
            chosen = rng.choice(len(self.pool), size=self.k, replace=len(self.pool) < self.k)
            return [self.pool[i] for i in chosen]
        if self.policy == "position":
            return self._nearest_in_position(case_id, index, rng)
        return self._most_alike(query_image)

    def _nearest_in_position(self, case_id, index, rng):
        target = self.dataset.slice_position(case_id, index)
        picks = []
        for case in self._choose_cases(rng):
            slices = self.dataset.slice_indices(case)
            picks.append((case, min(slices, key=lambda s: abs(self.dataset.slice_position(case, s) - target))))
        return picks

    def _most_alike(self, query_image):
        distances = ((self.thumbnails - thumbnail(query_image)) ** 2).sum(axis=1)
        picks, used = [], set()
        for i in np.argsort(distances):
            case = self.pool[i][0]
            if case not in used or len(used) >= len(self.cases):
                picks.append(self.pool[i])
                used.add(case)
            if len(picks) == self.k:
                break
        return picks
