"""Every config field checked before any work: one table of field specs, a few cross-field rules.

`validate(config)` walks a run config (an ``ml_collections.ConfigDict``, a
frozen one, or the plain nested dict of a ``config.json``) against `FIELDS`
and `RULES` and raises one ``ValueError`` listing every problem, one line
each, as ``config.<dotted.field>=<value given>: expected <what is allowed>``.
A field the table does not know is an error too (usually a typo'd
``--config.field=`` override that ml_collections would otherwise accept on an
unlocked config, or a stale field in a hand-written one).

The table is the single statement of what each field of
`vgg_jax/configs/common.py` may hold; fields that only some configs carry
(``resize_method``, ``download``, ``class_names``/``preprocessing`` of
converted weights, ``distributed.initialization_timeout_seconds``) are marked
optional. Cross-field rules run only on fields that passed their own check,
so a bad type is reported once, not again as a rule violation.

This module imports neither TensorFlow nor JAX: it runs before either is
initialised (and in tools that never load them).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Sequence
from typing import Any

from vgg_jax.configs.specs import (
    Spec,
    boolean,
    custom,
    integer,
    is_int,
    is_number,
    number,
    one_of,
    sequence,
    text,
)

# The six configurations of paper Table 1. models.VARIANTS is the same tuple; it is not imported
# because models pulls in JAX/Flax (tests/test_validation.py checks that the two agree).
VARIANTS = ("A", "A-LRN", "B", "C", "D", "E")
# The dense pooling rules of vgg_jax.protocols.DENSE_POOLING (not imported: protocols pulls in JAX;
# tests/test_validation.py checks that the two agree).
DENSE_POOLING = ("ceil", "centre", "floor")
# Layer names of the released Caffe models (conv{block}_{i}, fc6–fc8), for warm_start.layers.
_LAYER_NAME = re.compile(r"conv[1-5]_[1-4]|fc[678]")
_HOST_PORT = re.compile(r"\S+:\d{1,5}")
_MISSING = object()


# --------------------------------------------------------------------------- field specs (configs/specs.py)


def warm_start_layers(value: Any) -> str | tuple[str, ...]:
    """config.warm_start.layers as 'all' or a tuple of layer names; ValueError for anything else.

    Accepts every form a config or the command line produces: 'all'; a tuple/list of names; a
    comma-separated string; and, because config_flags parses an override by the field's current
    type, ('all',) and ('conv1_1,fc8',) from ``--config.warm_start.layers=all`` / ``=conv1_1,fc8``
    on a field that holds a tuple. '' and () mean no layers.
    """
    if isinstance(value, str):
        parts = [value]
    elif isinstance(value, (tuple, list)) and all(isinstance(part, str) for part in value):
        parts = list(value)
    else:
        raise ValueError(f"warm_start.layers={value!r} is neither a string nor a sequence of strings")
    names = tuple(name.strip() for part in parts for name in part.split(",") if name.strip())
    if names == ("all",):
        return "all"
    unknown = [name for name in names if not _LAYER_NAME.fullmatch(name)]
    if unknown:
        raise ValueError(f"warm_start.layers: {unknown} are not layer names")
    return names


def _layers(value: Any) -> bool:
    warm_start_layers(value)  # raises ValueError, which Spec.problem reports
    return True


def _warm_start_step(value: Any) -> bool:
    # The command line gives a str field '5' for --config.warm_start.step=5; checkpoints accepts it.
    if isinstance(value, str):
        return value in ("best", "latest") or value.isdigit()
    return is_int(value) and value >= 0


def _class_names(value: Any) -> bool:
    return value is None or (isinstance(value, (tuple, list)) and all(isinstance(name, str) for name in value))


def _string_mapping(value: Any) -> bool:
    keys = getattr(value, "keys", None)
    return keys is not None and all(isinstance(k, str) and isinstance(value[k], str) for k in keys())


_FLOAT16 = (
    "float16 is refused: training it needs loss scaling, which vgg_jax does not do (gradients underflow); "
    "bfloat16 has float32's range and needs none"
)

# Nested groups of fields (ConfigDicts inside the config); everything else is a leaf in FIELDS.
# → optional (spike_guard: absent from the config.json of runs that predate it)
GROUPS: dict[str, bool] = {
    "model": False,
    "plateau": False,
    "warm_start": False,
    "distributed": True,
    "spike_guard": True,
    "loc": True,
}

# Every field of configs/common.py, and the optional fields some configs carry. Keep in step with common.py:
# tests/test_validation.py fails for a field of the default config that is missing here.
FIELDS: dict[str, Spec] = {
    "seed": integer(0, 2**31 - 1),  # jax.random.key and tf.data both take it (+ the process index)
    # Paper §2: the network.
    "model.variant": one_of(*VARIANTS),
    "model.num_classes": integer(2),
    "model.width_multiplier": number(0, low_open=True),
    "model.fc_width": integer(1),
    "model.dropout_rate": number(0, 1, high_open=True),
    "model.initializer": one_of("normal", "glorot", "he"),
    "model.init_std": number(0, low_open=True),
    "model.lrn_alpha_over_size": boolean(),
    "compute_dtype": one_of("float32", "bfloat16", refused={"float16": _FLOAT16}),
    "remat": boolean(),
    # Paper §3.1: data and augmentation.
    "dataset": text(what="a TFDS name; '' only in converted configs"),
    "data_dir": text(what="'' for the TFDS default"),
    "download": boolean(optional=True),
    "train_split": text(nonempty=True, what="a TFDS split"),
    "eval_split": text(nonempty=True, what="a TFDS split"),
    "crop_size": integer(32, multiple_of=32),  # five 2x2 max-pools
    "scale_min": integer(1),
    "scale_max": integer(1),
    "eval_scale": integer(1),
    "eval_method": one_of("center_crop", "dense"),
    "dense_pooling": one_of(*DENSE_POOLING, optional=True),  # absent in older runs: the paper's 'ceil'
    "resize_method": one_of("exact", "fast", optional=True),
    "resample_on_device": boolean(optional=True),  # vgg_jax.resample: the train step rescales the crops
    "resample_canvas": integer(0, optional=True),  # its canvas side; 0: 2 × crop_size
    "random_flip": boolean(),
    "color_shift_std": number(0),
    "mean_rgb": sequence(lambda v: is_number(v) and 0 <= v <= 255, "numbers in [0, 255] (R, G, B)", length=3),
    "shuffle_buffer": integer(1),
    "corrupt_images": one_of("skip", "fail"),
    "input_shards": integer(1, special={0: "one per process"}),
    # Paper §3.1: optimisation.
    "global_batch_size": integer(1),
    "eval_batch_size": integer(1),
    "num_epochs": number(0),
    "num_train_steps": integer(1, special={-1: "train for num_epochs"}),
    "learning_rate": number(0, low_open=True),
    "momentum": number(0, 1, high_open=True),
    "weight_decay": number(0),
    "decay_biases": boolean(),
    "lr_schedule": one_of("plateau", "step"),
    "plateau.factor": number(0, 1, low_open=True, high_open=True),
    "plateau.patience": integer(1),  # optim.PlateauControl's bound: 0 would divide after every evaluation
    "plateau.threshold": number(0),
    "plateau.cooldown": integer(0),
    "plateau.max_reductions": integer(0),
    "step_boundaries_epochs": sequence(lambda v: is_number(v) and v > 0, "positive numbers (epochs)", increasing=True),
    # Paper §3.1: warm start of deeper nets / finer scales.
    "warm_start.checkpoint": text(what="a run directory; '' for none"),
    "warm_start.step": custom(_warm_start_step, "'best', 'latest' or a step number >= 0"),
    "warm_start.layers": custom(
        _layers,
        "'all', or layer names (conv1_1 … conv5_4, fc6, fc7, fc8) as a tuple/list or a comma-separated string "
        "('' or () for none)",
    ),
    # Loop, logging, checkpoints.
    "log_every_steps": integer(1),
    "log_layer_stats": boolean(optional=True),
    "eval_every_steps": integer(1, special={-1: "once per epoch"}),
    "checkpoint_every_steps": integer(1),
    "keep_checkpoints": integer(1),  # 0 (with keep_best_checkpoints=0) would delete every checkpoint
    "keep_best_checkpoints": integer(0),
    "stop_after_steps": integer(1, special={-1: "no limit"}),
    "spike_guard.factor": custom(lambda v: is_number(v) and (v == 0 or v > 1), "0 (off) or a finite number > 1"),
    "spike_guard.window": integer(1),
    "spike_guard.max_retries": integer(0),
    "distributed.initialize": one_of("auto", "yes", "no"),
    "distributed.coordinator_address": custom(
        lambda v: isinstance(v, str) and (v == "" or bool(_HOST_PORT.fullmatch(v))), "'' or 'host:port'"
    ),
    "distributed.num_processes": integer(1, special={-1: "from the environment"}),
    "distributed.process_id": integer(0, special={-1: "from the environment"}),
    "distributed.heartbeat_timeout_seconds": integer(1),
    "distributed.initialization_timeout_seconds": integer(1, optional=True),
    # Converted weights (vgg_jax.convert): names of fc8's classes and how the original preprocessing was absorbed.
    "class_names": custom(_class_names, "None or a list of strings", optional=True),
    "class_wnids": custom(_class_names, "None or a list of WordNet ids", optional=True),  # converted ImageNet weights
    "model.include_top": boolean(optional=True),  # False: converted Keras 'notop' weights (no fc6–fc8)
    "preprocessing": custom(_string_mapping, "a mapping of strings to strings", optional=True),
}


# Paper App. A localisation (vgg_jax/configs/loc.py): checked only in configs that carry the `loc` group.
LOC_FIELDS: dict[str, Spec] = {
    "model.box_head": one_of("scr", "pcr"),  # one box for all classes, or one per class
    "loc.finetune": one_of("all", "fc6-fc7"),
    "loc.image_feature": text(nonempty=True, what="a TFDS feature"),
    "loc.label_feature": text(nonempty=True, what="a TFDS ClassLabel feature, e.g. 'label' or 'objects/label'"),
    "loc.boxes_feature": text(nonempty=True, what="a TFDS BBox feature, e.g. 'objects/bbox'"),
    "loc.box_labels_feature": text(what="the boxes' classes; '' when every box is of the image's class"),
    "loc.max_boxes": integer(1),
    "loc.classifiers": text(what="classification run directories, comma-separated; '' for warm_start.checkpoint"),
    "loc.test_scales": sequence(lambda v: is_int(v) and v >= 32, "integers >= 32 (test scales Q)"),
    "loc.flip": one_of("auto", "yes", "no"),
    "loc.merge_iou": number(0, 1),
    "loc.top_k": integer(1),
}


def fields_of(config: Any) -> dict[str, Spec]:
    """The specs that apply to `config`: FIELDS, and LOC_FIELDS when it has a `loc` group."""
    return FIELDS | LOC_FIELDS if _is_group(config) and "loc" in config.keys() else FIELDS


# --------------------------------------------------------------------------- cross-field rules


@dataclasses.dataclass(frozen=True)
class Rule:
    """A constraint between fields; `check` gets their values (in `fields` order) and returns a problem or None."""

    fields: tuple[str, ...]
    check: Callable[..., str | None]


def _scale_range(scale_min: int, scale_max: int) -> str | None:
    if scale_min > scale_max:
        return f"config.scale_min={scale_min} > config.scale_max={scale_max}: S is drawn from [scale_min, scale_max]"
    return None


def _crop_in_scale(crop_size: int, scale_min: int) -> str | None:
    if crop_size > scale_min:
        return (
            f"config.crop_size={crop_size} > config.scale_min={scale_min}: the training crop must fit in the "
            "image rescaled to the smallest S"
        )
    return None


def _crop_in_eval_scale(crop_size: int, eval_scale: int) -> str | None:
    if crop_size > eval_scale:
        return (
            f"config.eval_scale={eval_scale} < config.crop_size={crop_size}: the centre crop must fit in the "
            "image rescaled to Q"
        )
    return None


def _training_length(num_epochs: float, num_train_steps: int) -> str | None:
    if num_train_steps <= 0 and num_epochs <= 0:
        return (
            f"config.num_epochs={num_epochs!r} with config.num_train_steps={num_train_steps}: "
            "set num_epochs > 0, or num_train_steps > 0"
        )
    return None


def _shards_split_batch(input_shards: int, global_batch_size: int) -> str | None:
    if input_shards > 0 and global_batch_size % input_shards:
        return (
            f"config.global_batch_size={global_batch_size} is not divisible by config.input_shards={input_shards}: "
            "every shard contributes the same number of rows"
        )
    return None


def _process_id_in_range(num_processes: int, process_id: int) -> str | None:
    if num_processes > 0 and process_id >= num_processes:
        return (
            f"config.distributed.process_id={process_id} >= config.distributed.num_processes={num_processes}: "
            "ids run from 0 to num_processes - 1"
        )
    return None


def _class_names_match(class_names: Sequence[str] | None, num_classes: int) -> str | None:
    if class_names is not None and len(class_names) != num_classes:
        return (
            f"config.class_names has {len(class_names)} names but config.model.num_classes={num_classes}: "
            "one name per class"
        )
    return None


def _dataset_named(dataset: str, preprocessing: Any) -> str | None:
    # Converted weights (config.preprocessing present) may come from an unknown data set; training needs one.
    if not dataset.strip() and preprocessing is _MISSING:
        return "config.dataset='': expected a TFDS data set name (e.g. 'imagenet2012', 'stl10')"
    return None


def _loc_center_crop(box_head: str, eval_method: str) -> str | None:
    if eval_method != "center_crop":
        return (
            f"config.eval_method={eval_method!r} with config.model.box_head={box_head!r}: localisation runs validate "
            "on the centre crop (protocol 1); the dense protocol 2 is `python -m vgg_jax.localise_eval`"
        )
    return None


def _warm_start_source(layers: Any, checkpoint: str) -> str | None:
    # A deeper net or a finer scale told to start from an earlier run, without the run: it would train from
    # random init, the case the paper says stalls (§3.1), and every number of Tables 3-6 would be another net's.
    if warm_start_layers(layers) and not checkpoint.strip():
        return (
            f"config.warm_start.layers={layers!r} with config.warm_start.checkpoint='': the paper starts "
            "this net from an earlier run (net A for the deeper nets, the previous scale's net for S=384 and "
            "jittered S). Either give that run: --config.warm_start.checkpoint=RUN_DIR, or train from random init "
            "on purpose: --config.warm_start.layers=''"
        )
    return None


RULES: tuple[Rule, ...] = (
    Rule(("scale_min", "scale_max"), _scale_range),
    Rule(("crop_size", "scale_min"), _crop_in_scale),
    Rule(("crop_size", "eval_scale"), _crop_in_eval_scale),
    Rule(("num_epochs", "num_train_steps"), _training_length),
    Rule(("input_shards", "global_batch_size"), _shards_split_batch),
    Rule(("distributed.num_processes", "distributed.process_id"), _process_id_in_range),
    Rule(("class_names", "model.num_classes"), _class_names_match),
    Rule(("dataset", "preprocessing"), _dataset_named),
    Rule(("model.box_head", "eval_method"), _loc_center_crop),
    Rule(("warm_start.layers", "warm_start.checkpoint"), _warm_start_source),
)
# Fields a rule may see absent (passed as _MISSING rather than skipping the rule).
_RULE_MAY_BE_MISSING = frozenset({"preprocessing"})


# --------------------------------------------------------------------------- the walk


def _is_group(value: Any) -> bool:
    # ConfigDict, FrozenConfigDict and dict all have keys() and item access; ConfigDict is no Mapping.
    return hasattr(value, "keys") and hasattr(value, "__getitem__") and not isinstance(value, (str, bytes))


def _flatten(config: Any) -> tuple[dict[str, Any], list[str]]:
    """{dotted field: value} for the leaves the table knows, and problems with the config's shape."""
    values: dict[str, Any] = {}
    found: list[str] = []
    fields = fields_of(config)
    known = set(fields) | set(GROUPS)

    def walk(node: Any, prefix: str) -> None:
        for key in sorted(node.keys(), key=str):
            path = f"{prefix}{key}"
            value = node[key]
            if path in GROUPS:
                if _is_group(value):
                    walk(value, path + ".")
                else:
                    found.append(f"config.{path}={value!r}: expected a group of fields (a ConfigDict)")
            elif path in fields:
                values[path] = value
            else:
                guess = difflib.get_close_matches(path, sorted(known), n=1)
                hint = f"; did you mean config.{guess[0]}?" if guess else ""
                found.append(f"config.{path}={value!r}: unknown field (not in vgg_jax/configs/common.py){hint}")

    walk(config, "")
    return values, found


