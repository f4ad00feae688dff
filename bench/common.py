"""Shared pieces of the benchmarks: the analytic FLOP count (paper §2), timing helpers, the worker protocol.

The analytic count is what the paper's "15.47 GMACs for D at 224²" means: one
multiply-accumulate per kernel weight per output position of every conv and
fc layer. A training step costs about three forwards (forward, gradient with
respect to the activations, gradient with respect to the weights), less the
activation gradient of conv1_1, which nobody needs (the images are not
trained). One MAC is two FLOPs, as in XLA's cost analysis.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Iterable
from typing import Any

# Lines a worker process writes for the harness start with this; everything else on its stdout is ignored.
WORKER_PREFIX = "@@bench "


def model_shapes(
    variant: str, image_size: int, width_multiplier: float = 1.0, fc_width: int = 4096, num_classes: int = 1000
) -> dict[str, tuple[int, ...]]:
    """Kernel shapes of every layer of our VGG, from `jax.eval_shape` (no allocation), in forward order."""
    import jax
    import jax.numpy as jnp

    from vgg_jax import models

    model = models.VGG(
        variant=variant,
        num_classes=num_classes,
        width_multiplier=width_multiplier,
        fc_width=fc_width,
        crop_size=image_size,
    )
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    )["params"]
    return {name: tuple(shapes[name]["kernel"].shape) for name in models.layer_names(variant)}


def analytic_macs(shapes: dict[str, tuple[int, ...]], image_size: int) -> dict[str, float]:
    """Per-image forward multiply-accumulates, counted two ways.

    ``forward_macs`` is the paper's convention (every kernel tap at every output
    position, padding included: 15.47 G for D at 224). ``forward_macs_exact``
    leaves out the taps that fall on the zero padding of a 'SAME' conv, as XLA's
    cost analysis does: along one side of length s a k-tap kernel with padding
    p = k // 2 touches k·s − p(p+1) real pixels. ``first_conv_*`` are conv1_1's
    share (its input gradient is not computed).
    """
    totals = {"forward_macs": 0.0, "forward_macs_exact": 0.0}
    first: dict[str, float] = {}
    for name, shape in shapes.items():
        if name.startswith("conv"):
            block = int(name[4 : name.index("_")])
            side = image_size // 2 ** (block - 1)
            kernel, pad = shape[0], shape[0] // 2
            channels = shape[2] * shape[3]
            macs = side * side * kernel * kernel * channels
            exact = (kernel * side - pad * (pad + 1)) ** 2 * channels
            if not first:
                first = {"first_conv_macs": float(macs), "first_conv_macs_exact": float(exact)}
        else:  # fc kernels are (inputs, outputs): one MAC per weight on a crop
            macs = exact = shape[0] * shape[1]
        totals["forward_macs"] += macs
        totals["forward_macs_exact"] += exact
    return totals | first


def analytic_train_flops(
    variant: str, image_size: int, width_multiplier: float = 1.0, fc_width: int = 4096, num_classes: int = 1000
) -> dict[str, float]:
    """Analytic FLOPs per image of the forward pass and of the train step (3 × forward − conv1_1's input gradient).

    ``train_flops_per_image`` uses the paper's convention (padding taps counted; the MFU numerator);
    ``train_flops_per_image_exact`` leaves them out (what XLA's cost analysis should report).
    """
    macs = analytic_macs(model_shapes(variant, image_size, width_multiplier, fc_width, num_classes), image_size)
    return {
        "forward_gmacs_per_image": macs["forward_macs"] / 1e9,
        "forward_flops_per_image": 2.0 * macs["forward_macs"],
        "train_flops_per_image": 6.0 * macs["forward_macs"] - 2.0 * macs["first_conv_macs"],
        "train_flops_per_image_exact": 6.0 * macs["forward_macs_exact"] - 2.0 * macs["first_conv_macs_exact"],
    }


class _AttributeDict(dict):
    """What `vgg_jax/configs/common.py` needs of ``ml_collections.ConfigDict``: a dict with attribute access."""

    def __init__(self, initial: Any = None, type_safe: bool = True) -> None:
        del type_safe
        super().__init__(initial or {})

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


def paper_config(variant: str) -> Any:
    """The paper's recipe for `variant` (vgg_jax/configs/common.py, its one definition), also where
    ml_collections is not installed: a bare GPU image (bench/gpu.sh) has JAX, Flax, optax and torch only, and
    the benchmarks then read the recipe into plain attribute dicts."""
    try:
        import ml_collections  # noqa: F401
    except ImportError:
        import types

        sys.modules["ml_collections"] = types.SimpleNamespace(ConfigDict=_AttributeDict)  # type: ignore[assignment]
        try:
            from vgg_jax.configs import common as configs_common
        finally:
            del sys.modules["ml_collections"]
        return configs_common.get_config(variant)
    from vgg_jax.configs import common as configs_common

    return configs_common.get_config(variant)


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def emit(record: dict[str, Any]) -> None:
    """One protocol line on stdout (worker → harness)."""
    sys.stdout.write(WORKER_PREFIX + json.dumps(record) + "\n")
    sys.stdout.flush()


def read_record(stream: Any) -> dict[str, Any]:
    """The next protocol line of a worker; raises with the worker's last output if it died."""
    seen = []
    for line in stream:
        if line.startswith(WORKER_PREFIX):
            return json.loads(line[len(WORKER_PREFIX) :])
        seen.append(line)
    raise RuntimeError("benchmark worker exited early; its last output:\n" + "".join(seen[-20:]))


def quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# --- Is the machine quiet? -------------------------------------------------------------------------------------
# XLA:CPU and PyTorch lose different amounts to other work on the same cores, so a ratio taken while anything
# else ran is not a measurement. The load average alone cannot tell: it counts our own threads too, and lags by
# a minute. What does tell is the CPU time the whole machine spent during the run minus the CPU time of this
# process tree (the benchmark and its workers): the "foreign" cores.
FOREIGN_CORES_QUIET = 0.15  # above this many cores of other work on average, numbers are marked busy


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _machine_busy_ticks() -> int:
    fields = pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return user + nice + system + irq + softirq + steal


def _tree_ticks(root: int) -> int:
    """utime + stime of `root` and its live descendants, plus the reaped children `root` waited for."""
    stats: dict[int, tuple[int, int, int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        rest = text[text.rindex(")") + 2 :].split()  # fields after "pid (comm)"
        ppid, utime, stime, cutime, cstime = int(rest[1]), int(rest[11]), int(rest[12]), int(rest[13]), int(rest[14])
        own = utime + stime + (cutime + cstime if int(entry.name) == root else 0)
        stats[int(entry.name)] = (ppid, own, 0)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0, 0))[1]
        todo.extend(children.get(pid, []))
    return total


class Quietness:
    """Measures how much other work shared the machine between `start()` and `stop()`."""

    def start(self) -> Quietness:
        self.load_before = load_average()
        self.wall = time.perf_counter()
        self.available = pathlib.Path("/proc/stat").exists()
        if self.available:
            self.machine, self.tree = _machine_busy_ticks(), _tree_ticks(os.getpid())
        return self

    def stop(self) -> dict[str, Any]:
        seconds = time.perf_counter() - self.wall
        record: dict[str, Any] = {"load_before": self.load_before, "load_after": load_average()}
        if self.available:
            ticks = os.sysconf("SC_CLK_TCK")
            machine = (_machine_busy_ticks() - self.machine) / ticks
            ours = (_tree_ticks(os.getpid()) - self.tree) / ticks
            record["foreign_cores"] = max(0.0, machine - ours) / max(seconds, 1e-9)
            record["quiet"] = record["foreign_cores"] <= FOREIGN_CORES_QUIET
        else:
            record["foreign_cores"], record["quiet"] = float("nan"), False
        return record


def load_line(record: dict[str, Any]) -> str:
    """One line for the report: the load, and whether a verdict may be drawn."""
    line = (
        f"load average {record['load_before']:.2f} → {record['load_after']:.2f}; other work during the run: "
        f"{record['foreign_cores']:.2f} cores"
    )
    return line + ("" if record["quiet"] else "  ** BUSY MACHINE: numbers marked, no verdict **")
