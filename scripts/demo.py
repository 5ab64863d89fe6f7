"""The README's demo: one MVG trained on several tasks at once, on real MRI, on a CPU, in minutes; the
context pair alone tells it which task a query asks for.

Data: the MNI152 2009 T1 template with its grey/white matter maps, shipped in the nilearn wheel
(nothing is downloaded). datasets/mni_demo.py cuts it into axial slabs that act as cases, holds out
slabs far from the training ones, and draws on the same slices:
    MNI_tissue       background / CSF-ish / grey matter / white matter (ids 1, 2, 3)
    MNI_brain        background / brain (id 1)
    MNI_hemispheres  background / left / right (ids 1, 2): intensity cannot tell them apart
    MNI_regions      background / cerebral / subcortical / cerebellar territories (ids 1, 2, 3): each
                     brain voxel takes the group of its nearest of Seitzman et al.'s (2018) 300 ROIs
    MNI_denoise      Rician noise (6% of the bright end) -> clean T1
    MNI_inpaint      T1 with a disc removed from every slice of the slab -> the whole T1 (--image_tasks)
The class ids collide across label sets, so a query slice alone does not say what to paint. Each slab
lies in a pose of its own (rotation, shift, size), and every training slab comes in three poses.
Then the project's own tools: datasets.prepare, main_pretrain.py (a small MVG, trained in stretches,
each followed by main_eval.py for the learning curve), main_eval.py on the held-out slabs with baselines
on the same queries and contexts (the three most alike training slices of other slabs per query):
    copy_context  the context labels' per-pixel vote as the answer;  intensity  nearest class-mean
    intensity;  identity  the noisy or voided input as the answer.
Finally every held-out query is run once with a context from each label set in turn (context_switch).

    scripts/demo.sh                  # 800 steps: about 6 minutes of training on 2 quiet cores
    scripts/demo.sh --steps 3200     # longer training
    scripts/demo.sh --minutes 30     # as many steps as this machine manages in 30 minutes
    python -m scripts.demo --help    # the same, in an environment that is already set up
"""

import argparse
import json
import os
import shlex
import shutil
import sys
import time

import torch

import main_eval
import main_pretrain
from datasets import prepare
from datasets.canvas import InContextDataset, to_model_inputs
from datasets.mixture import Mixture
from datasets.mni_demo import LABEL_SETS, write_demo_sources
from label_encoding import LABEL_ENCODINGS
from masking_generator import MaskPolicy
from models_mvg import create_model
from scripts import demo_report
from util.cli import ArgumentParser, UsageError, log, run_main

# The demo's model and canvas: a 6-block ViT-Ti on 256x128 canvases (two 128x128 pairs cropped from
# 144x144 slices), small enough to learn on two CPU cores in minutes. --fast shrinks everything
# further for the test suite, which only checks that every stage runs and writes its files.
FULL = dict(
    model="mvg_vit_tiny_patch16",
    size=144,
    input_size=(256, 128),
    depth=6,
    batch_size=8,
    mask=(32, 4, 16),
    curve_points=5,
)
FAST = dict(
    model="mvg_vit_tiny_patch16", size=40, input_size=(64, 32), depth=4, batch_size=2, mask=(2, 1, 2), curve_points=2
)
IMAGE_TASKS = ("MNI_denoise", "MNI_inpaint")
# A fixed step count, not a time budget, by default: on a slower or busier machine the demo takes
# longer instead of training less (under load, 10 minutes gave 246 steps and a model below both
# baselines; 800 steps give the README's table).
DEFAULT_STEPS = 800
# Context pairs per held-out query: the most alike training slices, the model's predictions under
# each ensembled (main_eval.py --num_prompts) and the copy baseline voting over the same labels. One
# context misses what that one slice lacks (the cerebellum of a higher slice, say).
CONTEXTS_PER_QUERY = 3


