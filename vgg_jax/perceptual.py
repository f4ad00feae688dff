"""VGG features for perceptual and style losses: differentiable, jittable, any image size (paper §2, Table 1).

Configs D and E (VGG-16/19) are the usual feature extractors of image-synthesis losses: the perceptual
loss (Johnson et al., ECCV 2016, eq. 2), the style loss on Gram matrices (Gatys et al., CVPR 2016,
normalised as Johnson et al. eq. 3-4) and LPIPS v0.1 (Zhang et al., CVPR 2018; its linear weights,
from the ``lpips`` package, ship in ``vgg_jax/assets``). `VGGFeatures` is a frozen, hashable
description of the net and its input convention; parameters are passed explicitly. Images in a
declared range are mapped to 0–255 minus the weights' mean RGB, what every vgg_jax net takes;
concrete images that cannot be in that range are refused (0–255 images into ``[0,1]`` give a loss
that trains nothing), traced ones go unchecked. Losses accumulate in float32. No TensorFlow is
imported. Usage, options and conventions: docs/pretrained.md.
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
POOLINGS = ("max", "avg")  # the paper's max-pools, or Gatys et al.'s average pools
REDUCTIONS = ("mean", "sum", "none")
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
      pooling: 'max' (the trained networks') or 'avg' (Gatys et al. 2016: "replacing the maximum pooling
        operation by average pooling yields slightly more appealing results" for image synthesis).
    """

    variant: str = "D"
    layers: tuple[str, ...] = PRESETS["lpips"].layers
    mean_rgb: tuple[float, ...] = CAFFE_MEAN_RGB
    input_range: Any = (0.0, 1.0)
    width_multiplier: float = 1.0
    dtype: Any = jnp.float32
    lrn_alpha_over_size: bool = False
    pooling: str = "max"

    def __post_init__(self) -> None:
        # Normalised here so that equal descriptions hash equal (a static argument of jax.jit).
        object.__setattr__(self, "layers", self._check_layers(self.layers))
        object.__setattr__(self, "input_range", _input_range(self.input_range))
        object.__setattr__(self, "mean_rgb", tuple(float(m) for m in self.mean_rgb))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

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
            pooling=self.pooling,
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
    pooling: str = "max",
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
        pooling=pooling,
    )
    return net, jax.device_put(conv_params(classifier.params))


def pretrained(
    preset: str = "lpips",
    *,
    source: str | None = None,
    input_range: str | Sequence[float] = (0.0, 1.0),
    dtype: Any = jnp.float32,
    pooling: str = "max",
    **kwargs: Any,
) -> tuple[VGGFeatures, dict[str, Any]]:
    """(features, parameters) of a `PRESETS` layer set with published weights (`vgg_jax.pretrained`).

    The default source is Keras' notop file (the authors' VGG-16/19 conv
    layers, the weights Johnson et al. and Gatys et al. used); 'torchvision'
    gives torchvision's (what LPIPS uses). ``pooling='avg'`` swaps the max-pools
    for average pools (Gatys et al.). `kwargs` go to `vgg_jax.pretrained`
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
    return from_classifier(classifier, layer_set.layers, input_range=input_range, dtype=dtype, pooling=pooling)


def _weights(layers: tuple[str, ...], weights: Mapping[str, float] | Sequence[float] | None) -> dict[str, float]:
    if weights is None:
        return dict.fromkeys(layers, 1.0)
    if isinstance(weights, Mapping):
        return {layer: float(weights.get(layer, 0.0)) for layer in layers}
    weights = [float(w) for w in weights]
    if len(weights) != len(layers):
        raise ValueError(f"{len(weights)} layer weights for {len(layers)} layers {layers}")
    return dict(zip(layers, weights, strict=True))


def _reduce(per_image: jax.Array, reduction: str) -> jax.Array:
    """(N,) losses → their mean or sum (scalars), or themselves ('none')."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return {"mean": jnp.mean, "sum": jnp.sum}.get(reduction, lambda x: x)(per_image)


