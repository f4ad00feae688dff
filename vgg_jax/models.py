"""The VGG networks of paper §2 (Table 1): six configurations from one table.

Layer names follow the released Caffe models (``conv1_1`` … ``conv5_4``,
``fc6``, ``fc7``, ``fc8``) so that warm start and weight import copy layers by
name and a parameter path reads ``params/conv3_2/kernel``.

The classifier head is stored once and used two ways (paper §3.2):

* on a crop of ``crop_size`` (training, multi-crop testing): flatten + dense,
  returning logits ``(N, classes)``;
* fully convolutionally (dense testing): fc6 becomes a k×k convolution with
  k = crop_size / 32 and fc7, fc8 become 1×1 convolutions with the *same*
  parameters, reshaped; any image at least ``crop_size`` on each side yields a
  class score map ``(N, h, w, classes)``.

fc kernels have the shape of a dense layer, ``(k*k*C, F)``, with rows in
NHWC-flattening order, so a (k, k, C, F) reshape is the equivalent conv kernel.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vgg_jax.layers import ceil_mode_pad, local_response_norm, max_pool_2x2, sliding_patches

VARIANTS = ("A", "A-LRN", "B", "C", "D", "E")

# Table 1: conv widths per block, and the kernel size of every conv in each
# block (3 = 3×3, 1 = 1×1). Every block ends with a 2×2/2 max-pool.
BLOCK_WIDTHS = (64, 128, 256, 512, 512)
_KERNELS: dict[str, tuple[tuple[int, ...], ...]] = {
    "A": ((3,), (3,), (3, 3), (3, 3), (3, 3)),
    "A-LRN": ((3,), (3,), (3, 3), (3, 3), (3, 3)),
    "B": ((3, 3), (3, 3), (3, 3), (3, 3), (3, 3)),
    "C": ((3, 3), (3, 3), (3, 3, 1), (3, 3, 1), (3, 3, 1)),
    "D": ((3, 3), (3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
    "E": ((3, 3), (3, 3), (3, 3, 3, 3), (3, 3, 3, 3), (3, 3, 3, 3)),
}
# Only A-LRN normalises, after conv1_1 (and its ReLU), before pool1.
_LRN_AFTER = {"A-LRN": "conv1_1"}


def conv_layer_names(variant: str) -> list[str]:
    """Caffe names of the conv layers of `variant`, in order."""
    _check_variant(variant)
    return [
        f"conv{block + 1}_{index + 1}"
        for block, kernels in enumerate(_KERNELS[variant])
        for index in range(len(kernels))
    ]


def layer_names(variant: str) -> list[str]:
    """Caffe names of every parameterised layer of `variant`, in order."""
    return conv_layer_names(variant) + ["fc6", "fc7", "fc8"]


def feature_names(variant: str) -> list[str]:
    """Names accepted by ``VGG(...)(x, outputs=...)``, in forward order.

    ``convB_I`` is the pre-activation output of a conv, ``reluB_I`` the same
    after ReLU, ``norm1`` the LRN output (A-LRN), ``poolB`` the pooled block.
    ``fc6`` and ``fc7`` are taken after their ReLU (as the in-place Caffe blobs
    of those names are): the 4096-D descriptors of paper App. B. ``fc8`` is
    the logits (or the class score map when dense).
    """
    names = []
    for block, kernels in enumerate(_KERNELS[_check_variant(variant)]):
        for index in range(len(kernels)):
            conv = f"conv{block + 1}_{index + 1}"
            names += [conv, f"relu{block + 1}_{index + 1}"]
            if _LRN_AFTER.get(variant) == conv:
                names.append("norm1")
        names.append(f"pool{block + 1}")
    return names + ["fc6", "fc7", "fc8"]


_HEAD_NAMES = ("fc6", "fc7", "fc8")


def min_feature_size(names: Sequence[str]) -> int:
    """Smallest image side for which every conv-stage activation in `names` is non-empty.

    Block b (``convb_i``, ``relub_i``) sees the image after b − 1 2×2/2 max-pools
    (paper §2.1) and ``poolb`` after b, each flooring the size.
    """
    need = 1
    for name in names:
        match = re.fullmatch(r"(?:conv|relu)(\d)_\d|pool(\d)|norm1", name)
        if match is None:
            raise ValueError(f"{name!r} is not a conv-stage activation (convB_I, reluB_I, poolB, norm1)")
        pools = int(match.group(1)) - 1 if match.group(1) else int(match.group(2) or 0)
        need = max(need, 2**pools)
    return need


def _check_feature_size(height: int, width: int, names: set[str]) -> None:
    need = min_feature_size(sorted(names))
    if min(height, width) < need:
        deepest = max(sorted(names), key=lambda name: min_feature_size([name]))
        raise ValueError(
            f"activation {deepest} needs images of at least {need}x{need} (one pixel after its max-pools), "
            f"got {height}x{width}"
        )


def _check_variant(variant: str) -> str:
    if variant not in _KERNELS:
        raise ValueError(f"unknown VGG variant {variant!r}; expected one of {VARIANTS}")
    return variant


def _kernel_init(name: str, std: float) -> Any:
    if name == "normal":
        return nn.initializers.normal(stddev=std)
    if name == "glorot":
        return nn.initializers.glorot_uniform()
    if name == "he":  # not in the paper: He et al. (2015), what torchvision's VGG uses
        return nn.initializers.variance_scaling(2.0, "fan_in", "normal")
    raise ValueError(f"unknown initializer {name!r}; expected 'normal' (paper, std 0.01), 'glorot' or 'he'")


class FullyConnected(nn.Module):
    """A dense layer that can also run as the equivalent k×k convolution (paper §3.2).

    The kernel is stored as ``(window*window*in_channels, features)``; on an
    NHWC input of spatial size `window` this is flatten + matmul, and
    ``dense=True`` slides the same weights over any larger map: each output
    position's k×k×C patch (in the kernel's row order) times the kernel, one
    matmul — on XLA:CPU 2.6× faster than the same k×k convolution
    (bench/RESULTS.md, "Dense fc6"). A 1×1 window is a matmul over the last axis in both modes.
    """

    features: int
    window: int
    kernel_init: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, dense: bool) -> jax.Array:
        in_channels = x.shape[-1]
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (self.window * self.window * in_channels, self.features),
            self.param_dtype,
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
        x = x.astype(self.dtype)
        if dense:
            y = sliding_patches(x, self.window) @ kernel
        else:
            y = x.reshape(x.shape[0], -1) @ kernel
        return y + bias


def _conv_block(
    module: VGG, x: jax.Array, block: int, channels: int, kernel_init: Any, dense: bool = False
) -> tuple[jax.Array, list[tuple[str, jax.Array]]]:
    """One block of Table 1 (convs + ReLUs, LRN in A-LRN, 2×2/2 max-pool) in `module`'s scope.

    A function of the module rather than a submodule, so that the layer names
    stay `convB_I` (not `block3/conv3_1`) with or without `nn.remat` around it.
    Returns the pooled output and every named activation of the block, in order.
    """
    activations = []
    for index, size in enumerate(_KERNELS[module.variant][block]):
        name = f"conv{block + 1}_{index + 1}"
        x = nn.Conv(
            channels,
            (size, size),
            padding="SAME",
            kernel_init=kernel_init,
            dtype=module.dtype,
            param_dtype=module.param_dtype,
            name=name,
        )(x)
        activations.append((name, x))
        x = nn.relu(x)
        activations.append((f"relu{block + 1}_{index + 1}", x))
        if _LRN_AFTER.get(module.variant) == name:
            x = local_response_norm(x, alpha_over_size=module.lrn_alpha_over_size)
            activations.append(("norm1", x))
    if module.pooling == "avg":
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    else:
        if dense:
            x = ceil_mode_pad(x)
        x = max_pool_2x2(x)
    activations.append((f"pool{block + 1}", x))
    return x, activations


def _pooled_block(
    module: VGG, x: jax.Array, block: int, channels: int, kernel_init: Any, dense: bool = False
) -> jax.Array:
    return _conv_block(module, x, block, channels, kernel_init, dense)[0]


class VGG(nn.Module):
    """VGG configuration `variant` (paper Table 1).

    Attributes:
      variant: one of VARIANTS.
      num_classes: width of fc8.
      width_multiplier: scales every conv width (1.0 is the paper); for the
        narrow networks of tests and demos.
      fc_width: width of fc6 and fc7 (4096 in the paper).
      crop_size: training crop side (224); fc6 sees (crop_size/32)² positions.
      dropout_rate: after fc6 and fc7 when training (0.5).
      initializer: 'normal' (zero mean, `init_std`, the paper's random init),
        'glorot' (the paper's alternative to pre-training net A) or 'he'
        (not in the paper; torchvision's choice, which assumes normalised
        inputs: with raw pixels it needs a small learning rate). Biases are
        always zero.
      lrn_alpha_over_size: Caffe's LRN convention (α/n) instead of AlexNet's.
      dtype: compute dtype; param_dtype: storage dtype of the parameters.
      remat: recompute each conv block in the backward pass instead of storing
        its activations (memory for compute; see bench/RESULTS.md).
      box_head: paper App. A localisation: 'none' (fc8 gives class scores),
        'scr' (the last layer, ``fc8_box``, regresses one box (cx, cy, w, h)
        shared by all classes: 4 outputs) or 'pcr' (one box per class:
        4·num_classes outputs, class-major). See `vgg_jax.localisation.arithmetic`.
      pooling: 'max' (the paper's 2×2/2 max-pools) or 'avg' (average pools, as
        Gatys et al. use for image synthesis; `vgg_jax.perceptual`).
    """

    variant: str = "D"
    num_classes: int = 1000
    width_multiplier: float = 1.0
    fc_width: int = 4096
    crop_size: int = 224
    dropout_rate: float = 0.5
    initializer: str = "normal"
    init_std: float = 0.01
    lrn_alpha_over_size: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    box_head: str = "none"
    pooling: str = "max"

    @property
    def fc6_window(self) -> int:
        return self.crop_size // 32

    def conv_widths(self) -> tuple[int, ...]:
        return tuple(max(1, round(width * self.width_multiplier)) for width in BLOCK_WIDTHS)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool = False,
        dense: bool = False,
        outputs: Sequence[str] | None = None,
    ) -> jax.Array | dict[str, jax.Array]:
        """Runs the network on mean-subtracted NHWC images.

        Args:
          x: (N, H, W, 3). With ``dense=False`` H = W = crop_size; with
            ``dense=True`` both at least crop_size.
          train: enables dropout (needs a 'dropout' rng).
          dense: fully-convolutional head; returns (N, h, w, classes).
          outputs: names from `feature_names(variant)`; when given, returns a
            dict of those activations and stops after the last one needed.
        """
        _check_variant(self.variant)
        if self.crop_size % 32:
            raise ValueError(f"crop_size must be a multiple of 32, got {self.crop_size}")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"VGG expects NHWC RGB images (N, H, W, 3), got shape {x.shape}")
        height, width = x.shape[1:3]
        wanted = set(outputs or ())
        last = _last_layer(self)
        unknown = wanted - set(feature_names(self.variant)[:-1] + [last])
        if unknown:
            raise ValueError(
                f"unknown activation name(s) {sorted(unknown)} for VGG-{self.variant}; "
                f"known: {feature_names(self.variant)}"
            )
        if wanted and not wanted & set(_HEAD_NAMES):
            # Conv-stage activations only (e.g. perceptual losses): the convs take any size, so the crop
            # size does not matter; each requested block just needs at least one pixel after its pools.
            _check_feature_size(height, width, wanted)
        elif dense and min(height, width) < self.crop_size:
            raise ValueError(
                f"dense evaluation needs images of at least crop_size={self.crop_size} "
                f"on each side, got {height}x{width}"
            )
        elif not dense and (height, width) != (self.crop_size, self.crop_size):
            raise ValueError(
                f"the crop head expects {self.crop_size}x{self.crop_size} images, got "
                f"{height}x{width}; use dense=True for whole images"
            )
        captured: dict[str, jax.Array] = {}

        def keep(name: str, value: jax.Array) -> bool:
            """Records `value` if requested; True once every request is met."""
            if name in wanted:
                captured[name] = value
            return bool(wanted) and len(captured) == len(wanted)

        kernel_init = _kernel_init(self.initializer, self.init_std)
        x = x.astype(self.dtype)
        if self.remat and not wanted:
            # Keep only each block's input; recompute its convs in the backward pass.
            pooled = nn.remat(_pooled_block, static_argnums=(2, 3, 4, 5))
            for block, channels in enumerate(self.conv_widths()):
                x = pooled(self, x, block, channels, kernel_init, dense)
        else:
            for block, channels in enumerate(self.conv_widths()):
                x, activations = _conv_block(self, x, block, channels, kernel_init, dense)
                for name, value in activations:
                    if keep(name, value):
                        return captured

        head = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=kernel_init)
        x = FullyConnected(self.fc_width, self.fc6_window, name="fc6", **head)(x, dense)
        x = nn.relu(x)
        if keep("fc6", x):
            return captured
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = FullyConnected(self.fc_width, 1, name="fc7", **head)(x, dense)
        x = nn.relu(x)
        if keep("fc7", x):
            return captured
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = FullyConnected(box_outputs(self) if last == "fc8_box" else self.num_classes, 1, name=last, **head)(x, dense)
        if keep(last, x):
            return captured
        return x


BOX_HEADS = ("none", "scr", "pcr")


def _last_layer(model: VGG) -> str:
    """'fc8' (class scores) or 'fc8_box' (App. A box regression: its own name, so a classifier never fills it)."""
    if model.box_head not in BOX_HEADS:
        raise ValueError(f"box_head={model.box_head!r}: expected one of {BOX_HEADS}")
    return "fc8" if model.box_head == "none" else "fc8_box"


def box_outputs(model: VGG) -> int:
    """Width of fc8_box (paper App. A): 4 (SCR, one box for all classes) or 4 per class (PCR)."""
    return 4 if model.box_head == "scr" else 4 * model.num_classes


def from_config(config: Any, *, dtype: Any = None) -> VGG:
    """The network a run config describes (``config.model``, ``crop_size``, ``compute_dtype``)."""
    model = dict(config.model)
    return VGG(
        variant=model["variant"],
        num_classes=model["num_classes"],
        width_multiplier=model.get("width_multiplier", 1.0),
        fc_width=model.get("fc_width", 4096),
        crop_size=config.crop_size,
        dropout_rate=model.get("dropout_rate", 0.5),
        initializer=model.get("initializer", "normal"),
        init_std=model.get("init_std", 0.01),
        lrn_alpha_over_size=model.get("lrn_alpha_over_size", False),
        dtype=jnp.dtype(dtype or config.get("compute_dtype", "float32")),
        remat=bool(config.get("remat", False)),
        box_head=model.get("box_head", "none"),
    )


def parameter_count(variant: str, num_classes: int = 1000, crop_size: int = 224, **kwargs: Any) -> int:
    """Number of parameters, computed from shapes alone (no allocation)."""
    model = VGG(variant=variant, num_classes=num_classes, crop_size=crop_size, **kwargs)
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, crop_size, crop_size, 3), jnp.float32)
    )
    return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(shapes))


def main() -> None:
    """Prints the Markdown table of parameter counts in docs/models.md."""
    print("| config | weight layers | parameters |")
    print("|---|---|---|")
    for variant in VARIANTS:
        print(f"| {variant} | {len(layer_names(variant))} | {parameter_count(variant):,} |")


if __name__ == "__main__":
    main()
