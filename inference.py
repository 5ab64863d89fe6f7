"""In-context inference: checkpoints loaded with their recorded settings; context pairs and query
slices in, query predictions out, at the query's size.

    model, settings = load_checkpoint('mvg.pth', {'label_encoding': None})   # the checkpoint's own
    predictor = Predictor(model, device='cuda', precision='bf16', label_encoding=settings['label_encoding'])
    labels = predictor.segment(contexts, queries)        # class ids, one (rows, cols) array per query
    images = predictor.translate(contexts, queries)      # uint8 images (synthesis, denoising, inpainting)

`contexts` is either one list of (image, target) pairs shared by every query, or one such list per
query. Each query is put under each of its K context pairs (K = num_prompts, from 1 up) on the model's
canvas. How a slice meets the canvas half (the training crop size, 448x448 for the paper's model):
    scale 'training'  (default) at the scale of the training crops: training crops the prepared slices
                      without resizing (enlarging only a slice smaller than the crop), so objects keep
                      their prepared size; a larger slice is covered by overlapping crop-sized windows
                      (4 for 512 slices on 448 halves), each context pair cropped at the matching place,
                      and the window predictions averaged before decoding
    scale 'fit'       the whole slice resized to the canvas half: one pass, but objects of a 512 slice
                      appear at 0.875x the size the model was trained on
Predictions are decoded per query:
    segmentation  nearest colour among the colours that the query's OWN context labels were drawn with,
                  background (black) included, back to class ids: a query never receives a class that
                  only another query's context shows; with the binary encoding one pass per class of the
                  query's contexts, and the class whose prediction is brightest above half wins
    image tasks   the mean of the three channels, as the 8-bit grey of the prepared slices
"""

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from flags import SCALES
from label_encoding import LABEL_ENCODINGS, decode_brightest, decode_nearest, drawing, inference_palette
from models_mvg import MODELS, MVG, create_model
from pixels import as_grey_uint8, as_label, denormalise, resize_picture, to_normalised_tensor, training_scale_size
from tasks import Task
from util.checkpoint import check_weights_fit, read_checkpoint, state_dict_of, strip_prefixes
from util.cli import UsageError
from util.record import recorded_settings, resolve_settings
from util.runtime import DTYPES, autocast

PairList = Sequence[tuple[np.ndarray, np.ndarray]]
DEFAULT_INPUT_SIZE = [896, 448]  # the paper's canvas, for checkpoints that do not say theirs


def model_from_state(
    state: dict, where: str, model_name: str, input_size: Sequence[int], depth: int | None = None
) -> MVG:
    """The model `model_name` (canvas input_size, `depth` blocks or the factory's) with the state's
    weights: ours ({'model', ...}), the authors' and Painter's ({'model', 'args': Namespace}) or a bare
    state dict; weights that do not fit are a one-line error, not a dump of keys."""
    weights = strip_prefixes(state_dict_of(state))
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UsageError(f"{where}: expected a state dict or a dict with a 'model' entry")
    if model_name not in MODELS:
        raise UsageError(f"--model {model_name}: unknown; choose one of {sorted(MODELS)}")
    model = create_model(model_name, input_size=tuple(input_size), **({"depth": depth} if depth else {}))
    check_weights_fit(
        model,
        weights,
        where,
        "check --model, --depth and --input_size",
        target=f"{model_name} with {len(model.blocks)} blocks on a {input_size[0]}x{input_size[1]} canvas",
    )
    model.load_state_dict(weights)
    return model


def load_checkpoint(path: str, flags: dict, force: bool = False, required: Sequence[str] = ()) -> tuple[MVG, dict]:
    """(model, settings) from a checkpoint and the user's flags ({'model': ..., 'input_size': ...,
    'depth': ..., 'label_encoding': ..., None where not given}); see util/record.py for the rules.
    `required` names settings that must be known (e.g. the label encoding for segmentation).
    settings also says where the checkpoint's values came from ('settings_source')."""
    state = read_checkpoint(path)
    recorded = recorded_settings(state, path)
    wanted = {"model": None, "input_size": None, "depth": None, **flags}
    settings = resolve_settings(
        wanted, recorded, path, force, defaults={"input_size": DEFAULT_INPUT_SIZE}, required=("model", *required)
    )
    model = model_from_state(state, path, settings["model"], settings["input_size"], settings["depth"])
    settings["depth"] = len(model.blocks)
    settings["settings_source"] = recorded.source
    return model, settings


def window_starts(length: int, window: int) -> list[int]:
    """Starts of the fewest `window`-long windows that cover `length`, spread evenly (overlapping)."""
    count = math.ceil(length / window)
    if count == 1:
        return [0]
    return [round(i * (length - window) / (count - 1)) for i in range(count)]


