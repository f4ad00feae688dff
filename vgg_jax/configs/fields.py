"""Every config field, declared once: default, allowed values, what a change on resume does, meaning.

`FIELDS` is read by `configs/common.py` and `configs/loc.py` (the defaults),
`configs/validation.py` (the allowed values; cross-field rules live there),
`vgg_jax.training.resume` (which fields may change on resume, and what a change does)
and docs/config.md (generated from it by `markdown_table`). A new field is one
`Field` here, read somewhere in the package (tests/test_config_fields.py checks both).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vgg_jax.configs.specs import (
    FLOAT16_REFUSED,
    LAYER_NAME,
    Spec,
    boolean,
    class_names,
    coordinator_address,
    custom,
    integer,
    is_int,
    is_number,
    layer_names,
    number,
    one_of,
    sequence,
    spike_factor,
    string_mapping,
    text,
    warm_start_step,
)
from vgg_jax.evaluation.arithmetic import DENSE_POOLING
from vgg_jax.models import BOX_HEADS, VARIANTS
from vgg_jax.preprocess import CAFFE_MEAN_RGB

# Layers that have the same shape in every configuration (paper §3.1): a trained net A initialises these in
# the deeper nets.
NET_A_SHARED_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field.

    `may_change`: None when a change on resume is refused (the field fixes what the run is), else what the
    change does. `where`: 'recipe' (every config has it), 'loc' (App. A configs), 'extra' (converted weights
    or tools set it; absent means `default`). `optional`: an older config.json may lack it (absent: `default`).
    """

    path: str
    default: Any
    spec: Spec
    meaning: str
    may_change: str | None = None
    where: str = "recipe"
    optional: bool = False

    @property
    def may_be_absent(self) -> bool:
        return self.optional or self.where == "extra"


@dataclasses.dataclass(frozen=True)
class Group:
    """A nested group of fields (a ConfigDict in the config); `optional`: older config.json files lack it."""

    name: str
    meaning: str
    optional: bool = False
    type_safe: bool = True
    where: str = "recipe"


GROUPS: dict[str, Group] = {
    group.name: group
    for group in (
        Group("model", "the network (paper §2)"),
        Group("plateau", "the plateau rule of the learning rate (§3.1)"),
        Group("warm_start", "initialisation from an earlier run (§3.1); `layers` is a tuple or 'all'", type_safe=False),
        Group("spike_guard", "divergence guard (vgg_jax.training.guard)", optional=True),
        Group("distributed", "how the processes find each other", optional=True),
        Group("loc", "localisation (App. A)", optional=True, where="loc"),
        Group("finetune", "per-layer rates when fine-tuning (configs/finetune.py)", type_safe=False, where="extra"),
    )
}

_PLATEAU = "the plateau rule from the next evaluation on"
_NO_EFFECT = "nothing: a resumed run does not warm start"
_GUARD = "the spike guard from the next step on"
_PROCESSES = "how the processes find each other"
_FROM_ENV = {-1: "from the environment"}

