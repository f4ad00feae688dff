"""Command line: ``python -m vgg_jax.main --config=configs/e.py:demo --workdir=runs/demo``.

Flags: ``--config`` (a config file with its `:arg`, fields overridable as
``--config.field=value``) and ``--workdir``. Run the same command again to
resume; run it on every host for multi-host training (see launch/).

`--config=configs/<net>.py` works from any directory: when that file is not
there (an installed package, another directory), the packaged
`vgg_jax/configs/<net>.py` is used (`vgg_jax.configs.resolve_config_path`).
Paths may be relative or start with `~`. Library INFO logs are off; pass
``--verbosity=1`` (or set VGG_JAX_VERBOSE=1) to see them. A config that does
not load (a missing file, a syntax error, a bad `:arg`, an unknown field, a
value of the wrong type) is one line naming it (`vgg_jax.cli`).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow (tf.data) is noisy

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vgg_jax import cli, configs, console  # noqa: E402

# Importing vgg_jax applies the CPU defaults (vgg_jax/__init__.py); vgg_jax.data hides GPUs from TF.

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/d.py:scale=384.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs (resumes if present).")
flags.mark_flags_as_required(["config", "workdir"])


def _main(argv: list[str]) -> None:
    console.setup_command()
    import jax

    from vgg_jax import parallel, train

    config = _CONFIG.value
    parallel.initialize(config.get("distributed"))  # before anything touches a JAX backend
    if jax.process_index() == 0:
        print(console.format_config(config), flush=True)
    train.train_and_evaluate(config, _WORKDIR.value)


def _resolve_config_flag(argv: list[str]) -> list[str]:
    """Rewrites `--config=configs/<net>.py…` to the packaged file when the given file does not exist."""
    resolved = list(argv)
    for index, arg in enumerate(resolved):
        if arg.startswith("--config="):
            resolved[index] = "--config=" + configs.resolve_config_path(arg.removeprefix("--config="))
        elif arg == "--config" and index + 1 < len(resolved):
            resolved[index + 1] = configs.resolve_config_path(resolved[index + 1])
    return resolved


def check_config_arguments(argv: list[str]) -> None:
    """Loads `--config` and checks every `--config.field` names a field, before absl parses them (`cli`)."""
    spec = next((a.removeprefix("--config=") for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv[:-1]:
        spec = argv[argv.index("--config") + 1]
    if spec is None:
        return  # absl names the missing required flag
    config = _load_config(spec)
    fields = sorted(console.flatten(config.to_dict(), stringify=False))
    groups = {field.rsplit(".", i)[0] for field in fields for i in range(1, field.count(".") + 1)}
    for arg in argv:
        if arg.startswith(("--config.", "--noconfig.")):
            name = arg.split("=", 1)[0].split("config.", 1)[1]
            if name not in fields and name not in groups:
                close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
                hint = f"did you mean {', '.join(close)}? " if close else ""
                raise cli.ArgumentError(
                    f"--config.{name}: {spec} has no field {name!r}; {hint}the fields are the names in the "
                    "'resolved config' a run prints (e.g. --config.num_train_steps=100, --config.model.variant=D)"
                )


def _load_config(spec: str) -> Any:
    """The config `spec` names (file[:arg]), or an `ArgumentError` saying what stops it from loading."""
    path, colon, arg = spec.partition(":")
    where = f"--config={spec}"
    if not os.path.isfile(os.path.expanduser(path)):
        raise cli.ArgumentError(
            f"{where}: no config file {path!r} (from {os.getcwd()}); expected a file such as configs/d.py, with an "
            f"optional :arg such as configs/d.py:scale=384 (the packaged nets: {', '.join(configs.NETS)})"
        )
    try:
        module_spec = importlib.util.spec_from_file_location("vgg_jax_config_check", os.path.expanduser(path))
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except SyntaxError as error:
        raise cli.ArgumentError(
            f"{where}: {error.filename} line {error.lineno} is not valid Python ({error.msg}): "
            f"{(error.text or '').strip()!r}"
        ) from error
    except Exception as error:
        raise cli.ArgumentError(f"{where}: loading {path} failed: {type(error).__name__}: {error}") from error
    if not callable(getattr(module, "get_config", None)):
        raise cli.ArgumentError(f"{where}: {path} defines no get_config(arg) function")
    try:
        return module.get_config(arg) if colon else module.get_config()
    except (ValueError, TypeError, KeyError) as error:
        raise cli.ArgumentError(f"{where}: {error}") from error


def run() -> None:
    from vgg_jax import checkpoints, guard, run_lock

    expected = (ValueError, OSError, guard.DivergedError, run_lock.WorkdirInUseError, checkpoints.CheckpointError)
    cli.run_absl(_main, argv=_resolve_config_flag(sys.argv), check=check_config_arguments, expected=expected)


if __name__ == "__main__":
    run()
