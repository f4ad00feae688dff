"""Paper App. A test protocol 2 on whole images: dense boxes, top-5 classes, greedy merging (TensorFlow-free).

Every net runs through the runner of `vgg_jax.evaluation.evaluate` (`Classifier.run`) under its own resolved
`TestProtocol`, so each localisation net and each classifier has its own test scales (Table 9's fusion
row: the S = 256 net at Q = 256 and the S = 384 net at Q = 352, 384), in batches:

* the top-k classes are those of the best classification system given: each classification net under
  its protocol (default dense + multi-crop, as `evaluate --method=both`), the nets' posteriors fused;
* each localisation net gives, at each of its scales, the fc8_box map of the image and of its mirror
  (the part of the image its pooling rule says: the whole image in the paper's configs); each cell's
  boxes are those of the crop_size window it sees;
* each cell's class scores are the classification nets' soft-max at that cell, under the localisation
  net's protocol (same scales, mirror and pooling: the same windows), averaged over the nets;
* for each top-k class the boxes of every cell, mirror, scale and localisation net (their union) are
  merged greedily, ranked by the cells' class scores (`vgg_jax.localisation.arithmetic.class_boxes`), and the best
  group's box, clipped to the image, is the answer.

`Classifier.localise` (the notebook API) and `vgg_jax.localisation.evaluate` (the table) both call
`localise_examples`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from vgg_jax.evaluation import arithmetic as protocols
from vgg_jax.evaluation.protocol import TestProtocol
from vgg_jax.localisation import arithmetic as localise

Net = tuple[Any, TestProtocol]  # an `inference.Classifier` and its resolved protocol


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


def scales_needed(nets: Sequence[Net]) -> list[int]:
    """Every test scale Q of `nets`: the examples must hold the image rescaled to each."""
    return sorted({q for _, protocol in nets for q in protocol.test_scales})


def class_posteriors(classifiers: Sequence[Net], examples: Sequence[Mapping[str, Any]]) -> dict[int, np.ndarray]:
    """{index: (C,)} the classification system's posterior: each net under its protocol, the nets fused."""
    fused: dict[int, np.ndarray] = {}
    for net, protocol in classifiers:
        result = net.run(examples, protocol, name="protocol 2: classes")
        posteriors = protocols.fuse_posteriors([result["posteriors"][m] for m in protocol.components])
        for index, posterior in zip(result["indices"].tolist(), posteriors, strict=True):
            fused[index] = fused.get(index, 0.0) + posterior / len(classifiers)
    return fused


def cell_boxes(box_maps: np.ndarray, image_size: tuple[int, int], pooling: str, crop: int) -> list[np.ndarray]:
    """Per view (image, mirror): (cells, K, 4) corners normalised by the image, from (V, h, w, 4·K) maps."""
    region = protocols.dense_region(*image_size, pooling)
    per_cell = box_maps.reshape(*box_maps.shape[:3], -1, 4)
    views = []
    for view, maps in enumerate(per_cell):
        corners = localise.dense_boxes(maps, region[2:], crop)  # normalised by the region the net saw
        corners = localise.flip_boxes(corners) if view else corners  # the mirror was taken inside the region
        corners = localise.region_to_image(corners, region, image_size)
        views.append(np.clip(corners, 0.0, 1.0).reshape(-1, *corners.shape[-2:]))
    return views


def _check(localisers: Sequence[Net], classifiers: Sequence[Net]) -> None:
    if not localisers or not classifiers:
        raise ValueError("protocol 2 needs at least one localisation net and one classification net")
    for net, protocol in localisers:
        if protocol.method != "maps":
            raise ValueError(f"a localisation net runs under method='maps', got {protocol.method!r}")
        for classifier, _ in classifiers:
            if classifier.crop_size != net.crop_size:
                raise ValueError(
                    f"the localisation net's crop ({net.crop_size}) and a classifier's ({classifier.crop_size}) "
                    "differ: protocol 2 needs the same crop size, so that a cell of both maps sees the same window"
                )


def localise_examples(
    localisers: Sequence[Net],
    classifiers: Sequence[Net],
    examples: Sequence[Mapping[str, Any]],
    *,
    merge_iou: float = 0.5,
    top_k: int = 5,
) -> Localisation:
    """Protocol 2 for this process's `examples` ({'index', 'label', 'scaled': {Q: image}} at every Q of the
    nets, `scales_needed`), in their order: top-k classes and one merged box per class."""
    _check(localisers, classifiers)
    local = {int(example["index"]): example for example in examples}
    posteriors = class_posteriors(classifiers, examples)
    boxes: dict[int, list[np.ndarray]] = {index: [] for index in local}
    scores: dict[int, list[np.ndarray]] = {index: [] for index in local}
    for net, protocol in localisers:
        box_maps = net.run(examples, protocol, name="protocol 2: boxes")
        class_maps = [c.run(examples, protocol, name="protocol 2: cell scores") for c, _ in classifiers]
        for row, index in enumerate(box_maps["indices"].tolist()):
            if index not in local:
                continue  # another process's example: it is scored there
            for s, q in enumerate(protocol.test_scales):
                cells = np.mean([jax.nn.softmax(m["maps"][row][s], axis=-1) for m in class_maps], axis=0)
                size = tuple(np.shape(local[index]["scaled"][q])[:2])
                boxes[index] += cell_boxes(box_maps["maps"][row][s], size, protocol.pooling, net.crop_size)
                scores[index] += [view.reshape(-1, view.shape[-1]) for view in cells]
    k = max(1, min(int(top_k), len(next(iter(posteriors.values()))))) if posteriors else 1
    ids, probabilities, merged = [], [], []
    for index in local:
        posterior, candidates = posteriors[index], boxes[index]
        width = max(b.shape[1] for b in candidates)  # SCR and PCR nets together: an SCR box stands for every class
        candidates = np.concatenate([np.broadcast_to(b, (b.shape[0], width, 4)) for b in candidates])
        top = np.argsort(-posterior, kind="stable")[:k]
        ids.append(top)
        probabilities.append(posterior[top])
        merged.append(localise.class_boxes(candidates, np.concatenate(scores[index]), top, merge_iou))
    names_of = classifiers[0][0].class_names
    names = [[names_of[c] for c in row] for row in ids] if names_of is not None else None
    return Localisation(
        np.asarray(ids, np.int64).reshape(-1, k),
        np.asarray(probabilities, np.float32).reshape(-1, k),
        np.asarray(merged, np.float32).reshape(-1, k, 4),
        names,
    )


def localise_images(
    localisers: Sequence[Net],
    classifiers: Sequence[Net],
    images: Sequence[np.ndarray],
    *,
    merge_iou: float = 0.5,
    top_k: int = 5,
) -> Localisation:
    """`localise_examples` for uint8 RGB images of any sizes, rescaled to every Q here (bilinear, antialiased)."""
    examples = protocols.scaled_examples(images, scales_needed([*localisers, *classifiers]))
    return localise_examples(localisers, classifiers, examples, merge_iou=merge_iou, top_k=top_k)
