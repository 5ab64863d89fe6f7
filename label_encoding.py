"""How segmentation labels become pictures for the model, and its pictures become labels again.

Training draws the target label maps of a canvas in one of three encodings (render_labels):
    random_colors  every class present gets a random colour, the same in both pairs of the sample
                   (the paper's best); background stays black
    grey           class k drawn as grey level 10k (of 255), the authors' code; at most 25 classes
    binary         one class present in the query (and the context, where they share one), drawn white,
                   against everything else in black
Training canvases draw a sample's crops straight into 8-bit pixels (draw_labels: render_labels'
colours, applied through one colour table). Inference draws each query's context labels with a
palette fixed by a seed and spread further apart than training's (inference_palette, drawing), and
decodes a prediction by the nearest of those colours (decode_nearest).
"""

import functools
from collections.abc import Callable, Sequence

import numpy as np

from util.cli import UsageError

LABEL_ENCODINGS = ("random_colors", "grey", "binary")
GREY_STEP = 10
MAX_GREY_CLASS = 25  # 10 * 25 = 250 is the last grey level that fits in 8 bits


def check_grey_ids(largest: int, where: str):
    """The grey encoding draws class k as 10k and cannot draw ids above MAX_GREY_CLASS."""
    if largest > MAX_GREY_CLASS:
        raise UsageError(
            f"{where}: label encoding 'grey' draws class k as grey level {GREY_STEP}k and stops "
            f"at class {MAX_GREY_CLASS}; found class {largest}: use random_colors or binary"
        )


def grey_colours(class_ids: np.ndarray) -> np.ndarray:
    """(K, 3) uint8 grey colours of the grey encoding."""
    return np.repeat((GREY_STEP * np.asarray(class_ids, dtype=np.int64))[:, None], 3, axis=1).astype(np.uint8)


def random_palette(num_colors: int, rng: np.random.Generator, tries: int = 8) -> np.ndarray:
    """(num_colors, 3) uint8 colours, none black, spread apart: the best of a few random draws by the
    smallest distance between two colours or to black, so nearest-colour decoding stays easy."""
    best, best_gap = None, -1.0
    for _ in range(tries if num_colors <= 64 else 1):
        colors = rng.integers(0, 256, size=(num_colors, 3))
        gap = smallest_gap(colors)
        if gap > best_gap and gap > 0:
            best, best_gap = colors, gap
    if best is None:  # only possible for thousands of classes: accept a duplicate-free draw instead
        codes = rng.choice(2**24 - 1, size=num_colors, replace=False) + 1
        best = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], axis=1)
    return best.astype(np.uint8)


def smallest_gap(colours: np.ndarray) -> float:
    """The smallest distance between two of colours (K, 3), black included."""
    points = np.concatenate([np.zeros((1, 3)), colours.astype(np.float64)])
    gaps = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.eye(len(points)) * 1e9
    return float(gaps.min())


