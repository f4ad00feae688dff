"""Fast XLA:CPU defaults, applied before JAX initialises its backends.

The flag set is chosen by measurement (bench/RESULTS.md, "CPU flags";
``python bench/train_step.py --sweep`` reruns the search). On jaxlib 0.10 XLA
sends every convolution to YNNPACK, and a VGG train step then takes 1.7× as long
as with XLA's Eigen convolutions (quiet sweep); we turn YNNPACK convolutions
off. (``--xla_cpu_use_onednn=true``, once added too, changes nothing measurable:
no op of the step reaches oneDNN in this jaxlib.)

`apply()` only touches XLA_FLAGS when the backend will be the CPU (no
accelerator named by JAX_PLATFORMS, no JAX GPU/TPU plugin installed), and a
user's own XLA_FLAGS always win: a flag they set is never overridden.
"""

from __future__ import annotations

import importlib.util
import logging
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


def apply() -> bool:
    """Adds `CPU_XLA_FLAGS` to XLA_FLAGS when the backend will be the CPU; returns whether it did."""
    if not backend_will_be_cpu():
        return False
    if "jax" in sys.modules:
        try:
            from jax._src import xla_bridge

            if getattr(xla_bridge, "_backends", None):
                logging.warning("vgg_jax.cpu_defaults.apply() after JAX initialised its backends: no effect")
        except ImportError:  # private module moved: nothing to warn about
            pass
    current = os.environ.get("XLA_FLAGS", "")
    merged = merged_flags(current)
    if merged != current.strip():
        os.environ["XLA_FLAGS"] = merged
    return True
