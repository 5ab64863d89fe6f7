"""Inference speed: query slices per second through Predictor.segment (canvas building, model, decoding).

Queries and contexts are real MNI152 T1 slices with tissue labels (from the nilearn wheel) at 512x512,
the size of prepared slices; the model has random weights (speed does not depend on them).

    python -m bench.bench_inference --models mvg_vit_tiny_patch16 mvg_vit_base_patch16 --slices 8
    python -m bench.bench_inference --models mvg_vit_large_patch16 --device cuda --precision bf16 --slices 256

Each model runs at every --scale given (training: overlapping windows at the training-crop scale, four
per 512 slice on 448 halves; fit: the slice resized whole), timed one after the other.
"""

import argparse
import sys
import time

import numpy as np
import torch
from PIL import Image

from datasets.mni_demo import load_template, tissue_labels
from flags import SCALES, add_runtime_flags
from inference import Predictor
from models_mvg import MODELS, create_model
from util.cli import ArgumentParser, log, run_main
from util.runtime import resolve_precision


def parse_args(argv=None):
    """The arguments, --precision resolved for --device as evaluation resolves it."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models", nargs="+", default=["mvg_vit_tiny_patch16", "mvg_vit_base_patch16"], choices=sorted(MODELS)
    )
    p.add_argument("--input_size", type=int, nargs=2, default=(896, 448), metavar=("H", "W"))
    p.add_argument("--slices", type=int, default=8, help="query slices timed per model")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--num_prompts", type=int, default=1)
    p.add_argument("--scale", nargs="+", default=list(SCALES), choices=SCALES)
    add_runtime_flags(p)
    args = p.parse_args(argv)
    args.precision = resolve_precision(args.precision, args.device, inference=True)
    return args


def mni_slices(count):
    """(image, label) pairs of axial MNI152 slices at 512x512, spread over the brain."""
    t1 = np.asarray(load_template("t1").dataobj, dtype=np.float32)
    labels = tissue_labels(
        np.asarray(load_template("gm").dataobj) / 255.0, np.asarray(load_template("wm").dataobj) / 255.0
    )
    t1 = (255 * (t1 - t1.min()) / (t1.max() - t1.min())).astype(np.uint8)
    pairs = []
    for z in np.linspace(60, 130, count).round().astype(int):
        image = Image.fromarray(np.flipud(t1[:, :, z].T)).resize((512, 512), Image.BILINEAR)
        label = Image.fromarray(np.flipud(labels[:, :, z].T)).resize((512, 512), Image.NEAREST)
        pairs.append((np.asarray(image), np.asarray(label)))
    return pairs


def main(argv=None):
    args = parse_args(argv)
    pairs = mni_slices(args.slices + args.num_prompts)
    contexts = pairs[: args.num_prompts]
    queries = [image for image, _ in pairs[args.num_prompts :]]
    log(
        f"{args.slices} query slices of 512x512, canvas {args.input_size[0]}x{args.input_size[1]}, "
        f"{args.num_prompts} prompt(s), batch {args.batch_size}, {args.device}, {args.precision}"
    )
    log("| model | scale | slices/s | ms per slice |")
    log("|---|---|---|---|")
    for name in args.models:
        model = create_model(name, input_size=args.input_size)
        model.set_attention(args.attention)
        for scale in args.scale:
            predictor = Predictor(
                model,
                device=args.device,
                precision=args.precision,
                batch_size=args.batch_size,
                num_prompts=args.num_prompts,
                scale=scale,
            )
            seconds = time_segmentation(predictor, contexts, queries, args)
            log(f"| {name} | {scale} | {args.slices / seconds:.2f} | {1000 * seconds / args.slices:.0f} |")


def time_segmentation(predictor, contexts, queries, args) -> float:
    """Seconds to segment every query, after a warm-up batch."""
    predictor.segment(contexts, queries[: args.batch_size])
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    predictor.segment(contexts, queries)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(run_main(main))
