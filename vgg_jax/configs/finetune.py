"""Fine-tuning published VGG-16 (or VGG-19) on your own photos: the paper's nets (§2) as a warm start (§3.1).

    python -m vgg_jax.main --config=configs/finetune.py --workdir=runs/my_photos \\
        --config.dataset=folder:~/my_photos

``arg``: ``vgg16`` (default), ``vgg19``, or ``demo`` (the README demo's narrow net, CPU minutes).
Every choice here is ours, not the paper's [choice]: Keras' published weights with a fresh fc8 when
the class count differs; conv1_1 … conv3_3 frozen (early filters transfer, a small data set cannot
improve them), conv4_1 … fc7 at a tenth of the rate, fc8 at the full rate (Caffe's ``lr_mult``); a
fixed ÷10 schedule (a small validation split is too noisy for the plateau rule); the paper's
augmentation; batch 32 (one GPU). The fields and their reasons: docs/finetune.md.
"""

from __future__ import annotations

import ml_collections

from vgg_jax.configs import common

NETS = {"vgg16": ("D", "conv3_3"), "vgg19": ("E", "conv3_4"), "demo": ("E", "conv3_4")}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name = (arg or "vgg16").strip()
    if name not in NETS:
        raise ValueError(f"unknown config argument {arg!r} for configs/finetune.py; expected one of {list(NETS)}")
    variant, freeze_through = NETS[name]
    config = common.get_config(variant, "scale=256-384")
    config.dataset = ""  # set it: --config.dataset=folder:PATH (or a TFDS name)
    config.train_split, config.eval_split = "train", "test"
    config.model.initializer = "glorot"  # for fc8, the only layer not copied
    config.warm_start.checkpoint = f"pretrained:{name}"
    config.warm_start.step = "latest"
    config.warm_start.layers = "all"
    config.finetune = ml_collections.ConfigDict(
        dict(freeze_through=freeze_through, body_lr_multiplier=0.1, head_layers=("fc8",)), type_safe=False
    )
    config.learning_rate = 1e-2
    config.lr_schedule = "step"
    config.num_epochs = 16.0
    config.step_boundaries_epochs = (12.0,)
    config.global_batch_size = 32
    config.eval_batch_size = 64
    config.shuffle_buffer = 4096
    config.log_every_steps = 20
    config.checkpoint_every_steps = 500  # and at every evaluation (once per epoch)
    config.keep_checkpoints = 2
    if name == "demo":
        _demo(config)
    return config


def _demo(config: ml_collections.ConfigDict) -> None:
    """The README demo's net and image sizes (`common._demo`), warm-started from a run of yours."""
    config.model.width_multiplier, config.model.fc_width = 1 / 4, 256
    config.crop_size = 32
    config.scale_min, config.scale_max, config.eval_scale = 32, 40, 36
    config.warm_start.checkpoint = "runs/demo"
    config.num_epochs, config.step_boundaries_epochs = 40.0, (30.0,)
    config.log_every_steps, config.eval_every_steps = 30, 30
