"""Evaluates an MVG checkpoint in context on the test split of prepared datasets.

    python main_eval.py --checkpoint output_dir/checkpoint-last.pth --data_path data --output_dir eval

For every test slice (query) of every dataset, context pairs come from training cases only, chosen by
--context_policy (fixed, random, position or retrieval; seeded and recorded; evaluation/contexts.py).
Every setting of how canvases are drawn (model, canvas size, depth, label encoding) comes from the
checkpoint's record (util/record.py); a flag that contradicts it is refused unless --force. Slices meet
the canvas at the scale of the training crops (--scale training, see inference.py) or resized whole
(--scale fit). Predictions are decoded per query (segmentation: nearest colour of the query's own
context to class ids; image tasks: 8-bit grey).

Two protocols, each in its own table (--protocol):
    foreground  the test slices whose truth holds foreground (segmentation; other tasks: enough body),
                as the paper evaluates
    volume      every slice of each test volume, so false positives on slices without foreground
                count, as whole-volume Dice (nnU-Net's) does; needs test cases prepared with all
                their slices (datasets.prepare --test_slices all, the default)
Each case is scored on its true grid (evaluation/scoring.py): Dice and HD95 in mm for label targets,
PSNR and SSIM for image targets (inpainting also inside the removed region); --baselines scores the
task's baselines on the same queries and contexts (evaluation/baselines.py).

Writes <output_dir>/results.json (the settings used, then per dataset and protocol the summary and
every case), <dataset>_<protocol>_cases.csv, results.md (the tables, beside the paper's numbers) and
grids/<dataset>_*.png (context | context target | query | prediction | truth).
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass
from functools import lru_cache

from tqdm import tqdm

from datasets.manifest import PreparedDataset, find_datasets, read_png
from evaluation.baselines import Baselines
from evaluation.contexts import CONTEXT_POLICIES, ContextPicker
from evaluation.reports import PROTOCOLS, compare_results, markdown_tables, save_grids, save_predictions, write_case_csv
from evaluation.scoring import score_case, summarise
from flags import add_model_flags, add_prompt_flags, add_runtime_flags
from inference import Predictor, load_checkpoint
from label_encoding import LABEL_ENCODINGS
from tasks import TASK_NAMES, get_task
from util.cli import ArgumentParser, UsageError, log, run_main
from util.files import atomic_output, writable_folder
from util.runtime import resolve_precision


def get_args_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data and output")
    data.add_argument("--data_path", nargs="+", help="prepared roots (folders of datasets)")
    data.add_argument("--datasets", nargs="*", default=None, help="only these dataset names")
    data.add_argument("--tasks", nargs="*", default=None, choices=TASK_NAMES, help="only datasets of these tasks")
    data.add_argument("--output_dir", default="eval_output")
    data.add_argument(
        "--compare",
        nargs=2,
        metavar=("BEFORE", "AFTER"),
        help="instead of evaluating, print two results.json side by side (e.g. few-shot adaptation)",
    )
    data.add_argument(
        "--protocol",
        default="auto",
        choices=["auto", *PROTOCOLS, "both"],
        help="foreground slices (the paper's), whole volumes, or both; auto: both where the test "
        "cases hold all their slices, else foreground",
    )
    data.add_argument("--max_cases", type=int, default=0, help="evaluate at most this many test cases per dataset")
    data.add_argument("--grids", type=int, default=4, help="visual grids saved per dataset")
    data.add_argument(
        "--baselines",
        action="store_true",
        help="also score the task's baselines on the same queries and contexts (tasks.py)",
    )
    data.add_argument(
        "--save_predictions",
        action="store_true",
        help="also write predicted slices as PNG under <output_dir>/predictions/<dataset>/<case>/",
    )

    model = p.add_argument_group("model (defaults: what the checkpoint records)")
    model.add_argument("--checkpoint", help="checkpoint file (ours, the authors' or a bare state dict)")
    add_model_flags(model)
    add_runtime_flags(model)
    model.add_argument("--batch_size", type=int, default=8, help="queries per forward")

    context = p.add_argument_group("context")
    context.add_argument(
        "--context_policy",
        default="position",
        choices=CONTEXT_POLICIES,
        help="which training slices are a query's context pairs (evaluation/contexts.py)",
    )
    context.add_argument(
        "--context_cases",
        type=int,
        default=0,
        help="draw contexts from only the first k training cases in sorted order (few-shot); 0: all",
    )
    add_prompt_flags(context)
    context.add_argument("--seed", type=int, default=0)
    return p


# ---------------------------------------------------------------------------------------------------
# evaluation of one dataset


def protocols_of(dataset: PreparedDataset, test_cases, wanted: str) -> list:
    """The protocols a dataset is scored under (see the module docstring)."""
    complete = all(len(dataset.slice_indices(c)) == dataset.case(c)["num_slices"] for c in test_cases)
    if wanted == "auto":
        return ["foreground", "volume"] if complete else ["foreground"]
    chosen = list(PROTOCOLS) if wanted == "both" else [wanted]
    if "volume" in chosen and not complete:
        raise UsageError(
            f"--protocol {wanted}: the test cases of {dataset.dataset_dir} hold only some of their "
            f"slices; prepare it again with --test_slices all for whole-volume scores"
        )
    return chosen


@dataclass
class CaseRun:
    """One test case's predicted slices, with what they were predicted from."""

    indices: list  # predicted slice indices, in order
    foreground: set  # those whose truth holds foreground
    queries: list
    truths: list
    regions: list | None  # the task's region (inpainting's removed region) per slice, or None
    chosen: list  # per slice: [(context case, slice index), ...]
    contexts: list  # per slice: [(image, target), ...]
    preds: list
    baselines: dict  # baseline name -> predictions

    def selected(self, protocol: str) -> list:
        """Positions (into indices) of the slices a protocol scores."""
        return [j for j, i in enumerate(self.indices) if protocol == "volume" or i in self.foreground]


