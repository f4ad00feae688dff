"""What a run computes on (paper §3.3: data parallelism over the devices): words for its start line, and a
warning when an NVIDIA GPU is in the machine but JAX runs on the CPU (JAX installed without CUDA).

JAX for a GPU or TPU is a separate install (``pip install -U "jax[cuda13]"``, ``"jax[tpu]"`` on a TPU
VM); without it JAX falls back to the CPU without a word, and a VGG step is then 100× slower.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

INSTALL = {"cuda": 'pip install -U "jax[cuda13]"', "tpu": 'pip install -U "jax[tpu]"'}


def describe(devices: Sequence[Any]) -> str:
    """'8 × gpu (NVIDIA H100 80GB HBM3)', or several such groups joined by ' + '."""
    groups = collections.Counter((device.platform, device.device_kind) for device in devices)
    return " + ".join(f"{count} × {platform} ({kind})" for (platform, kind), count in groups.items())


def nvidia_gpu_evidence(environ: Mapping[str, str] | None = None) -> str | None:
    """What shows an NVIDIA GPU here ('/dev/nvidia0', 'nvidia-smi'), or None. CUDA_VISIBLE_DEVICES='' or
    JAX_PLATFORMS naming the CPU is a choice to use the CPU: then None too."""
    environ = os.environ if environ is None else environ
    if environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1") or environ.get("JAX_PLATFORMS", ""):
        return None
    if os.path.exists("/dev/nvidia0"):
        return "/dev/nvidia0"
    if shutil.which("nvidia-smi"):
        return "nvidia-smi"
    return None


def warn_if_gpu_unused(platform: str, environ: Mapping[str, str] | None = None) -> bool:
    """Logs a warning (and returns True) when JAX runs on the CPU of a machine with an NVIDIA GPU."""
    evidence = nvidia_gpu_evidence(environ) if platform == "cpu" else None
    if evidence:
        logging.warning(
            "an NVIDIA GPU is present (%s) but JAX runs on the CPU: install JAX for CUDA (`%s`), or set "
            "JAX_PLATFORMS=cpu to train on the CPU on purpose",
            evidence,
            INSTALL["cuda"],
        )
    return bool(evidence)
