"""What a command does to its process before any work, and what a library user gets with one call.

Importing vgg_jax changes nothing in the process. `prepare` applies the
measured XLA:CPU flags (`vgg_jax.runtime.cpu_defaults`; before JAX starts a backend)
and keeps TensorFlow — tf.data's host-side engine — off the GPUs, whose memory
JAX needs, and quiet. Every command calls it first; in a notebook call
``vgg_jax.prepare_process()`` before the first JAX computation.
"""

from __future__ import annotations

import importlib.util
import os


def hide_gpus_from_tensorflow() -> None:
    """Keeps TensorFlow off every GPU (no effect once TensorFlow has initialised its devices)."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # TensorFlow already initialised its devices: nothing can change now.
        pass


def prepare(*, tensorflow: bool = True) -> tuple[str, ...]:
    """The measured CPU flags this jaxlib knows, and with `tensorflow` (if installed) TF off the GPUs.

    Returns the XLA flags it added. Flags the user set in XLA_FLAGS win.
    """
    from vgg_jax.runtime import console, cpu_defaults

    applied = cpu_defaults.apply()
    if tensorflow and importlib.util.find_spec("tensorflow") is not None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        console.import_tensorflow_quietly()
        hide_gpus_from_tensorflow()
    return applied


def start_command(*, tensorflow: bool = True) -> None:
    """What every command does first: `prepare`, then library chatter off unless asked for (`console.quiet`)."""
    from absl import flags

    from vgg_jax.runtime import console, extras

    if tensorflow:
        extras.exit_unless_training(extras.command_name())
    prepare(tensorflow=tensorflow)
    if not console.verbose_requested(flags.FLAGS["verbosity"].present > 0):
        console.quiet(tensorflow=tensorflow)