@dataclass
class DatasetRun:
    """What every case of a dataset is evaluated with."""

    dataset: PreparedDataset
    task: object  # tasks.Task
    protocols: list
    picker: ContextPicker
    predictor: Predictor
    baselines: Baselines | None
    class_ids: list
    read: object  # a caching read_png


def predict_case(run: DatasetRun, case_id: str) -> CaseRun:
    dataset, read = run.dataset, run.read
    foreground = dataset.foreground_slice_indices(case_id)
    indices = dataset.slice_indices(case_id) if "volume" in run.protocols else foreground
    queries = [read(dataset.slice_path(dataset.input_folder, case_id, i)) for i in indices]
    truths = [read(dataset.slice_path(dataset.target_folder, case_id, i)) for i in indices]
    region = run.task.region_folder
    regions = [read(dataset.slice_path(region, case_id, i)) for i in indices] if region else None
    chosen = [run.picker.pick(case_id, i, q) for i, q in zip(indices, queries)]
    contexts = [
        [
            (
                read(dataset.slice_path(dataset.input_folder, c, s)),
                read(dataset.slice_path(dataset.target_folder, c, s)),
            )
            for c, s in picks
        ]
        for picks in chosen
    ]
    # Class ids in the label files' own type: a volume's int64 maps would take gigabytes.
    preds = [p.astype(t.dtype) for p, t in zip(run.predictor.run(run.task, contexts, queries), truths)]
    return CaseRun(
        indices,
        set(foreground),
        queries,
        truths,
        regions,
        chosen,
        contexts,
        preds,
        run.baselines.predict(queries, contexts) if run.baselines else {},
    )


def score_picked(run: DatasetRun, case_id: str, case: CaseRun, picked: list, preds: list) -> dict:
    """Scores of the predictions at the picked positions of a case."""

    def by_index(values):
        return None if values is None else {case.indices[j]: values[j] for j in picked}

    return score_case(
        run.task, run.dataset, case_id, by_index(preds), by_index(case.truths), run.class_ids, by_index(case.regions)
    )


def score_protocols(run: DatasetRun, case_id: str, case: CaseRun, results, baseline_results):
    """Adds the case's scores under each protocol (a protocol with no slice of this case skips it)."""
    for protocol in run.protocols:
        picked = case.selected(protocol)
        if not picked:
            continue
        results[protocol][case_id] = scores = score_picked(run, case_id, case, picked, case.preds)
        scores["contexts"] = {str(case.indices[j]): [list(p) for p in case.chosen[j]] for j in picked}
        for name, preds in case.baselines.items():
            baseline_results[protocol].setdefault(name, {})[case_id] = score_picked(run, case_id, case, picked, preds)


def dataset_run(args, predictor: Predictor, dataset: PreparedDataset, test_cases) -> DatasetRun:
    task = get_task(dataset.task, dataset.dataset_dir)
    picker = ContextPicker(dataset, args.context_policy, args.num_prompts, args.seed, args.context_cases)
    class_ids = sorted(c for c in dataset.classes if c != 0) if task.target_is_label else []
    read = lru_cache(maxsize=4096)(read_png)
    baselines = Baselines(dataset, picker.pool, read) if args.baselines else None
    return DatasetRun(
        dataset, task, protocols_of(dataset, test_cases, args.protocol), picker, predictor, baselines, class_ids, read
    )


