"""Paper App. A localisation data, offline: scikit-learn's digits placed on larger canvases, boxes known exactly.

Importing this module registers ``sklearn_digits_loc`` with TFDS (`vgg_jax.data.sources` does so); it
prepares from the installed scikit-learn package, no download, deterministically.

Each example is a 96×96 RGB PNG canvas: a grey noise background (uniform 0..31 per pixel) with one digit
of `sklearn.datasets.load_digits()` (values scaled to 0..255) enlarged by a factor f ∈ {4, 5, 6}
(bilinear, as the classification demo's digits are: 32–48 px, a third to a half of the side) at a
uniform random position. At the demo's S = Q = 80 a 64-px window sees 0.8 of the side and the dense map
of the whole canvas has 2×2 windows at stride 32: an object that the centre crop may cut, and several
overlapping windows that see it, as in the paper (224-px windows on 256×341 images). The enlarged
digit's pixels brighter than any background pixel (> 31) replace the background; its box is the tight
box of those pixels, exact. Features follow TFDS's detection sets (e.g. ``voc``): ``image``,
``label`` (the digit), ``objects`` = Sequence({``bbox``: BBox (ymin, xmin, ymax, xmax) / 96,
``label``}) with one object, and ``index``.

Splits [fixed]: the digits of `vgg_jax.data.embedded.split_indices()` (the classification demo's
stratified 80/20 split), ``train`` = every train digit placed twice (2,874 canvases), ``test`` = every
test digit once (360). Placement draws from ``numpy.random.default_rng([7, digit index, copy])``.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from vgg_jax.data import embedded

CANVAS = 96
FACTORS = (4, 5, 6)
COPIES = {"train": 2, "test": 1}
NUM_TRAIN = embedded.NUM_TRAIN * COPIES["train"]
NUM_TEST = embedded.NUM_TEST * COPIES["test"]
_SEED = 7


def place_digit(digit: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One canvas (CANVAS, CANVAS, 3) uint8 with `digit` (8×8, values 0..16) on noise, and its pixel box.

    The box is (top, left, bottom, right) in pixels, bottom/right exclusive: the extent of the pixels the
    digit makes brighter than any background pixel (> 31).
    """
    from PIL import Image

    factor = int(rng.choice(FACTORS))
    size = 8 * factor
    top, left = (int(v) for v in rng.integers(0, CANVAS - size + 1, size=2))
    canvas = rng.integers(0, 32, size=(CANVAS, CANVAS), dtype=np.int64)
    grey = Image.fromarray(np.round(digit * 255.0 / 16.0).astype(np.uint8))
    big = np.asarray(grey.resize((size, size), Image.Resampling.BILINEAR), np.int64)
    ink = big > 31
    window = canvas[top : top + size, left : left + size]
    window[ink] = big[ink]
    rows, cols = np.nonzero(ink)
    box = (top + rows.min(), left + cols.min(), top + rows.max() + 1, left + cols.max() + 1)
    rgb = np.repeat(canvas.astype(np.uint8)[:, :, None], 3, axis=2)
    return rgb, tuple(int(v) for v in box)


class SklearnDigitsLoc(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's digits on 96×96 noise canvases with exact boxes (App. A demo)."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"1.0.0": "64-px canvases, digits 24-48 px.", "2.0.0": "96-px canvases, smooth digits 32-48 px."}
    code_path = epath.Path(__file__)  # as in embedded.py: no importlib_resources lookup

    def _info(self) -> tfds.core.DatasetInfo:
        labels = [str(d) for d in range(10)]
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(CANVAS, CANVAS, 3), dtype=np.uint8, encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=labels),
                    "objects": tfds.features.Sequence(
                        {"bbox": tfds.features.BBoxFeature(), "label": tfds.features.ClassLabel(names=labels)}
                    ),
                    "index": np.int64,
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download: the digits ship with scikit-learn.
        indices = embedded.split_indices()
        return {name: self._generate_examples(idx, COPIES[name]) for name, idx in indices.items()}

    def _generate_examples(self, indices: np.ndarray, copies: int):
        from sklearn.datasets import load_digits

        digits = load_digits()
        for i in indices:
            for copy in range(copies):
                rng = np.random.default_rng([_SEED, int(i), copy])
                image, (top, left, bottom, right) = place_digit(digits.images[i].astype(np.int64), rng)
                label = int(digits.target[i])
                bbox = tfds.features.BBox(top / CANVAS, left / CANVAS, bottom / CANVAS, right / CANVAS)
                key = int(i) * 10 + copy
                yield key, {"image": image, "label": label, "objects": [{"bbox": bbox, "label": label}], "index": key}
