"""Every config field checked before any work: the declared allowed values, and a few cross-field rules.

`validate(config)` walks a run config (an ``ml_collections.ConfigDict``, a
frozen one, or the plain nested dict of a ``config.json``) against the
declarations of `vgg_jax.configs.fields` and the `RULES` here, and raises one
``ValueError`` listing every problem, one line each, as
``config.<dotted.field>=<value given>: expected <what is allowed>``. An
undeclared field is an error too (usually a typo'd ``--config.field=``).
Cross-field rules run only on fields that passed their own check, so a bad
type is reported once. Imports no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Sequence
from typing import Any

from vgg_jax.configs import fields, specs
from vgg_jax.configs.fields import GROUPS, Field
from vgg_jax.configs.tree import flatten, is_group

_MISSING = object()


def fields_of(config: Any) -> dict[str, Field]:
    """The declarations that apply to `config`: the recipe's and extras, App. A's when it has a `loc` group."""
    loc = is_group(config) and "loc" in config.keys() and is_group(config["loc"])
    return {field.path: field for field in fields.FIELDS if field.where != "loc" or loc}


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
        return (
            "config.dataset='': expected a TFDS data set name (e.g. 'imagenet2012', 'stl10') or a folder of images "
            "('folder:PATH', PATH/<class>/<image>)"
        )
    return None


def _loc_center_crop(box_head: str, eval_method: str) -> str | None:
    if eval_method != "center_crop":
        return (
            f"config.eval_method={eval_method!r} with config.model.box_head={box_head!r}: localisation runs validate "
            "on the centre crop (protocol 1); the dense protocol 2 is `python -m vgg_jax localise`"
        )
    return None


def _canvas_holds_crop(resample_on_device: bool, resample_canvas: int, crop_size: int) -> str | None:
    if resample_on_device and 0 < resample_canvas < crop_size:
        return (
            f"config.resample_canvas={resample_canvas} is smaller than config.crop_size={crop_size}: the canvas must "
            "hold at least a crop's window (0 picks 2 × crop_size)"
        )
    return None


def _head_present(num_classes: int, fc_width: int, include_top: Any) -> str | None:
    # Only converted 'notop' weights (model.include_top=False) have no classifier to size.
    if include_top is not False and (num_classes == 0 or fc_width == 0):
        return (
            f"config.model.num_classes={num_classes}, model.fc_width={fc_width}: a net with fc6–fc8 needs >= 2 "
            "classes and fc_width >= 1 (0 only for weights without the head, model.include_top=False)"
        )
    return None


def _warm_start_source(layers: Any, checkpoint: str) -> str | None:
    # A deeper net or a finer scale told to start from an earlier run, without the run: it would train from
    # random init, the case the paper says stalls (§3.1), and every number of Tables 3-6 would be another net's.
    if specs.warm_start_layers(layers) and not checkpoint.strip():
        return (
            f"config.warm_start.layers={layers!r} with config.warm_start.checkpoint='': the paper starts "
            "this net from an earlier run (net A for the deeper nets, the previous scale's net for S=384 and "
            "jittered S). Either give that run: --config.warm_start.checkpoint=RUN_DIR, or train from random init "
            "on purpose: --config.warm_start.layers=''"
        )
    return None


RULES: tuple[Rule, ...] = (
    Rule(("model.num_classes", "model.fc_width", "model.include_top"), _head_present),
    Rule(("scale_min", "scale_max"), _scale_range),
    Rule(("crop_size", "scale_min"), _crop_in_scale),
    Rule(("crop_size", "eval_scale"), _crop_in_eval_scale),
    Rule(("num_epochs", "num_train_steps"), _training_length),
    Rule(("input_shards", "global_batch_size"), _shards_split_batch),
    Rule(("distributed.num_processes", "distributed.process_id"), _process_id_in_range),
    Rule(("class_names", "model.num_classes"), _class_names_match),
    Rule(("dataset", "preprocessing"), _dataset_named),
    Rule(("model.box_head", "eval_method"), _loc_center_crop),
    Rule(("resample_on_device", "resample_canvas", "crop_size"), _canvas_holds_crop),
    Rule(("warm_start.layers", "warm_start.checkpoint"), _warm_start_source),
)
# Fields a rule may see absent (passed as _MISSING rather than skipping the rule).
_RULE_MAY_BE_MISSING = frozenset({"preprocessing", "model.include_top"})


# --------------------------------------------------------------------------- the walk


def _shape_problems(config: Any, declared: dict[str, Field]) -> list[str]:
    """Undeclared fields (with a guess), groups that are no group, and missing groups."""
    found: list[str] = []
    known = sorted(set(declared) | set(GROUPS))
    for path, value in flatten(config).items():
        if path in GROUPS:
            found.append(f"config.{path}={value!r}: expected a group of fields (a ConfigDict)")
        elif path not in declared:
            guess = difflib.get_close_matches(path, known, n=1)
            hint = f"; did you mean config.{guess[0]}?" if guess else ""
            found.append(f"config.{path}={value!r}: unknown field (not in vgg_jax/configs/fields.py){hint}")
    present = set(config.keys())
    found += [
        f"config.{name} is missing: expected a group of fields (a ConfigDict)"
        for name, group in GROUPS.items()
        if name not in present and not group.optional and group.where == "recipe"
    ]
    return found


def problems(config: Any) -> list[str]:
    """Every problem with `config`, one line each (empty when it is valid)."""
    if not is_group(config):
        return [f"config={config!r}: expected a ConfigDict (or dict) of fields"]
    declared = fields_of(config)
    found = _shape_problems(config, declared)
    values = {path: value for path, value in flatten(config).items() if path in declared}
    # A group that is absent or no group is reported once, as the group, not field by field.
    no_group = {name for name in GROUPS if not is_group(config[name] if name in config.keys() else None)}
    bad: set[str] = set()
    for path, field in declared.items():
        if fields.group_of(path) in no_group:
            bad.add(path)
        elif path not in values:
            if not field.may_be_absent:
                found.append(f"config.{path} is missing: expected {field.spec.allowed}")
                bad.add(path)
        elif problem := field.spec.problem(values[path]):
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