def evaluate_dataset(args, predictor: Predictor, dataset: PreparedDataset, out_dir: str) -> list:
    """One summary per protocol."""
    test_cases = dataset.case_ids("test")
    if not test_cases:
        raise UsageError(f"{dataset.dataset_dir}: the manifest has no test cases (prepare it with a test split)")
    if args.max_cases:
        test_cases = test_cases[: args.max_cases]
    run = dataset_run(args, predictor, dataset, test_cases)
    results, baseline_results = ({p: {} for p in run.protocols} for _ in range(2))
    grids_left = args.grids
    for case_id in tqdm(test_cases, desc=dataset.name):
        case = predict_case(run, case_id)
        score_protocols(run, case_id, case, results, baseline_results)
        if args.save_predictions:
            save_predictions(out_dir, dataset, case_id, case.indices, case.preds)
        grids_left -= save_grids(out_dir, dataset, case_id, case, run.task.target_is_label, run.class_ids, grids_left)
    summaries = []
    for protocol in run.protocols:
        summary = summarise(run.task, dataset, results[protocol], run.class_ids, protocol)
        summary["baselines"] = {
            name: {
                k: v for k, v in summarise(run.task, dataset, cases, run.class_ids, protocol).items() if k != "per_case"
            }
            for name, cases in baseline_results[protocol].items()
        }
        summaries.append(summary)
    return summaries


# ---------------------------------------------------------------------------------------------------
# the run


def load_datasets(args) -> list:
    folders = [p for root in args.data_path for p in find_datasets(root)]
    if args.datasets:
        missing = sorted(set(args.datasets) - {os.path.basename(p) for p in folders})
        if missing:
            raise UsageError(f"--datasets {' '.join(missing)}: not found under {' '.join(args.data_path)}")
        folders = [p for p in folders if os.path.basename(p) in args.datasets]
    datasets = [PreparedDataset(p) for p in folders]
    if args.tasks:
        datasets = [d for d in datasets if d.task in args.tasks]
    if not datasets:
        raise UsageError(
            f"--data_path {' '.join(args.data_path)}: no prepared dataset (folder with manifest.json"
            f"{' of tasks ' + ' '.join(args.tasks) if args.tasks else ''})"
        )
    return datasets


def build_predictor(args, datasets) -> tuple:
    """(Predictor, the settings used): the checkpoint's record, the flags where they agree or --force."""
    flags = {
        "model": args.model,
        "input_size": args.input_size,
        "depth": args.depth,
        "label_encoding": args.label_encoding,
    }
    segments = any(get_task(d.task, d.dataset_dir).target_is_label for d in datasets)
    model, settings = load_checkpoint(
        args.checkpoint, flags, args.force, required=("label_encoding",) if segments else ()
    )
    model.set_attention(args.attention)
    precision = resolve_precision(args.precision, args.device, inference=True)
    predictor = Predictor(
        model,
        device=args.device,
        precision=precision,
        batch_size=args.batch_size,
        label_encoding=settings["label_encoding"] or LABEL_ENCODINGS[0],
        num_prompts=args.num_prompts,
        ensemble=args.ensemble,
        seed=args.seed,
        scale=args.scale,
    )
    settings.update(
        scale=args.scale,
        attention=args.attention,
        context_policy=args.context_policy,
        num_prompts=args.num_prompts,
        ensemble=args.ensemble,
        precision=precision,
        seed=args.seed,
    )
    return predictor, settings


def check_args(args):
    if not args.checkpoint or not args.data_path:
        raise UsageError("--checkpoint and --data_path are required (unless --compare)")
    for flag in ("num_prompts", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be at least 1")


def evaluate(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.compare:
        log(compare_results(*args.compare).rstrip("\n"))
        return 0
    check_args(args)
    datasets = load_datasets(args)
    predictor, settings = build_predictor(args, datasets)
    writable_folder(os.path.join(args.output_dir, "grids"), "--output_dir")
    summaries = []
    for dataset in datasets:
        for summary in evaluate_dataset(args, predictor, dataset, args.output_dir):
            write_case_csv(args.output_dir, summary)
            summaries.append(summary)
    with atomic_output(os.path.join(args.output_dir, "results.json"), "w") as handle:
        json.dump({"settings": settings, "args": vars(args), "datasets": summaries}, handle, indent=1)
    table = markdown_tables(summaries)
    with atomic_output(os.path.join(args.output_dir, "results.md"), "w") as handle:
        handle.write(table)
    log(table)
    return 0


def main(argv=None):
    return run_main(evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
