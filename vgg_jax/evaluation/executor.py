"""Paper §3.2 on device: the one builder of testing's jitted forward passes, used by every consumer.

`forward(kind, …)` returns the compiled function of one kind of test, built once per (kind, net, mean
RGB, mesh, flips, layers); jit then keeps one executable per input shape. `vgg_jax.evaluation.runner` feeds it
batches for `evaluate` (Tables 3–6), `transfer` (App. B), the notebook API (`Classifier.predict`,
`.features`, `.localise`) and App. A's protocol 2, so all of them compute the same numbers.

* ``dense``: §3.2 posteriors — the fully-convolutional net on canvases that hold each image top-left,
  score maps averaged over the image's own cells, soft-maxed, averaged with the mirrored image's;
* ``descriptor``: App. B — the named activation maps, each averaged over the image's own cells and
  over the mirror, concatenated in the order asked;
* ``maps``: App. A protocol 2 — the last layer's map of the image and of its mirror, as they are;
* ``views``: multi-crop and centre-crop posteriors, averaged over the views of each image.

Canvases are exact (`masked_dense_apply`): every conv's input and output are zeroed outside the image,
so each cell is that of the image alone, up to float summation order (tests; bench/RESULTS.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vgg_jax import models, preprocess
from vgg_jax.evaluation import arithmetic as protocols

KINDS = ("dense", "descriptor", "maps", "views")
_CACHE: dict[Any, Callable[..., Any]] = {}


def layer_map_size(layer: str, heights: Any, widths: Any, crop: int) -> tuple[Any, Any]:
    """Dense map size of a named activation (`models.feature_names`, or the last layer) on h×w inputs."""
    if layer.startswith("fc"):
        return protocols.dense_map_size(heights, widths, crop)
    pools = int(math.log2(models.min_feature_size([layer])))  # the max-pools before `layer`
    return protocols.pooled_size(heights, pools), protocols.pooled_size(widths, pools)


def layer_widths(model: models.VGG, layers: Sequence[str]) -> list[int]:
    """Channels of each named activation of `model`, from shapes alone."""
    crop = model.crop_size
    x = jax.ShapeDtypeStruct((1, crop, crop, 3), jnp.float32)
    shapes = jax.eval_shape(lambda v: model.init_with_output(jax.random.key(0), v, outputs=tuple(layers))[0], x)
    return [int(shapes[layer].shape[-1]) for layer in layers]


def masked_dense_apply(
    model: models.VGG, params: Any, x: jax.Array, heights: jax.Array, widths: jax.Array, **kwargs: Any
) -> Any:
    """`model.apply(dense=True)` on canvases that hold each image top-left, computed as on the image alone.

    Every conv's input and output are zeroed outside the image's region at their resolution (⌈h/2^b⌉
    rows in block b+1, the ceil-mode pools of dense evaluation): the conv sees the zeros that 'SAME'
    padding gives the unpadded image, and a pool window that straddles the border takes
    max(post-ReLU ≥ 0, 0), the value of the ceil-mode pool of the image alone.
    """

    def mask_conv(next_fun: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
        name = context.module.name or ""
        if context.method_name != "__call__" or not name.startswith("conv"):
            return next_fun(*args, **kwargs)
        pools = int(name[4 : name.index("_")]) - 1
        rows, cols = protocols.pooled_size(heights, pools), protocols.pooled_size(widths, pools)
        inside = protocols.top_left_mask(rows, cols, args[0].shape[1:3])[..., None]
        out = next_fun(args[0] * inside.astype(args[0].dtype), *args[1:], **kwargs)
        return out * inside.astype(out.dtype)  # so the next pool's window at the border sees max(x ≥ 0, 0) = x

    with nn.intercept_methods(mask_conv):
        return model.apply({"params": params}, x, dense=True, **kwargs)


def _canvases(images: jax.Array, sizes: jax.Array, mean_rgb: tuple[float, ...], flips: bool):
    """Preprocessed canvases (and their mirrors, each inside its own width) with each row's image size."""
    inside = protocols.top_left_mask(sizes[:, 0], sizes[:, 1], images.shape[1:3])
    x = jnp.where(inside[..., None], preprocess.preprocess_for_model(images, mean_rgb=mean_rgb), 0.0)
    if not flips:
        return x, sizes
    return protocols.with_flips(x, sizes[:, 1]), jnp.concatenate([sizes, sizes])  # a mirror keeps its size


def forward(
    kind: str,
    model: models.VGG,
    mean_rgb: Sequence[float],
    mesh: Mesh,
    flips: bool,
    layers: Sequence[str] = ("fc7",),
) -> Callable[..., Any]:
    """The jitted test function of `kind` (KINDS); outputs replicated over `mesh`, `meta` passed through.

    Canvas kinds take (params, uint8 canvases (B, H, W, 3), sizes (B, 2) of the image top-left, meta);
    ``views`` takes (params, uint8 crops (B, V, c, c, 3), meta). Returns (values, meta): posteriors (B, C),
    descriptors (B, ΣF), or maps (B, 1 + flips, h, w, D) over the whole canvas.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    mean_rgb, layers = tuple(float(v) for v in mean_rgb), tuple(layers)
    key = (kind, repr(model), mean_rgb, mesh, flips, layers)
    if key in _CACHE:
        return _CACHE[key]
    model = model.clone(remat=False)  # inference: no backward pass; the interceptor stays outside lifted scopes
    crop = model.crop_size

    def dense(params, images, sizes, meta):
        x, both = _canvases(images, sizes, mean_rgb, flips)
        maps = masked_dense_apply(model, params, x, both[:, 0], both[:, 1])
        cells = protocols.top_left_mask(*protocols.dense_map_size(sizes[:, 0], sizes[:, 1], crop), maps.shape[1:3])
        return protocols.dense_flip_posterior(maps, cells, flips), meta

    def descriptor(params, images, sizes, meta):
        x, both = _canvases(images, sizes, mean_rgb, flips)
        maps = masked_dense_apply(model, params, x, both[:, 0], both[:, 1], outputs=layers)
        pooled = []
        for layer in layers:
            size = layer_map_size(layer, sizes[:, 0], sizes[:, 1], crop)
            cells = protocols.top_left_mask(*size, maps[layer].shape[1:3])
            pooled.append(protocols.dense_flip_descriptor(maps[layer], cells, flips))
        return jnp.concatenate(pooled, axis=-1), meta

    def maps(params, images, sizes, meta):
        x, both = _canvases(images, sizes, mean_rgb, flips)
        out = masked_dense_apply(model, params, x, both[:, 0], both[:, 1]).astype(jnp.float32)
        count = images.shape[0]
        return (jnp.stack([out[:count], out[count:]], axis=1) if flips else out[:, None]), meta

    def views(params, crops, meta):
        batch, count = crops.shape[:2]
        x = preprocess.preprocess_for_model(crops.reshape(batch * count, *crops.shape[2:]), mean_rgb=mean_rgb)
        logits = model.apply({"params": params}, x).astype(jnp.float32).reshape(batch, count, -1)
        return protocols.average_posteriors(logits, axis=1), meta

    replicated = NamedSharding(mesh, P())
    function = {"dense": dense, "descriptor": descriptor, "maps": maps, "views": views}[kind]
    _CACHE[key] = jax.jit(function, out_shardings=(replicated, replicated))
    return _CACHE[key]


def clear_cache() -> None:
    """Forgets the compiled functions (a benchmark that swaps `masked_dense_apply` needs fresh ones)."""
    _CACHE.clear()
