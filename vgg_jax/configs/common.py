"""The paper's training recipe (§3.1) as one config; the per-net files pick a variant.

Every `vgg_jax/configs/<net>.py` (and its thin twin `configs/<net>.py` in a
source checkout) exposes `get_config(arg)` (big_vision's `file.py:arg`
convention). `arg` is a comma-separated list of:

- ``scale=256`` (default), ``scale=384`` or ``scale=256-512``: the training
  scale S (fixed, or jittered per image). S=384 starts from the S=256 net with
  lr 1e-3; jittered S starts from the S=384 net (all layers) — the paper's
  schedule. Point `warm_start.checkpoint` at the run to start from.
- ``dataset=NAME``: any TFDS image-classification set (``stl10`` has a preset).
- ``demo``: the embedded digits, a narrow net, small images: minutes on a CPU;
  ``demo,dataset=sample_photos``: the same on patches of packaged photographs
  (`vgg_jax.data.embedded_photos`). bench/convergence.py runs both for 5 seeds.
"""

from __future__ import annotations

import ml_collections

from vgg_jax.configs import fields


def parse_arg(arg: str | None) -> dict[str, str]:
    """'scale=384,dataset=stl10,demo' → {'scale': '384', 'dataset': 'stl10', 'demo': ''}."""
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        key, _, value = item.partition("=")
        if key not in ("scale", "dataset", "demo"):
            raise ValueError(f"unknown config argument {key!r} in {arg!r}; expected scale=, dataset= or demo")
        options[key] = value
    return options


def _training_scale(text: str) -> tuple[int, int]:
    """'384' → (384, 384); '256-512' → (256, 512): S fixed or jittered (paper §3.1)."""
    parts = text.split("-")
    if len(parts) in (1, 2) and all(part.strip().isdigit() and int(part) > 0 for part in parts):
        low, high = int(parts[0]), int(parts[-1])
        if low <= high:
            return low, high
    raise ValueError(
        f"config argument scale={text!r} is not a training scale; expected a side in pixels such as scale=256 or "
        "scale=384, or a jittered range low-high such as scale=256-512"
    )


def get_config(variant: str = "D", arg: str | None = None) -> ml_collections.ConfigDict:
    """The paper's recipe for `variant`, modified by `arg` (see module docstring)."""
    options = parse_arg(arg)
    config = _declared_recipe()
    config.model.variant = variant
    if variant in ("A", "A-LRN"):
        config.warm_start.layers = ()  # net A trains from random init

    scale = options.get("scale", "256")
    low, high = _training_scale(scale)
    if "-" in scale:
        config.scale_min, config.scale_max = low, high
        config.eval_scale = (low + high) // 2
        config.learning_rate = 1e-3  # fine-tuning from the S=384 net [choice]
        config.warm_start.layers = "all"
    else:
        config.scale_min = config.scale_max = config.eval_scale = low
        if low != 256:
            config.learning_rate = 1e-3  # paper: S=384 net from the S=256 net, lr 1e-3
            config.warm_start.layers = "all"

    if options.get("dataset"):
        config.dataset = options["dataset"]
        if config.dataset == "stl10":
            _stl10(config)
    if "demo" in options:
        _demo(config, options.get("dataset", ""))
    return config


def _declared_recipe() -> ml_collections.ConfigDict:
    """The declared defaults of the recipe's fields (`vgg_jax.configs.fields`), as a ConfigDict."""
    config = ml_collections.ConfigDict()
    for name, value in fields.defaults("recipe").items():
        group = fields.GROUPS.get(name)
        config[name] = ml_collections.ConfigDict(value, type_safe=group.type_safe) if group else value
    return config


def _stl10(config: ml_collections.ConfigDict) -> None:
    """STL-10: 96×96 images, 10 classes; the recipe scaled to its size."""
    config.model.num_classes = 10
    config.eval_split = "test"
    config.crop_size = 96
    config.scale_min, config.scale_max, config.eval_scale = 96, 128, 112
    config.global_batch_size = config.eval_batch_size = 128
    config.model.fc_width = 1024
    config.warm_start.layers = ()


def _demo(config: ml_collections.ConfigDict, dataset: str = "") -> None:
    """The embedded digits (or `dataset`: ``sample_photos``): same depth, narrow widths, 32-px crops; CPU minutes."""
    config.dataset = dataset or "sklearn_digits"
    config.train_split, config.eval_split = "train", "test"
    config.model.num_classes = 10
    config.model.width_multiplier = 1 / 4
    config.model.fc_width = 256
    config.model.initializer = "glorot"  # the paper's alternative to pre-training net A
    config.crop_size = 32
    config.scale_min, config.scale_max, config.eval_scale = 32, 40, 36
    config.random_flip = config.dataset != "sklearn_digits"  # a mirrored 2, 3 or 7 is not a digit
    # 32-px crops of 32–40-px images: one window, which only 'centre' puts where the centre crop is (the
    # README demo: dense error 7.5 % with ceil, 0.3 % with centre; bench/RESULTS.md, "Dense evaluation fidelity").
    config.dense_pooling = "centre"
    config.eval_every_steps = 110  # every 5 epochs
    config.shuffle_buffer = 2048
    config.global_batch_size = 64
    config.eval_batch_size = 200
    config.num_epochs = 40.0
    # Half the paper's rate at a quarter of its batch. At 0.02, 2 of 3 a.py:demo seeds collapsed
    # or diverged: conv1_1, which sees raw 0–255 pixels, moved 2–5 % of its norm per step,
    # until one batch's gradient (100× the usual) moved every layer by a third and momentum replayed it.
    # 0.005: 20 of 20 runs converged, digits and photos (bench/RESULTS.md, "Convergence"), and it learns faster.
    config.learning_rate = 0.005
    config.lr_schedule = "step"
    config.step_boundaries_epochs = (30.0, 36.0)
    config.log_every_steps = 44  # every 2 epochs: the whole run's output fits on a screen
    config.checkpoint_every_steps = 220  # every 10 epochs (each evaluation saves too)
    config.warm_start.layers = ()
    if config.dataset == "sample_photos":  # 6,000 training patches, 4.2× the digits: the same ~900 steps
        config.num_epochs = 10.0
        config.step_boundaries_epochs = (7.5, 9.0)
