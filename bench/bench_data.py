"""Data speed: training canvases per second per worker, beside what the model consumes.

Prepares the real MNI152 T1 template with its tissue labels (from the nilearn wheel) at 512x512, as
the authors' slices are, unless --data points at prepared roots; then times InContextDataset items
(four PNG decodes, crops, label rendering, normalisation, mask) in one process, and a DataLoader
with --workers processes.

    python -m bench.bench_data                          # MNI152 segmentation, 896x448 canvases
    python -m bench.bench_data --data /data/prepared --workers 8 --model_samples_per_s 20
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from datasets import prepare
from datasets.canvas import InContextDataset, Mixture
from datasets.mni_demo import write_mni152_tissue_case
from label_encoding import LABEL_ENCODINGS
from masking_generator import MaskPolicy
from util.cli import ArgumentParser, UsageError, log, run_main


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="*", default=[], help="prepared roots (default: prepare MNI152 in a temp dir)")
    p.add_argument("--input_size", type=int, nargs=2, default=(896, 448), metavar=("H", "W"))
    p.add_argument("--label_encoding", default="random_colors", choices=LABEL_ENCODINGS)
    p.add_argument("--items", type=int, default=200, help="items timed in the single process")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the second figure")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument(
        "--model_samples_per_s",
        type=float,
        default=0.0,
        help="training samples/s of one accelerator (from bench_model.py), for comparison",
    )
    return p.parse_args(argv)


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


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)  # one worker's worth of CPU, as in a DataLoader worker
    with tempfile.TemporaryDirectory() as tmp:
        roots = args.data or [str(prepared_mni(Path(tmp)))]
        grid = (args.input_size[0] // 16, args.input_size[1] // 16)
        data = InContextDataset(
            Mixture.of(roots),
            MaskPolicy(input_size=grid),
            input_size=args.input_size,
            label_encoding=args.label_encoding,
        )
        log(data.describe())
        data[0]
        start = time.perf_counter()
        for index in range(args.items):
            data[index]
        single = args.items / (time.perf_counter() - start)

        loader = torch.utils.data.DataLoader(
            data, batch_size=args.batch_size, num_workers=args.workers, sampler=range(args.items * args.workers)
        )
        start = time.perf_counter()
        count = sum(batch["imgs"].shape[0] for batch in loader)
        pooled = count / (time.perf_counter() - start)

    log(f"canvases/s in one process (one worker): {single:.1f} ({1000 / single:.1f} ms per canvas)")
    log(
        f"canvases/s with {args.workers} DataLoader workers, batch {args.batch_size}: {pooled:.1f} "
        f"({pooled / args.workers:.1f} per worker, start-up and collation included)"
    )
    if args.model_samples_per_s:
        needed = args.model_samples_per_s / single
        log(
            f"the model trains {args.model_samples_per_s:.1f} samples/s per accelerator: "
            f"{needed:.2f} workers of this speed keep up with it"
        )


if __name__ == "__main__":
    sys.exit(run_main(main))
