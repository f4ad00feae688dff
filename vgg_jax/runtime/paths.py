"""Paths a user gives: relative to the current directory, `~` expanded, URLs untouched.

Called once at each boundary where a user's path enters (`train_and_evaluate`,
the command lines, `vgg_jax.load`, the converter), so that everything below
sees absolute paths: Orbax refuses relative checkpoint paths, and a process
that changes directory must not change what a path means.
"""

from __future__ import annotations

import os

import ml_collections

from vgg_jax.configs.tree import get_field, set_field

# Config fields that hold a path (dotted); each is resolved like a command-line path.
CONFIG_PATH_FIELDS = ("data_dir", "warm_start.checkpoint")


def resolve(path: str | os.PathLike[str]) -> str:
    """'' stays '' (meaning 'default'); 'gs://…' and other URLs pass through; else absolute, `~` expanded."""
    path = os.fspath(path)
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def resolve_config_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Resolves `CONFIG_PATH_FIELDS` of `config` in place (and returns it)."""
    for dotted in CONFIG_PATH_FIELDS:
        value = get_field(config, dotted)
        if isinstance(value, str):
            set_field(config, dotted, resolve(value))
    return config
