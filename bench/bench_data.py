"""Data speed: training canvases per second per worker, the previous path against the current one.

Prepares the real MNI152 T1 template with its tissue labels (from the nilearn wheel) at 512x512, as
the authors' slices are, unless --data points at prepared roots. Then builds the same items three
ways in one process with one thread, as one DataLoader worker runs: --repeats rounds of --items
items, the three paths taking turns every 10 items (the order rotating):

    previous        every slice decoded from its PNG for every canvas, labels drawn by
                    render_labels, the canvases normalised to float32 and the valid map built in
                    the worker (the path before the slice cache and 8-bit canvases)
    current         InContextDataset as it is: slices from the shared cache (datasets.slice_cache,
                    filled as slices are first met), 8-bit canvases; normalising moves to the device
    current, no cache   the same with a cache of 0 bytes: what a worker gets on data far larger than
                    its cache, every slice decoded

and prints the median canvases/s of each, with the CPU model. With --authors_repo (a checkout of the
authors' release) a fourth path takes its turns too:

    authors         their MVGDataset (med_dataset.py) on the same prepared slices, reached through a
                    folder of links in the layout it expects: every slice decoded twice per item,
                    float32 canvases normalised and the valid map built in the worker, labels drawn
                    as their grey levels (compare with --label_encoding grey)

Then prints the median canvases/s of each path. Then a DataLoader with --workers
processes per path (a fresh dataset each, so the current path starts with an empty cache), and
what to_model_inputs costs per canvas on this CPU (on a GPU it runs there).

    python -m bench.bench_data                          # MNI152 segmentation, 896x448 canvases
    python -m bench.bench_data --data /data/prepared --workers 8 --model_samples_per_s 20
    python -m bench.bench_data --authors_repo /tmp/authors_mvg --label_encoding grey
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.authors import authors_module
from datasets import prepare
from datasets.canvas import InContextDataset, to_model_inputs
from datasets.manifest import read_png
from datasets.mixture import Mixture
from datasets.mni_demo import write_mni152_tissue_case
from label_encoding import LABEL_ENCODINGS, render_labels
from masking_generator import MaskPolicy, sample_rng
from pixels import to_normalised_tensor
from tasks import TASK_NAMES
from util.cli import ArgumentParser, UsageError, log, run_main


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="*", default=[], help="prepared roots (default: prepare MNI152 in a temp dir)")
    p.add_argument("--input_size", type=int, nargs=2, default=(896, 448), metavar=("H", "W"))
    p.add_argument("--label_encoding", default="random_colors", choices=LABEL_ENCODINGS)
    p.add_argument("--items", type=int, default=150, help="items per path and round in the single process")
    p.add_argument("--repeats", type=int, default=5, help="rounds of the three paths in turns")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader figures")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument(
        "--model_samples_per_s",
        type=float,
        default=0.0,
        help="training samples/s of one accelerator (from bench_model.py), for comparison",
    )
    p.add_argument("--authors_repo", default="", help="a checkout of the authors' release: time their dataset too")
    args = p.parse_args(argv)
    if args.authors_repo and not os.path.isfile(os.path.join(args.authors_repo, "med_dataset.py")):
        raise UsageError(f"--authors_repo {args.authors_repo}: no med_dataset.py there (a checkout of their release?)")
    return args


# ---------------------------------------------------------------------------------------------------
# the previous path, kept for the comparison (and for tests/test_canvas_pixels.py, which holds the
# current path to its values)


class PreviousPath(torch.utils.data.Dataset):
    """Items of `dataset` built as before the slice cache and 8-bit canvases: the same choices and
    random draws, every slice decoded from its file, float32 canvases normalised in the worker and a
    float32 valid map. Returns what to_model_inputs returns for the current path's items."""

    def __init__(self, dataset: InContextDataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        data = self.dataset
        rng = sample_rng(data.seed, data.epoch, index)
        choice = data._choose(rng)
        source = data.sources[choice.source_id]
        target_is_label = source.task.target_is_label
        images, targets = [], []
        for pair in (choice.context, choice.query):
            input_path, target_path = pair.input_path, pair.target_path
            if choice.swap:
                input_path, target_path = target_path, input_path
            image, target = data.augment(read_png(input_path), read_png(target_path), target_is_label, rng)
            images.append(np.ascontiguousarray(image))
            targets.append(np.ascontiguousarray(target))
        if target_is_label:
            targets = render_labels(targets, data.label_encoding, rng)
            drawn = np.concatenate([t.any(axis=0) for t in targets])
            valid = np.where(drawn, np.float32(1.0), np.float32(source.task.background_weight))
        else:
            valid = np.ones(data.input_size, dtype=np.float32)
        mask, _ = data.mask_policy(source.task.name, rng)
        return {
            "imgs": to_normalised_tensor(images),
            "tgts": to_normalised_tensor(targets),
            "mask": torch.from_numpy(mask.reshape(-1)),
            "valid": torch.from_numpy(valid)[None],
            "task": TASK_NAMES.index(source.task.name),
            "dataset": choice.source_id,
        }


# The folders the authors' MVGDataset lists whatever it is asked to load: their nine segmentation
# datasets, the inpainting one (with image/) and the modality-transfer one (with t1c/).
AUTHORS_SEGMENTATION = ("ACDC", "LA", "LungCT", "amosct", "amosmr", "btcv", "promise", "prostate_ultrasound", "word")
AUTHORS_OTHER_FOLDERS = ("brainLocal/image", "brainGLI/t1c")


class AuthorsPath(torch.utils.data.Dataset):
    """The authors' MVGDataset on one prepared segmentation dataset (image/<case>/<slice>.png and
    label/<case>/<slice>.png, their layout too), linked in as their first dataset, the others empty.
    Indices wrap around its slices."""

    def __init__(self, repo: str, dataset_folder: str, links_folder: Path, grid: tuple[int, int]):
        module = authors_module(repo, "med_dataset")
        masking_module = authors_module(repo, "utils/masking_generator")
        links_folder.mkdir(parents=True, exist_ok=True)
        (links_folder / AUTHORS_SEGMENTATION[0]).symlink_to(os.path.abspath(dataset_folder))
        for name in (*(f"{name}/image" for name in AUTHORS_SEGMENTATION[1:]), *AUTHORS_OTHER_FOLDERS):
            (links_folder / name).mkdir(parents=True)
        generator = masking_module.MaskingGenerator(grid, num_masking_patches=grid[0] * grid[1] // 4)
        self.dataset = module.MVGDataset(str(links_folder), generator, half_mask_ratio=0.5)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[index % len(self.dataset)]


def first_dataset_folder(root: str) -> str:
    """The first prepared dataset of a root (a folder holding image/ and label/)."""
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if os.path.isdir(os.path.join(folder, "image")) and os.path.isdir(os.path.join(folder, "label")):
            return folder
    raise UsageError(f"{root}: no prepared segmentation dataset (image/ and label/) for the authors' dataset")


# ---------------------------------------------------------------------------------------------------
# measuring


def prepared_mni(folder: Path) -> Path:
    write_mni152_tissue_case(folder / "mni")
    out = folder / "prepared"
    code = prepare.main(
        [
            "msd",
            "--root",
            str(folder / "mni"),
            "--out",
            str(out),
            "--dataset",
            "MNI152",
            "--size",
            "512",
            "--test_fraction",
            "0",
        ]
    )
    if code:
        raise UsageError("preparing MNI152 failed (the reason is above)")
    return out


def cpu_model() -> str:
    """The CPU as /proc/cpuinfo names it (model name, family and model numbers), and how many cores
    this process may use."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name", "unknown CPU")
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return f"{name}, {len(os.sched_getaffinity(0))} cores available"


CHUNK = 10  # items each path builds in one turn


def items_per_second(data, first: int, count: int) -> float:
    start = time.perf_counter()
    for index in range(first, first + count):
        data[index]
    return count / (time.perf_counter() - start)


def loader_per_second(data, args) -> float:
    loader = torch.utils.data.DataLoader(
        data, batch_size=args.batch_size, num_workers=args.workers, sampler=range(args.items * args.workers)
    )
    start = time.perf_counter()
    count = sum(batch["imgs"].shape[0] for batch in loader)
    return count / (time.perf_counter() - start)


def alternating_rates(paths: dict, args) -> dict:
    """{path name: canvases/s per round}. Every round times other items, so the cache holds only what
    earlier rounds (and this round's earlier items) decoded. The paths take turns every CHUNK items, in
    an order that rotates, so that a burst of load from elsewhere falls on all of them alike."""
    names = list(paths)
    rates = {name: [] for name in names}
    for round_ in range(args.repeats):
        seconds = dict.fromkeys(names, 0.0)
        first = 1 + round_ * args.items
        for turn, start in enumerate(range(first, first + args.items, CHUNK)):
            count = min(CHUNK, first + args.items - start)
            for name in names[turn % len(names) :] + names[: turn % len(names)]:
                seconds[name] += count / items_per_second(paths[name], start, count)
        for name in names:
            rates[name].append(args.items / seconds[name])
        log(f"round {round_ + 1}: " + ", ".join(f"{name} {rates[name][-1]:.1f}" for name in names))
    return rates


def conversion_seconds(dataset, batch_size: int) -> float:
    """Seconds per canvas of to_model_inputs on the CPU (the mean of 3 calls after a warm-up)."""
    batch = torch.utils.data.default_collate([dataset[i] for i in range(batch_size)])
    to_model_inputs(batch, torch.device("cpu"))
    start = time.perf_counter()
    for _ in range(3):
        to_model_inputs(batch, torch.device("cpu"))
    return (time.perf_counter() - start) / 3 / batch_size


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)  # one worker's worth of CPU, as in a DataLoader worker
    with tempfile.TemporaryDirectory() as tmp:
        roots = args.data or [str(prepared_mni(Path(tmp)))]
        grid = (args.input_size[0] // 16, args.input_size[1] // 16)

        def dataset(**kwargs):
            return InContextDataset(
                Mixture.of(roots),
                MaskPolicy(input_size=grid),
                input_size=args.input_size,
                label_encoding=args.label_encoding,
                **kwargs,
            )

        current = dataset()
        log(current.describe())
        log(f"CPU: {cpu_model()}; torch {torch.__version__}, 1 thread")
        paths = {
            "previous": PreviousPath(dataset()),
            "current": current,
            "current, no cache": dataset(slice_cache_bytes=0),
        }
        if args.authors_repo:
            paths["authors"] = AuthorsPath(
                args.authors_repo, first_dataset_folder(roots[0]), Path(tmp) / "authors", grid
            )
        for data in paths.values():
            data[0]  # imports and first-call costs out of the timings
        rates = alternating_rates(paths, args)
        cache = current.slice_cache
        log(f"slice cache: {cache.cached_slices()} slices, {cache.used_bytes() / 2**20:.1f} MiB in shared memory")

        conversion = conversion_seconds(current, args.batch_size)

        pooled = {
            "previous": loader_per_second(PreviousPath(dataset()), args),
            "current": loader_per_second(dataset(), args),
        }

    names = list(paths)
    previous = statistics.median(rates["previous"])
    log("")
    log(f"canvases/s in one process (one worker), median of {args.repeats} rounds of {args.items} items:")
    for name in names:
        median = statistics.median(rates[name])
        log(
            f"  {name:<18} {median:7.1f}  ({1000 / median:.2f} ms per canvas; {median / previous:.2f}x the "
            f"previous path; rounds {', '.join(f'{r:.1f}' for r in rates[name])})"
        )
    if "authors" in rates:
        authors = statistics.median(rates["authors"])
        log(f"the current path builds {statistics.median(rates['current']) / authors:.2f}x the authors' canvases/s")
    log(
        f"to_model_inputs on this CPU: {1000 * conversion:.2f} ms per canvas (normalising and the valid map, "
        "which the previous path did in the worker; on a GPU it runs there)"
    )
    for name, rate in pooled.items():
        log(
            f"canvases/s with {args.workers} DataLoader workers, batch {args.batch_size}, {name}: {rate:.1f} "
            f"({rate / args.workers:.1f} per worker, start-up, an empty cache and collation included)"
        )
    if args.model_samples_per_s:
        single = statistics.median(rates["current"])
        log(
            f"the model trains {args.model_samples_per_s:.1f} samples/s per accelerator: "
            f"{args.model_samples_per_s / single:.2f} workers of the current path's speed keep up with it"
        )


if __name__ == "__main__":
    sys.exit(run_main(main))
