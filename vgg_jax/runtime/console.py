"""What a command prints: vgg_jax's progress, warnings and errors — no library INFO chatter.

Like the Flax examples, a run prints the resolved config once, one line per
log step, one per evaluation and one per checkpoint. Orbax, TFDS, JAX, clu and
absl log INFO lines of their own (save threads, metadata stores, backends):
`quiet()` keeps those below WARNING off the console, unless the user asks for
them with `--verbosity=1` (absl's flag) or `VGG_JAX_VERBOSE=1`.

TensorFlow's C++ start-up lines (oneDNN notice, CPU feature guard) are written
to file descriptor 2 before any Python logging exists and ignore
TF_CPP_MIN_LOG_LEVEL in current releases, so `import_tensorflow_quietly`
captures that descriptor during the import and replays only what is not such
a notice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from typing import Any

from vgg_jax.configs.tree import flatten

_PACKAGE_DIR = str(pathlib.Path(__file__).resolve().parents[1])  # vgg_jax/, every subpackage
# Library warnings meant for library developers, or expected (the first preparation of the embedded set).
_HARMLESS_WARNINGS = ("has no dataset_info.json", "is deprecated and will be removed")
_TENSORFLOW_NOTICES = ("absl::InitializeLog", "oneDNN custom operations", "cpu_feature_guard", "TF-TRT Warning")


def verbose_requested(verbosity_flag_given: bool = False) -> bool:
    return verbosity_flag_given or os.environ.get("VGG_JAX_VERBOSE", "") not in ("", "0")


class _OursOrWarnings(logging.Filter):
    """Passes vgg_jax's records at any level and other libraries' at WARNING and above."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.pathname.startswith(_PACKAGE_DIR):
            return True
        if record.levelno < logging.WARNING:
            return False
        return not any(text in str(record.msg) for text in _HARMLESS_WARNINGS)


def quiet(*, tensorflow: bool = True) -> None:
    """Filters library chatter from the handlers of the root logger (absl's, under `app.run`); TFDS's bars off."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        from absl import logging as absl_logging

        handlers.append(absl_logging.get_absl_handler())
    except ImportError:
        pass
    for handler in handlers:
        if not any(isinstance(f, _OursOrWarnings) for f in handler.filters):
            handler.addFilter(_OursOrWarnings())
    if tensorflow:
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow with its C++ start-up notices dropped (other stderr output is replayed)."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
    kept = [line for line in text.splitlines() if line and not any(n in line for n in _TENSORFLOW_NOTICES)]
    if kept:
        print("\n".join(kept), file=sys.stderr, flush=True)


class _Without(logging.Filter):
    def __init__(self, texts: tuple[str, ...]) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in str(record.msg) for text in self.texts)


@contextlib.contextmanager
def without_messages(logger_name: str, *texts: str) -> Iterator[None]:
    """Drops `logger_name`'s records containing any of `texts` while the block runs (expected, harmless ones)."""
    logger, silencer = logging.getLogger(logger_name), _Without(texts)
    logger.addFilter(silencer)
    try:
        yield
    finally:
        logger.removeFilter(silencer)


def format_config(config: Any) -> str:
    """The resolved config in a dozen lines: sorted `field: value` pairs, wrapped (a run's output fits a screen)."""
    glue = "\x00"  # keeps each `field: value` on one line when wrapping
    pairs = [
        f"{key}: {value if isinstance(value, str) and value else repr(value)}".replace(" ", glue)
        for key, value in flatten(config).items()
    ]
    wrapped = textwrap.fill(", ".join(pairs), width=118, break_long_words=False, break_on_hyphens=False)
    return "resolved config:\n" + textwrap.indent(wrapped.replace(glue, " "), "  ")
