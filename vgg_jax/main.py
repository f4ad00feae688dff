"""Command line: ``python -m vgg_jax.main --config=configs/e.py:demo --workdir=runs/demo``.

Flags: ``--config`` (a config file with its `:arg`, fields overridable as
``--config.field=value``) and ``--workdir``. Run the same command again to
resume; run it on every host for multi-host training (see launch/).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow (tf.data) is noisy

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

# Importing vgg_jax applies the CPU defaults (vgg_jax/__init__.py); vgg_jax.data hides GPUs from TF.

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/d.py:scale=384.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs (resumes if present).")
flags.mark_flags_as_required(["config", "workdir"])


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    from vgg_jax import parallel, train

    config = _CONFIG.value
    parallel.initialize(config.get("distributed"))  # before anything touches a JAX backend
    if jax.process_index() == 0:
        logging.info("resolved config:\n%s", config)
        print(config, flush=True)
    try:
        train.train_and_evaluate(config, _WORKDIR.value)
    except (ValueError, FileNotFoundError, PermissionError, train.NonFiniteLossError) as error:
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)


def run() -> None:
    app.run(_main)


if __name__ == "__main__":
    run()
