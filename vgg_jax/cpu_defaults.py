"""Fast XLA:CPU defaults, applied before JAX initialises its backends.

The flag set is chosen by measurement (bench/RESULTS.md). A user's own
XLA_FLAGS always win: we only add flags they did not set.
"""

from __future__ import annotations

import os

# Measured set for XLA:CPU (see bench/RESULTS.md, "CPU flags").
CPU_XLA_FLAGS: tuple[str, ...] = ()


def apply() -> None:
    """Adds `CPU_XLA_FLAGS` to XLA_FLAGS (flags already present are left as the user set them)."""
    current = os.environ.get("XLA_FLAGS", "")
    present = {flag.split("=", 1)[0] for flag in current.split()}
    extra = [flag for flag in CPU_XLA_FLAGS if flag.split("=", 1)[0] not in present]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
