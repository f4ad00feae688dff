"""Paper App. A localisation as pure arithmetic: box parameters, training targets, the Euclidean loss,
dense box maps, greedy merging (OverFeat) and the top-5 localisation error.

Pure NumPy / jnp, no TensorFlow or I/O, so training, both test protocols and `Classifier.localise`
take each rule from one place. Boxes travel as normalised corners ``(ymin, xmin, ymax, xmax)``
(TFDS's order); the net regresses ``(cx, cy, w, h)`` relative to the window it sees [choice]. The
target is the class's box with the largest area inside the crop, not clipped to it [choice]; the loss
is Caffe's EuclideanLoss ½‖p − t‖² (PCR: the true class's four outputs only). Greedy merging groups
boxes with IoU ≥ ``merge_iou`` in decreasing score: mean box, summed score [choice]. A prediction is
right when its class is true and its IoU > 0.5 with one of that class's boxes (ILSVRC's top-5 rule).
Each [choice] and its reason: docs/localisation.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IOU_THRESHOLD = 0.5  # ILSVRC: a box is right when IoU > 0.5
REGRESSIONS = ("scr", "pcr")

# ----------------------------------------------------------------------------- box parameters


def corners_to_params(corners: jax.Array) -> jax.Array:
    """(…, 4) corners (ymin, xmin, ymax, xmax) → the paper's (cx, cy, w, h)."""
    ymin, xmin, ymax, xmax = jnp.moveaxis(jnp.asarray(corners), -1, 0)
    return jnp.stack([(xmin + xmax) / 2, (ymin + ymax) / 2, xmax - xmin, ymax - ymin], axis=-1)


def params_to_corners(params: jax.Array) -> jax.Array:
    """(…, 4) (cx, cy, w, h) → corners (ymin, xmin, ymax, xmax); negative sizes count as zero."""
    cx, cy, w, h = jnp.moveaxis(jnp.asarray(params), -1, 0)
    w, h = jnp.maximum(w, 0.0), jnp.maximum(h, 0.0)
    return jnp.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=-1)


def iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Intersection over union of corner boxes (broadcasting over leading axes); 0 for empty boxes."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    top, left = jnp.maximum(a[..., 0], b[..., 0]), jnp.maximum(a[..., 1], b[..., 1])
    bottom, right = jnp.minimum(a[..., 2], b[..., 2]), jnp.minimum(a[..., 3], b[..., 3])
    inter = jnp.maximum(bottom - top, 0.0) * jnp.maximum(right - left, 0.0)

    def area(box):
        return jnp.maximum(box[..., 2] - box[..., 0], 0.0) * jnp.maximum(box[..., 3] - box[..., 1], 0.0)

    union = area(a) + area(b) - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


# ----------------------------------------------------------------------------- training (crops)


