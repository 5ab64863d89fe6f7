"""The README's demo: MVG trained and evaluated in context on real MRI, on a CPU, in minutes.

Data: the MNI152 2009 T1 template with its grey/white matter maps, shipped in the nilearn wheel
(nothing is downloaded). datasets/mni_demo.py cuts it into axial slabs that act as cases, held-out
slabs far from the training ones, and builds two tasks:
    MNI_tissue   segmentation: background / CSF-ish / grey matter / white matter
    MNI_denoise  denoising: Rician noise (6% of the bright end) -> clean T1
Then the project's own tools: datasets.prepare, main_pretrain.py (a small MVG for a bounded time),
main_eval.py on the held-out slabs with baselines on the same queries and contexts:
    copy_context  the context's label as the answer;  intensity  nearest class-mean intensity;
    identity      the noisy input as the denoised answer.

    scripts/demo.sh                  # about 10 minutes of training on 2 cores
    scripts/demo.sh --minutes 30     # longer training, better numbers
    scripts/demo.sh --steps 800      # a fixed number of steps: the same numbers on any machine
    python -m scripts.demo --help    # the same, in an environment that is already set up
"""

import argparse
import json
import os
import resource
import shutil
import sys
import time

import torch

import main_eval
import main_pretrain
from datasets import prepare
from datasets.canvas import InContextDataset, to_model_inputs
from datasets.mixture import Mixture
from datasets.mni_demo import write_demo_sources
from label_encoding import LABEL_ENCODINGS
from masking_generator import MaskPolicy
from models_mvg import create_model
from util.cli import ArgumentParser, UsageError, log, run_main

# The demo's model and canvas: a 6-block ViT-Ti on 256x128 canvases (two 128x128 pairs cropped from
# 144x144 slices), small enough to learn on two CPU cores in minutes. --fast shrinks everything
# further for the test suite, which only checks that every stage runs and writes its files.
FULL = dict(size=144, input_size=(256, 128), depth=6, batch_size=8, mask=(32, 4, 16))
FAST = dict(size=40, input_size=(64, 32), depth=4, batch_size=2, mask=(2, 1, 2))


def get_args_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_output", help="everything the demo writes")
    p.add_argument("--minutes", type=float, default=10.0, help="training time budget")
    p.add_argument(
        "--steps",
        type=int,
        help="train exactly this many steps instead (reproducible results whatever the machine or its load)",
    )
    p.add_argument("--workers", type=int, default=1, help="data loading processes during training")
    p.add_argument(
        "--label_encoding",
        default="grey",
        choices=LABEL_ENCODINGS,
        help="how labels are drawn; 'grey' (the authors' code) learns within minutes on a CPU, "
        "'random_colors' (the paper's best) needs much longer training",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="a few steps at tiny sizes: checks the pipeline only")
    p.add_argument("--fresh", action="store_true", help="delete --out first (default: reuse prepared data)")
    return p


def stage(title):
    log(f"\n=== {title}")


def build_data(out, config, seed):
    prepared = os.path.join(out, "prepared")
    tissue, denoise, test_cases = write_demo_sources(os.path.join(out, "sources"), seed=seed)
    common = ["--out", prepared, "--size", str(config["size"]), "--test_cases", test_cases]
    for argv in (
        ["msd", "--root", tissue, "--dataset", "MNI_tissue", *common],
        [
            "denoising",
            "--root",
            denoise,
            "--low_dose",
            "noisy/*.nii.gz",
            "--normal_dose",
            "clean/*.nii.gz",
            "--modality",
            "MRI",
            "--dataset",
            "MNI_denoise",
            *common,
        ],
    ):
        if prepare.main(argv) != 0:
            raise UsageError(f"preparing the demo data failed (the reason is above): {' '.join(argv)}")
    return prepared