def get_args_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_output", help="everything the demo writes")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"training steps (default {DEFAULT_STEPS}, about six minutes on 2 quiet cores): the same training "
        "whatever the machine's speed or load; float summation order still differs between CPUs",
    )
    budget.add_argument(
        "--minutes", type=float, help="train for about this long instead: as many steps as this machine manages"
    )
    p.add_argument("--batch_size", type=int, help=f"canvases per step (default: {FULL['batch_size']})")
    p.add_argument("--workers", type=int, default=1, help="data loading processes during training")
    p.add_argument(
        "--label_encoding",
        default="binary",
        choices=LABEL_ENCODINGS,
        help="how labels are drawn; 'binary' (one class at a time, white on black) learns within minutes "
        "on a CPU; 'grey' (the authors' code) and 'random_colors' (the paper's best) need much longer",
    )
    p.add_argument(
        "--label_sets",
        nargs="+",
        default=list(LABEL_SETS),
        choices=list(LABEL_SETS),
        help="segmentation label sets drawn on the slabs (datasets/mni_demo.py)",
    )
    p.add_argument(
        "--image_tasks",
        nargs="*",
        default=["MNI_denoise"],
        choices=list(IMAGE_TASKS),
        help="image-to-image tasks trained alongside (inpainting needs far more than the default budget)",
    )
    p.add_argument(
        "--train_args",
        default="",
        help="more main_pretrain.py flags, after the demo's own (so they win), e.g. "
        "--train_args='--lr 3e-4 --background_weight 1'",
    )
    p.add_argument(
        "--specialists",
        action="store_true",
        help="also train one model per label set on that set alone, same steps (multiplies training time)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="a few steps at tiny sizes: checks the pipeline only")
    p.add_argument("--fresh", action="store_true", help="delete --out first (default: reuse prepared data)")
    return p


def stage(title):
    log(f"\n=== {title}")


def prepare_arguments(sources, args) -> list[list[str]]:
    """datasets.prepare's command lines, one per demo dataset."""
    runs = [
        ["msd", "--root", sources.label_sets[name], "--dataset", LABEL_SETS[name].dataset] for name in args.label_sets
    ]
    if "MNI_denoise" in args.image_tasks:
        noisy_clean = ["--low_dose", "noisy/*.nii.gz", "--normal_dose", "clean/*.nii.gz", "--modality", "MRI"]
        runs.append(["denoising", "--root", sources.denoise, *noisy_clean, "--dataset", "MNI_denoise"])
    if "MNI_inpaint" in args.image_tasks:
        runs.append(["brats-inpainting", "--root", sources.inpaint, "--dataset", "MNI_inpaint"])
    return runs


def build_data(out, config, args):
    prepared = os.path.join(out, "prepared")
    sources = write_demo_sources(os.path.join(out, "sources"), label_sets=args.label_sets, seed=args.seed)
    common = ["--out", prepared, "--size", str(config["size"]), "--test_cases", sources.test_cases]
    for argv in prepare_arguments(sources, args):
        if prepare.main([*argv, *common]) != 0:
            raise UsageError(f"preparing the demo data failed (the reason is above): {' '.join(argv)}")
    return prepared


def write_mixture(prepared, out, datasets):
    """Each image task as often as all label sets together, each label set equally often. Painting
    an MRI slice is what denoising asks, and binary label sets teach the model to paint white masks;
    at equal weights (1 canvas in 5 for denoising with four label sets) the denoised slices came out
    at 17.41 dB against the noisy input's 24.04, and at 1 in 2 at 23.68 dB, with the label sets
    unchanged (mean Dice 0.642 and 0.645 after 800 steps, bench/README.md)."""
    path = os.path.join(out, "mixture.json")
    label_sets = sum(name not in IMAGE_TASKS for name in datasets)
    entries = [
        {"path": os.path.abspath(os.path.join(prepared, name)), "weight": label_sets if name in IMAGE_TASKS else 1}
        for name in datasets
    ]
    with open(path, "w") as handle:
        json.dump({"datasets": entries}, handle)
    return path


def seconds_per_step(prepared, config):
    """Times a few training steps of the demo configuration, to fit the run into the budget."""
    torch.manual_seed(0)
    model = create_model(config["model"], input_size=config["input_size"], depth=config["depth"])
    grid = (config["input_size"][0] // model.patch_size, config["input_size"][1] // model.patch_size)
    count, smallest, largest = config["mask"]
    data = InContextDataset(
        Mixture.of([prepared]),
        MaskPolicy(grid, count, smallest, largest, half_mask_ratio=0.5),
        input_size=config["input_size"],
        patch_size=model.patch_size,
    )
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


# The schedule's epochs (warm-up is half of one). main_pretrain.py runs whole epochs, so the demo's
# steps are a whole number of them.
EPOCHS = 10


def training_steps(prepared, config, args) -> int:
    if args.fast:
        return 3
    if args.minutes is None:
        wanted = args.steps
    else:
        wanted = int(args.minutes * 60 / seconds_per_step(prepared, config))
    steps = whole_epochs(wanted)
    if steps != wanted:
        log(f"{wanted} steps rounded to {steps}: a whole number of the schedule's {EPOCHS} epochs")
    return steps


def whole_epochs(steps: int) -> int:
    """The nearest step count that fills EPOCHS equal epochs, at least one step each."""
    return max(1, round(steps / EPOCHS)) * EPOCHS


def curve_steps(steps: int, points: int) -> list[int]:
    """Where training pauses for an evaluation: `points` steps evenly spread, the last one included."""
    return sorted({max(1, round(steps * (k + 1) / points)) for k in range(points)})


def training_arguments(config, args, steps, mixture, run_dir) -> list[str]:
    epochs = 1 if args.fast else EPOCHS
    samples_per_epoch = steps // epochs * config["batch_size"]
    count, smallest, largest = config["mask"]
    height, width = config["input_size"]
    flags = (
        f"--model {config['model']} --depth {config['depth']} --input_size {height} {width} "
        f"--batch_size {config['batch_size']} --epochs {epochs} --samples_per_epoch {samples_per_epoch} "
        # From scratch: a high learning rate, no layer-wise decay (nothing pretrained to protect).
        "--lr 1e-3 --layer_decay 1.0 --warmup_epochs 0.5 --weight_decay 0.05 "
        f"--num_mask_patches {count} --min_mask_patches_per_block {smallest} "
        f"--max_mask_patches_per_block {largest} --half_mask_ratio 0.5 "
        # Train as the evaluation asks: the context pair comes from another case (slab).
        f"--context_from other_case --label_encoding {args.label_encoding} --device cpu --precision fp32 "
        # Black target pixels count fully: at the authors' 0.1, painting the whole brain white for
        # "left hemisphere" costs a tenth of the error, and a binary model learns exactly that.
        "--background_weight 1 "
        f"--num_workers {args.workers} --seed {args.seed} --save_every_epochs 0 --save_every_steps 200 "
        "--print_freq 20 --vis_every_steps 100 --auto_resume"
    )
    # Paths go in as whole words: they may hold spaces.
    return [*flags.split(), "--mixture", mixture, "--output_dir", run_dir, *shlex.split(args.train_args)]


def evaluate(checkpoint, prepared, eval_dir, datasets, fast, grids=0, protocol="both"):
    """main_eval.py's results {(dataset, protocol): summary}, baselines included; the label encoding
    and the rest come from the checkpoint's record."""
    argv = ["--checkpoint", checkpoint, "--data_path", prepared, "--output_dir", eval_dir, "--datasets", *datasets]
    argv += ["--device", "cpu", "--context_policy", "retrieval", "--num_prompts", str(CONTEXTS_PER_QUERY)]
    argv += ["--grids", str(grids), "--batch_size", "8"]
    # fp32 whatever the CPU, so that a fixed --steps gives the same table on CPUs with and without bf16.
    argv += ["--baselines", "--protocol", protocol, "--precision", "fp32"]
    if fast:
        argv += ["--max_cases", "1"]
    if main_eval.main(argv) != 0:
        raise UsageError("the evaluation failed (the reason is above)")
    with open(os.path.join(eval_dir, "results.json")) as handle:
        return {(d["dataset"], d["protocol"]): d for d in json.load(handle)["datasets"]}


RUN_MARKER = "written_by_scripts_demo"


def fresh_run_dir(run_dir):
    """An empty training folder. One left by an earlier demo (it holds RUN_MARKER) is removed: its
    steps and schedule may differ, and training would resume from it. Any other existing folder is
    the user's, and is left alone."""
    if os.path.isdir(run_dir):
        if not os.path.exists(os.path.join(run_dir, RUN_MARKER)):
            raise UsageError(f"{run_dir}: exists and was not written by the demo; choose another --out")
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, RUN_MARKER), "w") as handle:
        handle.write("scripts/demo.py replaces this folder when it runs again\n")


