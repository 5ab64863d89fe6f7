"""Evaluates an MVG checkpoint in context on the test split of prepared datasets.

    python main_eval.py --checkpoint output_dir/checkpoint-last.pth --data_path data --output_dir eval

For every test slice (query) of every dataset, context pairs come from training cases only, chosen by
--context (seeded and recorded):
    fixed      the same K slices for every query (middle slice of K training cases)
    random     K random training slices per query
    position   per query, K training cases, each giving its slice nearest in relative position in its
               volume, (index + 0.5) / slices, the same definition as predict.py's
    retrieval  the K training slices whose 16x16 thumbnails are nearest to the query's (L2 after
               standardising each thumbnail), at most one per case
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
Each case is scored on its true grid: its slices placed at their indices in the volume with the
volume's voxel spacing (scaled to the prepared slice size), slices that were not kept as background,
and one-slice volumes (pictures, radiographs) in 2D (metrics.py): Dice and HD95 in mm for
segmentation, PSNR and SSIM for image tasks (inpainting also inside the removed region).

Writes <output_dir>/results.json (the settings used, then per dataset and protocol the summary and
every case), <dataset>_<protocol>_cases.csv, results.md (the tables, beside the paper's numbers) and
grids/<dataset>_*.png (context | context target | query | prediction | truth).
"""
import argparse
import csv
import json
import math
import os
import sys
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import metrics
from datasets.canvas import LABEL_ENCODINGS, resize_picture
from datasets.manifest import PreparedDataset, find_datasets, read_png
from inference import SCALES, Predictor, inference_palette, load_checkpoint
from masking_generator import TASKS
from models_mvg import ATTENTION_PATHS
from util.cli import UsageError, run_main
from util.files import atomic_output, path_below, writable_folder

CONTEXT_POLICIES = ('fixed', 'random', 'position', 'retrieval')
PROTOCOLS = {'foreground': "foreground slices (the paper's protocol)", 'volume': 'whole volumes'}
THUMBNAIL = 16

