"""VGG features for perceptual and style losses: differentiable, jittable, any image size (paper §2, Table 1).

The very deep nets of the paper (configs D and E: VGG-16 and VGG-19) are the
usual feature extractors of image-synthesis losses, which compare images by
their activations instead of their pixels:

* **perceptual (feature reconstruction) loss** — mean squared (or absolute)
  difference of activations (Johnson et al., *Perceptual Losses for Real-Time
  Style Transfer and Super-Resolution*, ECCV 2016, eq. 2);
* **style loss** — squared Frobenius distance of Gram matrices of activations
  (Gatys et al., *Image Style Transfer Using CNNs*, CVPR 2016; normalised as
  Johnson et al. eq. 3-4);
* **LPIPS** (v0.1, VGG) — Zhang et al., *The Unreasonable Effectiveness of
  Deep Features as a Perceptual Metric*, CVPR 2018: unit-normalised VGG-16
  activations, squared differences weighted per channel by linear weights
  learned from human judgements (shipped in ``vgg_jax/assets``, from the
  ``lpips`` pip package), averaged over positions, summed over layers.

Usage::

    from vgg_jax import perceptual
    net, params = perceptual.pretrained("lpips")            # VGG-16 relu1_2 … relu5_3, images in [0, 1]
    loss = perceptual.perceptual_loss(net, params, x, y)    # x, y: float (N, H, W, 3) RGB
    grad = jax.grad(perceptual.style_loss, argnums=2)(net, params, x, style)
    net, params = perceptual.pretrained("lpips", source="torchvision")
    distances = perceptual.lpips(net, params, x, y)          # (N,) LPIPS v0.1

`VGGFeatures` is a frozen (hashable) description of the network and input
convention; its parameters are passed explicitly (close over them, or pass
``net`` as a static argument of `jax.jit`). Inputs are float RGB NHWC in a
declared range (``[0,1]``, ``[-1,1]`` or ``0-255``), mapped to the 0–255 scale
minus the weights' mean RGB. Concrete images that cannot be in that range are
refused with the range in the message — integer images into a float range,
values beyond it by more than `RANGE_TOLERANCE` of its span (0–255 images into
``[0,1]`` would give activations 255× off and a loss that trains nothing) —
but inside `jax.jit` or `jax.grad` the images are traced and the check is
skipped. An empty batch gives empty features; its losses are an error — the input every vgg_jax network takes (converted
weights have their own normalisation folded into conv1_1, see convert.py).
Only conv-stage activations are used, so any image size works as long as the
deepest requested layer keeps one pixel after its max-pools. Activations are
named as in `vgg_jax.models.feature_names`: ``convB_I`` (before the ReLU),
``reluB_I`` (after), ``poolB``. Computation runs in `dtype` (float32 or
bfloat16; parameters stay float32); losses are accumulated in float32.

No TensorFlow is imported by this module or by what it imports.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax import models
from vgg_jax.preprocess import CAFFE_MEAN_RGB

LPIPS_FILE = pathlib.Path(__file__).resolve().parent / "assets" / "lpips_vgg_v0.1.json"
# LPIPS calibrated its weights on torchvision's VGG-16, which takes ImageNet-normalised RGB.
_TORCHVISION_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)


@dataclasses.dataclass(frozen=True)
class LayerSet:
    """A named choice of network and activations from the literature."""

    variant: str
    layers: tuple[str, ...]
    reference: str


PRESETS: dict[str, LayerSet] = {
    "lpips": LayerSet(
        "D",
        ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"),
        "VGG-16 layers LPIPS compares (Zhang et al., CVPR 2018); the common 'VGG perceptual loss'",
    ),
    "johnson_content": LayerSet("D", ("relu2_2",), "Johnson et al. 2016 feature reconstruction loss (VGG-16)"),
    "johnson_style": LayerSet(
        "D", ("relu1_2", "relu2_2", "relu3_3", "relu4_3"), "Johnson et al. 2016 style reconstruction loss (VGG-16)"
    ),
    "gatys_style": LayerSet(
        "E", ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"), "Gatys et al. 2016 style layers (VGG-19)"
    ),
    "gatys_content": LayerSet("E", ("relu4_2",), "Gatys et al. 2016 content layer (VGG-19)"),
}

INPUT_RANGES: dict[str, tuple[float, float]] = {"[0,1]": (0.0, 1.0), "[-1,1]": (-1.0, 1.0), "0-255": (0.0, 255.0)}
# Beyond the declared range by more than this fraction of its span is refused; resampling overshoot is allowed.
RANGE_TOLERANCE = 0.01

Params = Mapping[str, Any]
Features = dict[str, jax.Array]


def _input_range(value: str | Sequence[float]) -> tuple[float, float]:
    if isinstance(value, str):
        key = value.replace(" ", "")
        if key not in INPUT_RANGES:
            raise ValueError(f"unknown input range {value!r}; expected one of {list(INPUT_RANGES)} or (low, high)")
        return INPUT_RANGES[key]
    low, high = (float(v) for v in value)
    if not high > low:
        raise ValueError(f"input range must have high > low, got {value}")
    return low, high


@dataclasses.dataclass(frozen=True)
class VGGFeatures:
    """Named activations of VGG-`variant` on float RGB images, as a differentiable function of the images.

    Attributes:
      variant: a configuration of paper Table 1 (usually 'D' or 'E').
      layers: default activations returned (names of `models.feature_names`, conv stage only).
      mean_rgb: subtracted on the 0–255 scale (the weights' convention: `Classifier.mean_rgb`).
      input_range: (low, high) of the images, or '[0,1]', '[-1,1]', '0-255'.
      width_multiplier: the network's width (1.0 for published weights).
      dtype: compute dtype (jnp.float32 or jnp.bfloat16).
      lrn_alpha_over_size: LRN convention (A-LRN only).
    """

    variant: str = "D"
    layers: tuple[str, ...] = PRESETS["lpips"].layers
    mean_rgb: tuple[float, ...] = CAFFE_MEAN_RGB
    input_range: Any = (0.0, 1.0)
    width_multiplier: float = 1.0
    dtype: Any = jnp.float32
    lrn_alpha_over_size: bool = False

    def __post_init__(self) -> None:
        # Normalised here so that equal descriptions hash equal (a static argument of jax.jit).
        object.__setattr__(self, "layers", self._check_layers(self.layers))
        object.__setattr__(self, "input_range", _input_range(self.input_range))
        object.__setattr__(self, "mean_rgb", tuple(float(m) for m in self.mean_rgb))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))

    def _check_layers(self, layers: str | Sequence[str]) -> tuple[str, ...]:
        layers = (layers,) if isinstance(layers, str) else tuple(layers)
        known = [name for name in models.feature_names(self.variant) if not name.startswith("fc")]
        unknown = [name for name in layers if name not in known]
        if unknown or not layers:
            raise ValueError(
                f"unknown or non-convolutional layer(s) {unknown or layers} for VGG-{self.variant}; "
                f"perceptual features are any of {known}"
            )
        return layers

    @property
    def model(self) -> models.VGG:
        # The head's sizes are irrelevant: only conv-stage activations are ever computed.
        return models.VGG(
            variant=self.variant,
            width_multiplier=self.width_multiplier,
            lrn_alpha_over_size=self.lrn_alpha_over_size,
            dtype=self.dtype,
        )

    def min_size(self, layers: Sequence[str] | None = None) -> int:
        """Smallest image side the requested layers need (one pixel after their max-pools)."""
        return models.min_feature_size(self._check_layers(layers) if layers else self.layers)

    def __call__(self, params: Params, images: jax.Array, layers: str | Sequence[str] | None = None) -> Features:
        """{layer: (N, h, w, C) activation} for float RGB `images` (N, H, W, 3) in `input_range`."""
        layers = self._check_layers(layers) if layers else self.layers
        images = jnp.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected float RGB images (N, H, W, 3), got shape {images.shape}")
        self._check_range(images)
        low, high = self.input_range
        x = (images.astype(jnp.float32) - low) * (255.0 / (high - low)) - jnp.asarray(self.mean_rgb, jnp.float32)
        return self.model.apply({"params": conv_params(params)}, x.astype(self.dtype), outputs=layers)

    def _check_range(self, images: jax.Array) -> None:
        """Refuses concrete images that cannot be in `input_range` (traced ones, inside jit/grad, are not checked)."""
        if isinstance(images, jax.core.Tracer):
            return
        low, high = self.input_range
        declared = f"input_range=({low:g}, {high:g})"
        if jnp.issubdtype(images.dtype, jnp.integer) and (low, high) != INPUT_RANGES["0-255"]:
            raise ValueError(
                f"images of dtype {images.dtype} (0-255 values) into a net declared {declared}: convert them "
                f"(e.g. x / 255 for [0,1]) or declare input_range='0-255'"
            )
        if images.size == 0:
            return
        smallest, largest = float(jnp.min(images)), float(jnp.max(images))
        slack = RANGE_TOLERANCE * (high - low)
        if smallest < low - slack or largest > high + slack:
            raise ValueError(
                f"images with values in [{smallest:.4g}, {largest:.4g}] into a net declared {declared}: outside it "
                f"by more than {RANGE_TOLERANCE:.0%} of its span, the activations are off by that factor. Rescale "
                "them, or declare the range they are in (input_range='0-255', '[-1,1]' or (low, high))"
            )


def conv_params(params: Params) -> dict[str, Any]:
    """The conv layers of `params` (a Classifier's ``params``, or ``{'params': …}``): all features need.

    Dropping fc6–fc8 (89 % of VGG's weights) keeps them out of jitted calls.
    """
    if "params" in params and isinstance(params["params"], Mapping):
        params = params["params"]
    return {name: value for name, value in params.items() if not name.startswith("fc")}


def from_classifier(
    classifier: Any,
    layers: str | Sequence[str] = PRESETS["lpips"].layers,
    *,
    input_range: str | Sequence[float] = (0.0, 1.0),
    dtype: Any = jnp.float32,
) -> tuple[VGGFeatures, dict[str, Any]]:
    """(features, conv parameters on device) of a `vgg_jax.load` / `vgg_jax.pretrained` Classifier."""
    model = classifier.model
    net = VGGFeatures(
        variant=model.variant,
        layers=layers,
        mean_rgb=classifier.mean_rgb,
        input_range=input_range,
        width_multiplier=model.width_multiplier,
        dtype=dtype,
        lrn_alpha_over_size=model.lrn_alpha_over_size,
    )
    return net, jax.device_put(conv_params(classifier.params))


def pretrained(
    preset: str = "lpips",
    *,
    source: str | None = None,
    input_range: str | Sequence[float] = (0.0, 1.0),
    dtype: Any = jnp.float32,
    **kwargs: Any,
) -> tuple[VGGFeatures, dict[str, Any]]:
    """(features, parameters) of a `PRESETS` layer set with published weights (`vgg_jax.pretrained`).

    The default source is Keras' notop file (the authors' VGG-16/19 conv
    layers, the weights Johnson et al. and Gatys et al. used); 'torchvision'
    gives torchvision's (what LPIPS uses). `kwargs` go to `vgg_jax.pretrained`
    (cache_dir, url, sha256).
    """
    from vgg_jax import pretrained as weights

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {list(PRESETS)}")
    layer_set = PRESETS[preset]
    name = {"D": "vgg16", "E": "vgg19"}[layer_set.variant]
    if source in (None, "keras"):
        name += "_notop"
    classifier = weights.pretrained(name, source=source, **kwargs)
    return from_classifier(classifier, layer_set.layers, input_range=input_range, dtype=dtype)


def _weights(layers: tuple[str, ...], weights: Mapping[str, float] | Sequence[float] | None) -> dict[str, float]:
    if weights is None:
        return dict.fromkeys(layers, 1.0)
    if isinstance(weights, Mapping):
        return {layer: float(weights.get(layer, 0.0)) for layer in layers}
    weights = [float(w) for w in weights]
    if len(weights) != len(layers):
        raise ValueError(f"{len(weights)} layer weights for {len(layers)} layers {layers}")
    return dict(zip(layers, weights, strict=True))


def perceptual_loss(
    net: VGGFeatures,
    params: Params,
    images: jax.Array,
    targets: jax.Array | Features,
    *,
    layers: Sequence[str] | None = None,
    weights: Mapping[str, float] | Sequence[float] | None = None,
    distance: str = "mse",
) -> jax.Array:
    """Σ_layers w_l · mean over (N, h, w, C) of (φ_l(images) − φ_l(targets))² ('mse') or |·| ('l1').

    Johnson et al. 2016 eq. 2 (feature reconstruction loss) summed over
    layers. `targets` are images like `images`, or their features from `net`
    (computed once for a fixed target). Returns a float32 scalar.
    """
    layers = net._check_layers(layers) if layers else net.layers
    if distance not in ("mse", "l1"):
        raise ValueError(f"distance must be 'mse' or 'l1', got {distance!r}")
    _require_images(images, "perceptual_loss")
    # Two forward passes, not one over the concatenation: then a gradient with respect to `images` only
    # never runs backward through the targets' pass (a third less work than the concatenated batch).
    ours = net(params, images, layers)
    theirs = targets if isinstance(targets, Mapping) else net(params, targets, layers)
    total = jnp.zeros((), jnp.float32)
    for layer, weight in _weights(layers, weights).items():
        difference = ours[layer].astype(jnp.float32) - jnp.asarray(theirs[layer]).astype(jnp.float32)
        error = jnp.square(difference) if distance == "mse" else jnp.abs(difference)
        total = total + weight * jnp.mean(error)
    return total


def _require_images(images: jax.Array, loss: str) -> None:
    # The batch size is static even under jit: an empty batch is refused whether traced or not.
    if jnp.shape(images)[:1] == (0,):
        raise ValueError(f"{loss} of an empty batch (0 images) is undefined (a mean over no images); skip the call")


def gram_matrix(features: jax.Array) -> jax.Array:
    """(N, h, w, C) → (N, C, C): Σ_positions φ φᵀ / (C·h·w), in float32 (Johnson et al. 2016 eq. 3).

    Gatys et al. use the unnormalised sum; the normalisation makes layers of
    different sizes comparable and the value independent of the image size.
    """
    n, h, w, c = features.shape
    flat = features.reshape(n, h * w, c).astype(jnp.float32)
    return jnp.einsum("npc,npd->ncd", flat, flat, precision=jax.lax.Precision.HIGHEST) / (c * h * w)


def gram_matrices(
    net: VGGFeatures, params: Params, images: jax.Array, layers: Sequence[str] | None = None
) -> dict[str, jax.Array]:
    """{layer: Gram matrix (N, C, C)} of `images`: a style target computed once."""
    return {layer: gram_matrix(value) for layer, value in net(params, images, layers).items()}


def style_loss(
    net: VGGFeatures,
    params: Params,
    images: jax.Array,
    style: jax.Array | Mapping[str, jax.Array],
    *,
    layers: Sequence[str] | None = None,
    weights: Mapping[str, float] | Sequence[float] | None = None,
) -> jax.Array:
    """Σ_layers w_l · mean over images of ‖G_l(images) − G_l(style)‖²_F (Johnson et al. 2016 eq. 4).

    `style`: images (one, broadcast to every image, or one per image; any
    size, since Gram matrices do not depend on it) or `gram_matrices` of them.
    Returns a float32 scalar.
    """
    layers = net._check_layers(layers) if layers else net.layers
    _require_images(images, "style_loss")
    ours = gram_matrices(net, params, images, layers)
    theirs = style if isinstance(style, Mapping) else gram_matrices(net, params, jnp.asarray(style), layers)
    total = jnp.zeros((), jnp.float32)
    for layer, weight in _weights(layers, weights).items():
        difference = ours[layer] - jnp.asarray(theirs[layer], jnp.float32)
        total = total + weight * jnp.mean(jnp.sum(jnp.square(difference), axis=(-2, -1)))
    return total


@functools.cache
def lpips_weights() -> tuple[tuple[str, ...], tuple[np.ndarray, ...]]:
    """LPIPS v0.1's per-channel weights for VGG-16 relu1_2 … relu5_3: (layers, weights), non-negative.

    From the ``lpips`` pip package (0.1.4, BSD-2-Clause, ``weights/v0.1/vgg.pth``); see the JSON's fields.
    """
    data = json.loads(LPIPS_FILE.read_text(encoding="utf-8"))
    # NumPy, not jnp: a cached jnp array made while tracing would be a leaked tracer.
    return tuple(data["layers"]), tuple(np.asarray(w, np.float32) for w in data["weights"])


def _unit(features: jax.Array) -> jax.Array:
    # LPIPS's normalize_tensor: divide by the channel L2 norm plus 1e-10 (not max(norm, eps)), as published.
    features = features.astype(jnp.float32)
    return features / (jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True)) + 1e-10)


def lpips(net: VGGFeatures, params: Params, images: jax.Array, targets: jax.Array) -> jax.Array:
    """LPIPS distance (Zhang et al. 2018, v0.1, VGG-16 trunk) of each image to its target: (N,) float32.

    `net` must be the 'lpips' preset on torchvision's VGG-16 weights (what the
    linear weights were calibrated on): ``perceptual.pretrained("lpips",
    source="torchvision", input_range="[-1,1]")`` or any input range — the
    images are mapped to torchvision's normalisation by `net` as usual.
    """
    layers, weights = lpips_weights()
    if net.variant != "D" or net.width_multiplier != 1.0:
        raise ValueError(
            f"LPIPS is defined on VGG-16 (variant D, full width); got VGG-{net.variant} x{net.width_multiplier:g}"
        )
    if max(abs(ours - theirs) for ours, theirs in zip(net.mean_rgb, _TORCHVISION_MEAN_RGB, strict=True)) > 1e-3:
        raise ValueError(
            f"LPIPS's weights were calibrated on torchvision's VGG-16; this network's mean RGB {net.mean_rgb} is not "
            "torchvision's: use perceptual.pretrained('lpips', source='torchvision') (or source='timm')"
        )
    ours, theirs = net(params, images, layers), net(params, targets, layers)
    total = jnp.zeros(jnp.shape(images)[:1], jnp.float32)
    for layer, weight in zip(layers, weights, strict=True):
        difference = jnp.square(_unit(ours[layer]) - _unit(theirs[layer]))
        total = total + jnp.mean(difference @ weight, axis=(1, 2))
    return total
