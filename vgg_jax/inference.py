"""Notebook API: load a run, classify images, extract features (paper §3.2 testing, App. B features).

    import vgg_jax
    clf = vgg_jax.load("runs/demo")                  # latest step; step="best" or an int
    clf.logits(crops)                                # uint8 (N, crop, crop, 3) RGB → (N, classes)
    clf.predict(crops, top_k=5)                      # Prediction(class_ids, probabilities, names)
    clf.predict(images, dense=True, scales=(256, 384, 512))   # the paper's dense multi-scale test
    clf.features(crops, layer="pool5")               # named activations
    clf.features(images, layer="fc7", dense=True)    # App. B descriptor (N, fc_width), unit L2 norm
    clf.features(images, dense=True, scales=(256, 384, 512), combine="stack")  # (N, 3·fc_width)
    vgg_jax.load("runs/loc").localise(photos)        # App. A: top-5 classes, one box each

Images are always uint8 RGB NHWC with values 0–255; the run's preprocessing
(minus ``config.mean_rgb``) is applied here. Converted weights (``convert.py``)
have their own preprocessing absorbed into conv1_1, so they take the same input.

Dense evaluation (paper §3.2) runs under a `TestProtocol` (`clf.test_protocol(...)`) through the runner
and compiled functions of `evaluation.evaluate`, so the numbers are evaluate's (docs/inference.md); the
pooling rule is ``pooling=``, default the run's ``config.dense_pooling``. The App. B descriptor is the same
with an activation map instead of the score map, L2-normalised at the end (`protocols.combine_scales`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from vgg_jax import models, preprocess
from vgg_jax.checkpointing import checkpoints
from vgg_jax.evaluation import arithmetic as protocols
from vgg_jax.evaluation import executor, runner
from vgg_jax.evaluation.arithmetic import center_crop, resize_smaller_side  # also offered to notebooks from here
from vgg_jax.evaluation.protocol import TestProtocol
from vgg_jax.runtime import parallel, paths


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Top-k classes per image: ``class_ids`` and ``probabilities`` are (N, k); ``names`` is N lists of k or None."""

    class_ids: np.ndarray
    probabilities: np.ndarray
    names: list[list[str]] | None

    def __len__(self) -> int:
        return len(self.class_ids)

    @property
    def top1(self) -> np.ndarray:
        """The most probable class of each image, (N,)."""
        return self.class_ids[:, 0]

    def __str__(self) -> str:
        lines = []
        for i, (ids, probs) in enumerate(zip(self.class_ids, self.probabilities, strict=True)):
            labels = self.names[i] if self.names is not None else [str(c) for c in ids]
            lines.append(f"{i}: " + ", ".join(f"{label} {p:.3f}" for label, p in zip(labels, probs, strict=True)))
        return "\n".join(lines)


