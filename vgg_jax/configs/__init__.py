"""The paper's recipes (§3.1) as ml_collections configs, shipped inside the package.

`--config=configs/<net>.py[:arg]` names one of these files: from a source
checkout the thin top-level `configs/<net>.py` is loaded; anywhere else (an
installed package, another directory) `vgg_jax.main` resolves the same name
to the file here (see `resolve_config_path`).
"""

from __future__ import annotations

import os
import pathlib

PACKAGED = pathlib.Path(__file__).resolve().parent
NETS = ("a", "a_lrn", "b", "c", "d", "e", "loc", "finetune")  # loc: App. A localisation


def resolve_config_path(spec: str) -> str:
    """`configs/e.py:demo` → the same spec, or the packaged file's path when the file is not there.

    A path that exists (relative to the current directory, or with `~`) is kept, so users' own
    config files work; a missing `configs/<net>.py` or a bare `<net>` / `<net>.py` falls back to
    `vgg_jax/configs/<net>.py`. Anything else is returned unchanged for config_flags to report.
    """
    path, sep, arg = spec.partition(":")
    if os.path.exists(os.path.expanduser(path)):
        return spec
    name = pathlib.Path(path).name.removesuffix(".py")
    if name in NETS and pathlib.Path(path).parent.name in ("", "configs"):
        return f"{PACKAGED / (name + '.py')}{sep}{arg}"
    return spec