def problems(config: Any) -> list[str]:
    """Every problem with `config`, one line each (empty when it is valid)."""
    if not _is_group(config):
        return [f"config={config!r}: expected a ConfigDict (or dict) of fields"]
    values, found = _flatten(config)
    bad: set[str] = set()
    present = set(config.keys())
    for group, optional in GROUPS.items():
        absent = group not in present
        if absent and not optional:
            found.append(f"config.{group} is missing: expected a group of fields (a ConfigDict)")
        if absent or not _is_group(config[group]):  # reported once, as the group, not field by field
            bad.update(path for path in FIELDS if path.startswith(group + "."))
    for path, spec in fields_of(config).items():
        if path in bad:
            continue
        if path not in values:
            if not spec.optional:
                found.append(f"config.{path} is missing: expected {spec.allowed}")
                bad.add(path)
            continue
        problem = spec.problem(values[path])
        if problem:
            found.append(f"config.{path}={values[path]!r}: {problem}")
            bad.add(path)
    for rule in RULES:
        if any(f in bad or (f not in values and f not in _RULE_MAY_BE_MISSING) for f in rule.fields):
            continue  # a field already reported, or absent: the rule has nothing sound to say
        problem = rule.check(*(values.get(f, _MISSING) for f in rule.fields))
        if problem:
            found.append(problem)
    return found


def validate(config: Any) -> None:
    """Raises ValueError listing every problem with `config` (field, value given, what is allowed)."""
    found = problems(config)
    if found:
        count = f"{len(found)} problem{'s' if len(found) > 1 else ''}"
        raise ValueError(f"invalid config ({count}):\n" + "\n".join(f"  {line}" for line in found))
