"""Readers of the published VGG weight formats (paper §2 networks) → vgg_jax parameters.

Keras ``.h5`` / ``.weights.h5`` (h5py), torchvision state dicts
(``torch.load(weights_only=True)``), timm / torchvision ``.safetensors``
(``safetensors.numpy``, no torch); each is mapped to Caffe's layer names,
NHWC layouts and fc6 row order, and checked against the variant's structure
(Table 1). `vgg_jax.weights.convert` documents the conventions and writes run
directories from what these return.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax import models

KERAS_VARIANTS = {"D": "VGG16", "E": "VGG19"}
TORCHVISION_VARIANTS = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)

Params = dict[str, dict[str, np.ndarray]]


class ConversionError(ValueError):
    """The weight file does not match the requested variant (or is not a VGG file)."""


# --------------------------------------------------------------------------- Keras


def _decode(name: Any) -> str:
    return name.decode("utf8") if isinstance(name, bytes) else str(name)


def read_keras_h5(path: str | os.PathLike) -> dict[str, list[np.ndarray]]:
    """Keras layer name → its weight arrays in Keras' order (kernel, bias), for both file layouts."""
    import h5py

    layers: dict[str, list[np.ndarray]] = {}
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise ConversionError(
            f"{path}: not a readable HDF5 file ({error}); the file may be truncated or corrupt"
        ) from error
    with handle as f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" in root.attrs:  # legacy Keras 1/2 layout (and Keras 3's legacy model.save('x.h5'))
            for layer in map(_decode, root.attrs["layer_names"]):
                group = root[layer]
                names = [_decode(n) for n in group.attrs.get("weight_names", [])]
                if names:
                    layers[layer] = [np.asarray(group[n][()]) for n in names]
        elif "layers" in f:  # Keras 3 `.weights.h5`

            def visit(group: Any) -> None:
                for key, child in group.items():
                    if not isinstance(child, h5py.Group):
                        continue
                    variables = child.get("vars")
                    if isinstance(variables, h5py.Group) and len(variables):
                        name = _decode(variables.attrs.get("name", key))
                        order = sorted(variables.keys(), key=lambda k: int(k) if k.isdigit() else k)
                        layers[name] = [np.asarray(variables[k][()]) for k in order]
                    if "layers" in child:  # a nested model
                        visit(child["layers"])

            visit(f["layers"])
        else:
            raise ConversionError(
                f"{path}: not a Keras weight file (neither a legacy .h5 with 'layer_names' nor a Keras 3 "
                ".weights.h5 with a 'layers' group); top-level keys: {list(f.keys())}"
            )
    return layers


def _keras_to_ours(name: str) -> str | None:
    match = re.fullmatch(r"block(\d)_conv(\d)", name)
    if match:
        return f"conv{match.group(1)}_{match.group(2)}"
    return {"fc1": "fc6", "fc2": "fc7", "predictions": "fc8"}.get(name)


def from_keras_h5(path: str | os.PathLike, variant: str, *, absorb_preprocessing: bool = True) -> Params:
    """Parameters of `variant` (D or E) from a Keras VGG16/VGG19 weight file (notop: the conv layers only).

    With `absorb_preprocessing` (default) conv1_1 is made to take RGB input
    (its input channels reversed), so the network takes RGB minus
    ``CAFFE_MEAN_RGB`` like every vgg_jax model.
    """
    if variant not in KERAS_VARIANTS:
        raise ConversionError(f"Keras ships VGG16 (variant D) and VGG19 (variant E) only; got variant {variant!r}")
    raw = read_keras_h5(path)
    params: Params = {}
    unexpected = []
    for keras_name, arrays in raw.items():
        ours = _keras_to_ours(keras_name)
        if ours is None:
            unexpected.append(keras_name)
            continue
        if len(arrays) != 2:
            raise ConversionError(
                f"{path}: Keras layer {keras_name!r} ({ours}) has {len(arrays)} weight arrays, expected kernel and "
                f"bias; shapes {[a.shape for a in arrays]}"
            )
        kernel, bias = arrays
        if kernel.ndim < bias.ndim:
            kernel, bias = bias, kernel
        params[ours] = {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}
    if unexpected:
        raise ConversionError(
            f"{path}: layer(s) {unexpected} are not part of a Keras VGG16/VGG19 classifier (expected block<b>_conv<i>, "
            "fc1, fc2, predictions)"
        )
    # No fc1/fc2/predictions: an include_top=False ("notop") file, the conv layers only (checked as such).
    params = dict(sorted(params.items(), key=lambda item: _layer_order(item[0])))
    _check_structure(params, variant, path, source="keras", names=_keras_names(variant))
    if absorb_preprocessing:
        params["conv1_1"]["kernel"] = np.ascontiguousarray(params["conv1_1"]["kernel"][:, :, ::-1, :])
    return params


