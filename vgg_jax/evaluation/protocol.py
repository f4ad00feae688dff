"""Paper §3.2 / §4, App. A and App. B: a test protocol as one frozen value, built once and passed whole.

A `TestProtocol` says how nets are tested: the method (§3.2's dense, multi-crop, both and the centre
crop; App. B's pooled descriptor; App. A's dense maps), the test scales Q of each net, test-time flips,
the dense pooling rule, the canvas buckets of dense evaluation and the global batch. The command lines
(`evaluate`, `transfer`, `localise_eval`) and the notebook API build one from their options; `resolve`
gives the concrete protocol of one net, its unset parts filled in from that net's config (scales
'single' → Q = S, flips 'auto' → as trained, the pooling rule and batch of the config). The runner takes
only resolved protocols, so every consumer tests a net the same way.

Scales are given once for every net or once per net, in the order the nets are given (Table 9's fusion
row: the S = 256 net at Q = 256, the S = 384 net at Q = 352 and 384).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from vgg_jax.evaluation import arithmetic as protocols

# What a net is asked: evaluate's methods (paper §3.2; 'both' = dense + multi-crop averaged), App. B's
# pooled descriptor, App. A's per-cell dense maps (protocol 2).
CLASSIFICATION_METHODS = ("dense", "multicrop", "both", "center_crop")
METHODS = (*CLASSIFICATION_METHODS, "descriptor", "maps")
BUCKETS = ("aspect", "exact")
FLIPS = ("auto", "yes", "no")

ScaleSpec = str | tuple[int, ...]  # 'single', 'multi' or explicit Qs


def _scale_spec(value: Any) -> ScaleSpec:
    """'single' | 'multi' | '256,384' | 256 | (256, 384) → 'single', 'multi' or a tuple of Qs."""
    if isinstance(value, str):
        text = value.strip()
        if text in ("single", "multi"):
            return text
        try:
            scales = tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            scales = ()
        if not scales:
            raise ValueError(f"scales: expected 'single', 'multi' or integers like 256,384,512; got {value!r}")
        return scales
    if isinstance(value, int | np.integer):
        return (int(value),)
    return tuple(int(q) for q in value)


def _per_net(scales: Any) -> tuple[ScaleSpec, ...]:
    """One spec for every net ('multi', 256, [256, 384]) or one per net (['256', '352,384'], [[256], [352]])."""
    if isinstance(scales, str | int | np.integer):
        return (_scale_spec(scales),)
    items = list(scales)
    if not items:
        raise ValueError("scales: at least one test scale Q is needed")
    if all(isinstance(item, int | np.integer) for item in items):
        return (_scale_spec(items),)
    return tuple(_scale_spec(item) for item in items)


def pooling_of(config: Any) -> str:
    """The dense pooling rule a net's config asks for (``config.dense_pooling``; absent: the paper's)."""
    return protocols.check_dense_pooling(config.get("dense_pooling", protocols.PAPER_POOLING))


@dataclasses.dataclass(frozen=True)
class TestProtocol:
    """How to test nets (see the module docstring). Unset fields (None, 'auto', 'single') follow each net's config.

    Attributes:
      method: one of METHODS.
      scales: test scales Q per net: one spec for all ('single', 'multi', (256, 384)) or one per net.
      flips: 'auto' (as the net trained: ``config.random_flip``), 'yes'/'no', or a bool.
      pooling: the dense pooling rule (`protocols.DENSE_POOLING`); None: ``config.dense_pooling``.
      buckets: 'aspect' (a few masked canvas shapes per Q, exact) or 'exact' (one shape per image; one process).
      max_aspect, num_buckets: the aspect canvases (`protocols.dense_canvases`).
      batch_size: the global batch in crops' worth of pixels; None: ``config.eval_batch_size``.
      grid: multi-crop grid side (5: 25 crops, × 2 flips).
      layers: App. B descriptor layer(s), pooled and concatenated in this order.
      resolved: True once `resolve` filled everything in for one net.
    """

    __test__ = False  # not a pytest test class, despite its name

    method: str = "dense"
    scales: Any = "single"
    flips: str | bool = "auto"
    pooling: str | None = None
    buckets: str = "aspect"
    max_aspect: float = 2.0
    num_buckets: int = 5
    batch_size: int | None = None
    grid: int = protocols.GRID
    layers: tuple[str, ...] = ("fc7",)
    resolved: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", _per_net(self.scales))  # frozen: normalised once, here
        object.__setattr__(self, "layers", (self.layers,) if isinstance(self.layers, str) else tuple(self.layers))
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.flips, bool) and self.flips not in FLIPS:
            raise ValueError(f"flips must be one of {FLIPS} or a bool, got {self.flips!r}")
        if self.pooling is not None:
            protocols.check_dense_pooling(self.pooling)
        if self.buckets not in BUCKETS:
            raise ValueError(f"dense_buckets must be one of {BUCKETS}, got {self.buckets!r}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.grid < 1 or self.max_aspect < 1 or self.num_buckets < 1:
            raise ValueError(f"need grid, max_aspect, num_buckets >= 1; got {self.grid}, {self.max_aspect}, "
                             f"{self.num_buckets}")  # fmt: skip
        if not self.layers:
            raise ValueError("layers: at least one layer is needed for the descriptor")

    @property
    def components(self) -> tuple[str, ...]:
        """The runner's methods: 'both' is dense and multi-crop (their posteriors averaged, Table 5)."""
        return ("dense", "multicrop") if self.method == "both" else (self.method,)

    @property
    def test_scales(self) -> tuple[int, ...]:
        """The Qs of a resolved protocol."""
        if not self.resolved:
            raise ValueError("this TestProtocol is not resolved for a net: call .resolve(config) first")
        return self.scales[0]

    def check_nets(self, count: int, what: str = "--scales") -> None:
        """Scales given once, or once per net (`count` nets): raised before any work."""
        if len(self.scales) not in (1, count):
            raise ValueError(
                f"{what} was given {len(self.scales)} times for {count} nets: give it once (the same for every "
                "net) or once per net, in the order the nets are given"
            )

    def resolve(self, config: Any, net: int = 0) -> TestProtocol:
        """The concrete protocol of net number `net` (its config `config`): scales, flips, pooling, batch."""
        if self.resolved:
            return self
        self.check_nets(max(len(self.scales), net + 1))
        spec = self.scales[net if len(self.scales) > 1 else 0]
        scales = tuple(protocols.resolve_scales(spec, config))
        return dataclasses.replace(
            self,
            scales=(scales,),
            flips=protocols.resolve_flips(self.flips, config),
            pooling=self.pooling or pooling_of(config),
            batch_size=int(self.batch_size or config.eval_batch_size),
            resolved=True,
        )

    def with_method(self, method: str, layers: Sequence[str] | None = None) -> TestProtocol:
        """The same protocol asking another question (e.g. App. A's 'maps' at a localiser's scales)."""
        return dataclasses.replace(self, method=method, layers=tuple(layers) if layers else self.layers)

    def describe(self) -> dict[str, Any]:
        """The protocol as JSON-friendly values (reports record how their numbers were measured)."""
        scales = [list(s) if isinstance(s, tuple) else s for s in self.scales]
        return {
            "method": self.method,
            "scales": scales[0] if len(scales) == 1 else scales,
            "flips": self.flips,
            "dense_pooling": self.pooling,
            "dense_buckets": self.buckets,
            "batch_size": self.batch_size,
        }
