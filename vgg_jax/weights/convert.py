"""Import published VGG weights (paper §2 networks) into a vgg_jax run directory.

Sources: Keras VGG16/19 ``.h5`` and ``.weights.h5`` (read with h5py; "notop" files give a net without
fc6–fc8), torchvision vgg11–19 state dicts (``torch.load(weights_only=True)``, or ``.safetensors``
without torch) and timm's ``vggNN.tv_in1k`` safetensors (torchvision's weights, fc6/fc7 stored as
convolutions). Kernels become HWIO / (in, out); fc6's rows move from NCHW to NHWC flattening order.
Each source's preprocessing is folded into conv1_1 — Caffe's BGR by reversing its input channels,
torchvision's ``/255, −mean, /std`` by scaling them — so every run directory takes RGB 0–255 minus
``config.mean_rgb``; the original is recorded in ``config.preprocessing``. Widths, class count and
crop size are inferred from the shapes and checked against Table 1 before anything is written.
Commands and options: docs/inference.md; `vgg_jax.pretrained` downloads and converts by name.
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