# Paper, Table 2 (segmentation score, 0-1) in its column order: name keys match prepared dataset
# names case- and punctuation-insensitively.
PAPER_SEGMENTATION = [
    (('amosct', 'amos'), 'AMOS CT', 0.73, 0.52, 0.20, 0.87),
    (('word',), 'WORD', 0.74, 0.48, 0.29, 0.90),
    (('btcv',), 'BTCV', 0.73, 0.45, 0.37, 0.91),
    (('amosmri', 'amosmr'), 'AMOS MRI', 0.74, 0.51, 0.25, 0.88),
    (('microsegnet',), 'MicroSegNet', 0.91, 0.69, 0.71, 0.97),
    (('promise12', 'promise'), 'PROMISE12', 0.85, 0.68, 0.55, 0.93),
    (('chestdefect', 'chestxray', 'defect'), 'Chest defect', 0.79, 0.50, 0.55, 0.90),
    (('acdc',), 'ACDC', 0.85, 0.52, 0.54, 0.90),
    (('la', 'leftatrium'), 'LA', 0.81, 0.55, 0.57, 0.89),
]
# Read off the paper's chart, approximately (dB).
PAPER_IMAGE_PSNR = {'denoising': 33.0, 'inpainting': 34.0, 'synthesis': 24.0}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', help='checkpoint file (ours, the authors\' or a bare state dict)')
    p.add_argument('--model', default=None, help='factory name (default: the one the checkpoint records)')
    p.add_argument('--input_size', type=int, nargs=2, default=None, metavar=('H', 'W'),
                   help='canvas size (default: the checkpoint\'s, else 896 448)')
    p.add_argument('--depth', type=int, default=None, help='transformer blocks (default: the checkpoint\'s)')
    p.add_argument('--data_path', nargs='+', help='prepared roots (folders of datasets)')
    p.add_argument('--compare', nargs=2, metavar=('BEFORE', 'AFTER'),
                   help='instead of evaluating, print two results.json side by side (e.g. few-shot adaptation)')
    p.add_argument('--datasets', nargs='*', default=None, help='only these dataset names')
    p.add_argument('--tasks', nargs='*', default=None, choices=TASKS, help='only datasets of these tasks')
    p.add_argument('--output_dir', default='eval_output')
    p.add_argument('--context', default='position', choices=CONTEXT_POLICIES)
    p.add_argument('--num_prompts', type=int, default=1, help='context pairs per query')
    p.add_argument('--ensemble', default='features', choices=['features', 'outputs', 'both'])
    p.add_argument('--context_cases', type=int, default=0,
                   help='draw contexts from only the first k training cases in sorted order (few-shot); 0: all')
    p.add_argument('--label_encoding', default=None, choices=LABEL_ENCODINGS,
                   help='how context labels are drawn (default: the one the checkpoint records; needed for '
                        'checkpoints that record none)')
    p.add_argument('--force', action='store_true',
                   help='use --model/--input_size/--depth/--label_encoding even where they contradict the checkpoint')
    p.add_argument('--attention', default='auto', choices=ATTENTION_PATHS,
                   help='how attention adds the relative-position bias (all exact); auto: the fastest for the device')
    p.add_argument('--scale', default='training', choices=SCALES,
                   help='training: slices at the scale of the training crops, in overlapping windows; '
                        'fit: each slice resized whole to the canvas half (faster, objects smaller)')
    p.add_argument('--protocol', default='auto', choices=['auto', *PROTOCOLS, 'both'],
                   help='foreground slices (the paper\'s), whole volumes, or both; auto: both where the test '
                        'cases hold all their slices, else foreground')
    p.add_argument('--max_cases', type=int, default=0, help='evaluate at most this many test cases per dataset')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--precision', default='fp32', choices=['fp32', 'bf16', 'fp16'])
    p.add_argument('--batch_size', type=int, default=8, help='queries per forward')
    p.add_argument('--grids', type=int, default=4, help='visual grids saved per dataset')
    p.add_argument('--baselines', action='store_true',
                   help='also score simple baselines on the same queries and contexts: copy the context label '
                        'and a nearest class-mean intensity classifier (segmentation), the input itself (image tasks)')
    p.add_argument('--save_predictions', action='store_true',
                   help='also write predicted slices as PNG under <output_dir>/predictions/<dataset>/<case>/')
    p.add_argument('--seed', type=int, default=0)
    return p


# ---------------------------------------------------------------------------------------------------
# context choice


def _key(*parts) -> int:
    return zlib.crc32('/'.join(map(str, parts)).encode())


