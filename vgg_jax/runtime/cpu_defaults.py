"""Fast XLA:CPU defaults, applied before JAX initialises its backends.

The flag set is chosen by measurement (bench/RESULTS.md, "CPU flags";
``python bench/train_step.py --sweep`` reruns the search). On jaxlib 0.10 XLA
sends every convolution to YNNPACK, and a VGG train step then takes 1.7× as long
as with XLA's Eigen convolutions (quiet sweep); we turn YNNPACK convolutions
off. (``--xla_cpu_use_onednn=true``, once added too, changes nothing measurable:
no op of the step reaches oneDNN in this jaxlib.)

`apply()` only touches XLA_FLAGS when the backend will be the CPU (no
accelerator named by JAX_PLATFORMS, no JAX GPU/TPU plugin installed), only
with flags this jaxlib's XLA defines (an unknown flag aborts every JAX
program), and a user's own XLA_FLAGS always win. Nothing calls it at import:
the commands do, through `vgg_jax.prepare_process`.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import logging
import mmap
import os
import pkgutil
import sys

# Measured set for XLA:CPU (see bench/RESULTS.md, "CPU flags").
CPU_XLA_FLAGS: tuple[str, ...] = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)

_ACCELERATOR_PLATFORMS = ("cuda", "gpu", "rocm", "tpu", "metal")
_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def _accelerator_plugin_installed() -> bool:
    """True when a JAX plugin for a GPU/TPU is importable (found without importing JAX)."""
    if any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_MODULES):
        return True
    try:
        import jax_plugins  # namespace package of the PJRT plugins (xla_cuda12, xla_tpu, ...)
    except ImportError:
        return False
    return any(
        any(platform in module.name for platform in _ACCELERATOR_PLATFORMS + ("xla_",))
        for module in pkgutil.iter_modules(jax_plugins.__path__)
    )


def backend_will_be_cpu(environ: os._Environ | dict[str, str] | None = None) -> bool:
    """Whether JAX will run on the CPU: JAX_PLATFORMS says so, or names nothing and no accelerator plugin exists."""
    environ = os.environ if environ is None else environ
    platforms = (environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or "").lower()
    if platforms:
        return all(p.strip() == "cpu" for p in platforms.split(",") if p.strip())
    return not _accelerator_plugin_installed()


def merged_flags(current: str, defaults: tuple[str, ...] = CPU_XLA_FLAGS) -> str:
    """`current` XLA_FLAGS plus every default whose flag name `current` does not set."""
    present = {flag.split("=", 1)[0] for flag in current.split()}
    extra = [flag for flag in defaults if flag.split("=", 1)[0] not in present]
    return " ".join([current, *extra]).strip()


def _xla_libraries() -> list[str]:
    """jaxlib's shared libraries, where XLA's flag table lives (located without importing JAX)."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return []
    found: list[str] = []
    for folder in spec.submodule_search_locations:
        found += glob.glob(os.path.join(folder, "**", "*.so"), recursive=True)
    return sorted(found, key=os.path.getsize, reverse=True)


@functools.cache
def xla_knows(flag: str) -> bool:
    """Whether this jaxlib's XLA defines `flag` (``--name=value``): its name is a string in XLA's library."""
    name = flag.split("=", 1)[0].lstrip("-").encode()
    for path in _xla_libraries():
        with open(path, "rb") as library:
            if os.fstat(library.fileno()).st_size == 0:
                continue
            with mmap.mmap(library.fileno(), 0, access=mmap.ACCESS_READ) as contents:
                if contents.find(name) >= 0:
                    return True
    return False


def apply() -> tuple[str, ...]:
    """Adds the `CPU_XLA_FLAGS` this XLA knows to XLA_FLAGS when the backend will be the CPU; returns them."""
    if not backend_will_be_cpu():
        return ()
    if "jax" in sys.modules:
        try:
            from jax._src import xla_bridge

            if getattr(xla_bridge, "_backends", None):
                logging.warning("vgg_jax.prepare_process() after JAX initialised its backends: no effect on XLA")
        except ImportError:  # private module moved: nothing to warn about
            pass
    known = tuple(flag for flag in CPU_XLA_FLAGS if xla_knows(flag))
    current = os.environ.get("XLA_FLAGS", "")
    merged = merged_flags(current, known)
    if merged != current.strip():
        os.environ["XLA_FLAGS"] = merged
    return known
