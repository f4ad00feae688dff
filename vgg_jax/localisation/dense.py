"""Paper App. A test protocol 2 on whole images: dense boxes, top-5 classes, greedy merging (TensorFlow-free).

For each test scale Q the image is rescaled (smaller side Q) and, with its mirror (``flip``), run
fully convolutionally (§3.2) through every localisation net — each cell of the fc8_box map gives
boxes for the crop_size window it sees — and every classification net, whose per-cell soft-max gives
each cell's class scores. The top-k classes are those of the classification nets' dense posteriors
(§3.2, averaged over nets: fusion). For each such class the boxes of every cell, mirror, scale and
localisation net (their union) are merged greedily, ranked by the cells' class scores
(`vgg_jax.localisation.arithmetic.class_boxes`), and the best group's box, clipped to the image, is the answer.

The localisation and classification nets must share the crop size, so that cell (i, j) of both
maps sees the same window. `Classifier.localise` (the notebook API) and `vgg_jax.localisation.evaluate`
(the table) both call `localise_images`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax.evaluation import arithmetic as protocols
from vgg_jax.localisation import arithmetic as localise


@dataclasses.dataclass(frozen=True)
class Localisation:
    """Top-k classes with one box each, per image.

    ``class_ids`` and ``probabilities`` are (N, k); ``boxes`` (N, k, 4) corners (ymin, xmin, ymax,
    xmax) normalised by each image; ``names`` N lists of k, or None.
    """

    class_ids: np.ndarray
    probabilities: np.ndarray
    boxes: np.ndarray
    names: list[list[str]] | None

    def __len__(self) -> int:
        return len(self.class_ids)

    def pixel_boxes(self, index: int, height: int, width: int) -> np.ndarray:
        """Image `index`'s boxes as (k, 4) pixel (x0, y0, x1, y1), e.g. for matplotlib."""
        ymin, xmin, ymax, xmax = np.moveaxis(self.boxes[index], -1, 0)
        return np.stack([xmin * width, ymin * height, xmax * width, ymax * height], axis=-1)

    def __str__(self) -> str:
        lines = []
        for i, (ids, probs, boxes) in enumerate(zip(self.class_ids, self.probabilities, self.boxes, strict=True)):
            labels = self.names[i] if self.names is not None else [str(c) for c in ids]
            guesses = [
                f"{label} {p:.3f} [{', '.join(f'{v:.2f}' for v in box)}]"
                for label, p, box in zip(labels, probs, boxes, strict=True)
            ]
            lines.append(f"{i}: " + "; ".join(guesses))
        return "\n".join(lines)


def dense_maps(net: Any, images: Any) -> np.ndarray:
    """(N, 2, h, w, D) float32 dense outputs of `net` (an `inference.Classifier`) on the images and their mirrors."""

    def build():
        def maps(variables: Any, x: jax.Array) -> jax.Array:
            y = net.model.apply(variables, net._inputs(protocols.with_flips(x)), dense=True).astype(jnp.float32)
            return jnp.stack([y[: x.shape[0]], y[x.shape[0] :]], axis=1)

        return maps

    return net._map(net._jitted(("dense_maps",), build), images)


def image_outputs(
    localisers: Sequence[Any], classifiers: Sequence[Any], image: np.ndarray, scales: Sequence[int], flip: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For one image: the §3.2 dense posterior (C,) fused over classifiers and scales, every cell's boxes
    (M, K, 4) (normalised by the image, clipped) and the cells' class scores (M, C)."""
    boxes, scores, posteriors = [], [], []
    for q in scales:
        x = protocols.resize_smaller_side(np.asarray(image)[None], q)
        size = tuple(int(v) for v in x.shape[1:3])
        views = 2 if flip else 1
        class_maps = [dense_maps(c, x)[0] for c in classifiers]  # (2, h, w, C): the image, its mirror
        posteriors += [np.asarray(protocols.dense_flip_posterior(m))[0] for m in class_maps]
        cells = np.mean([jax.nn.softmax(m, axis=-1) for m in class_maps], axis=0)[:views]
        for net in localisers:
            maps = dense_maps(net, x)[0][:views]
            if maps.shape[1:3] != cells.shape[1:3]:
                raise ValueError(
                    f"the localisation net's map {maps.shape[1:3]} and the classifier's {cells.shape[1:3]} differ at "
                    f"Q={q}: they need the same crop size (localiser {net.crop_size})"
                )
            per_cell = maps.reshape(*maps.shape[:3], -1, 4)
            for view in range(views):
                corners = localise.dense_boxes(per_cell[view], size, net.crop_size)
                corners = localise.flip_boxes(corners) if view else corners
                boxes.append(np.clip(corners, 0.0, 1.0).reshape(-1, *corners.shape[-2:]))
                scores.append(np.asarray(cells[view]).reshape(-1, cells.shape[-1]))
    widths = {b.shape[1] for b in boxes}
    if len(widths) > 1:  # SCR and PCR nets together: each SCR box stands for every class
        count = max(widths)
        boxes = [np.broadcast_to(b, (b.shape[0], count, 4)) for b in boxes]
    return np.mean(posteriors, axis=0), np.concatenate(boxes), np.concatenate(scores)


def localise_images(
    localisers: Sequence[Any],
    classifiers: Sequence[Any],
    images: Sequence[np.ndarray] | np.ndarray,
    *,
    scales: Sequence[int],
    flip: bool = True,
    merge_iou: float = 0.5,
    top_k: int = 5,
) -> Localisation:
    """Protocol 2 for uint8 RGB images (any sizes): top-k classes and one merged box per class."""
    ids, probabilities, boxes = [], [], []
    for image in images:
        image = np.asarray(image)
        posterior, candidates, scores = image_outputs(localisers, classifiers, image, scales, flip)
        top = np.argsort(-posterior, kind="stable")[: max(1, min(int(top_k), posterior.shape[-1]))]
        ids.append(top)
        probabilities.append(posterior[top])
        boxes.append(localise.class_boxes(candidates, scores, top, merge_iou))
    names_of = classifiers[0].class_names
    names = [[names_of[c] for c in row] for row in ids] if names_of is not None else None
    return Localisation(np.asarray(ids), np.asarray(probabilities), np.asarray(boxes), names)
