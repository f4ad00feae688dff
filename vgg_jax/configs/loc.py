"""Paper App. A localisation recipe: `--config=configs/loc.py:ARG` (a comma-separated list).

- ``pcr`` (default) or ``scr``: one box per class (4·C outputs) or one shared box (4 outputs).
- ``fc6-fc7``: fine-tune only fc6, fc7 and the box layer (default ``all`` layers; the paper chose all).
- ``variant=D`` (default; the paper's net), ``scale=256`` (default) or ``scale=384``: the fixed S of
  training, as the classifier it starts from (no jittering in App. A).
- ``dataset=NAME``: any TFDS set with boxes; map its features with ``--config.loc.*_feature``.
- ``demo``: the embedded ``sklearn_digits_loc`` (digits on 96-px canvases, 64-px crops), a narrow
  net A whose classifier starts its conv layers from the digit classifier of ``configs/a.py:demo``:
  minutes on a CPU (README, "Localisation").
- ``classifier`` gives the classification recipe on the same data (the net the localiser
  starts from, and the class scores of protocol 2).

Everything else is the classification recipe of `common.py`, with the paper's changes: lr 1e-3,
every layer but the new last one (``fc8_box``, random) from ``warm_start.checkpoint`` — the
classifier trained at the same S — validation on the centre crop (protocol 1).
"""

from __future__ import annotations

import ml_collections

from vgg_jax import models
from vgg_jax.configs import common, fields

_OPTIONS = ("pcr", "scr", "all", "fc6-fc7", "classifier", "demo", "variant", "scale", "dataset")


def parse_arg(arg: str | None) -> dict[str, str]:
    """'demo,scr,scale=384' → {'demo': '', 'scr': '', 'scale': '384'}; unknown keys raise."""
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        key, _, value = item.partition("=")
        if key not in _OPTIONS:
            raise ValueError(f"unknown localisation config argument {key!r} in {arg!r}; expected one of {_OPTIONS}")
        options[key] = value
    if "pcr" in options and "scr" in options:
        raise ValueError(f"{arg!r}: choose one of pcr (one box per class) and scr (one shared box)")
    return options


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The App. A recipe modified by `arg` (see the module docstring)."""
    options = parse_arg(arg)
    variant = options.get("variant", "A" if "demo" in options else "D")
    base = ",".join(f"{key}={options[key]}" for key in ("scale", "dataset") if options.get(key))
    if "-" in options.get("scale", ""):
        raise ValueError("App. A trains at a fixed S (scale=256 or scale=384), not a jittered range")
    config = common.get_config(variant, base + (",demo" if "demo" in options else ""))
    config.loc = ml_collections.ConfigDict(fields.defaults("loc")["loc"])
    config.loc.finetune = "fc6-fc7" if "fc6-fc7" in options else "all"
    config.loc.test_scales = (config.eval_scale,)
    if "demo" in options:
        _demo(config)
    if "classifier" in options:
        del config["loc"]  # the same data and scale, classified: the net the localiser starts from
        return config
    config.model.box_head = "scr" if "scr" in options else "pcr"
    config.learning_rate = 1e-3  # App. A: lr 1e-3 from the classifier at the same S
    if "demo" in options:
        _demo_localiser(config)
    config.warm_start.layers = (*models.conv_layer_names(variant), "fc6", "fc7")  # all but the new last layer
    config.eval_method = "center_crop"
    return config


def _demo(config: ml_collections.ConfigDict) -> None:
    """Digits on 96-px noise canvases, S = Q = 80, 64-px crops: 2×2 overlapping dense windows per canvas (the
    paper's 224-px windows on 256×341 images: 2×5). Net A at ¼ of the widths, fc 256, no flips (digits).

    The classifier starts its conv layers from the digit classifier of ``configs/a.py:demo`` (32-px crops of
    the plain digits) [demo choice, as the paper starts deeper nets from net A: from random init it was still at
    83 % test error after 14 epochs at lr 0.005, and stayed at chance at 0.01; bench/RESULTS.md]."""
    config.dataset = "sklearn_digits_loc"
    config.loc.label_feature = "label"
    config.loc.box_labels_feature = "objects/label"
    config.loc.max_boxes = 1
    # mean_rgb stays the digit demos' (Caffe's): the conv layers from configs/a.py:demo see the inputs they learnt on.
    config.crop_size = 64
    config.scale_min = config.scale_max = config.eval_scale = 80
    config.loc.test_scales = (80,)
    config.dense_pooling = "ceil"  # the whole canvas, as the paper's configs
    config.model.width_multiplier = 1 / 4
    config.model.fc_width = 256
    config.warm_start.layers = tuple(models.conv_layer_names("A"))
    config.learning_rate = 0.005
    config.num_epochs = 20.0
    config.step_boundaries_epochs = (16.0, 19.0)
    config.eval_every_steps = 180  # every 4 epochs of 45 steps
    config.log_every_steps = 45
    config.checkpoint_every_steps = 270


def _demo_localiser(config: ml_collections.ConfigDict) -> None:
    """The demo's box regression from that classifier: 10 epochs [demo choice, measured: bench/RESULTS.md]."""
    config.learning_rate = 0.005
    config.num_epochs = 10.0
    config.step_boundaries_epochs = (7.0, 9.0)