class ContextPicker:
    """Chooses context slices (case id, slice index) from training cases; see the module docstring."""

    def __init__(self, dataset: PreparedDataset, policy: str, k: int, seed: int, context_cases: int = 0):
        self.dataset, self.policy, self.k, self.seed = dataset, policy, k, seed
        cases = dataset.case_ids('train')
        if context_cases:  # the first k in sorted order: the cases a mixture's num_cases trains on
            cases = cases[:context_cases]
        self.cases = [c for c in cases if dataset.slice_indices(c)]
        if not self.cases:
            raise ValueError(f"{dataset.name}: no training case with slices to take contexts from")
        self.pool = [(c, i) for c in self.cases for i in dataset.slice_indices(c)]
        self.fixed = [(c, self._middle(c)) for c in self._choose_cases(np.random.default_rng(seed))]
        self.thumbnails = None
        if policy == 'retrieval':
            self.thumbnails = np.stack([self.thumbnail(read_png(dataset.slice_path(dataset.input_folder, c, i)))
                                        for c, i in tqdm(self.pool, desc=f'{dataset.name}: context thumbnails',
                                                         leave=False)])

    def _middle(self, case):
        slices = self.dataset.slice_indices(case)
        return slices[len(slices) // 2]

    def _choose_cases(self, rng):
        """K cases, distinct while there are enough."""
        return rng.choice(self.cases, size=self.k, replace=len(self.cases) < self.k).tolist()

    @staticmethod
    def thumbnail(image: np.ndarray) -> np.ndarray:
        small = np.asarray(Image.fromarray(image).resize((THUMBNAIL, THUMBNAIL), Image.BOX), np.float32).ravel()
        return (small - small.mean()) / (small.std() + 1e-6)

    def pick(self, case_id: str, index: int, query_image: np.ndarray):
        rng = np.random.default_rng([self.seed, _key(self.dataset.name, case_id, index)])
        if self.policy == 'fixed':
            return self.fixed
        if self.policy == 'random':
            chosen = rng.choice(len(self.pool), size=self.k, replace=len(self.pool) < self.k)
            return [self.pool[i] for i in chosen]
        if self.policy == 'position':
            target = self.dataset.slice_position(case_id, index)
            picks = []
            for case in self._choose_cases(rng):
                slices = self.dataset.slice_indices(case)
                picks.append((case, min(slices, key=lambda s: abs(self.dataset.slice_position(case, s) - target))))
            return picks
        distances = ((self.thumbnails - self.thumbnail(query_image)) ** 2).sum(axis=1)
        picks, used = [], set()
        for i in np.argsort(distances):
            case = self.pool[i][0]
            if case not in used or len(used) >= len(self.cases):
                picks.append(self.pool[i])
                used.add(case)
            if len(picks) == self.k:
                break
        return picks


# ---------------------------------------------------------------------------------------------------
# evaluation of one dataset


def prepared_spacing(dataset: PreparedDataset, case_id: str):
    """(slice, row, col) spacing in mm of a case's stack of prepared slices."""
    record = dataset.case(case_id)
    spacing = record['canonical']['spacing']
    axis = record['slice_axis']
    u, v = [a for a in range(3) if a != axis]
    plan = record['resize']
    # picture = flipud(slice.T): rows run along v, columns along u
    return (spacing[axis], spacing[v] * plan['resized_from'][0] / plan['size'][0],
            spacing[u] * plan['resized_from'][1] / plan['size'][1])


def score_case(dataset: PreparedDataset, case_id: str, preds: dict, truths: dict, class_ids,
               masks: dict = None) -> dict:
    """Scores of one case; preds, truths (and masks) map slice indices to 2D arrays."""
    if dataset.task == 'segmentation':
        return metrics.segmentation_case_scores(preds, truths, dataset.case(case_id)['num_slices'], class_ids,
                                                prepared_spacing(dataset, case_id))
    indices = sorted(preds)
    pred, truth = np.stack([preds[i] for i in indices]), np.stack([truths[i] for i in indices])
    scores = {'psnr': metrics.psnr(pred, truth), 'ssim': metrics.ssim(pred, truth)}
    if masks is not None:
        region = np.stack([masks[i] for i in indices]) > 0
        scores.update(psnr_region=metrics.psnr(pred, truth, region), ssim_region=metrics.ssim(pred, truth, region))
    return scores


def protocols_of(dataset: PreparedDataset, test_cases, wanted: str) -> list:
    """The protocols a dataset is scored under (see the module docstring)."""
    complete = all(len(dataset.slice_indices(c)) == dataset.case(c)['num_slices'] for c in test_cases)
    if wanted == 'auto':
        return ['foreground', 'volume'] if complete else ['foreground']
    chosen = list(PROTOCOLS) if wanted == 'both' else [wanted]
    if 'volume' in chosen and not complete:
        raise UsageError(f"--protocol {wanted}: the test cases of {dataset.dataset_dir} hold only some of their "
                         f"slices; prepare it again with --test_slices all for whole-volume scores")
    return chosen


@dataclass
class CaseRun:
    """One test case's predicted slices, with what they were predicted from."""
    indices: list            # predicted slice indices, in order
    foreground: set          # those whose truth holds foreground
    queries: list
    truths: list
    masks: Optional[list]
    chosen: list             # per slice: [(context case, slice index), ...]
    contexts: list           # per slice: [(image, target), ...]
    preds: list
    baselines: dict          # baseline name -> predictions

    def selected(self, protocol: str) -> list:
        """Positions (into indices) of the slices a protocol scores."""
        return [j for j, i in enumerate(self.indices) if protocol == 'volume' or i in self.foreground]


def predict_case(dataset, case_id, protocols, picker, predictor, baselines, read) -> CaseRun:
    foreground = dataset.foreground_slice_indices(case_id)
    indices = dataset.slice_indices(case_id) if 'volume' in protocols else foreground
    queries = [read(dataset.slice_path(dataset.input_folder, case_id, i)) for i in indices]
    truths = [read(dataset.slice_path(dataset.target_folder, case_id, i)) for i in indices]
    mask_folder = next((f for f, kind in dataset.folders.items() if kind == 'mask'), None)
    masks = [read(dataset.slice_path(mask_folder, case_id, i)) for i in indices] if mask_folder else None
    chosen = [picker.pick(case_id, i, q) for i, q in zip(indices, queries)]
    contexts = [[(read(dataset.slice_path(dataset.input_folder, c, s)),
                  read(dataset.slice_path(dataset.target_folder, c, s))) for c, s in picks] for picks in chosen]
    run = predictor.segment if dataset.task == 'segmentation' else predictor.translate
    # Class ids in the label files' own type: a volume's int64 maps would take gigabytes.
    preds = [p.astype(t.dtype) for p, t in zip(run(contexts, queries), truths)]
    return CaseRun(indices, set(foreground), queries, truths, masks, chosen, contexts, preds,
                   baselines.predict(queries, contexts) if baselines else {})


def score_protocols(dataset, case_id, run: CaseRun, protocols, class_ids, results, baseline_results):
    """Adds the case's scores under each protocol (a protocol with no slice of this case skips it)."""
    for protocol in protocols:
        picked = run.selected(protocol)
        if not picked:
            continue

        def by_index(values):
            return None if values is None else {run.indices[j]: values[j] for j in picked}
        truths, masks = by_index(run.truths), by_index(run.masks)
        scores = score_case(dataset, case_id, by_index(run.preds), truths, class_ids, masks)
        scores['contexts'] = {str(run.indices[j]): [list(p) for p in run.chosen[j]] for j in picked}
        results[protocol][case_id] = scores
        for name, preds in run.baselines.items():
            baseline_results[protocol].setdefault(name, {})[case_id] = score_case(
                dataset, case_id, by_index(preds), truths, class_ids, masks)


def save_grids(out_dir, dataset, case_id, run: CaseRun, class_ids, count: int) -> int:
    """Up to `count` grids of the case's foreground slices, spread over them; returns how many."""
    candidates = run.selected('foreground') or list(range(len(run.indices)))
    shown = np.unique(np.linspace(0, len(candidates) - 1, num=min(count, len(candidates))).round().astype(int))
    for position in shown:
        j = candidates[position]
        grid = grid_picture(dataset, run.contexts[j][0], run.queries[j], run.preds[j], run.truths[j], class_ids)
        with atomic_output(path_below(out_dir, 'grids', f'{dataset.name}_{case_id}_{run.indices[j]}.png')) as handle:
            grid.save(handle, format='PNG')
    return len(shown)


def grid_picture(dataset, context, query, prediction, truth, class_ids) -> Image.Image:
    """context image | context target | query | prediction | truth, as one RGB strip; labels are
    shown in fixed display colours whatever encoding the model used."""
    lut = np.zeros((max([0, *class_ids]) + 1, 3), np.uint8)
    if class_ids:
        lut[class_ids] = inference_palette(class_ids, 'random_colors')

    def rgb(picture, is_label):
        return lut[np.minimum(picture, len(lut) - 1)] if is_label else np.repeat(picture[..., None], 3, axis=2)

    def fit(picture, is_label):
        return resize_picture(picture, query.shape, is_label)

    is_label = dataset.task == 'segmentation'
    tiles = [rgb(fit(context[0], False), False), rgb(fit(context[1], is_label), is_label),
             rgb(query, False), rgb(prediction, is_label), rgb(truth, is_label)]
    return Image.fromarray(np.concatenate(tiles, axis=1).astype(np.uint8))


def evaluate_dataset(args, predictor: Predictor, dataset: PreparedDataset, out_dir: str) -> list:
    """One summary per protocol."""
    test_cases = dataset.case_ids('test')
    if not test_cases:
        raise UsageError(f"{dataset.dataset_dir}: the manifest has no test cases (prepare it with a test split)")
    if args.max_cases:
        test_cases = test_cases[:args.max_cases]
    protocols = protocols_of(dataset, test_cases, args.protocol)
    picker = ContextPicker(dataset, args.context, args.num_prompts, args.seed, args.context_cases)
    class_ids = sorted(c for c in dataset.classes if c != 0) if dataset.task == 'segmentation' else []
    read = lru_cache(maxsize=4096)(read_png)
    baselines = Baselines(dataset, picker, read) if args.baselines else None
    results, baseline_results = ({p: {} for p in protocols} for _ in range(2))
    grids_left = args.grids
    for case_id in tqdm(test_cases, desc=dataset.name):
        run = predict_case(dataset, case_id, protocols, picker, predictor, baselines, read)
        score_protocols(dataset, case_id, run, protocols, class_ids, results, baseline_results)
        if args.save_predictions:
            save_predictions(out_dir, dataset, case_id, run.indices, run.preds)
        grids_left -= save_grids(out_dir, dataset, case_id, run, class_ids, grids_left)
    summaries = []
    for protocol in protocols:
        summary = summarise(dataset, results[protocol], class_ids, protocol)
        summary['baselines'] = {name: {k: v for k, v in summarise(dataset, cases, class_ids, protocol).items()
                                       if k != 'per_case'}
                                for name, cases in baseline_results[protocol].items()}
        summaries.append(summary)
    return summaries


class Baselines:
    """What a method must beat, on the same queries and contexts as the model.

    copy_context  the first context label, resized to the query (segmentation)
    intensity     each pixel takes the class whose mean intensity on training slices is nearest
                  (segmentation; fitted on at most 200 training slices)
    identity      the query input itself as the prediction (image tasks)
    """

    def __init__(self, dataset: PreparedDataset, picker: 'ContextPicker', read):
        self.segmentation = dataset.task == 'segmentation'
        self.class_of_grey = None
        if self.segmentation:
            rng = np.random.default_rng(0)
            pool = [picker.pool[i] for i in rng.permutation(len(picker.pool))[:200]]
            sums, counts = np.zeros(2 ** 16), np.zeros(2 ** 16)
            for case, index in pool:
                image = read(dataset.slice_path(dataset.input_folder, case, index)).astype(np.float64)
                label = read(dataset.slice_path(dataset.target_folder, case, index)).astype(np.int64)
                sums += np.bincount(label.ravel(), weights=image.ravel(), minlength=2 ** 16)
                counts += np.bincount(label.ravel(), minlength=2 ** 16)
            present = np.flatnonzero(counts)
            means = sums[present] / counts[present]
            self.class_of_grey = present[np.abs(np.arange(256)[:, None] - means[None]).argmin(axis=1)]

    def predict(self, queries, contexts) -> dict:
        if not self.segmentation:
            return {'identity': queries}
        copied = [resize_picture(pairs[0][1], q.shape, is_label=True) for q, pairs in zip(queries, contexts)]
        return {'copy_context': copied, 'intensity': [self.class_of_grey[q] for q in queries]}


def save_predictions(out_dir, dataset, case_id, indices, preds):
    folder = path_below(out_dir, 'predictions', dataset.name, case_id)
    digits = dataset.case(case_id)['slice_digits']
    for index, pred in zip(indices, preds):
        array = pred.astype(np.uint16 if pred.max() > 255 else np.uint8)
        with atomic_output(os.path.join(folder, f'{index:0{digits}d}.png')) as handle:
            Image.fromarray(array).save(handle, format='PNG')


def summarise(dataset: PreparedDataset, cases: dict, class_ids, protocol: str) -> dict:
    summary = {'dataset': dataset.name, 'task': dataset.task, 'modality': dataset.modality, 'protocol': protocol,
               'cases': len(cases)}
    if dataset.task == 'segmentation':
        names = dataset.classes
        summary['classes'] = {
            str(c): {'name': names.get(c, str(c)),
                     'dice': metrics.nanmean(r['dice'][c] for r in cases.values()),
                     'hd95': metrics.nanmean(r['hd95'][c] for r in cases.values()),
                     'hd95_undefined_cases': sum(math.isnan(r['hd95'][c]) for r in cases.values())}
            for c in class_ids}
        # Dataset score: mean over classes of the per-class mean over cases.
        summary['dice'] = metrics.nanmean(v['dice'] for v in summary['classes'].values())
        summary['hd95'] = metrics.nanmean(v['hd95'] for v in summary['classes'].values())
    else:
        for key in ('psnr', 'ssim', 'psnr_region', 'ssim_region'):
            values = [r[key] for r in cases.values() if key in r]
            if values:
                capped = [metrics.capped(v) for v in values] if key.startswith('psnr') else values
                summary[key] = metrics.nanmean(capped)
    summary['per_case'] = cases
    return summary


# ---------------------------------------------------------------------------------------------------
# reports


def write_case_csv(out_dir: str, summary: dict):
    rows = []
    for case_id, result in summary['per_case'].items():
        row = {'case': case_id}
        if summary['task'] == 'segmentation':
            row['mean_dice'] = result['mean_dice']
            row.update({f'dice_{c}': v for c, v in result['dice'].items()})
            row.update({f'hd95_{c}': v for c, v in result['hd95'].items()})
        else:
            row.update({k: v for k, v in result.items() if k != 'contexts'})
        rows.append(row)
    if not rows:
        return
    with atomic_output(path_below(out_dir, f"{summary['dataset']}_{summary['protocol']}_cases.csv"), 'w') as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _normalised(name: str) -> str:
    return ''.join(ch for ch in name.lower() if ch.isalnum())


def paper_row(name: str):
    key = _normalised(name)
    return next((row for row in PAPER_SEGMENTATION if key in row[0]), None)


def fmt(value, digits=3):
    return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value:.{digits}f}'