def _layer_order(layer: str) -> tuple[int, int]:
    match = re.fullmatch(r"conv(\d)_(\d)", layer)
    return (int(match.group(1)), int(match.group(2))) if match else (9, int(layer[2:]))


def _keras_names(variant: str) -> dict[str, str]:
    names = {}
    for layer in models.layer_names(variant):
        match = re.fullmatch(r"conv(\d)_(\d)", layer)
        names[layer] = f"block{match.group(1)}_conv{match.group(2)}" if match else None
    names.update(fc6="fc1", fc7="fc2", fc8="predictions")
    return names


# --------------------------------------------------------------------------- torchvision


def _torchvision_indices(variant: str) -> list[int]:
    """Index in torchvision's `features` Sequential of each conv of `variant` (conv, ReLU, …, MaxPool)."""
    indices, position = [], 0
    for kernels in models._KERNELS[variant]:
        for _ in kernels:
            indices.append(position)
            position += 2  # Conv2d, ReLU
        position += 1  # MaxPool2d
    return indices


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A state-dict file as NumPy arrays: ``.safetensors`` with safetensors.numpy (no torch), else
    ``torch.load(..., weights_only=True)`` (never unpickling arbitrary objects)."""
    if str(path).endswith(".safetensors"):
        return read_safetensors(path)
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "reading a torchvision .pth file needs PyTorch (`pip install torch`); alternatively pass a dict of "
            "NumPy arrays to from_torchvision_state_dict"
        ) from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, OSError) as error:  # also torch's refusal of non-weight objects
        raise ConversionError(
            f"{path}: not a readable PyTorch weight file ({type(error).__name__}: {error}); the file may be "
            "truncated or corrupt, or not a plain state dict"
        ) from error
    if not isinstance(state, Mapping):
        raise ConversionError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(state)}")
    return {
        key: value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        for key, value in state.items()
    }


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file as NumPy arrays, with ``safetensors.numpy`` (no torch, no pickle)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ConversionError(f"{path}: not a readable .safetensors file ({error})") from error


def timm_to_torchvision_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """timm's VGG keys → torchvision's (the inverse of timm's ``vgg._filter_fn``).

    timm runs fc6/fc7 as convolutions (``pre_logits.fc1``: (O, C, k, k);
    ``pre_logits.fc2``: (O, I, 1, 1)) and names fc8 ``head.fc``; flattening a
    (O, C, k, k) kernel gives torchvision's (O, C·k·k) rows in the same NCHW
    order. Keys already in torchvision's layout pass through.
    """
    renames = {"pre_logits.fc1.": "classifier.0.", "pre_logits.fc2.": "classifier.3.", "head.fc.": "classifier.6."}
    out = {}
    for key, value in state.items():
        new = key
        for old, replacement in renames.items():
            if key.startswith(old):
                new = replacement + key[len(old) :]
        if new in ("classifier.0.weight", "classifier.3.weight") and np.ndim(value) == 4:
            value = np.reshape(np.asarray(value), (np.shape(value)[0], -1))
        out[new] = value
    return out


def from_timm_safetensors(path_or_state: str | os.PathLike | Mapping[str, Any], variant: str) -> Params:
    """Parameters of `variant` (A, B, D or E) from timm's ``vggNN.tv_in1k`` ``model.safetensors`` (no torch).

    timm's weights are torchvision's (``tv_in1k``) with timm's key names; the
    preprocessing (torchvision's mean/std) is absorbed as for torchvision.
    """
    if isinstance(path_or_state, str | os.PathLike):
        origin, state = str(path_or_state), read_safetensors(path_or_state)
    else:
        origin, state = "timm state dict", dict(path_or_state)
    return from_torchvision_state_dict(timm_to_torchvision_keys(state), variant, origin=origin)


def from_torchvision_state_dict(
    state_dict_or_path: Mapping[str, Any] | str | os.PathLike,
    variant: str,
    *,
    absorb_preprocessing: bool = True,
    origin: str | None = None,
) -> Params:
    """Parameters of `variant` (A, B, D or E) from a torchvision ``vgg11/13/16/19`` state dict (or its file).

    With `absorb_preprocessing` (default) conv1_1's input channels are divided
    by 255·std, so the network takes RGB 0–255 minus 255·mean (torchvision's
    normalisation, exactly). `origin` names the weights in error messages.
    """
    if isinstance(state_dict_or_path, str | os.PathLike):
        origin = origin or str(state_dict_or_path)
        state = load_torch_state_dict(state_dict_or_path)
    else:
        origin = origin or "state dict"
        state = {
            k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
            for k, v in state_dict_or_path.items()
        }
    if variant not in TORCHVISION_VARIANTS:
        raise ConversionError(
            f"torchvision ships vgg11/13/16/19 = variants {sorted(TORCHVISION_VARIANTS)}; got variant {variant!r}"
        )
    batch_norm = sorted(k for k in state if k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    if batch_norm:
        raise ConversionError(
            f"{origin}: batch-norm layers found ({batch_norm[:2]}…): this is a vgg*_bn state dict; only the "
            "paper's networks without batch normalisation (vgg11/13/16/19) can be converted"
        )
    pattern = re.compile(r"(features|classifier)\.(\d+)\.(weight|bias)")
    unknown = sorted(k for k in state if not pattern.fullmatch(k))
    if unknown:
        raise ConversionError(
            f"{origin}: unexpected key(s) {unknown[:5]} for a torchvision VGG state dict (expected "
            "features.<i>.weight/bias and classifier.<i>.weight/bias)"
        )
    conv_indices = sorted({int(pattern.fullmatch(k).group(2)) for k in state if k.startswith("features.")})
    expected = _torchvision_indices(variant)
    if conv_indices != expected:
        guesses = [v for v in TORCHVISION_VARIANTS if _torchvision_indices(v) == conv_indices]
        hint = f"; it looks like {TORCHVISION_VARIANTS[guesses[0]]} (variant {guesses[0]})" if guesses else ""
        raise ConversionError(
            f"{origin}: {len(conv_indices)} conv layers at features.{conv_indices}, but "
            f"{TORCHVISION_VARIANTS[variant]} (variant {variant}) has {len(expected)} at features.{expected}{hint}"
        )
    fc_indices = sorted({int(pattern.fullmatch(k).group(2)) for k in state if k.startswith("classifier.")})
    if fc_indices != [0, 3, 6]:
        raise ConversionError(
            f"{origin}: classifier layers at classifier.{fc_indices}, expected classifier.[0, 3, 6] (fc6, fc7, fc8)"
        )

    def get(key: str) -> np.ndarray:
        if key not in state:
            raise ConversionError(f"{origin}: {key} is missing")
        return np.asarray(state[key], dtype=np.float32)

    params: Params = {}
    for name, index in zip(models.conv_layer_names(variant), expected, strict=True):
        weight = get(f"features.{index}.weight")
        if weight.ndim != 4:
            raise ConversionError(f"{origin}: features.{index}.weight ({name}) has shape {weight.shape}, expected OIHW")
        params[name] = {"kernel": weight.transpose(2, 3, 1, 0), "bias": get(f"features.{index}.bias")}
    last_channels = params[models.conv_layer_names(variant)[-1]]["kernel"].shape[-1]
    for name, index in (("fc6", 0), ("fc7", 3), ("fc8", 6)):
        weight = get(f"classifier.{index}.weight")
        if weight.ndim != 2:
            raise ConversionError(
                f"{origin}: classifier.{index}.weight ({name}) has shape {weight.shape}, expected 2-D"
            )
        if name == "fc6":
            outputs, inputs = weight.shape
            window = math.isqrt(inputs // last_channels) if inputs % last_channels == 0 else 0
            if window == 0 or window * window * last_channels != inputs:
                raise ConversionError(
                    f"{origin}: classifier.0.weight (fc6) has shape {weight.shape}: its {inputs} inputs are not "
                    f"k·k·{last_channels} (the last conv's width) for any k"
                )
            # NCHW flatten (c, h, w) → NHWC flatten (h, w, c).
            weight = weight.reshape(outputs, last_channels, window, window).transpose(0, 2, 3, 1).reshape(outputs, -1)
        params[name] = {"kernel": np.ascontiguousarray(weight.T), "bias": get(f"classifier.{index}.bias")}
    names = {layer: _torchvision_key(variant, layer) for layer in models.layer_names(variant)}
    _check_structure(params, variant, origin, source="torchvision", names=names)
    if absorb_preprocessing:
        scale = 255.0 * np.asarray(TORCHVISION_STD, np.float32)
        params["conv1_1"]["kernel"] = params["conv1_1"]["kernel"] / scale[None, None, :, None]
    return params


def _torchvision_key(variant: str, layer: str) -> str:
    fc = {"fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6"}
    if layer in fc:
        return fc[layer]
    return f"features.{_torchvision_indices(variant)[models.conv_layer_names(variant).index(layer)]}"


# --------------------------------------------------------------------------- structure check, config


def has_head(params: Params) -> bool:
    """Whether `params` hold the classifier (fc6–fc8); Keras' notop files do not."""
    return any(layer in params for layer in ("fc6", "fc7", "fc8"))


def infer_hyperparameters(params: Params, variant: str) -> dict[str, Any]:
    """width_multiplier, fc_width, num_classes, crop_size implied by the shapes of `params`.

    Without a head (a notop file) only the width is known: fc_width and
    num_classes are 0 and crop_size the paper's 224 (it only matters to a head).
    """
    for layer in ("conv1_1", "fc6", "fc7", "fc8") if has_head(params) else ("conv1_1",):
        if layer not in params:
            raise ConversionError(f"layer {layer} is missing from the weights")
    width_multiplier = params["conv1_1"]["kernel"].shape[-1] / models.BLOCK_WIDTHS[0]
    if not has_head(params):
        return dict(width_multiplier=width_multiplier, fc_width=0, num_classes=0, crop_size=224)
    last = models.VGG(variant=variant, width_multiplier=width_multiplier).conv_widths()[-1]
    rows = params["fc6"]["kernel"].shape[0]
    window = math.isqrt(rows // last) if rows % last == 0 else 0
    if window == 0 or window * window * last != rows:
        raise ConversionError(
            f"fc6 kernel has shape {params['fc6']['kernel'].shape}: {rows} rows are not k·k·{last} (the width of "
            f"conv5 implied by conv1_1's {params['conv1_1']['kernel'].shape[-1]} channels) for any k"
        )
    return dict(
        width_multiplier=width_multiplier,
        fc_width=int(params["fc7"]["kernel"].shape[-1]),
        num_classes=int(params["fc8"]["kernel"].shape[-1]),
        crop_size=32 * window,
    )


def expected_shapes(variant: str, **hyperparameters: Any) -> dict[str, dict[str, tuple[int, ...]]]:
    """Shapes of every parameter of VGG-`variant` with the given widths (from shapes alone)."""
    crop = hyperparameters.get("crop_size", 224)
    model = models.VGG(variant=variant, **hyperparameters)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, crop, crop, 3), jnp.float32))
    return {layer: {k: tuple(v.shape) for k, v in leaves.items()} for layer, leaves in shapes["params"].items()}


