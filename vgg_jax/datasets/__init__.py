"""Data sets that ship with vgg_jax as TFDS builders (no download needed).

Importing this package registers them with TFDS, so ``tfds.builder(name)``
finds them:

- ``sklearn_digits``: scikit-learn's handwritten digits (1,797 8×8 images,
  10 classes) as RGB PNG, with a fixed stratified 1,437 / 360 train/test split.
  It prepares from the installed scikit-learn package, offline.
"""

from vgg_jax.datasets.sklearn_digits import NUM_TEST, NUM_TRAIN, SklearnDigits

__all__ = ["NUM_TEST", "NUM_TRAIN", "SklearnDigits"]