def training_target(boxes: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The regression target of each crop and its weight (App. A; rule in the module docstring).

    boxes: (N, B, 4) ground-truth corners in crop coordinates (may extend past the crop); mask: (N, B).
    Returns (N, 4) target (cx, cy, w, h) of the box with the largest area inside the crop (unclipped),
    and (N,) weights: 1 where some box shows inside the crop, else 0.
    """
    boxes = jnp.asarray(boxes, jnp.float32)
    clipped = jnp.clip(boxes, 0.0, 1.0)
    area = (clipped[..., 2] - clipped[..., 0]) * (clipped[..., 3] - clipped[..., 1])
    area = jnp.where(mask, area, 0.0)
    best = jnp.argmax(area, axis=-1)
    chosen = jnp.take_along_axis(boxes, best[:, None, None], axis=1)[:, 0]
    return corners_to_params(chosen), (jnp.max(area, axis=-1) > 0).astype(jnp.float32)


def box_of_class(outputs: jax.Array, classes: jax.Array, regression: str) -> jax.Array:
    """(N, 4) box of `classes` (N,) from fc8_box outputs (N, 4) for SCR or (N, 4·C) for PCR."""
    if regression == "scr":
        return outputs
    per_class = outputs.reshape(*outputs.shape[:-1], -1, 4)
    return jnp.take_along_axis(per_class, classes[:, None, None], axis=1)[:, 0]


def euclidean_loss(predicted: jax.Array, target: jax.Array) -> jax.Array:
    """Caffe's EuclideanLoss on box parameters, per crop: ½‖p − t‖² (float32); averaged over weighted crops."""
    return 0.5 * jnp.sum(jnp.square(predicted.astype(jnp.float32) - target), axis=-1)


def localised(predicted_params: jax.Array, boxes: jax.Array, mask: jax.Array) -> jax.Array:
    """(N,) True where the predicted (cx, cy, w, h) has IoU > 0.5 with one of the (N, B) ground-truth boxes."""
    overlaps = iou(params_to_corners(predicted_params)[:, None, :], boxes)
    return jnp.any(jnp.logical_and(mask, overlaps > IOU_THRESHOLD), axis=-1)


# ----------------------------------------------------------------------------- dense boxes (protocol 2)


def dense_boxes(box_map: np.ndarray, image_size: tuple[int, int], crop: int, stride: int = 32) -> np.ndarray:
    """Boxes of every cell of a dense fc8_box map, as corners normalised by the rescaled image.

    box_map: (h, w, K, 4) window-relative (cx, cy, w, h) of one image rescaled to `image_size` (H, W).
    Cell (i, j) sees the `crop` × `crop` window at (stride·i, stride·j) (the fully-convolutional head
    of paper §3.2). Returns (h, w, K, 4) corners in [0, 1] image units (not clipped).
    """
    cells_y, cells_x = box_map.shape[:2]
    height, width = image_size
    top = (np.arange(cells_y, dtype=np.float32) * stride)[:, None, None, None]  # (h, 1, K, corner pair)
    left = (np.arange(cells_x, dtype=np.float32) * stride)[None, :, None, None]
    corners = np.asarray(params_to_corners(box_map), np.float32)  # window units
    ys = (top + corners[..., 0::2] * crop) / height
    xs = (left + corners[..., 1::2] * crop) / width
    return np.stack([ys[..., 0], xs[..., 0], ys[..., 1], xs[..., 1]], axis=-1)


def region_to_image(corners: np.ndarray, region: Sequence[int], image_size: tuple[int, int]) -> np.ndarray:
    """Corners normalised by a `region` (top, left, h, w) of an image → normalised by the image (H, W)."""
    top, left, rows, cols = region
    height, width = image_size
    corners = np.asarray(corners, np.float32)
    ys = (top + corners[..., 0::2] * rows) / height
    xs = (left + corners[..., 1::2] * cols) / width
    return np.stack([ys[..., 0], xs[..., 0], ys[..., 1], xs[..., 1]], axis=-1)


def flip_boxes(corners: np.ndarray) -> np.ndarray:
    """Corners of boxes predicted on a horizontally flipped image, mapped back to the image: x → 1 − x."""
    corners = np.asarray(corners)
    return np.stack([corners[..., 0], 1 - corners[..., 3], corners[..., 2], 1 - corners[..., 1]], axis=-1)


def greedy_merge(boxes: np.ndarray, scores: np.ndarray, merge_iou: float) -> tuple[np.ndarray, np.ndarray]:
    """OverFeat-style greedy merging of one class's boxes (rule in the module docstring).

    boxes: (M, 4) corners; scores: (M,) the class score of each box's cell. Returns the merged boxes
    (G, 4) and their scores (G,), best first.
    """
    boxes, scores = np.asarray(boxes, np.float32), np.asarray(scores, np.float32)
    if not len(boxes):
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
    order = np.argsort(-scores, kind="stable")
    boxes, scores = boxes[order], scores[order]
    overlaps = np.asarray(iou(boxes[:, None], boxes[None, :]))
    free = np.ones(len(boxes), bool)
    merged, merged_scores = [], []
    for seed in range(len(boxes)):
        if not free[seed]:
            continue
        group = free & (overlaps[seed] >= merge_iou)
        group[seed] = True
        free &= ~group
        merged.append(boxes[group].mean(axis=0))
        merged_scores.append(scores[group].sum())
    ranked = np.argsort(-np.asarray(merged_scores), kind="stable")
    return np.asarray(merged, np.float32)[ranked], np.asarray(merged_scores, np.float32)[ranked]


def class_boxes(boxes: np.ndarray, scores: np.ndarray, classes: Sequence[int], merge_iou: float) -> np.ndarray:
    """One merged box per class of `classes` (protocol 2).

    boxes: (M, K, 4) corners from M dense cells (all flips, scales and nets: their union); K = 1 (SCR)
    or C (PCR). scores: (M, C) the classification net's posterior at each cell. Returns (len(classes), 4).
    """
    result = []
    for c in classes:
        candidates = boxes[:, 0 if boxes.shape[1] == 1 else int(c)]
        merged, _ = greedy_merge(candidates, scores[:, int(c)], merge_iou)
        result.append(merged[0] if len(merged) else np.zeros(4, np.float32))
    return np.asarray(result, np.float32).reshape(len(classes), 4)


def top5_correct(
    classes: np.ndarray, boxes: np.ndarray, label: int, gt_boxes: np.ndarray, k: int = 5
) -> tuple[bool, bool]:
    """(top-1 right, top-k right) for one image: a guess is right with the class right and IoU > 0.5.

    classes: (≥k,) predicted classes, best first; boxes: (≥k, 4) their corners; gt_boxes: (B, 4) the
    ground-truth boxes of `label` (normalised like `boxes`).
    """
    gt_boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    hits = [
        int(c) == int(label) and bool(np.any(np.asarray(iou(box[None], gt_boxes)) > IOU_THRESHOLD))
        for c, box in zip(classes[:k], boxes[:k], strict=True)
    ]
    return bool(hits[:1] and hits[0]), any(hits)