def _check_structure(params: Params, variant: str, origin: str, *, source: str, names: Mapping[str, str]) -> None:
    """Every layer of `variant` present with the shape the inferred widths imply, and nothing else.

    A file without any fc layer is checked as the conv layers alone (a notop file).
    """
    wanted = models.layer_names(variant) if has_head(params) else models.conv_layer_names(variant)

    def described(layer: str) -> str:
        return f"{layer} ({source} {names[layer]!r})" if names.get(layer) else layer

    missing = [layer for layer in wanted if layer not in params]
    extra = [layer for layer in params if layer not in wanted]
    if missing or extra:
        guesses = [
            v
            for v in (KERAS_VARIANTS if source == "keras" else TORCHVISION_VARIANTS)
            if set(models.layer_names(v)) == set(params) or set(models.conv_layer_names(v)) == set(params)
        ]
        hint = f"; the file's layers match variant {guesses[0]}" if guesses else ""
        problems = []
        if missing:
            problems.append("missing layer(s) " + ", ".join(described(m) for m in missing))
        if extra:
            problems.append("layer(s) not in VGG-" + variant + ": " + ", ".join(extra))
        raise ConversionError(f"{origin}: does not match VGG-{variant}: {'; '.join(problems)}{hint}")
    hyper = infer_hyperparameters(params, variant)
    # A notop file has no head: any fc sizes will do for the shapes of the conv layers.
    shapes = expected_shapes(variant, **(hyper if has_head(params) else dict(hyper, fc_width=1, num_classes=1)))
    for layer in wanted:
        for leaf in ("kernel", "bias"):
            got = tuple(params[layer][leaf].shape)
            want = shapes[layer][leaf]
            if got != want:
                raise ConversionError(
                    f"{origin}: layer {described(layer)} {leaf} has shape {got} in the file but VGG-{variant} "
                    f"(width_multiplier={hyper['width_multiplier']:g}, fc_width={hyper['fc_width']}, "
                    f"num_classes={hyper['num_classes']}, crop_size={hyper['crop_size']}) expects {want}"
                )