class Classifier:
    """A VGG network with its parameters and preprocessing, for classification and features.

    Attributes:
      config: the run's config (``config.json``).
      params: the parameters (nested dict of NumPy arrays, as restored).
      model: the `vgg_jax.models.VGG` module.
      class_names: list of names, or None when the data set has none.
      step: the checkpoint step restored (None when built from parameters).
      batch_size: images per device call; larger inputs are processed in chunks.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        params: Any,
        *,
        step: int | None = None,
        class_names: Sequence[str] | None = None,
        batch_size: int = 64,
        dtype: Any = jnp.float32,
    ):
        self.config = config
        self.params = params
        self.step = step
        self.batch_size = int(batch_size)
        self.model = models.from_config(config, dtype=dtype)
        self.class_names = list(class_names) if class_names is not None else None
        self.mean_rgb = tuple(float(m) for m in config.mean_rgb)
        self._variables = {"params": jax.device_put(params)}
        self._preprocess = preprocess.preprocess_for_model
        self._functions: dict[tuple[Any, ...], Any] = {}

    # ------------------------------------------------------------------ properties

    @property
    def crop_size(self) -> int:
        return int(self.config.crop_size)

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @property
    def layers(self) -> list[str]:
        """Names accepted by `features` (see `vgg_jax.models.feature_names`)."""
        return models.feature_names(self.model.variant)

    def __repr__(self) -> str:
        model = self.model
        return (
            f"Classifier(VGG-{model.variant}, {model.num_classes} classes, width x{model.width_multiplier:g}, "
            f"fc {model.fc_width}, crop {self.crop_size}, step {self.step}, mean_rgb {self.mean_rgb})"
        )

    # ------------------------------------------------------------------ jitted functions (cached per shape by jit)

    def _require_head(self, layers: Sequence[str] = ("fc8",)) -> None:
        """Keras' notop files convert without fc6–fc8: say so instead of a missing-parameter error."""
        if not self.config.model.get("include_top", True) and {"fc6", "fc7", "fc8"} & set(layers):
            raise ValueError(
                "this network has no classifier head (fc6-fc8): it was converted from an include_top=False "
                "('notop') file; logits/predict are unavailable, features() of conv/pool layers work"
            )

    def _inputs(self, images: Any) -> jax.Array:
        return self._preprocess(images, mean_rgb=self.mean_rgb)

    def _jitted(self, key: tuple[Any, ...], build: Any) -> Any:
        """One `jax.jit` per (function, options); jit itself caches one compilation per input shape."""
        if key not in self._functions:
            self._functions[key] = jax.jit(build())
        return self._functions[key]

    @property
    def _logits_fn(self) -> Any:
        return self._jitted(
            ("logits",), lambda: lambda variables, images: self.model.apply(variables, self._inputs(images))
        )

    def _activation_fn(self, layers: tuple[str, ...]) -> Any:
        def activation(variables: Any, images: jax.Array) -> dict[str, jax.Array]:
            return self.model.apply(variables, self._inputs(images), outputs=layers)

        return self._jitted(("activation", layers), lambda: activation)

    # ------------------------------------------------------------------ helpers

    def _check_images(self, images: Any, *, crop: bool) -> np.ndarray | jax.Array:
        expected = f"(N, {self.crop_size}, {self.crop_size}, 3)" if crop else "(N, H, W, 3)"
        if isinstance(images, list | tuple) and not images:  # no images: an empty batch, empty results
            return np.zeros((0, self.crop_size, self.crop_size, 3), np.uint8)
        if isinstance(images, list | tuple):
            shapes = sorted({tuple(np.shape(image)) for image in images})
            if len(shapes) > 1:
                raise ValueError(
                    f"expected one batch {expected}, got a list of {len(images)} images of {len(shapes)} different "
                    f"shapes ({', '.join(map(str, shapes[:3]))}{', …' if len(shapes) > 3 else ''}); pass images of "
                    "one size together, e.g. one call per image with image[None]"
                )
        if not hasattr(images, "shape") or not hasattr(images, "dtype"):
            images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(
                f"expected uint8 RGB images with values 0-255 of shape {expected}, got dtype {images.dtype}; "
                "for floats in [0, 1] use (x * 255).round().astype(np.uint8)"
            )
        if images.ndim != 4 or images.shape[-1] != 3:
            hint = " (add a batch axis: images[None])" if images.ndim == 3 and images.shape[-1] == 3 else ""
            hint = hint or (" (grey images: np.repeat(x[..., None], 3, -1))" if images.ndim == 3 else "")
            if images.ndim == 4 and images.shape[-1] in (1, 4):
                hint = " (grey: np.repeat(x, 3, -1); RGBA: x[..., :3])"
            raise ValueError(f"expected uint8 RGB images of shape {expected}, got shape {images.shape}{hint}")
        if crop and images.shape[1:3] != (self.crop_size, self.crop_size):
            raise ValueError(
                f"expected images of shape {expected} (the crop size), got shape {images.shape}; use "
                "clf.prepare(images) to rescale and centre-crop, or dense=True for images of any size"
            )
        return images

    def _map(self, fn: Any, images: Any) -> Any:
        """Applies `fn(variables, batch)` in chunks of `batch_size` (the last padded); NumPy (pytree) result."""
        count = len(images)
        if count == 0:  # an empty batch: empty outputs of the right shapes, nothing run
            one = jax.ShapeDtypeStruct((1, *images.shape[1:]), images.dtype)
            shapes = jax.eval_shape(fn, self._variables, one)
            return jax.tree_util.tree_map(lambda s: np.zeros((0, *s.shape[1:]), s.dtype), shapes)
        if count <= self.batch_size:
            return jax.tree_util.tree_map(np.asarray, fn(self._variables, jnp.asarray(images)))
        outputs = []
        for start in range(0, count, self.batch_size):
            chunk = jnp.asarray(images[start : start + self.batch_size])
            real = len(chunk)
            if real < self.batch_size:  # same shape for every call: one compilation
                pad = jnp.repeat(chunk[-1:], self.batch_size - real, axis=0)
                chunk = jnp.concatenate([chunk, pad])
            outputs.append(
                jax.tree_util.tree_map(lambda x, real=real: np.asarray(x)[:real], fn(self._variables, chunk))
            )
        return jax.tree_util.tree_map(lambda *parts: np.concatenate(parts), *outputs)

    # ------------------------------------------------------------------ the test protocol (evaluate's runner)

    def test_protocol(
        self,
        method: str = "dense",
        scales: int | Sequence[int] | None = None,
        *,
        flips: str | bool = "auto",
        pooling: str | None = None,
        layers: Sequence[str] = ("fc7",),
    ) -> TestProtocol:
        """The `TestProtocol` of this net (resolved): `scales` default ``config.eval_scale``, `flips` 'auto'
        (as trained), `pooling` None (``config.dense_pooling``); batches of `batch_size` crops' worth of pixels."""
        scales, size = int(self.config.eval_scale) if scales is None else scales, self.batch_size
        protocol = TestProtocol(method, scales, flips, pooling, batch_size=size, layers=tuple(layers))
        return protocol.resolve(self.config)

    def run(
        self, examples: Any, protocol: TestProtocol, *, name: str = "predict", log_every_s: float | None = None
    ) -> dict[str, Any]:
        """`evaluation.runner.run_evaluation` of this net: `examples` {'index', 'label', 'scaled': {Q: image}}."""
        if not hasattr(self, "_mesh"):
            self._mesh = parallel.create_mesh()
            self._replicated = runner.replicate(self.params, self._mesh)
        options = dict(mean_rgb=self.mean_rgb, mesh=self._mesh, name=name, log_every_s=log_every_s)
        return runner.run_evaluation(self.model, self._replicated, examples, protocol.resolve(self.config), **options)

    def run_images(self, images: Any, protocol: TestProtocol) -> dict[str, Any]:
        """`run` on an (N, H, W, 3) uint8 batch (or a list of images of any sizes), rescaled to each Q here."""
        protocol = protocol.resolve(self.config)
        examples = protocols.scaled_examples(images, protocol.test_scales)
        return self.run(examples, protocol)

    # ------------------------------------------------------------------ public API

    def prepare(self, images: Any, scale: int | None = None) -> np.ndarray:
        """Rescales uint8 images so the smaller side is `scale` (default ``config.eval_scale``), centre-crops."""
        images = self._check_images(images, crop=False)
        scale = int(scale or self.config.eval_scale)
        protocols.check_scales([scale], self.crop_size)
        return np.asarray(center_crop(resize_smaller_side(images, scale), self.crop_size))

    def logits(self, images: Any) -> np.ndarray:
        """uint8 RGB (N, crop, crop, 3) → float32 logits (N, classes)."""
        self._require_head()
        images = self._check_images(images, crop=True)
        return self._map(self._logits_fn, images).astype(np.float32)

    def probabilities(
        self,
        images: Any,
        *,
        dense: bool = False,
        scales: int | Sequence[int] | None = None,
        flips: str | bool = "auto",
        pooling: str | None = None,
    ) -> np.ndarray:
        """Soft-max posteriors (N, classes): of the crops, or the paper's dense multi-scale protocol.

        `flips` (dense): 'auto' averages with the mirrored image if the run trained with flips; 'yes'/'no'.
        `pooling` (dense): the pooling rule (`protocols.DENSE_POOLING`); None: the run's config.
        """
        self._require_head()
        if not dense:
            return np.asarray(jax.nn.softmax(self.logits(images), axis=-1))
        images = self._check_images(images, crop=False)
        protocol = self.test_protocol("dense", scales, flips=flips, pooling=pooling)
        return self.run_images(images, protocol)["posteriors"]["dense"]

    def predict(
        self,
        images: Any,
        top_k: int = 5,
        *,
        dense: bool = False,
        scales: int | Sequence[int] | None = None,
        flips: str | bool = "auto",
        pooling: str | None = None,
    ) -> Prediction:
        """Top-k classes with probabilities (and names where the data set has them).

        ``dense=False``: `images` are crops (N, crop, crop, 3). ``dense=True``:
        images of any size (at least the crop size after rescaling), rescaled
        to each Q in `scales` (default ``config.eval_scale``), dense over the
        image and its flip, posteriors averaged (paper §3.2; `pooling` as `probabilities`).
        """
        probabilities = self.probabilities(images, dense=dense, scales=scales, flips=flips, pooling=pooling)
        k = max(1, min(int(top_k), probabilities.shape[-1]))
        ids = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
        top = np.take_along_axis(probabilities, ids, axis=-1)
        names = None
        if self.class_names is not None:
            names = [[self.class_names[c] for c in row] for row in ids]
        return Prediction(class_ids=ids, probabilities=top, names=names)

    def features(
        self,
        images: Any,
        layer: str | Sequence[str] = "fc7",
        *,
        dense: bool = False,
        scales: int | Sequence[int] | None = None,
        normalize: bool = True,
        combine: str = "average",
        normalize_scales: bool = False,
        flips: str | bool = "auto",
        pooling: str | None = None,
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Activations of `layer` (one of `self.layers`), or a dict of several from one forward pass.

        ``dense=False``: crops (N, crop, crop, 3) → the activation as is:
        (N, h, w, C) for conv/pool layers, (N, F) for fc6/fc7/fc8.
        ``dense=True``: paper App. B — images of any size, rescaled to each Q
        in `scales`, the fully-convolutional activation map globally averaged,
        averaged with the flipped image's (`flips`), then over scales
        ``combine``d ('average' → (N, C), 'stack' → (N, len(scales)·C)) and
        L2-normalised (if `normalize`; ``normalize_scales`` normalises each
        scale first too); `pooling` as `probabilities`.
        """
        layers = (layer,) if isinstance(layer, str) else tuple(layer)
        unknown = [name for name in layers if name not in self.layers]
        if unknown or not layers:
            raise ValueError(
                f"unknown layer(s) {unknown or layers} for VGG-{self.model.variant}; valid layers: {self.layers}"
            )
        self._require_head(layers)
        if not dense:
            result = self._map(self._activation_fn(layers), self._check_images(images, crop=True))
        else:
            if combine not in ("average", "stack"):
                raise ValueError(f"combine must be 'average' or 'stack' (paper App. B), got {combine!r}")
            images = self._check_images(images, crop=False)
            protocol = self.test_protocol("descriptor", scales, flips=flips, pooling=pooling, layers=layers)
            descriptors = self.run_images(images, protocol)["descriptors"]  # (N, scales, ΣF), layers in order
            ends = np.cumsum(executor.layer_widths(self.model, layers))
            result = {}
            for name, start, end in zip(layers, [0, *ends[:-1]], ends, strict=True):
                stacked = descriptors[..., start:end]  # (N, scales, C)
                if normalize:
                    result[name] = protocols.combine_scales(stacked, combine, normalize_scales)
                else:  # the raw pooled activations, combined the same way
                    result[name] = stacked.mean(1) if combine == "average" else stacked.reshape(len(stacked), -1)
        return result[layer] if isinstance(layer, str) else {name: result[name] for name in layers}

    def localise(
        self,
        images: Any,
        classifiers: Classifier | Sequence[Classifier] | None = None,
        *,
        top_k: int | None = None,
        scales: int | Sequence[int] | None = None,
        flips: str | bool | None = None,
        pooling: str | None = None,
        merge_iou: float | None = None,
        classifier_method: str = "both",
        classifier_scales: int | Sequence[int] | None = None,
    ) -> Any:
        """Paper App. A, protocol 2, with this localisation net: top-k classes and one box each.

        `images`: uint8 RGB, an (N, H, W, 3) batch or a list of (H, W, 3) images of any sizes.
        `classifiers` give the class scores (several are fused); by default those of
        ``config.loc.classifiers``, else the classifier this net started from (``warm_start.checkpoint``);
        each is tested with `classifier_method` (default 'both': dense + multi-crop, the paper's best) at
        `classifier_scales` (default its ``eval_scale``). `scales`, `flips`, `merge_iou` and `top_k` default
        to ``config.loc``, `pooling` to ``config.dense_pooling``. Returns a `vgg_jax.localisation.dense.Localisation`
        (boxes as normalised corners; ``.pixel_boxes(i, H, W)`` for drawing).
        """
        from vgg_jax.localisation import dense as localise_dense

        if self.model.box_head == "none" or "loc" not in self.config:
            raise ValueError(f"{self!r} has no box layer (fc8_box): load a localisation run (configs/loc.py)")
        loc = self.config.loc
        if len(images) == 0:  # no images: an empty result (k per image as asked)
            k = max(1, min(int(loc.top_k if top_k is None else top_k), self.num_classes))
            empty = np.zeros((0, k), np.float32)
            return localise_dense.Localisation(empty.astype(np.int64), empty, np.zeros((0, k, 4), np.float32), None)
        if classifiers is None:
            classifiers = self.default_classifiers()
        classifiers = [classifiers] if isinstance(classifiers, Classifier) else list(classifiers)
        images = [self._check_images(np.asarray(image)[None], crop=False)[0] for image in images]
        scales = scales if scales is not None else tuple(loc.test_scales)
        box_protocol = self.test_protocol("maps", scales, flips=loc.flip if flips is None else flips, pooling=pooling)
        class_protocols = [c.test_protocol(classifier_method, classifier_scales) for c in classifiers]
        return localise_dense.localise_images(
            [(self, box_protocol)],
            list(zip(classifiers, class_protocols, strict=True)),
            images,
            merge_iou=loc.merge_iou if merge_iou is None else merge_iou,
            top_k=loc.top_k if top_k is None else top_k,
        )

    def default_classifiers(self) -> list[Classifier]:
        """A localisation run's classification nets: ``config.loc.classifiers``, else its warm start's run."""
        if not hasattr(self, "_classifiers"):
            spec = self.config.loc.classifiers or self.config.warm_start.checkpoint
            runs = [part.strip() for part in spec.split(",") if part.strip()]
            if not runs:
                raise ValueError(
                    "no classification net: pass classifiers=vgg_jax.load(...) or set config.loc.classifiers"
                )
            self._classifiers = [load(run, step="best", batch_size=self.batch_size) for run in runs]
        return self._classifiers


def class_names_for(config: ml_collections.ConfigDict, directory: str | None = None) -> list[str] | None:
    """Names from a converted config's ``class_names``, else the run's ``class_names.json``; never the data set.

    Loading a run must not start a download (or import TensorFlow): a training run stores its data set's
    names at start (`vgg_jax.training.resume.record_start`). Runs older than that get None and a one-line warning.
    """
    if "class_names" in config:
        names = config.class_names
        return list(names) if names is not None else None
    if directory is not None:
        stored = epath.Path(directory) / checkpoints.CLASS_NAMES_FILE
        if stored.exists():
            return list(json.loads(stored.read_text()))
    logging.warning(
        "no class names stored with this run (%s; data set %r): predictions carry class ids only",
        directory,
        config.get("dataset"),
    )
    return None


def load(path: str, step: int | str | None = None, *, batch_size: int = 64, dtype: Any = jnp.float32) -> Classifier:
    """A `Classifier` from a run directory: a training workdir or the output of `vgg_jax.weights.convert`.

    `path` may be relative or start with `~`. `step`: None or 'latest' (newest checkpoint), 'best' (lowest validation
    top-1 error) or a step number. Inference runs in `dtype` (float32 by
    default, whatever the run trained in).
    """
    directory = paths.resolve(path)
    params, config, resolved = checkpoints.restore_params(directory, step)
    names = class_names_for(config, directory)
    return Classifier(config, params, step=resolved, class_names=names, batch_size=batch_size, dtype=dtype)