def markdown_tables(summaries: list) -> str:
    """The tables of every protocol present, each under a heading that names it."""
    parts = []
    for protocol, title in PROTOCOLS.items():
        chosen = [s for s in summaries if s.get('protocol', 'foreground') == protocol]
        if chosen:
            parts.append(f'# Scored on {title}\n\n' + protocol_tables(chosen))
    return '\n'.join(parts)


def protocol_tables(summaries: list) -> str:
    segmentation = [s for s in summaries if s['task'] == 'segmentation']
    order = {row[1]: i for i, row in enumerate(PAPER_SEGMENTATION)}
    segmentation.sort(key=lambda s: (order.get((paper_row(s['dataset']) or (None, ''))[1], len(order)), s['dataset']))
    lines = []
    if segmentation:
        lines += ['## Segmentation (Dice 0-1, HD95 mm; per case in 3D, mean over classes)', '',
                  '| dataset | cases | Dice | HD95 | paper MVG | Painter | UniverSeg | nnU-Net |',
                  '|---|---|---|---|---|---|---|---|']
        for s in segmentation:
            paper = paper_row(s['dataset'])
            reported = ' | '.join(fmt(v, 2) for v in paper[2:]) if paper else '- | - | - | -'
            lines.append(f"| {s['dataset']} | {s['cases']} | {fmt(s['dice'])} | {fmt(s['hd95'], 2)} | {reported} |")
            for name, b in s.get('baselines', {}).items():
                lines.append(f"| {s['dataset']}: baseline {name} | {b['cases']} | {fmt(b['dice'])} | "
                             f"{fmt(b['hd95'], 2)} | - | - | - | - |")
        lines += ['', '### Per class', '', '| dataset | class | Dice | HD95 | cases without HD95 |', '|---|---|---|---|---|']
        for s in segmentation:
            for label, classes in [(s['dataset'], s['classes'])] + [
                    (f"{s['dataset']}: baseline {name}", b['classes']) for name, b in s.get('baselines', {}).items()]:
                for c, v in classes.items():
                    lines.append(f"| {label} | {c} {v['name']} | {fmt(v['dice'])} | {fmt(v['hd95'], 2)} | "
                                 f"{v['hd95_undefined_cases']} |")
    images = [s for s in summaries if s['task'] != 'segmentation']
    if images:
        lines += ['', f'## Image tasks (PSNR dB, exact = {metrics.PSNR_CAP:.0f}; SSIM 0-1)', '',
                  '| dataset | task | cases | PSNR | SSIM | PSNR in region | SSIM in region | paper PSNR (approx.) |',
                  '|---|---|---|---|---|---|---|---|']
        for s in images:
            lines.append(f"| {s['dataset']} | {s['task']} | {s['cases']} | {fmt(s.get('psnr'), 2)} | "
                         f"{fmt(s.get('ssim'))} | {fmt(s.get('psnr_region'), 2)} | {fmt(s.get('ssim_region'))} | "
                         f"{fmt(PAPER_IMAGE_PSNR.get(s['task']), 0)} |")
            for name, b in s.get('baselines', {}).items():
                lines.append(f"| {s['dataset']}: baseline {name} | {s['task']} | {b['cases']} | {fmt(b.get('psnr'), 2)} | "
                             f"{fmt(b.get('ssim'))} | {fmt(b.get('psnr_region'), 2)} | {fmt(b.get('ssim_region'))} | - |")
    return '\n'.join(lines) + '\n'


