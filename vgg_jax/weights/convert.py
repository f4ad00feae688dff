"""Import published VGG weights (paper §2 networks) into a vgg_jax run directory.

Sources:

* **Keras** ``keras.applications`` VGG16 / VGG19 (configs D, E): the legacy
  ``.h5`` layout (a group per layer with a ``weight_names`` attribute, at the
  root or under ``model_weights``, as in the published
  ``vgg16_weights_tf_dim_ordering_tf_kernels.h5``) and Keras 3's
  ``.weights.h5`` (``layers/<path>/vars/0,1`` with the layer name in the
  ``vars`` group's ``name`` attribute). Read with h5py; Keras is not needed.
  Layer names: ``block{b}_conv{i}`` → ``conv{b}_{i}``, ``fc1/fc2/predictions``
  → ``fc6/fc7/fc8``. Kernels are already HWIO / (in, out) and Keras' Flatten on
  NHWC gives the same (h, w, c) row order as ours.
  Keras' ``include_top=False`` ("notop") files hold the conv layers only: they
  convert to a network without fc6–fc8 (``config.model.include_top = False``)
  whose activations up to ``pool5`` work and whose classifier raises.
* **torchvision** ``vgg11/13/16/19`` state dicts (configs A, B, D, E; no
  batch-norm variants), read with ``torch.load(..., weights_only=True)`` (or,
  for a ``.safetensors`` file, with ``safetensors.numpy``, without torch):
  conv OIHW → HWIO, linear (out, in) → (in, out), fc6's rows reordered from
  NCHW flattening (c, h, w) to NHWC flattening (h, w, c).
* **timm** ``vggNN.tv_in1k`` ``model.safetensors`` (torchvision's weights in
  timm's layout, read with ``safetensors.numpy``, no torch): ``features.*`` as
  torchvision, fc6/fc7 stored as convolutions ``pre_logits.fc1/fc2`` (O, C, k, k)
  and fc8 as ``head.fc``; mapped back to torchvision's keys, then as above.

Weights with 1000 classes are ImageNet's (ILSVRC-2012, classes in sorted
WordNet-id order in every source): their config carries the WordNet ids
(``config.class_wnids``) and names (``config.class_names``) from
``vgg_jax/assets/imagenet_classes.json``, which was built from the data files
of the ``timm`` pip package (see its ``source`` field); ``--class_names``
overrides the names.

Preprocessing is absorbed into conv1_1 so that every run directory uses the
project's convention (RGB, 0–255, minus ``config.mean_rgb``, no std):

* Keras / Caffe: the net expects BGR minus the BGR mean. Reversing conv1_1's
  input-channel axis turns it into an RGB net; ``mean_rgb`` = Caffe's
  (123.68, 116.779, 103.939).
* torchvision: ``(x/255 - mean) / std`` = ``(x - 255·mean) / (255·std)``:
  ``mean_rgb`` = 255·mean and conv1_1's input channels are divided by 255·std.
  Exact, including the borders: the zero padding is applied after the
  normalisation in both frameworks. timm's VGG weights are torchvision's, with
  the same normalisation.

The original preprocessing is recorded in ``config.preprocessing`` and in the
checkpoint's ``meta``. Widths (``width_multiplier``, ``fc_width``), the number
of classes and the crop size (from fc6's fan-in) are inferred from the shapes
and checked against the variant's structure (Table 1); any mismatch is an error
naming the layer and both shapes, raised before anything is written.

Usage::

    python -m vgg_jax convert --source=keras --weights=vgg16.weights.h5 --variant=D --out=runs/keras_vgg16
    python -m vgg_jax convert --source=torchvision --weights=vgg19.pth --variant=E --out=runs/tv_vgg19 \\
        --class_names=imagenet_classes.txt
    python -m vgg_jax convert --source=timm --weights=model.safetensors --variant=D --out=runs/timm_vgg16

`vgg_jax.pretrained` downloads, checks and converts the published files itself.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import sys
from collections.abc import Sequence

import ml_collections

from vgg_jax.checkpointing import checkpoints
from vgg_jax.configs import common as configs_common
from vgg_jax.preprocess import CAFFE_MEAN_RGB
from vgg_jax.runtime import cli, paths
from vgg_jax.weights.formats import (
    TORCHVISION_MEAN,
    TORCHVISION_STD,
    ConversionError,
    Params,
    from_keras_h5,
    from_timm_safetensors,
    from_torchvision_state_dict,
    has_head,
    infer_hyperparameters,
)

SOURCES = ("keras", "torchvision", "timm")
IMAGENET_CLASSES_FILE = pathlib.Path(__file__).resolve().parents[1] / "assets" / "imagenet_classes.json"


def preprocessing_record(source: str, weights: str) -> dict[str, str]:
    """What the original network expected and how it was absorbed (for config and meta)."""
    if source == "keras":
        original = "Caffe: BGR channel order, 0-255, minus the BGR mean (103.939, 116.779, 123.68); no std"
        absorbed = "conv1_1 input channels reversed (BGR -> RGB); mean_rgb = (123.68, 116.779, 103.939)"
    else:
        original = f"{source}: RGB / 255, minus mean {TORCHVISION_MEAN}, divided by std {TORCHVISION_STD}"
        absorbed = "mean_rgb = 255 * mean; conv1_1 input channels divided by 255 * std"
    return dict(source=source, weights=os.path.basename(str(weights)), original=original, absorbed=absorbed)


def make_config(
    params: Params,
    variant: str,
    *,
    source: str,
    weights: str,
    class_names: Sequence[str] | None = None,
) -> ml_collections.ConfigDict:
    """A full run config (the paper's recipe for `variant`) describing converted `params`.

    1000-class weights get ImageNet's WordNet ids and names (`imagenet_classes`)
    unless `class_names` are given.
    """
    hyper = infer_hyperparameters(params, variant)
    config = configs_common.get_config(variant)
    config.model.include_top = has_head(params)
    config.model.width_multiplier = hyper["width_multiplier"]
    config.model.fc_width = hyper["fc_width"]
    config.model.num_classes = hyper["num_classes"]
    config.crop_size = hyper["crop_size"]
    if config.crop_size != 224:  # keep the paper's Q/crop ratio 256/224
        config.scale_min = config.scale_max = config.eval_scale = round(config.crop_size * 256 / 224)
    if hyper["num_classes"] != 1000:
        config.dataset = ""  # not ImageNet; unknown
    config.warm_start.layers = ()
    config.mean_rgb = CAFFE_MEAN_RGB if source == "keras" else tuple(round(255 * m, 6) for m in TORCHVISION_MEAN)
    wnids = None
    if hyper["num_classes"] == 1000:
        wnids, imagenet_names = imagenet_classes()
        class_names = imagenet_names if class_names is None else class_names
    config.class_wnids = wnids
    if class_names is not None:
        class_names = list(class_names)
        if len(class_names) != hyper["num_classes"]:
            raise ConversionError(
                f"{len(class_names)} class names given but the weights have {hyper['num_classes']} classes (fc8)"
            )
    # Present (possibly None) in converted configs: inference uses it instead of looking up the data set.
    config.class_names = class_names
    config.preprocessing = preprocessing_record(source, weights)
    return config


def convert(
    source: str,
    weights: str | os.PathLike,
    variant: str,
    out: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
) -> ml_collections.ConfigDict:
    """Converts `weights` and writes a run directory at `out` that `vgg_jax.load` reads; returns its config."""
    if source not in SOURCES:
        raise ConversionError(f"unknown source {source!r}; expected one of {SOURCES}")
    weights, out = paths.resolve(weights), paths.resolve(out)
    if not os.path.exists(weights):
        raise FileNotFoundError(f"weight file {weights} not found")
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"output directory {out} exists and is not empty; choose a new --out")
    if source == "keras":
        params = from_keras_h5(weights, variant)
    elif source == "timm":
        params = from_timm_safetensors(weights, variant)
    else:
        params = from_torchvision_state_dict(weights, variant)
    config = make_config(params, variant, source=source, weights=str(weights), class_names=class_names)
    meta = dict(
        source=source,
        variant=variant,
        weights=os.path.abspath(str(weights)),
        preprocessing=dict(config.preprocessing),
    )
    checkpoints.save_params_only(out, params, config, meta=meta)
    return config


@functools.cache
def _imagenet_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    data = json.loads(IMAGENET_CLASSES_FILE.read_text(encoding="utf-8"))
    return tuple(data["wnids"]), tuple(data["names"])


def imagenet_classes() -> tuple[list[str], list[str]]:
    """The 1000 ILSVRC-2012 classes in class-index order: (WordNet ids, short names).

    From ``vgg_jax/assets/imagenet_classes.json`` (built from the timm pip
    package's data files; its ``source`` field says how).
    """
    wnids, names = _imagenet_classes()
    return list(wnids), list(names)


def read_class_names(path: str | os.PathLike) -> list[str]:
    """One class name per line (trailing empty lines ignored)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--class_names file {path} not found (one class name per line)")
    lines = pathlib.Path(path).read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_enum("source", None, list(SOURCES), "Where the weights come from.")
    flags.DEFINE_string("weights", None, "Keras .h5/.weights.h5, torchvision .pth/.safetensors or timm .safetensors.")
    flags.DEFINE_string("variant", None, "D or E (keras); A, B, D or E (torchvision, timm).")
    flags.DEFINE_string("out", None, "Run directory to create (refused if it exists and is not empty).")
    flags.DEFINE_string("class_names", None, "Optional text file, one class name per line.")


def _main(argv: Sequence[str]) -> None:
    from absl import flags

    from vgg_jax.runtime import process

    process.start_command(tensorflow=False)
    values = flags.FLAGS
    names = read_class_names(paths.resolve(values.class_names)) if values.class_names else None
    config = convert(values.source, values.weights, values.variant, values.out, class_names=names)
    head = f"{config.model.num_classes} classes, crop {config.crop_size}" if config.model.include_top else "no head"
    print(
        f"wrote {values.out}: VGG-{values.variant} from {values.source} ({head}, mean_rgb {tuple(config.mean_rgb)}); "
        f"load it with vgg_jax.load({values.out!r})"
    )


def run(argv: Sequence[str] | None = None) -> None:
    """`vgg-jax convert` (`python -m vgg_jax convert`): a bad flag or an unconvertible file is one `error:` line."""
    cli.run_absl(
        _main,
        define=_define_flags,
        usage="vgg-jax convert --source=keras|torchvision|timm --weights=FILE --variant=D --out=DIR",
        required=("source", "weights", "variant", "out"),
        argv=[sys.argv[0], *argv] if argv is not None else None,
        expected=(ConversionError, FileExistsError, FileNotFoundError),
    )


if __name__ == "__main__":
    run()