def perceptual_loss(
    net: VGGFeatures,
    params: Params,
    images: jax.Array,
    targets: jax.Array | Features,
    *,
    layers: Sequence[str] | None = None,
    weights: Mapping[str, float] | Sequence[float] | None = None,
    distance: str = "mse",
    reduction: str = "mean",
) -> jax.Array:
    """Σ_layers w_l · mean over (h, w, C) of (φ_l(images) − φ_l(targets))² ('mse') or |·| ('l1'), per image.

    Johnson et al. 2016 eq. 2 (feature reconstruction loss) summed over
    layers. `targets` are images like `images`, or their features from `net`
    (computed once for a fixed target). Returns a float32 scalar (the mean
    over images with `reduction` 'mean', the default; 'sum'), or (N,) ('none').
    """
    layers = net._check_layers(layers) if layers else net.layers
    if distance not in ("mse", "l1"):
        raise ValueError(f"distance must be 'mse' or 'l1', got {distance!r}")
    _require_images(images, "perceptual_loss")
    # Two forward passes, not one over the concatenation: then a gradient with respect to `images` only
    # never runs backward through the targets' pass (a third less work than the concatenated batch).
    ours = net(params, images, layers)
    theirs = targets if isinstance(targets, Mapping) else net(params, targets, layers)
    total = jnp.zeros(jnp.shape(images)[:1], jnp.float32)
    for layer, weight in _weights(layers, weights).items():
        difference = ours[layer].astype(jnp.float32) - jnp.asarray(theirs[layer]).astype(jnp.float32)
        error = jnp.square(difference) if distance == "mse" else jnp.abs(difference)
        total = total + weight * jnp.mean(error, axis=(1, 2, 3))
    return _reduce(total, reduction)


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
    reduction: str = "mean",
) -> jax.Array:
    """Σ_layers w_l · ‖G_l(images) − G_l(style)‖²_F per image (Johnson et al. 2016 eq. 4).

    `style`: images (one, broadcast to every image, or one per image; any
    size, since Gram matrices do not depend on it) or `gram_matrices` of them.
    Returns a float32 scalar (the mean over images with `reduction` 'mean',
    the default; 'sum'), or (N,) ('none').
    """
    layers = net._check_layers(layers) if layers else net.layers
    _require_images(images, "style_loss")
    ours = gram_matrices(net, params, images, layers)
    theirs = style if isinstance(style, Mapping) else gram_matrices(net, params, jnp.asarray(style), layers)
    total = jnp.zeros(jnp.shape(images)[:1], jnp.float32)
    for layer, weight in _weights(layers, weights).items():
        difference = ours[layer] - jnp.asarray(theirs[layer], jnp.float32)
        total = total + weight * jnp.sum(jnp.square(difference), axis=(-2, -1))
    return _reduce(total, reduction)


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


def lpips(
    net: VGGFeatures, params: Params, images: jax.Array, targets: jax.Array, *, spatial: bool = False
) -> jax.Array:
    """LPIPS distance (Zhang et al. 2018, v0.1, VGG-16 trunk) of each image to its target: (N,) float32.

    ``spatial=True`` gives the distance map instead, (N, H, W) at the images' size: each layer's
    weighted squared difference upsampled bilinearly (half-pixel centres, as ``lpips``'s
    ``spatial=True``: torch's ``Upsample(mode='bilinear', align_corners=False)``), summed over layers.

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
    shape = jnp.shape(images)[:3]
    total = jnp.zeros(shape if spatial else shape[:1], jnp.float32)
    for layer, weight in zip(layers, weights, strict=True):
        distance = jnp.square(_unit(ours[layer]) - _unit(theirs[layer])) @ weight  # (N, h, w)
        # Upsampling only (h ≤ H): jax.image's triangle kernel then equals torch's align_corners=False bilinear.
        total = total + (jax.image.resize(distance, shape, "bilinear") if spatial else jnp.mean(distance, (1, 2)))
    return total