FIELDS: tuple[Field, ...] = (
    Field("seed", 0, integer(0, 2**31 - 1), "random numbers of init, dropout and the data stream (+ process index)"),
    # Paper §2: the network.
    Field("model.variant", "D", one_of(*VARIANTS), "the configuration of Table 1"),
    Field(
        "model.num_classes",
        1000,
        custom(lambda v: is_int(v) and (v >= 2 or v == 0), "an integer >= 2 (0: weights without fc6–fc8)"),
        "classes of fc8; overwritten from the data set's metadata when they differ",
        may_change="nothing: it follows the data set, which may not change",
    ),
    Field("model.width_multiplier", 1.0, number(0, low_open=True), "conv widths × this (1: the paper's)"),
    Field("model.fc_width", 4096, integer(0), "width of fc6 and fc7 (0: weights without fc6–fc8)"),
    Field("model.dropout_rate", 0.5, number(0, 1, high_open=True), "dropout on fc6 and fc7"),
    Field(
        "model.initializer",
        "normal",
        one_of("normal", "glorot", "he"),
        "weight init: N(0, init_std²) [choice], Glorot (the paper's alternative) or He (not the paper's)",
    ),
    Field("model.init_std", 0.01, number(0, low_open=True), "std of the 'normal' initializer"),
    Field("model.lrn_alpha_over_size", False, boolean(), "LRN's α as Caffe's α/n (False: AlexNet's α)"),
    Field("model.include_top", True, boolean(), "False: converted 'notop' weights without fc6–fc8", where="extra"),
    Field(
        "model.box_head", "none", one_of(*BOX_HEADS[1:]), "App. A: one box per class (pcr) or shared (scr)", where="loc"
    ),
    Field(
        "compute_dtype",
        "float32",
        one_of("float32", "bfloat16", refused={"float16": FLOAT16_REFUSED}),
        "activations' dtype (parameters stay float32)",
    ),
    Field(
        "remat", False, boolean(), "recompute conv activations in the backward pass", "memory only: the same arithmetic"
    ),
    # Paper §3.1: data and augmentation.
    Field("dataset", "imagenet2012", text(what="a TFDS name; '' only in converted configs"), "the TFDS data set"),
    Field(
        "data_dir",
        "",
        text(what="'' for the TFDS default"),
        "TFDS data directory; gs:// works",
        "where the same data set is read",
    ),
    Field(
        "download",
        True,
        boolean(),
        "whether a missing data set may be downloaded",
        "whether a missing data set may be downloaded",
        where="extra",
    ),
    Field("train_split", "train", text(nonempty=True, what="a TFDS split"), "the training split"),
    Field("eval_split", "validation", text(nonempty=True, what="a TFDS split"), "the split of the periodic validation"),
    Field("crop_size", 224, integer(32, multiple_of=32), "side of the training crop (five 2×2 max-pools)"),
    Field("scale_min", 256, integer(1), "smallest training scale S (equal bounds: single-scale training)"),
    Field("scale_max", 256, integer(1), "largest training scale S (jittered S: > scale_min)"),
    Field("eval_scale", 256, integer(1), "test scale Q of the periodic validation"),
    Field(
        "eval_method", "center_crop", one_of("center_crop", "dense"), "periodic validation: centre crop or dense (§3.2)"
    ),
    Field(
        "dense_pooling",
        "ceil",
        one_of(*DENSE_POOLING),
        "dense testing of a side not a multiple of 32: 'ceil' the whole image (§3.2), 'centre'/'floor' cut first",
        optional=True,
    ),
    Field(
        "resize_method",
        "exact",
        one_of("exact", "fast"),
        "rescaling: antialiased (exact) or bilinear (fast)",
        where="extra",
    ),
    Field(
        "resample_on_device",
        False,
        boolean(),
        "the host decodes each crop's source window; the train step rescales, crops and flips it on the accelerator",
        "where the crops are resampled (host or accelerator): the same draws, crops within ±1",
        optional=True,
    ),
    Field(
        "resample_canvas",
        0,
        integer(0),
        "the canvas side of device resampling (0: 2 × crop_size)",
        "the canvas the windows travel on (device resampling): the same crops",
        optional=True,
    ),
    Field("random_flip", True, boolean(), "random horizontal flips of the training crops"),
    Field("color_shift_std", 0.1, number(0), "PCA colour shift, α ~ N(0, std²)"),
    Field(
        "mean_rgb",
        CAFFE_MEAN_RGB,
        sequence(lambda v: is_number(v) and 0 <= v <= 255, "numbers in [0, 255] (R, G, B)", length=3),
        "mean RGB subtracted from each pixel (§2)",
    ),
    Field("shuffle_buffer", 16_384, integer(1), "examples in the training shuffle buffer"),
    Field(
        "corrupt_images",
        "skip",
        one_of("skip", "fail"),
        "an undecodable record is skipped (and counted) or stops the run",
        "whether an undecodable record stops the run",
    ),
    Field(
        "input_shards",
        0,
        integer(1, special={0: "one per process"}),
        "shards of the training stream; each process reads input_shards / process_count of them",
    ),
    Field(
        "tf_data_threads",
        0,
        integer(0),
        "threads of each tf.data pipeline (0: TensorFlow's default, all cores)",
        "how many threads read the data: the same stream",
        optional=True,
    ),
    # Paper §3.1: optimisation.
    Field("global_batch_size", 256, integer(1), "training batch over all processes"),
    Field(
        "eval_batch_size",
        256,
        integer(1),
        "validation batch over all processes",
        "memory only: validation is exact for any batch",
    ),
    Field(
        "num_epochs", 74.0, number(0), "training length (74 epochs: 370K iterations at batch 256)", "where the run ends"
    ),
    Field(
        "num_train_steps",
        -1,
        integer(1, special={-1: "train for num_epochs"}),
        "> 0 overrides num_epochs",
        "where the run ends",
    ),
    Field(
        "learning_rate",
        1e-2,
        number(0, low_open=True),
        "the initial learning rate",
        "the rate from the next step on (× the plateau scale under 'plateau')",
    ),
    Field("momentum", 0.9, number(0, 1, high_open=True), "SGD momentum"),
    Field("weight_decay", 5e-4, number(0), "L2 penalty multiplier"),
    Field("decay_biases", False, boolean(), "L2 on biases too (False: Caffe's decay_mult 0) [choice]"),
    Field("lr_schedule", "plateau", one_of("plateau", "step"), "÷10 when validation stalls, or at fixed epochs"),
    Field("plateau.factor", 0.1, number(0, 1, low_open=True, high_open=True), "the rate's multiplier at each drop"),
    Field("plateau.patience", 3, integer(1), "evaluations without improvement before a drop [choice]", _PLATEAU),
    Field("plateau.threshold", 1e-3, number(0), "the top-1 error drop that counts as improvement [choice]", _PLATEAU),
    Field("plateau.cooldown", 0, integer(0), "evaluations after a drop before the rule watches again", _PLATEAU),
    Field(
        "plateau.max_reductions",
        3,
        integer(0),
        "at most this many drops (the paper's run saw 3)",
        "the plateau rule from the next evaluation on (it never raises the rate)",
    ),
    Field(
        "step_boundaries_epochs",
        (30.0, 50.0, 65.0),
        sequence(lambda v: is_number(v) and v > 0, "positive numbers (epochs)", increasing=True),
        "epochs of the ÷10 drops under lr_schedule='step'",
        "the 'step' schedule from the next step on",
    ),
    # Paper §3.1: initialisation of deeper nets / finer scales from an earlier run.
    Field("warm_start.checkpoint", "", text(what="a run directory; '' for none"), "the run to start from", _NO_EFFECT),
    Field(
        "warm_start.step",
        "best",
        warm_start_step,
        "which of its checkpoints: 'best', 'latest' or a step",
        _NO_EFFECT,
    ),
    Field("warm_start.layers", NET_A_SHARED_LAYERS, layer_names, "the layers copied, or 'all'", _NO_EFFECT),
    # Loop, logging, checkpoints.
    Field("log_every_steps", 100, integer(1), "steps per train row of the log and metrics.jsonl", "how often it logs"),
    Field(
        "log_layer_stats",
        False,
        boolean(),
        "per-layer gradient norms and update/parameter ratios in the train rows",
        "what the train rows record",
        optional=True,
    ),
    Field(
        "eval_every_steps",
        -1,
        integer(1, special={-1: "once per epoch"}),
        "steps between evaluations",
        "how often it evaluates",
    ),
    Field("checkpoint_every_steps", 1000, integer(1), "steps between checkpoints", "how often it saves"),
    Field(
        "keep_checkpoints",
        3,
        integer(1),
        "latest checkpoints kept",
        "how many checkpoints are kept (from the next save)",
    ),
    Field(
        "keep_best_checkpoints",
        1,
        integer(0),
        "checkpoints with the lowest validation error kept",
        "how many best checkpoints are kept (from the next save)",
    ),
    Field(
        "stop_after_steps",
        -1,
        integer(1, special={-1: "no limit"}),
        "save and stop after this many steps of one invocation (time-limited job slots)",
        "where this invocation stops",
    ),
    Field(
        "spike_guard.factor", 0.0, spike_factor, "a log interval's mean loss > factor × the median is a spike", _GUARD
    ),
    Field("spike_guard.window", 5, integer(1), "log intervals in that median", _GUARD),
    Field("spike_guard.max_retries", 0, integer(0), "returns to the last good checkpoint (× plateau.factor)", _GUARD),
    Field("distributed.initialize", "auto", one_of("auto", "yes", "no"), "jax.distributed.initialize", _PROCESSES),
    Field("distributed.coordinator_address", "", coordinator_address, "process 0's 'host:port'", _PROCESSES),
    Field("distributed.num_processes", -1, integer(1, special=_FROM_ENV), "processes in the run", _PROCESSES),
    Field("distributed.process_id", -1, integer(0, special=_FROM_ENV), "this process's index", _PROCESSES),
    Field(
        "distributed.heartbeat_timeout_seconds",
        60,
        integer(1),
        "how long survivors wait for a lost process",
        _PROCESSES,
    ),
    Field(
        "distributed.initialization_timeout_seconds",
        300,
        integer(1),
        "how long processes wait for each other at start",
        _PROCESSES,
        where="extra",
    ),
    # Converted weights (vgg_jax.weights.convert).
    Field("class_names", None, class_names, "names of fc8's classes", where="extra"),
    Field("class_wnids", None, class_names, "WordNet ids of fc8's classes (converted ImageNet weights)", where="extra"),
    Field("preprocessing", None, string_mapping, "how the original preprocessing was absorbed", where="extra"),
    # Paper App. A: localisation (vgg_jax/configs/loc.py).
    Field(
        "loc.finetune",
        "all",
        one_of("all", "fc6-fc7"),
        "layers trained: all, or fc6, fc7 and the box layer",
        where="loc",
    ),
    Field("loc.image_feature", "image", text(nonempty=True, what="a TFDS feature"), "the image feature", where="loc"),
    Field(
        "loc.label_feature",
        "label",
        text(nonempty=True, what="a TFDS ClassLabel feature, e.g. 'label' or 'objects/label'"),
        "the class feature ('/' reaches into a sequence of objects)",
        where="loc",
    ),
    Field(
        "loc.boxes_feature",
        "objects/bbox",
        text(nonempty=True, what="a TFDS BBox feature, e.g. 'objects/bbox'"),
        "the boxes feature",
        where="loc",
    ),
    Field(
        "loc.box_labels_feature",
        "",
        text(what="the boxes' classes; '' when every box is of the image's class"),
        "the boxes' class feature",
        where="loc",
    ),
    Field("loc.max_boxes", 16, integer(1), "boxes kept per image", where="loc"),
    Field(
        "loc.classifiers",
        "",
        text(what="classification run directories, comma-separated; '' for warm_start.checkpoint"),
        "protocol 2: the classifiers giving the class scores",
        where="loc",
    ),
    Field(
        "loc.test_scales",
        (256,),
        sequence(lambda v: is_int(v) and v >= 32, "integers >= 32 (test scales Q)"),
        "protocol 2's test scales Q",
        where="loc",
    ),
    Field(
        "loc.flip",
        "auto",
        one_of("auto", "yes", "no"),
        "protocol 2 also on the mirrored image (§3.2); auto: if the net trained with flips",
        where="loc",
    ),
    Field("loc.merge_iou", 0.5, number(0, 1), "boxes with IoU >= this are averaged [choice]", where="loc"),
    Field("loc.top_k", 5, integer(1), "classes whose boxes protocol 2 scores", where="loc"),
)

