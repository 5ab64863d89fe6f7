"""What the model must beat, on the same queries and contexts (main_eval.py --baselines). A task's
entry in tasks.py names its baselines; each is one function here:

    copy_context  the context labels, resized to the query; with several contexts each pixel takes
                  the class most of them show, ties going to the first (most alike) context
                  (label targets)
    intensity     each pixel takes the class whose mean intensity on training slices is nearest
                  (label targets; fitted on at most 200 training slices)
    identity      the query input itself as the prediction (image targets)
"""

import numpy as np

from datasets.manifest import PreparedDataset
from pixels import resize_picture
from tasks import get_task

INTENSITY_FIT_SLICES = 200
LEVELS = 2**16  # label ids the class-mean table can hold (16-bit label PNGs)


def copy_context(queries, contexts, _):
    return [majority_label([resize_picture(label, q.shape, is_label=True) for _, label in pairs])
            for q, pairs in zip(queries, contexts)]  # fmt: skip


def majority_label(labels: list[np.ndarray]) -> np.ndarray:
    """Per pixel, the class most of the label maps show; a tie goes to the first map's class (half a
    vote extra breaks every tie and never outweighs a whole vote)."""
    stack = np.stack(labels)
    classes = np.unique(stack)
    votes = np.stack([(stack == c).sum(axis=0) + 0.5 * (stack[0] == c) for c in classes])
    return classes[votes.argmax(axis=0)].astype(stack.dtype)


def intensity(queries, _, class_of_grey):
    return [class_of_grey[q] for q in queries]


def identity(queries, *_):
    return list(queries)


BASELINES = {"copy_context": copy_context, "intensity": intensity, "identity": identity}


def class_of_grey_level(dataset: PreparedDataset, pool, read) -> np.ndarray:
    """(256,) class id per grey level: the class whose mean intensity over the pool is nearest."""
    rng = np.random.default_rng(0)
    chosen = [pool[i] for i in rng.permutation(len(pool))[:INTENSITY_FIT_SLICES]]
    sums, counts = np.zeros(LEVELS), np.zeros(LEVELS)
    for case, index in chosen:
        image = read(dataset.slice_path(dataset.input_folder, case, index)).astype(np.float64)
        label = read(dataset.slice_path(dataset.target_folder, case, index)).astype(np.int64)
        sums += np.bincount(label.ravel(), weights=image.ravel(), minlength=LEVELS)
        counts += np.bincount(label.ravel(), minlength=LEVELS)
    present = np.flatnonzero(counts)
    means = sums[present] / counts[present]
    return present[np.abs(np.arange(256)[:, None] - means[None]).argmin(axis=1)]


class Baselines:
    """The task's baselines for one dataset, fitted once; `predict` gives {name: predictions}."""

    def __init__(self, dataset: PreparedDataset, pool, read):
        self.names = get_task(dataset.task, dataset.dataset_dir).baselines
        self.class_of_grey = class_of_grey_level(dataset, pool, read) if "intensity" in self.names else None

    def predict(self, queries, contexts) -> dict:
        return {name: BASELINES[name](queries, contexts, self.class_of_grey) for name in self.names}
