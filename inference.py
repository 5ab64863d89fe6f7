"""In-context inference: context pairs and query slices in, query predictions out, at the query's size.

    predictor = Predictor(model, device='cuda', precision='bf16')
    labels = predictor.segment(contexts, queries)        # class ids, one (rows, cols) array per query
    images = predictor.translate(contexts, queries)      # uint8 images (synthesis, denoising, inpainting)

`contexts` is either one list of (image, target) pairs shared by every query, or one such list per
query. Each query is put under each of its K context pairs (K = num_prompts, from 1 up) on the model's
canvas; pairs are resized to the canvas half (images bilinear, labels nearest), the prediction of the
query half is resized back to the query's size and decoded:
    segmentation  nearest colour among the colours the context labels were drawn with, background
                  (black) included, back to the class ids; with the binary encoding one pass per class
                  and the class whose prediction is brightest above half wins
    image tasks   the mean of the three channels, as the 8-bit grey of the prepared slices
"""
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from datasets.canvas import (
    LABEL_ENCODINGS, MAX_GREY_CLASS, denormalise, random_palette, resize_picture, to_normalised_tensor,
)
from models_mvg import MVG, create_model
from util.checkpoint import load_weights_only, recorded_args, state_dict_of, strip_prefixes

PairList = Sequence[Tuple[np.ndarray, np.ndarray]]
PRECISIONS = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def load_model(checkpoint: str, model_name: Optional[str] = None, input_size: Optional[Sequence[int]] = None,
               **model_kwargs) -> MVG:
    """An MVG model with the weights of a checkpoint: ours ({'model', 'args': dict}), the authors'
    ({'model', 'args': argparse.Namespace}) or a bare state dict. The architecture comes from
    model_name/input_size (and factory keywords such as depth) or, when not given, from the
    checkpoint's args."""
    state = load_weights_only(checkpoint)
    weights = strip_prefixes(state_dict_of(state))
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"{checkpoint}: expected a state dict or a dict with a 'model' entry")
    saved = recorded_args(state)
    model_name = model_name or saved.get('model')
    if not model_name:
        raise ValueError(f"{checkpoint}: does not name its model; pass the model name (e.g. --model mvg_vit_large_patch16)")
    input_size = tuple(input_size or saved.get('input_size') or (896, 448))
    if saved.get('depth') and 'depth' not in model_kwargs:  # a depth other than the factory's
        model_kwargs['depth'] = saved['depth']
    model = create_model(model_name, input_size=input_size, **model_kwargs)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{checkpoint}: does not fit {model_name}: missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    return model


def as_grey_uint8(image: np.ndarray, name: str = 'image') -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        image = image[..., :3].mean(axis=2)
    if image.ndim != 2:
        raise ValueError(f"{name}: expected a 2D grey slice, got shape {image.shape}")
    if image.dtype != np.uint8:
        if image.min() < 0 or image.max() > 255:
            raise ValueError(f"{name}: intensities must be 0..255 like the prepared slices, "
                             f"got {image.min()}..{image.max()}")
        image = image.round().astype(np.uint8)
    return image


def as_label(label: np.ndarray, name: str = 'context label') -> np.ndarray:
    """Class ids as an integer array Pillow can resize (uint8, uint16 or int32)."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{name}: expected a 2D map of class ids, got shape {label.shape}")
    if label.dtype in (np.uint8, np.uint16):
        return label
    if not np.all(np.mod(label, 1) == 0) or label.min() < 0 or label.max() >= 2 ** 31:
        raise ValueError(f"{name}: class ids must be non-negative integers")
    return label.astype(np.int32)


def inference_palette(class_ids: Sequence[int], encoding: str, seed: int = 0) -> np.ndarray:
    """(len(class_ids), 3) uint8 colours for the foreground classes, fixed for a given seed."""
    class_ids = np.asarray(class_ids, dtype=np.int64)
    if encoding == 'grey':
        if len(class_ids) and class_ids.max() > MAX_GREY_CLASS:
            raise ValueError(f"label encoding 'grey' stops at class {MAX_GREY_CLASS}, got {class_ids.max()}")
        return np.repeat((10 * class_ids)[:, None], 3, axis=1).astype(np.uint8)
    return random_palette(len(class_ids), np.random.default_rng(seed))


def nearest_colour(picture: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(3, rows, cols) float picture -> index of the nearest of colours (K, 3), per pixel."""
    flat = picture.reshape(3, -1).T.astype(np.float32)  # (pixels, 3)
    palette = colours.astype(np.float32)
    distances = (flat ** 2).sum(1, keepdims=True) - 2 * flat @ palette.T + (palette ** 2).sum(1)
    return distances.argmin(axis=1).reshape(picture.shape[1:])