# Fine-tuning (configs/finetune.py): which layers train, at which share of the rate (vgg_jax.training.optim).
FIELDS += (
    Field(
        "finetune.freeze_through",
        "",
        custom(lambda v: v == "" or (isinstance(v, str) and bool(LAYER_NAME.fullmatch(v))), "'' or a layer name"),
        "the last frozen layer (conv1_1 … fc7); '' trains every layer",
        where="extra",
    ),
    Field(
        "finetune.body_lr_multiplier",
        0.1,
        number(0),
        "the rate of the layers between the frozen ones and the head, × learning_rate",
        where="extra",
    ),
    Field("finetune.head_layers", ("fc8",), layer_names, "the layers trained at the full rate", where="extra"),
)

BY_PATH: dict[str, Field] = {field.path: field for field in FIELDS}


def group_of(path: str) -> str | None:
    """'model.variant' → 'model'; 'seed' → None."""
    return path.split(".")[0] if "." in path else None


def defaults(where: str = "recipe") -> dict[str, Any]:
    """{name: default} of the top-level fields that `where` sets, and {group: {name: default}} of its groups."""
    tree: dict[str, Any] = {}
    for field in FIELDS:
        if field.where != where:
            continue
        group = group_of(field.path)
        node = tree.setdefault(group, {}) if group else tree
        node[field.path.rpartition(".")[2]] = field.default
    return tree


def markdown_table() -> str:
    """docs/config.md's field list: field, default, allowed values, on resume, meaning."""
    rows = ["| field | default | allowed | on resume | meaning |", "| --- | --- | --- | --- | --- |"]
    for field in FIELDS:
        resume = "fixed" if field.may_change is None else f"may change: {field.may_change}"
        default = f"`{field.default!r}`" + {"loc": " (App. A configs)", "extra": " (when absent)"}.get(field.where, "")
        cells = (f"`{field.path}`", default, field.spec.allowed, resume, field.meaning)
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"
