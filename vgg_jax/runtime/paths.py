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
# config.dataset='folder:PATH' is a folder of images (vgg_jax.data.folder); its PATH is resolved too.
FOLDER_PREFIX = "folder:"
# config.warm_start.checkpoint='pretrained:vgg16' names published weights (vgg_jax.pretrained), not a path.
PRETRAINED_PREFIX = "pretrained:"


def resolve(path: str | os.PathLike[str]) -> str:
    """'' stays '' (meaning 'default'); 'gs://…' and other URLs, and 'pretrained:NAME', pass through; else
    absolute, `~` expanded."""
    path = os.fspath(path)
    if not path or "://" in path or path.startswith(PRETRAINED_PREFIX):
        return path
    return os.path.abspath(os.path.expanduser(path))


def resolve_config_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Resolves `CONFIG_PATH_FIELDS` and a 'folder:PATH' data set of `config` in place (and returns it)."""
    dataset = config.get("dataset")
    if isinstance(dataset, str) and dataset.startswith(FOLDER_PREFIX):
        config.dataset = FOLDER_PREFIX + resolve(dataset.removeprefix(FOLDER_PREFIX))
    for dotted in CONFIG_PATH_FIELDS:
        value = get_field(config, dotted)
        if isinstance(value, str):
            set_field(config, dotted, resolve(value))
    return config
