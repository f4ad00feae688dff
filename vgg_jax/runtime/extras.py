"""The optional half of the install: what training and evaluation need beyond the networks, and the one line
that says how to get it.

``pip install vgg_jax`` gives the networks (paper §2, Table 1), `vgg_jax.load`, `vgg_jax.pretrained`,
`vgg_jax.perceptual` and `vgg_jax.weights.convert`: JAX, Flax, NumPy and the weight readers. Training and the
paper's evaluation (§3) read data sets with tf.data and TFDS and log with clu / TensorBoard:
``pip install "vgg_jax[train]"``. Stdlib imports only, so it can run before anything is missing.
"""

from __future__ import annotations

import importlib.util
import os
import sys

TRAIN_EXTRA = "train"
# Top-level modules of the train extra (setup.py's extras_require['train'] installs their distributions).
TRAIN_MODULES = ("tensorflow", "tensorflow_datasets", "clu", "tensorboard", "sklearn")


class MissingExtraError(ImportError):
    """A feature's optional dependencies are not installed; the message names the extra to install."""


def missing(modules: tuple[str, ...] = TRAIN_MODULES) -> list[str]:
    """The `modules` that cannot be imported here (found without importing them)."""
    absent = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            absent.append(name)
    return absent


def message(what: str, absent: list[str]) -> str:
    return (
        f"{what} needs {', '.join(absent)}, which `pip install vgg_jax` leaves out: "
        f'pip install "vgg_jax[{TRAIN_EXTRA}]"'
    )


def require_training(what: str) -> None:
    """Raises MissingExtraError (one line naming the extra) when a module of the train extra is missing."""
    absent = missing()
    if absent:
        raise MissingExtraError(message(what, absent))


def command_name() -> str:
    """'python -m vgg_jax.main' (or the script's name): the command, as the user ran it."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name}" if spec and spec.name else os.path.basename(sys.argv[0])


def exit_unless_training(what: str) -> None:
    """For command lines: the same check, ending the process with that one line (exit status 1)."""
    absent = missing()
    if absent:
        raise SystemExit(f"error: {message(what, absent)}")
