"""Command line: ``python -m vgg_jax.main --config=configs/e.py:demo --workdir=runs/demo``.

Flags: ``--config`` (a config file with its `:arg`, fields overridable as
``--config.field=value``) and ``--workdir``. Run the same command again to
resume; run it on every host for multi-host training (see launch/).

`--config=configs/<net>.py` works from any directory: when that file is not
there (an installed package, another directory), the packaged
`vgg_jax/configs/<net>.py` is used (`vgg_jax.configs.resolve_config_path`).
Paths may be relative or start with `~`. Library INFO logs are off; pass
``--verbosity=1`` (or set VGG_JAX_VERBOSE=1) to see them.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow (tf.data) is noisy

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vgg_jax import configs, console  # noqa: E402

# Importing vgg_jax applies the CPU defaults (vgg_jax/__init__.py); vgg_jax.data hides GPUs from TF.

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/d.py:scale=384.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs (resumes if present).")
flags.mark_flags_as_required(["config", "workdir"])


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.setup_command()
    import jax

    from vgg_jax import parallel, train

    config = _CONFIG.value
    parallel.initialize(config.get("distributed"))  # before anything touches a JAX backend
    if jax.process_index() == 0:
        print(console.format_config(config), flush=True)
    try:
        train.train_and_evaluate(config, _WORKDIR.value)
    except (ValueError, FileNotFoundError, PermissionError, train.DivergedError) as error:
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)


def _resolve_config_flag(argv: list[str]) -> list[str]:
    """Rewrites `--config=configs/<net>.py…` to the packaged file when the given file does not exist."""
    resolved = list(argv)
    for index, arg in enumerate(resolved):
        if arg.startswith("--config="):
            resolved[index] = "--config=" + configs.resolve_config_path(arg.removeprefix("--config="))
        elif arg == "--config" and index + 1 < len(resolved):
            resolved[index + 1] = configs.resolve_config_path(resolved[index + 1])
    return resolved


def run() -> None:
    app.run(_main, argv=_resolve_config_flag(sys.argv))


if __name__ == "__main__":
    run()
