"""A second offline demo set, of real photographs (not digits): which photo does a patch come from?

Importing this module registers ``sample_photos`` with TFDS, built from the photographs scikit-image
(``pip install scikit-image``, in the ``test`` extra) and scikit-learn ship, so that a recipe tuned on
the digits is checked on data nobody tuned it for (bench/convergence.py). Ten classes, one per photo
(`CLASSES`; grey ones copied to three channels); an example is a square patch (`PATCH_FRACTION` of the
photo's smaller side) at a random place, resized to 40×40 and stored as a PNG. Splits [fixed]: each
photo is a 4×4 chessboard of tiles, ``train`` patches lie inside the white tiles and ``test`` patches
inside the black ones, so no pixel is shared and both splits see every part of the scene (a split by
side tests on unseen scenery: the demo nets' test error wandered by ±10 points). 600 / 100 patches
per class; `write_folder` writes photo crops as the ``folder:PATH`` set of the fine-tuning tests.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

SIDE = 40
CLASSES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "brick", "grass", "gravel", "china", "flower")
PER_CLASS = {"train": 600, "test": 100}
NUM_TRAIN = PER_CLASS["train"] * len(CLASSES)
NUM_TEST = PER_CLASS["test"] * len(CLASSES)
GRID = 4  # tiles per side; (row + column) even: train, odd: test
PATCH_FRACTION = (0.12, 0.25)  # of the photo's smaller side (at most a tile)
_SEED = 11


def photo(name: str) -> np.ndarray:
    """The (H, W, 3) uint8 photograph of class `name`."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{name}.jpg")
    else:
        try:
            import skimage.data
        except ImportError as error:
            raise ImportError(
                "the sample_photos data set is built from scikit-image's photographs: pip install scikit-image"
            ) from error
        image = getattr(skimage.data, name)()
    image = np.asarray(image, np.uint8)
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image[:, :, :3]


def tile_bounds(height: int, width: int, row: int, column: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of tile (row, column) of the GRID×GRID grid (bottom/right exclusive)."""
    return row * height // GRID, column * width // GRID, (row + 1) * height // GRID, (column + 1) * width // GRID


def patch_box(height: int, width: int, split: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """(top, left, side) of a square patch wholly inside one tile of `split` (chessboard: train even, test odd)."""
    parity = 0 if split == "train" else 1
    tiles = [(r, c) for r in range(GRID) for c in range(GRID) if (r + c) % 2 == parity]
    top, left, bottom, right = tile_bounds(height, width, *tiles[int(rng.integers(len(tiles)))])
    side = min(int(rng.uniform(*PATCH_FRACTION) * min(height, width)), bottom - top, right - left)
    return int(rng.integers(top, bottom - side + 1)), int(rng.integers(left, right - side + 1)), side


def sample_patch(image: np.ndarray, split: str, rng: np.random.Generator) -> np.ndarray:
    """One SIDE×SIDE patch of `image` at `patch_box`, resized with antialiasing."""
    from PIL import Image

    top, left, side = patch_box(*image.shape[:2], split, rng)
    patch = Image.fromarray(image[top : top + side, left : left + side])
    return np.asarray(patch.resize((SIDE, SIDE), Image.Resampling.BILINEAR, reducing_gap=None), np.uint8)


class SamplePhotos(tfds.core.GeneratorBasedBuilder):
    """Patches of ten photographs shipped by scikit-image / scikit-learn; class = the photograph."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Left 70 % / right 30 % split, 150 / 40 patches per class.",
        "2.0.0": "Chessboard split, 600 / 100.",
    }
    code_path = epath.Path(__file__)  # as in embedded.py: no importlib_resources lookup

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(SIDE, SIDE, 3), dtype=np.uint8, encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=list(CLASSES)),
                    "index": np.int64,
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-image.org/docs/stable/api/skimage.data.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download: the photographs ship with the packages.
        return {split: self._generate_examples(split) for split in PER_CLASS}

    def _generate_examples(self, split: str):
        split_id = list(PER_CLASS).index(split)
        for label, name in enumerate(CLASSES):
            image = photo(name)
            for k in range(PER_CLASS[split]):
                rng = np.random.default_rng([_SEED, label, split_id, k])
                key = (label * 2 + split_id) * 1000 + k
                yield key, {"image": sample_patch(image, split, rng), "label": label, "index": key}


def write_folder(
    root: str, names: tuple[str, ...], per_class: dict[str, int], *, max_side: int = 128, seed: int = 0
) -> dict[str, list[str]]:
    """Writes crops of the photographs `names` as a folder data set (`vgg_jax.data.folder`); returns the files.

    `per_class` maps a split to a count: ``{"train": 8, "test": 2}`` writes ``root/<split>/<name>/…``;
    ``{"": 10}`` writes ``root/<name>/…`` (one split). Each file is a crop of its photograph (a fifth to two
    thirds of its smaller side, aspect 3:4 to 4:3, anywhere) resized to 32–`max_side` px per side, saved as
    JPEG or PNG in turns; every fifth is greyscale and every seventh PNG has an alpha channel: the mix a
    folder of real photos has. Deterministic in `seed`.
    """
    from PIL import Image

    written: dict[str, list[str]] = {}
    for label, name in enumerate(names):
        image = photo(name)
        height, width = image.shape[:2]
        for split_id, (split, count) in enumerate(per_class.items()):
            directory = os.path.join(root, split, name)
            os.makedirs(directory, exist_ok=True)
            for k in range(count):
                rng = np.random.default_rng([_SEED, seed, label, split_id, k])
                side = rng.uniform(0.2, 0.67) * min(height, width)
                aspect = rng.uniform(0.75, 4 / 3)
                h, w = int(min(side * aspect, height)), int(min(side / aspect, width))
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                crop = Image.fromarray(image[top : top + h, left : left + w])
                crop = crop.resize(tuple(int(v) for v in rng.integers(32, max_side + 1, 2)), Image.Resampling.BILINEAR)
                png = k % 2 == 1
                if k % 5 == 4:
                    crop = crop.convert("L")
                elif png and k % 7 == 6:
                    crop = crop.convert("RGBA")
                path = os.path.join(directory, f"{name}_{k:03d}.{'png' if png else 'jpg'}")
                crop.save(path, **({} if png else {"quality": 90}))
                written.setdefault(split, []).append(path)
    return written
