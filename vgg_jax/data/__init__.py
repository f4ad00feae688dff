"""Paper §3.1 training data and §3.2 test-time rescaling, on the host (TFDS + tf.data), by layer:

- `sources`: TFDS builders (prepared once, reused), metadata, split checks, example counts,
  record reading and the pre-decode corrupt-record screen.
- `embedded`: the embedded ``sklearn_digits`` builder, the offline demo set; `embedded_photos`: the
  ``sample_photos`` builder (patches of packaged photographs), the demo on data nobody tuned it for;
  `embedded_loc`: ``sklearn_digits_loc``, digits on canvases with boxes (App. A).
- `image_ops`: per-image TensorFlow ops: decode, isotropic rescale, the rescaled crop that
  decodes only its JPEG window, the §3.1 augmentation.
- `streams`: training and evaluation batches: per-process shards, determinism and resume,
  masked padding.
- `mean_rgb`: the training set's mean RGB, and its CLI ``python -m vgg_jax mean-rgb``.

The on-device half (cast, colour shift, mean subtraction) is TensorFlow-free, in `vgg_jax.preprocess`.
Importing this package imports nothing; the commands keep TensorFlow off the GPUs (`vgg_jax.runtime.process`).
"""

from vgg_jax.runtime import extras

# A missing training dependency: one line naming the extra, instead of an ImportError deep in TensorFlow.
extras.require_training("vgg_jax.data (training and evaluation data: tf.data, TFDS)")