def render_labels(labels: Sequence[np.ndarray], encoding: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Class-id maps of one training sample -> (3, rows, cols) uint8 pictures, one colour per class
    shared by all maps; the last map is the query's (the binary encoding picks its class there)."""
    size = int(max(label.max() for label in labels)) + 1
    present = np.flatnonzero(sum(np.bincount(label.ravel(), minlength=size) for label in labels))
    foreground = present[present != 0]
    lut = np.zeros((size, 3), dtype=np.uint8)
    if encoding == "random_colors":
        if len(foreground):
            lut[foreground] = random_palette(len(foreground), rng)
    elif encoding == "grey":
        if len(foreground):
            check_grey_ids(int(foreground.max()), "training label")
        lut[foreground] = grey_colours(foreground)
    elif encoding == "binary":
        candidates = binary_candidates(labels, foreground)
        if len(candidates):
            lut[rng.choice(candidates)] = 255
    else:
        raise ValueError(f"unknown label encoding '{encoding}'; choose one of {LABEL_ENCODINGS}")
    channels = [np.ascontiguousarray(lut[:, c]) for c in range(3)]
    return [np.stack([channel.take(label) for channel in channels]) for label in labels]


def binary_candidates(labels: Sequence[np.ndarray], foreground: np.ndarray) -> np.ndarray:
    """The classes the binary encoding may draw: those in every map (the context then shows the
    class it asks for), else those in the query, else any foreground. A class the context lacks
    leaves its picture black, and with it nothing to say which task the query's white mask answers.
    On the demo's region slabs a context from another case lacks the query's subcortical or
    cerebellar territory about half the time (0.53, 0.52)."""
    in_query = np.flatnonzero(np.bincount(labels[-1].ravel()))
    in_query = in_query[in_query != 0]
    shared = in_query
    for label in labels[:-1]:
        shared = np.intersect1d(shared, label.ravel())
    if len(shared):
        return shared
    return in_query if len(in_query) else foreground


# Inference colours are the best of many random draws, training's stay the paper's random ones (best of
# 8). A prediction decodes by its nearest colour, and where the model is unsure it blends colours,
# towards black most of all: a class drawn dark, or near another class's colour, then decodes wrong.
# The demo's random-colour model scored a mean Dice of 0.649, 0.704 and 0.648 under palette seeds 0-2
# at 8 tries (its cerebellar territory 0.28-0.82, by the colour drawn for it), and 0.675, 0.680 and
# 0.675 at 256 (bench/README.md).
INFERENCE_PALETTE_TRIES = 256


def inference_palette(class_ids: Sequence[int], encoding: str, seed: int = 0) -> np.ndarray:
    """(len(class_ids), 3) uint8 colours for the foreground classes, fixed for a given seed."""
    class_ids = np.asarray(class_ids, dtype=np.int64)
    if encoding == "grey":
        if len(class_ids):
            check_grey_ids(int(class_ids.max()), "context label")
        return grey_colours(class_ids)
    return spread_palette(len(class_ids), seed).copy()


@functools.lru_cache(maxsize=64)
def spread_palette(num_colors: int, seed: int) -> np.ndarray:
    """The inference palette of num_colors classes (cached: every query of a run asks for it)."""
    return random_palette(num_colors, np.random.default_rng(seed), tries=INFERENCE_PALETTE_TRIES)


def drawing(class_ids: np.ndarray, colours: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Class-id map -> (3, rows, cols) uint8 picture in the given colours, black elsewhere."""
    lut = np.zeros((int(class_ids.max()) + 1, 3), dtype=np.uint8)
    lut[class_ids] = colours
    return lambda label: lut[np.where(label < len(lut), label, 0)].transpose(2, 0, 1)  # other ids black


def nearest_colour(picture: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(3, rows, cols) float picture -> index of the nearest of colours (K, 3), per pixel."""
    flat = picture.reshape(3, -1).T.astype(np.float32)  # (pixels, 3)
    palette = colours.astype(np.float32)
    distances = (flat**2).sum(1, keepdims=True) - 2 * flat @ palette.T + (palette**2).sum(1)
    return distances.argmin(axis=1).reshape(picture.shape[1:])


def decode_nearest(picture: np.ndarray, class_ids: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """A predicted (3, rows, cols) picture -> class ids: background (black) or one of class_ids, whichever
    colour is nearest."""
    palette = np.concatenate([np.zeros((1, 3), np.uint8), colours])
    return np.concatenate([[0], class_ids])[nearest_colour(picture, palette)]


def decode_brightest(brightness: dict) -> np.ndarray:
    """Binary encoding: {class id: (rows, cols) brightness of its own pass} -> class ids; each pixel takes
    its brightest class if that is above half, else background."""
    ids = np.array(sorted(brightness))
    stack = np.stack([brightness[c] for c in ids])
    return np.where(stack.max(axis=0) > 127.5, ids[stack.argmax(axis=0)], 0)


def draw_labels(labels: Sequence[np.ndarray], encoding: str, rng: np.random.Generator, out: Sequence[np.ndarray]):
    """The class-id crops of one sample drawn into out, (3, rows, cols) uint8 each, as render_labels
    draws them: render_labels chooses the colours from which ids each map holds (and nothing else),
    so it is given just those ids, which takes the same random draws, and the colour table it gives
    them is applied here, once per channel."""
    present = [ids_present(label) for label in labels]
    lut = np.zeros((3, max(int(held[-1]) for held in present) + 1), dtype=np.uint8)
    for held, colours in zip(present, render_labels(present, encoding, rng)):
        lut[:, held] = colours
    for label, picture in zip(labels, out):
        rows = max(1, TAKE_BLOCK // label.shape[1])
        for top in range(0, label.shape[0], rows):
            block = label[top : top + rows]
            for channel in range(3):  # "clip": no buffered copy of the output; every id fits the table
                np.take(lut[channel], block, out=picture[channel, top : top + rows], mode="clip")


# take() first copies its indices to 64-bit integers. For a whole 448x448 crop that copy (1.6 MB) is
# above glibc's mmap threshold, so every call maps fresh pages and faults them in; in blocks of 14336
# pixels (112 KiB of indices, 32 rows of 448) the copy reuses heap memory: measured 1.36x more
# canvases/s without the slice cache, and no slower with it.
TAKE_BLOCK = 14336


# Up to this many ids, ids_present compares the map with each id: cheaper than counting every pixel
# (np.bincount converts the whole map to 64-bit indices first).
FEW_IDS = 32


def ids_present(label: np.ndarray) -> np.ndarray:
    """The ids a class-id map holds, ascending."""
    top = int(label.max())
    if top < FEW_IDS:
        return np.array([i for i in range(top + 1) if (label == i).any()])
    return np.flatnonzero(np.bincount(label.ravel()))