class Predictor:
    """Runs an MVG model in context on slices; see the module docstring."""

    def __init__(self, model, device='cpu', precision='fp32', batch_size=8, label_encoding='random_colors',
                 num_prompts=1, ensemble='features', seed=0):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got '{precision}'")
        if label_encoding not in LABEL_ENCODINGS:
            raise ValueError(f"label_encoding must be one of {LABEL_ENCODINGS}, got '{label_encoding}'")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.precision = precision
        self.batch_size = batch_size
        self.label_encoding = label_encoding
        self.num_prompts = num_prompts
        self.ensemble = ensemble
        self.seed = seed
        self.half = (model.img_size[0] // 2, model.img_size[1])

    # ----------------------------------------------------------------------------------------------
    # public entry points

    def segment(self, contexts: Union[PairList, Sequence[PairList]], queries: Sequence[np.ndarray]) -> List[np.ndarray]:
        """Class-id maps (int64, each query's size) for the queries."""
        contexts = self._contexts_per_query(contexts, queries, targets_are_labels=True)
        class_ids = np.unique(np.concatenate([np.unique(t) for pairs in contexts for _, t in pairs]))
        foreground = class_ids[class_ids != 0]
        if not len(foreground):
            raise ValueError("the context labels hold no class other than background (0): nothing to segment")
        if self.label_encoding == 'binary':
            return self._segment_one_class_at_a_time(contexts, queries, foreground)
        colours = np.concatenate([np.zeros((1, 3), np.uint8), inference_palette(foreground, self.label_encoding, self.seed)])
        lut = self._lookup(foreground, colours[1:])
        pictures = self._run(contexts, queries, lambda label: lut[label].transpose(2, 0, 1), is_label=True)
        ids = np.concatenate([[0], foreground])
        return [ids[nearest_colour(p, colours)] for p in pictures]

    def translate(self, contexts: Union[PairList, Sequence[PairList]], queries: Sequence[np.ndarray]) -> List[np.ndarray]:
        """uint8 grey images (each query's size) for image-to-image tasks."""
        contexts = self._contexts_per_query(contexts, queries, targets_are_labels=False)
        pictures = self._run(contexts, queries, lambda target: target, is_label=False)
        return [p.mean(axis=0).round().clip(0, 255).astype(np.uint8) for p in pictures]

    # ----------------------------------------------------------------------------------------------
    # internals

    def _contexts_per_query(self, contexts, queries, targets_are_labels: bool) -> List[List[tuple]]:
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
                    checked[key] = (as_grey_uint8(image, 'context image'),
                                    as_label(target) if targets_are_labels else as_grey_uint8(target, 'context target'))
        return [[checked[(id(image), id(target))] for image, target in pairs] for pairs in per_query]

    @staticmethod
    def _lookup(class_ids: np.ndarray, colours: np.ndarray) -> np.ndarray:
        lut = np.zeros((int(class_ids.max()) + 1, 3), dtype=np.uint8)
        lut[class_ids] = colours
        return lut

    def _segment_one_class_at_a_time(self, contexts, queries, foreground) -> List[np.ndarray]:
        brightness = []
        for class_id in foreground:
            def draw(label, class_id=class_id):
                return np.where(label == class_id, 255, 0).astype(np.uint8)
            brightness.append([p.mean(axis=0) for p in self._run(contexts, queries, draw, is_label=True)])
        labels = []
        for q in range(len(queries)):
            stack = np.stack([b[q] for b in brightness])
            best = stack.argmax(axis=0)
            labels.append(np.where(stack.max(axis=0) > 127.5, foreground[best], 0))
        return labels

    def _run(self, contexts, queries, draw_target, is_label: bool) -> List[np.ndarray]:
        """Predicted query halves, de-normalised to 0..255 floats (3, rows, cols) at each query's size."""
        outputs = []
        for start in range(0, len(queries), self.batch_size):
            batch_queries = queries[start:start + self.batch_size]
            imgs, tgts, sizes = [], [], []
            for query, pairs in zip(batch_queries, contexts[start:start + self.batch_size]):
                query = as_grey_uint8(query, 'query')
                sizes.append(query.shape)
                for image, target in pairs:
                    target_picture = draw_target(resize_picture(target, self.half, is_label))
                    blank = np.zeros_like(target_picture)
                    imgs.append(to_normalised_tensor([resize_picture(image, self.half, False),
                                                      resize_picture(query, self.half, False)]))
                    tgts.append(to_normalised_tensor([target_picture, blank]))
            canvases = self._predict(torch.stack(imgs), torch.stack(tgts))
            query_halves = canvases[:, :, self.half[0]:]
            for picture, size in zip(query_halves, sizes):
                picture = F.interpolate(picture[None], size=size, mode='bilinear', align_corners=False)[0]
                outputs.append(picture.numpy())
        return outputs

    def _predict(self, imgs: torch.Tensor, tgts: torch.Tensor) -> torch.Tensor:
        autocast = dict(device_type=self.device.type, dtype=PRECISIONS[self.precision],
                        enabled=self.precision != 'fp32')
        with torch.autocast(**autocast):
            pred = self.model.predict(imgs.to(self.device), tgts.to(self.device),
                                      num_prompts=self.num_prompts, ensemble=self.ensemble)
        return denormalise(pred.float().cpu()).clamp(0, 255)