def train_with_curve(prepared, out, config, args, steps, label_datasets, datasets):
    """Trains in stretches that end at the curve's steps (each stretch resumes exactly where the last
    stopped, so the final model is the one an uninterrupted run gives) and evaluates the label sets
    after each but the last, whose point the final evaluation gives (main); returns the checkpoint,
    the curve {step: results} and the seconds spent training."""
    run_dir = os.path.join(out, "train")
    fresh_run_dir(run_dir)
    flags = training_arguments(config, args, steps, write_mixture(prepared, out, datasets), run_dir)
    log(
        f"{steps} steps of batch {config['batch_size']}, evaluated after steps {curve_steps(steps, config['curve_points'])}"
    )
    checkpoint, curve, seconds = os.path.join(run_dir, "checkpoint-last.pth"), {}, 0.0
    for step in curve_steps(steps, config["curve_points"]):
        start = time.perf_counter()
        main_pretrain.main([*flags, "--stop_after_steps", str(step)])
        seconds += time.perf_counter() - start
        if step == steps:
            break
        curve_dir = os.path.join(out, "curve", f"step{step:05d}")
        curve[step] = evaluate(checkpoint, prepared, curve_dir, label_datasets, args.fast, protocol="foreground")
    return checkpoint, curve, seconds


def train_specialists(prepared, out, config, args, steps, label_datasets) -> dict:
    """{label set: mean Dice} of one model per label set, trained on that set alone for as many steps
    as the generalist, evaluated the same way: what sharing one model across tasks costs or gains."""
    scores = {}
    for name in label_datasets:
        folder = os.path.join(out, "specialists", name)
        run_dir = os.path.join(folder, "train")
        fresh_run_dir(run_dir)
        flags = training_arguments(config, args, steps, write_mixture(prepared, folder, [name]), run_dir)
        log(f"specialist for {name}: {steps} steps on {name} alone")
        main_pretrain.main([*flags, "--stop_after_steps", str(steps)])
        checkpoint = os.path.join(run_dir, "checkpoint-last.pth")
        results = evaluate(checkpoint, prepared, os.path.join(folder, "eval"), [name], args.fast, protocol="foreground")
        scores[name] = results[name, "foreground"]["dice"]
    return scores


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: must be at least 1")
    if args.minutes is not None and args.minutes <= 0:
        raise UsageError(f"--minutes {args.minutes:g}: must be more than 0")
    config = dict(FAST if args.fast else FULL)
    if args.batch_size:
        config["batch_size"] = args.batch_size
    if args.fresh and os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out, exist_ok=True)
    label_datasets = [LABEL_SETS[name].dataset for name in args.label_sets]
    datasets = label_datasets + [name for name in IMAGE_TASKS if name in args.image_tasks]
    timings = {}
    start = time.perf_counter()
    stage("1/4 data: MNI152 slabs -> prepared slices (datasets.prepare)")
    prepared = build_data(args.out, config, args)
    timings["data"] = time.perf_counter() - start
    budget = (
        "a few steps" if args.fast else f"about {args.minutes:g} minutes" if args.minutes else f"{args.steps} steps"
    )
    stage(f"2/4 training one MVG on all {len(datasets)} tasks on the CPU ({budget}), with a learning curve")
    steps = training_steps(prepared, config, args)  # once: the specialists train as many
    start = time.perf_counter()
    checkpoint, curve, timings["training"] = train_with_curve(
        prepared, args.out, config, args, steps, label_datasets, datasets
    )
    timings["curve evaluations"] = time.perf_counter() - start - timings["training"]
    stage("3/4 evaluation on the held-out slabs (main_eval.py, with baselines)")
    start = time.perf_counter()
    eval_dir = os.path.join(args.out, "eval")
    results = evaluate(checkpoint, prepared, eval_dir, datasets, args.fast, grids=4)
    curve[steps] = results  # the curve's last point: the same model, queries and contexts
    timings["evaluation"] = time.perf_counter() - start
    stage("4/4 context switching: every held-out query with a context from each label set")
    start = time.perf_counter()
    switch = demo_report.context_switch(checkpoint, prepared, label_datasets, args.out, args.fast, CONTEXTS_PER_QUERY)
    timings["context switching"] = time.perf_counter() - start
    specialists = None
    if args.specialists:
        stage("specialists: one model per label set, the same number of steps each")
        start = time.perf_counter()
        specialists = train_specialists(prepared, args.out, config, args, steps, label_datasets)
        timings["specialists"] = time.perf_counter() - start
    demo_report.write_summary(args.out, results, curve, switch, label_datasets, timings, specialists)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
