"""Our ViT-L against the authors' released model, side by side: a training step (forward, backward,
AdamW) at the same canvas, batch, mask and precision, the two models taking turns step by step, and the
peak resident memory of a one-step process of each. Each side steps the optimizer its own training
script builds over layer-decay groups (0.75, weight decay 0.05): ours the fused AdamW of
pretrain_setup.build_optimizer, theirs torch's default per-tensor AdamW.

The authors' code is not part of this repository: point --authors_repo at a checkout of their release
(the folder holding their models_mvg.py and utils/), for example

    git clone https://github.com/OliverRensu/MVG /tmp/authors_mvg
    python -m bench.bench_vs_authors --authors_repo /tmp/authors_mvg --input_size 448 224 --batch_size 2

Their model is built from its class with the settings of their ViT-L factory (which fixes the canvas at
896x448) and the canvas asked for. Both models see the same random canvases and the autoregressive mask
(the whole query target hidden); the loss weights are all ones.
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial

import torch
import torch.nn as nn

from bench.authors import authors_module
from models_mvg import create_model
from pretrain_setup import build_optimizer
from util.cli import ArgumentParser, UsageError, log, run_main
from util.runtime import PRECISIONS, autocast, default_device, resolve_precision

IMPLEMENTATIONS = ("ours", "authors")
WEIGHT_DECAY, LAYER_DECAY = 0.05, 0.75


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authors_repo", required=True, help="a checkout of the authors' release")
    p.add_argument("--input_size", type=int, nargs=2, default=(448, 224), metavar=("H", "W"))
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--device", default=default_device())
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=PRECISIONS)
    p.add_argument("--attention", default="auto", help="our attention path (models_mvg.ATTENTION_PATHS)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model; medians are reported")
    p.add_argument("--memory_of", default="", help=argparse.SUPPRESS)  # internal: implementation,precision
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.authors_repo, "models_mvg.py")):
        raise UsageError(f"--authors_repo {args.authors_repo}: no models_mvg.py there (a checkout of their release?)")
    args.precision = [resolve_precision(precision, args.device) for precision in args.precision]
    return args


def authors_optimizer(repo: str, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of their main_pretrain.py: their layer-decay groups, torch's default AdamW."""
    lr_decay = authors_module(repo, "utils/lr_decay")
    groups = lr_decay.param_groups_lrd(model, WEIGHT_DECAY, model.no_weight_decay(), layer_decay=LAYER_DECAY)
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.999))


def authors_model(repo: str, input_size) -> nn.Module:
    """Their MVG class with their ViT-L factory's settings, on the asked canvas."""
    return authors_module(repo, "models_mvg").MVG(
        img_size=tuple(input_size), patch_size=16, embed_dim=1024, depth=24, num_heads=16, drop_path_rate=0.1,
        window_size=0, qkv_bias=True, mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        window_block_indexes=(), residual_block_indexes=[], use_rel_pos=True, decoder_embed_dim=64,
    )  # fmt: skip


class Contender:
    """One model with its optimizer and batch; `step` runs one training step."""

    def __init__(self, implementation, args, precision):
        self.device = torch.device(args.device)
        torch.manual_seed(0)
        if implementation == "ours":
            self.model = create_model("mvg_vit_large_patch16", input_size=args.input_size).to(self.device)
            self.model.set_attention(args.attention)
            settings = argparse.Namespace(weight_decay=WEIGHT_DECAY, layer_decay=LAYER_DECAY)
            self.optimizer = build_optimizer(self.model, settings, 1e-4, self.device)
        else:
            self.model = authors_model(args.authors_repo, args.input_size).to(self.device)
            self.optimizer = authors_optimizer(args.authors_repo, self.model)
        self.model.train()
        n, (height, width) = args.batch_size, args.input_size
        self.imgs = torch.randn(n, 3, height, width, device=self.device)
        self.tgts = torch.randn(n, 3, height, width, device=self.device)
        grid = (height // 16, width // 16)
        self.mask = torch.zeros(n, *grid, dtype=torch.bool, device=self.device)
        self.mask[:, grid[0] // 2 :] = True
        self.valid = torch.ones_like(self.tgts)
        self.implementation, self.precision = implementation, precision

    def step(self):
        with autocast(self.device, self.precision):
            if self.implementation == "ours":
                loss = self.model(self.imgs, self.tgts, self.mask.flatten(1))[0]
            else:
                loss = self.model(self.imgs, self.tgts, self.mask, self.valid.clone())[0]
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_step(self) -> float:
        start = time.perf_counter()
        self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def step_times(args, precision) -> dict:
    """{implementation: [seconds per timed step]}, the two models taking turns."""
    contenders = {name: Contender(name, args, precision) for name in IMPLEMENTATIONS}
    for contender in contenders.values():
        for _ in range(args.warmup):
            contender.step()
    times = {name: [] for name in contenders}
    for _ in range(args.steps):
        for name, contender in contenders.items():
            times[name].append(contender.timed_step())
    return times


def release_cached_memory(device: str) -> None:
    """Hands the freed models' accelerator memory back, so the next precision's memory runs fit."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def peak_memory_gib(args, implementation, precision) -> float:
    """Peak resident memory of a fresh process that builds one model and runs one step."""
    argv = [sys.executable, "-m", __spec__.name, "--authors_repo", args.authors_repo, "--input_size",
            *map(str, args.input_size), "--batch_size", str(args.batch_size), "--device", args.device,
            "--attention", args.attention, "--memory_of", f"{implementation},{precision}"]  # fmt: skip
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise UsageError(f"the memory run of {implementation} {precision} failed (its error is above)")
    return json.loads(done.stdout.strip().splitlines()[-1]) / 2**30


def one_step_peak(args, implementation, precision) -> int:
    """This process's peak bytes after one step: on CUDA the most the allocator held, on the CPU the
    peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the
    parent through fork and exec, and the parent holds both models."""
    contender = Contender(implementation, args, precision)
    contender.step()
    if contender.device.type == "cuda":
        return torch.cuda.max_memory_allocated(contender.device)
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return kib * 1024


def main(argv=None):
    args = parse_args(argv)
    if args.memory_of:
        log(json.dumps(one_step_peak(args, *args.memory_of.split(","))))
        return
    torch.set_num_threads(torch.get_num_threads())
    # Each row is printed as soon as it is measured, so a later precision that fails loses nothing.
    header = [
        f"ViT-L, canvas {args.input_size[0]}x{args.input_size[1]}, batch {args.batch_size}, {args.device}, "
        f"our attention '{args.attention}'; train step seconds (median of {args.steps} alternating, min-max)",
        "",
        "| precision | authors' step (s) | our step (s) | speed-up | authors' peak (GiB) | our peak (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    log("\n".join(header))
    for precision in args.precision:
        # The one-step processes run first: on an accelerator the timed models' memory, still cached
        # by this process's allocator, would leave them too little room.
        peaks = {name: peak_memory_gib(args, name, precision) for name in IMPLEMENTATIONS}
        times = step_times(args, precision)
        release_cached_memory(args.device)
        median = {name: statistics.median(values) for name, values in times.items()}
        spread = {name: f"{min(values):.2f}-{max(values):.2f}" for name, values in times.items()}
        log(
            f"| {precision} | {median['authors']:.2f} ({spread['authors']}) | {median['ours']:.2f} ({spread['ours']}) "
            f"| {median['authors'] / median['ours']:.2f}x | {peaks['authors']:.2f} | {peaks['ours']:.2f} |"
        )


if __name__ == "__main__":
    sys.exit(run_main(main))