def matching_start(start: int, length: int, other_length: int, window: int) -> int:
    """Where a window of a context slice sits when the query's window starts at `start`: at the same
    relative place, so that the two windows show corresponding anatomy."""
    if length == window:
        return (other_length - window) // 2
    return round(start / (length - window) * (other_length - window))


class Predictor:
    """Runs an MVG model in context on slices; see the module docstring."""

    def __init__(
        self,
        model,
        device="cpu",
        precision="fp32",
        batch_size=8,
        label_encoding="random_colors",
        num_prompts=1,
        ensemble="features",
        seed=0,
        scale="training",
    ):
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, got '{precision}'")
        if label_encoding not in LABEL_ENCODINGS:
            raise ValueError(f"label_encoding must be one of {LABEL_ENCODINGS}, got '{label_encoding}'")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got '{scale}'")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.precision = precision
        self.batch_size = batch_size
        self.label_encoding = label_encoding
        self.num_prompts = num_prompts
        self.ensemble = ensemble
        self.seed = seed
        self.scale = scale
        self.half = (model.img_size[0] // 2, model.img_size[1])

    # ----------------------------------------------------------------------------------------------
    # public entry points

    def segment(self, contexts: PairList | Sequence[PairList], queries: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Class-id maps (int64, each query's size) for the queries."""
        contexts = self._contexts_per_query(contexts, queries, targets_are_labels=True)
        foregrounds = [self._foreground_of(pairs, q) for q, pairs in enumerate(contexts)]
        return self._in_chunks(self._segment_chunk, contexts, queries, foregrounds)

    def translate(self, contexts: PairList | Sequence[PairList], queries: Sequence[np.ndarray]) -> list[np.ndarray]:
        """uint8 grey images (each query's size) for image-to-image tasks."""
        contexts = self._contexts_per_query(contexts, queries, targets_are_labels=False)
        return self._in_chunks(self._translate_chunk, contexts, queries)

    def run(
        self, task: Task, contexts: PairList | Sequence[PairList], queries: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        """What the task's target is: class ids (segment) or images (translate)."""
        run = self.segment if task.target_is_label else self.translate
        return run(contexts, queries)

    # ----------------------------------------------------------------------------------------------
    # decoding, a chunk of queries at a time

    def _in_chunks(self, decode, contexts, queries, *per_query) -> list[np.ndarray]:
        """decode() on batch_size queries at a time, so that only one chunk's float predictions are
        held in memory (a volume's slices can run to gigabytes of them)."""
        outputs = []
        for first in range(0, len(queries), self.batch_size):
            chunk = slice(first, first + self.batch_size)
            outputs += decode(contexts[chunk], queries[chunk], *(values[chunk] for values in per_query))
        return outputs

    def _segment_chunk(self, contexts, queries, foregrounds) -> list[np.ndarray]:
        if self.label_encoding == "binary":
            return self._segment_one_class_at_a_time(contexts, queries, foregrounds)
        palettes = [inference_palette(foreground, self.label_encoding, self.seed) for foreground in foregrounds]
        draws = [drawing(foreground, palette) for foreground, palette in zip(foregrounds, palettes)]
        pictures = self._run(contexts, queries, draws, is_label=True)
        return [
            decode_nearest(picture, foreground, palette)
            for picture, foreground, palette in zip(pictures, foregrounds, palettes)
        ]

    def _translate_chunk(self, contexts, queries) -> list[np.ndarray]:
        pictures = self._run(contexts, queries, [None] * len(queries), is_label=False)
        return [p.mean(axis=0).round().clip(0, 255).astype(np.uint8) for p in pictures]

    # ----------------------------------------------------------------------------------------------
    # contexts and label drawing

    def _contexts_per_query(self, contexts, queries, targets_are_labels: bool) -> list[list[tuple]]:
        """One list of num_prompts (uint8 image, target) pairs per query; targets as class ids
        (uint8/uint16/int32) or uint8 grey images."""
        if not len(queries):
            raise ValueError("no query slices given")
        shared = len(contexts) and isinstance(contexts[0], tuple)
        per_query = [list(contexts)] * len(queries) if shared else [list(c) for c in contexts]
        if len(per_query) != len(queries):
            raise ValueError(f"{len(per_query)} context lists for {len(queries)} queries")
        checked = {}
        for i, pairs in enumerate(per_query):
            if len(pairs) != self.num_prompts:
                raise ValueError(f"query {i} has {len(pairs)} context pairs; num_prompts is {self.num_prompts}")
            for image, target in pairs:
                key = (id(image), id(target))
                if key not in checked:  # shared contexts are checked and converted once
                    checked[key] = (
                        as_grey_uint8(image, "context image"),
                        as_label(target) if targets_are_labels else as_grey_uint8(target, "context target"),
                    )
        return [[checked[(id(image), id(target))] for image, target in pairs] for pairs in per_query]

    @staticmethod
    def _foreground_of(pairs, query_number: int) -> np.ndarray:
        """The classes other than background that a query's own context labels hold, sorted."""
        present = np.unique(np.concatenate([np.unique(target) for _, target in pairs]))
        foreground = present[present != 0].astype(np.int64)
        if not len(foreground):
            raise ValueError(
                f"the context labels of query {query_number} hold no class other than "
                f"background (0): nothing to segment"
            )
        return foreground

    def _segment_one_class_at_a_time(self, contexts, queries, foregrounds) -> list[np.ndarray]:
        """Binary encoding: for each class, the queries whose contexts hold it are run with that
        class drawn white; each query takes its brightest class, if above half. Every context of a
        query takes part in each pass, also those without the class (all black): that a similar
        slice lacks the class is evidence that the query lacks it too. Running a pass on only the
        contexts that show its class cost the demo's regions 0.579 -> 0.402 (bench/README.md)."""
        brightness = [{} for _ in queries]  # per query: {class id: (rows, cols) brightness}
        for class_id in np.unique(np.concatenate(foregrounds)):
            members = [q for q, foreground in enumerate(foregrounds) if class_id in foreground]
            draw = drawing(np.array([class_id]), np.full((1, 3), 255, np.uint8))
            pictures = self._run(
                [contexts[q] for q in members], [queries[q] for q in members], [draw] * len(members), is_label=True
            )
            for q, picture in zip(members, pictures):
                brightness[q][int(class_id)] = picture.mean(axis=0)
        return [decode_brightest(per_class) for per_class in brightness]

    # ----------------------------------------------------------------------------------------------
    # canvases: views of the slices at the model's scale, batched, stitched back

    def _views(self, shape) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        """(size the slice is brought to, [top-left of each canvas-half window])."""
        if self.scale == "fit":
            return self.half, [(0, 0)]
        size = training_scale_size(shape, self.half)
        return size, [
            (top, left) for top in window_starts(size[0], self.half[0]) for left in window_starts(size[1], self.half[1])
        ]

    def _window(self, picture, is_label, query_size, query_start):
        """The window of a context picture that matches the query's window at query_start."""
        size, _ = self._views(picture.shape[:2])
        picture = resize_picture(picture, size, is_label)
        top = matching_start(query_start[0], query_size[0], size[0], self.half[0])
        left = matching_start(query_start[1], query_size[1], size[1], self.half[1])
        return picture[top : top + self.half[0], left : left + self.half[1]]

    def _canvases(self, query, pairs, draw, is_label, size, start):
        """The num_prompts (image canvas, target canvas) tensors of one window of one query."""
        query_window = query[start[0] : start[0] + self.half[0], start[1] : start[1] + self.half[1]]
        imgs, tgts = [], []
        for image, target in pairs:
            target_window = self._window(target, is_label, size, start)
            target_picture = draw(target_window) if draw is not None else target_window
            imgs.append(to_normalised_tensor([self._window(image, False, size, start), query_window]))
            tgts.append(to_normalised_tensor([target_picture, np.zeros_like(target_picture)]))
        return imgs, tgts

    def _run(self, contexts, queries, draws, is_label: bool) -> list[np.ndarray]:
        """Predicted query halves, de-normalised to 0..255 floats (3, rows, cols) at each query's size."""
        prepared, jobs = [], []
        for q, query in enumerate(queries):
            query = as_grey_uint8(query, "query")
            size, starts = self._views(query.shape)
            prepared.append((query.shape, size, resize_picture(query, size, False)))
            jobs += [(q, start) for start in starts]
        sums = [np.zeros((3, *size), np.float32) for _, size, _ in prepared]
        counts = [np.zeros(size, np.float32) for _, size, _ in prepared]
        for first in range(0, len(jobs), self.batch_size):
            imgs, tgts = [], []
            for q, start in jobs[first : first + self.batch_size]:
                _, size, query = prepared[q]
                job_imgs, job_tgts = self._canvases(query, contexts[q], draws[q], is_label, size, start)
                imgs += job_imgs
                tgts += job_tgts
            halves = self._predict(torch.stack(imgs), torch.stack(tgts)).numpy()
            for (q, (top, left)), half in zip(jobs[first : first + self.batch_size], halves):
                sums[q][:, top : top + self.half[0], left : left + self.half[1]] += half
                counts[q][top : top + self.half[0], left : left + self.half[1]] += 1
        outputs = []
        for (shape, size, _), total, count in zip(prepared, sums, counts):
            picture = torch.from_numpy(total / count)
            if tuple(size) != tuple(shape):
                picture = F.interpolate(picture[None], size=shape, mode="bilinear", align_corners=False)[0]
            outputs.append(picture.numpy())
        return outputs

    def _predict(self, imgs: torch.Tensor, tgts: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(self.device, self.precision):
            pred = self.model.predict(
                imgs.to(self.device), tgts.to(self.device), num_prompts=self.num_prompts, ensemble=self.ensemble
            )
        return denormalise(pred.float().cpu()).clamp(0, 255)
