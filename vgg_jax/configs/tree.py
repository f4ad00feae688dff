"""A config as dotted fields: the one flatten and the one dotted-field setter.

A config is an ``ml_collections.ConfigDict``, a frozen one, or the nested dict
of a ``config.json``; its groups are those `vgg_jax.configs.fields.GROUPS`
declares, so a field whose value is a mapping (``preprocessing``) stays one field.
"""

from __future__ import annotations

from typing import Any

from vgg_jax.configs.fields import GROUPS


def is_group(value: Any) -> bool:
    """ConfigDict, FrozenConfigDict and dict all have keys() and item access (ConfigDict is no Mapping)."""
    return hasattr(value, "keys") and hasattr(value, "__getitem__") and not isinstance(value, (str, bytes))


def flatten(config: Any, *, stringify: bool = False) -> dict[str, Any]:
    """{'model': {'variant': 'E'}, 'seed': 0} → {'model.variant': 'E', 'seed': 0}, sorted by field.

    A declared group that holds no group stays one entry (validation reports it). With `stringify`,
    values other than int, float, str and bool become text (TensorBoard's hparams take only those).
    """
    flat: dict[str, Any] = {}
    for key in sorted(config.keys(), key=str):
        value = config[key]
        if key in GROUPS and is_group(value):
            for name in sorted(value.keys(), key=str):
                flat[f"{key}.{name}"] = value[name]
        else:
            flat[str(key)] = value
    if stringify:
        flat = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat.items()}
    return flat


def get_field(config: Any, path: str, default: Any = None) -> Any:
    """config's value at dotted `path` ('warm_start.checkpoint'); `default` when it or its group is absent."""
    *parents, name = path.split(".")
    node = config
    for parent in parents:
        node = node.get(parent) if node is not None else None
    return node.get(name, default) if node is not None else default


def set_field(config: Any, path: str, value: Any) -> None:
    """Sets dotted `path` of `config` in place; KeyError naming the path when its group is absent."""
    *parents, name = path.split(".")
    node = config
    for parent in parents:
        if parent not in node:
            raise KeyError(f"config.{path}: the config has no group {parent!r}")
        node = node[parent]
    node[name] = value