def write_mixture(prepared, out):
    """Segmentation, the harder task, gets three quarters of the canvases."""
    path = os.path.join(out, "mixture.json")
    with open(path, "w") as handle:
        json.dump(
            {
                "datasets": [
                    {"path": os.path.abspath(os.path.join(prepared, "MNI_tissue")), "weight": 3},
                    {"path": os.path.abspath(os.path.join(prepared, "MNI_denoise")), "weight": 1},
                ]
            },
            handle,
        )
    return path


def seconds_per_step(prepared, config):
    """Times a few training steps of the demo configuration, to fit the run into the budget."""
    torch.manual_seed(0)
    grid = (config["input_size"][0] // 16, config["input_size"][1] // 16)
    count, smallest, largest = config["mask"]
    data = InContextDataset(
        Mixture.of([prepared]),
        MaskPolicy(grid, count, smallest, largest, half_mask_ratio=0.5),
        input_size=config["input_size"],
    )
    model = create_model("mvg_vit_tiny_patch16", input_size=config["input_size"], depth=config["depth"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    items = [data[i] for i in range(config["batch_size"])]
    batch = to_model_inputs(torch.utils.data.default_collate(items), torch.device("cpu"))
    times = []
    for _ in range(4):
        start = time.perf_counter()
        loss, _, _ = model(batch["imgs"], batch["tgts"], batch["mask"], batch["valid"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return sorted(times)[1] * 1.15  # the loop's data loading and logging on top of the bare step


def training_steps(prepared, config, args) -> int:
    if args.fast:
        return 3
    if args.steps:
        return args.steps
    return max(20, int(args.minutes * 60 / seconds_per_step(prepared, config)))


def train(prepared, out, config, args):
    steps = training_steps(prepared, config, args)
    epochs = 1 if args.fast else 10
    samples_per_epoch = max(1, steps // epochs) * config["batch_size"]
    count, smallest, largest = config["mask"]
    height, width = config["input_size"]
    run_dir = os.path.join(out, "train")
    log(f"{steps} steps of batch {config['batch_size']} in {epochs} epoch(s)")
    flags = (
        f"--model mvg_vit_tiny_patch16 --depth {config['depth']} --input_size {height} {width} "
        f"--batch_size {config['batch_size']} --epochs {epochs} --samples_per_epoch {samples_per_epoch} "
        # From scratch: a high learning rate, no layer-wise decay (nothing pretrained to protect).
        "--lr 1e-3 --layer_decay 1.0 --warmup_epochs 0.5 --weight_decay 0.05 "
        f"--num_mask_patches {count} --min_mask_patches_per_block {smallest} "
        f"--max_mask_patches_per_block {largest} --half_mask_ratio 0.5 "
        # Train as the evaluation asks: the context pair comes from another case (slab).
        f"--context_from other_case --label_encoding {args.label_encoding} --device cpu --precision fp32 "
        f"--num_workers {args.workers} --seed {args.seed} --save_every_epochs 0 --save_every_steps 200 "
        "--print_freq 20 --vis_every_steps 100"
    )
    # Paths go in as whole words: they may hold spaces.
    main_pretrain.main([*flags.split(), "--mixture", write_mixture(prepared, out), "--output_dir", run_dir])
    return os.path.join(run_dir, "checkpoint-last.pth")


def evaluate(checkpoint, prepared, out, fast):
    """main_eval.py's results {(dataset, protocol): summary}; the label encoding and the rest come from
    the checkpoint's record."""
    eval_dir = os.path.join(out, "eval")
    argv = [
        "--checkpoint",
        checkpoint,
        "--data_path",
        prepared,
        "--output_dir",
        eval_dir,
        "--device",
        "cpu",
        "--context_policy",
        "retrieval",
        "--baselines",
        "--grids",
        "4",
        "--batch_size",
        "8",
    ]
    if fast:
        argv += ["--max_cases", "1"]
    if main_eval.main(argv) != 0:
        raise UsageError("the evaluation failed (the reason is above)")
    with open(os.path.join(eval_dir, "results.json")) as handle:
        return {(d["dataset"], d["protocol"]): d for d in json.load(handle)["datasets"]}, eval_dir


def report(results, eval_dir, out, timings):
    tissue, denoise = results["MNI_tissue", "foreground"], results["MNI_denoise", "foreground"]
    model_dice, copy_dice = tissue["dice"], tissue["baselines"]["copy_context"]["dice"]
    model_psnr, noisy_psnr = denoise["psnr"], denoise["baselines"]["identity"]["psnr"]
    lines = [
        "| held-out slabs | MVG (this run) | copy the context label | intensity classifier | noisy input |",
        "|---|---|---|---|---|",
        f"| tissue mean Dice | {model_dice:.3f} | {copy_dice:.3f} | {tissue['baselines']['intensity']['dice']:.3f} | - |",
    ]
    for c, v in tissue["classes"].items():
        lines.append(
            f"| Dice {v['name']} | {v['dice']:.3f} | {tissue['baselines']['copy_context']['classes'][c]['dice']:.3f} "
            f"| {tissue['baselines']['intensity']['classes'][c]['dice']:.3f} | - |"
        )
    whole = results.get(("MNI_tissue", "volume"))
    if whole is not None:  # every slice of the held-out slabs, background-only ones included
        lines.append(
            f"| tissue mean Dice, whole slabs | {whole['dice']:.3f} | "
            f"{whole['baselines']['copy_context']['dice']:.3f} | "
            f"{whole['baselines']['intensity']['dice']:.3f} | - |"
        )
    lines.append(f"| denoising PSNR (dB) | {model_psnr:.2f} | - | - | {noisy_psnr:.2f} |")
    lines.append(f"| denoising SSIM | {denoise['ssim']:.3f} | - | - | {denoise['baselines']['identity']['ssim']:.3f} |")
    verdicts = [
        f"Dice: MVG {'beats' if model_dice > copy_dice else 'does NOT beat'} copying the context label "
        f"({model_dice:.3f} vs {copy_dice:.3f})",
        f"PSNR: MVG {'beats' if model_psnr > noisy_psnr else 'does NOT beat'} the noisy input "
        f"({model_psnr:.2f} vs {noisy_psnr:.2f} dB)",
    ]
    grids = sorted(f for f in os.listdir(os.path.join(eval_dir, "grids")) if f.startswith("MNI_tissue"))
    if grids:
        shutil.copy(os.path.join(eval_dir, "grids", grids[len(grids) // 2]), os.path.join(out, "demo.png"))
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    text = "\n".join(
        lines
        + [""]
        + verdicts
        + [
            "",
            f"time: {timing}; peak memory {peak:.2f} GiB",
            f"grid (context | context label | query | MVG | truth): {out}/demo.png",
            f"all tables: {eval_dir}/results.md",
        ]
    )
    with open(os.path.join(out, "summary.md"), "w") as handle:
        handle.write(text + "\n")
    log("\n" + text)
    return model_dice > copy_dice and model_psnr > noisy_psnr


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    config = FAST if args.fast else FULL
    if args.fresh and os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out, exist_ok=True)
    timings = {}
    start = time.perf_counter()
    stage("1/3 data: MNI152 slabs -> prepared slices (datasets.prepare)")
    prepared = build_data(args.out, config, args.seed)
    timings["data"] = time.perf_counter() - start
    budget = "a few steps" if args.fast else f"{args.steps} steps" if args.steps else f"about {args.minutes:g} minutes"
    stage(f"2/3 training MVG on the CPU ({budget})")
    start = time.perf_counter()
    checkpoint = train(prepared, args.out, config, args)
    timings["training"] = time.perf_counter() - start
    stage("3/3 evaluation on the held-out slabs (main_eval.py, with baselines)")
    start = time.perf_counter()
    results, eval_dir = evaluate(checkpoint, prepared, args.out, args.fast)
    timings["evaluation"] = time.perf_counter() - start
    report(results, eval_dir, args.out, timings)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