def compare_results(before_path: str, after_path: str) -> str:
    """A before/after table of the headline numbers of two results.json files."""
    def headline(path):
        try:
            with open(path) as handle:
                datasets = json.load(handle)['datasets']
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UsageError(f"--compare {path}: not a results.json of main_eval.py ({error})") from error
        return {(d['dataset'], d.get('protocol', 'foreground')): {k: d[k] for k in ('dice', 'hd95', 'psnr', 'ssim')
                                                                  if k in d} for d in datasets}
    before, after = headline(before_path), headline(after_path)
    lines = ['| dataset | protocol | metric | before | after | change |', '|---|---|---|---|---|---|']
    for name, protocol in sorted(set(before) & set(after)):
        for metric, value in before[name, protocol].items():
            new = after[name, protocol].get(metric, float('nan'))
            lines.append(f'| {name} | {protocol} | {metric} | {value:.4f} | {new:.4f} | {new - value:+.4f} |')
    return '\n'.join(lines) + '\n'


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
        raise UsageError(f"--data_path {' '.join(args.data_path)}: no prepared dataset (folder with manifest.json"
                         f"{' of tasks ' + ' '.join(args.tasks) if args.tasks else ''})")
    return datasets


def build_predictor(args, datasets) -> tuple:
    """(Predictor, the settings used): the checkpoint's record, the flags where they agree or --force."""
    flags = {'model': args.model, 'input_size': args.input_size, 'depth': args.depth,
             'label_encoding': args.label_encoding}
    segments = any(d.task == 'segmentation' for d in datasets)
    model, settings = load_checkpoint(args.checkpoint, flags, args.force,
                                      required=('label_encoding',) if segments else ())
    model.set_attention(args.attention)
    predictor = Predictor(model, device=args.device, precision=args.precision, batch_size=args.batch_size,
                          label_encoding=settings['label_encoding'] or LABEL_ENCODINGS[0],
                          num_prompts=args.num_prompts, ensemble=args.ensemble, seed=args.seed, scale=args.scale)
    settings.update(scale=args.scale, attention=args.attention, context=args.context,
                    num_prompts=args.num_prompts, ensemble=args.ensemble,
                    precision=args.precision, seed=args.seed)
    return predictor, settings


def main(argv=None):
    return run_main(evaluate, argv)


def evaluate(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.compare:
        print(compare_results(*args.compare), end='')
        return 0
    if not args.checkpoint or not args.data_path:
        raise UsageError('--checkpoint and --data_path are required (unless --compare)')
    if args.num_prompts < 1:
        raise UsageError(f'--num_prompts {args.num_prompts}: must be at least 1')
    datasets = load_datasets(args)
    predictor, settings = build_predictor(args, datasets)
    writable_folder(os.path.join(args.output_dir, 'grids'), '--output_dir')
    summaries = []
    for dataset in datasets:
        for summary in evaluate_dataset(args, predictor, dataset, args.output_dir):
            write_case_csv(args.output_dir, summary)
            summaries.append(summary)
    with atomic_output(os.path.join(args.output_dir, 'results.json'), 'w') as handle:
        json.dump({'settings': settings, 'args': vars(args), 'datasets': summaries}, handle, indent=1)
    table = markdown_tables(summaries)
    with atomic_output(os.path.join(args.output_dir, 'results.md'), 'w') as handle:
        handle.write(table)
    print(table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
