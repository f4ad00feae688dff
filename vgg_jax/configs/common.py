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

from vgg_jax.preprocess import CAFFE_MEAN_RGB

# Layers that have the same shape in every configuration (paper §3.1): a
# trained net A initialises these in the deeper nets.
NET_A_SHARED_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")


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
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Paper §2: the network.
    config.model = ml_collections.ConfigDict(
        dict(
            variant=variant,
            num_classes=1000,  # overwritten from the data set's metadata when they differ
            width_multiplier=1.0,
            fc_width=4096,
            dropout_rate=0.5,
            initializer="normal",  # zero-mean normal, std 0.01 [choice]; or 'glorot' (or 'he', not the paper's)
            init_std=0.01,
            lrn_alpha_over_size=False,  # AlexNet's α (True: Caffe's α/n)
        )
    )
    config.compute_dtype = "float32"  # or 'bfloat16' (parameters stay float32)
    config.remat = False  # recompute conv activations in the backward pass

    # Paper §3.1: data and augmentation.
    config.dataset = "imagenet2012"
    config.data_dir = ""  # '' = TFDS default (~/tensorflow_datasets); gs:// works
    config.train_split = "train"
    config.eval_split = "validation"
    config.crop_size = 224
    config.scale_min = 256  # S; equal bounds = single-scale training
    config.scale_max = 256
    config.eval_scale = 256  # Q for the periodic validation (Q = S; 384 for jittered S)
    config.eval_method = "center_crop"  # or 'dense' (paper §3.2, fully convolutional)
    # Dense testing runs the net on the whole image (paper §3.2): 'ceil' pools cover a side that is not a
    # multiple of 32; 'centre' / 'floor' cut it to one first (vgg_jax.protocols.DENSE_POOLING; bench/RESULTS.md).
    config.dense_pooling = "ceil"
    config.random_flip = True
    # True: the host decodes only each crop's source window; the train step rescales, crops and flips it on
    # the accelerator (vgg_jax.resample; the same crops within ±1). The canvas: 0 = 2 × crop_size.
    config.resample_on_device = False
    config.resample_canvas = 0
    config.color_shift_std = 0.1  # PCA colour shift, α ~ N(0, 0.1²)
    config.mean_rgb = CAFFE_MEAN_RGB
    config.shuffle_buffer = 16_384
    config.corrupt_images = "skip"  # or 'fail'
    # The training stream is cut into this many shards (0: one per process); each process reads
    # input_shards / process_count of them, so a 1-process run can reproduce a multi-host run exactly.
    config.input_shards = 0

    # Paper §3.1: optimisation.
    config.global_batch_size = 256
    config.eval_batch_size = 256
    config.num_epochs = 74.0  # 370K iterations at batch 256
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.learning_rate = 1e-2
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.decay_biases = False  # Caffe's decay_mult 0 on biases [choice]
    config.lr_schedule = "plateau"  # or 'step'
    # Plateau rule [choice: the paper gives no patience/threshold]: divide by 10
    # after `patience` evaluations without a `threshold` drop of validation top-1
    # error, at most `max_reductions` times (the paper's run saw 3).
    config.plateau = ml_collections.ConfigDict(
        dict(factor=0.1, patience=3, threshold=1e-3, cooldown=0, max_reductions=3)
    )
    config.step_boundaries_epochs = (30.0, 50.0, 65.0)  # for lr_schedule='step'

    # Paper §3.1: initialisation of deeper nets / finer scales from an earlier run.
    # Not type-safe: `layers` is a tuple of names or the string 'all' (set below for S=384 / jittered S).
    config.warm_start = ml_collections.ConfigDict(
        dict(checkpoint="", step="best", layers=NET_A_SHARED_LAYERS if variant not in ("A", "A-LRN") else ()),
        type_safe=False,
    )

    # Loop, logging, checkpoints.
    config.log_every_steps = 100
    # Per-layer gradient norms and update/parameter ratios in the train rows (diagnosing divergence; the
    # global ones are always there). Cheap, but 4 numbers per layer per row.
    config.log_layer_stats = False
    config.eval_every_steps = -1  # -1: once per epoch
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.keep_best_checkpoints = 1
    # > 0: save and stop after this many steps of one invocation, as on preemption (for time-limited job slots).
    config.stop_after_steps = -1
    # Divergence (vgg_jax.guard) [choice: off, as the paper reports none]. Non-finite loss or parameters always
    # stop the run; with max_retries > 0 the run instead goes back to the last good checkpoint, × plateau.factor
    # on the rate, at most max_retries times. factor > 0 also treats a log interval whose mean loss exceeds
    # factor × the median of the last `window` intervals as a spike (e.g. factor=3, max_retries=2).
    config.spike_guard = ml_collections.ConfigDict(dict(factor=0.0, window=5, max_retries=0))
    config.distributed = ml_collections.ConfigDict(
        dict(initialize="auto", coordinator_address="", num_processes=-1, process_id=-1, heartbeat_timeout_seconds=60)
    )

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
    # Half the paper's rate at a quarter of its batch. At 0.02 (this demo until issue 17) 2 of 3 a.py:demo
    # seeds collapsed or diverged: conv1_1, which sees raw 0–255 pixels, moved 2–5 % of its norm per step,
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
