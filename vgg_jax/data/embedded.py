"""Paper §3.1 training data, offline: the embedded demo set, scikit-learn's digits, as a TFDS builder.

Importing this module registers ``sklearn_digits`` with TFDS (`vgg_jax.data.sources` does so), so
``tfds.builder('sklearn_digits')`` finds it; it prepares from the installed scikit-learn package, no download.

`sklearn.datasets.load_digits()` ships with scikit-learn (no network): 1,797
grey 8×8 images of the digits 0–9 with values 0..16. The builder stores each as
an 8×8 RGB PNG (values scaled to 0..255 by ``round(v * 255 / 16)``, the grey
level copied to the three channels) with its integer label; class names are
'0'..'9'.

Split [fixed]: `sklearn.model_selection.train_test_split(test_size=0.2,
stratify=labels, random_state=0)` over the example indices, giving
**train = 1,437** and **test = 360** examples (36 ± 1 per class in test). Each
example keeps its index in `load_digits()` as feature ``index``.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NUM_TRAIN = 1437
NUM_TEST = 360
_SPLIT_SEED = 0
_TEST_FRACTION = 0.2


def split_indices() -> dict[str, np.ndarray]:
    """The fixed stratified train/test indices into `sklearn.datasets.load_digits()`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    train, test = train_test_split(
        np.arange(len(labels)), test_size=_TEST_FRACTION, stratify=labels, random_state=_SPLIT_SEED
    )
    return {"train": np.sort(train), "test": np.sort(test)}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8×8 handwritten digits, RGB PNG, fixed stratified 80/20 split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # TFDS derives this from the module's package resources, which needs the
    # `importlib_resources` backport on some installs; the answer is simply this file.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 3), dtype=np.uint8, encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
                    "index": np.int64,
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download: the data ship with scikit-learn.
        indices = split_indices()
        return {name: self._generate_examples(idx) for name, idx in indices.items()}

    def _generate_examples(self, indices: np.ndarray):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        for i in indices:
            rgb = np.repeat(images[i][:, :, None], 3, axis=2)
            yield int(i), {"image": rgb, "label": int(digits.target[i]), "index": int(i)}
