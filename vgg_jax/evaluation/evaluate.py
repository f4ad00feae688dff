"""Paper §4, Tables 3–6: evaluate runs with the §3.2 test protocols, fuse nets, report; the command line.

Each image is rescaled isotropically to a test scale Q and classified by ``method``: ``dense`` (the
fully-convolutional net on the whole image and its flip), ``multicrop`` (5×5 crops × 2 flips), ``both``
(Table 5) or ``center_crop`` (the cheap periodic validation). Flips, crops, scales and nets (fusion,
Table 6) are averaged as soft-max posteriors, never logits; only one dense score map is averaged
spatially over class scores, as in the paper. The options form one `TestProtocol`; the paper reports
the final network, so ``--step=latest`` is the default. The arithmetic is
`vgg_jax.evaluation.arithmetic`, the device runner `vgg_jax.evaluation.runner`; this module reads the
data set, computes the metrics, restores and fuses checkpoints and prints the paper's table.
Options and commands: docs/evaluation.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import Mesh

from vgg_jax import models
from vgg_jax.checkpointing import checkpoints
from vgg_jax.evaluation.arithmetic import DENSE_POOLING, fuse_posteriors, topk_errors
from vgg_jax.evaluation.protocol import CLASSIFICATION_METHODS, TestProtocol
from vgg_jax.evaluation.runner import run_evaluation
from vgg_jax.runtime import cli, parallel, paths, process

METHODS = CLASSIFICATION_METHODS
METHOD_LABELS = {
    "dense": "dense",
    "multicrop": "multi-crop",
    "both": "dense + multi-crop",
    "center_crop": "centre crop",
}


# ----------------------------------------------------------------------------- data set + metrics


def _split_with_limit(split: str, max_examples: int | None) -> str:
    if not max_examples:
        return split
    if "[" in split:
        raise ValueError(f"give either a sliced split ({split!r}) or max_examples, not both")
    return f"{split}[:{int(max_examples)}]"


# The data set is read through vgg_jax.data (TensorFlow), imported only where it is read: callers that
# pass their own `examples` never load TensorFlow, and `python -m vgg_jax evaluate` sets TF_CPP_MIN_LOG_LEVEL
# before TensorFlow is first imported.


def _num_examples(config: ml_collections.ConfigDict, split: str, max_examples: int | None) -> int | None:
    try:
        from vgg_jax.data import sources  # TensorFlow: see above

        total = int(sources.dataset_metadata(config).num_examples(split))
    except Exception:  # progress only: an unknown total just means no ETA
        return max_examples
    return min(total, max_examples) if max_examples else total


def _scaled_examples(config: ml_collections.ConfigDict, split: str, scales: Sequence[int]) -> Iterator[dict]:
    """This process's shard of `split`, each image rescaled (smaller side, uint8) to every Q, as NumPy."""
    import tensorflow as tf  # see above

    from vgg_jax.data import image_ops, sources, streams

    dataset = streams.load_eval_images(
        config, split=split, process_index=jax.process_index(), process_count=jax.process_count()
    )

    def rescale(example):
        scaled = {str(q): image_ops.rescale_smaller_side(example["image"], q) for q in scales}
        return {"index": example["index"], "label": example["label"], "scaled": scaled}

    rescale = sources.graph_function(rescale)
    dataset = dataset.map(rescale, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)
    for example in dataset.as_numpy_iterator():
        yield {
            "index": example["index"],
            "label": example["label"],
            "scaled": {q: example["scaled"][str(q)] for q in scales},
        }


def summarize(posteriors: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """top-1/top-5 error and the mean negative log posterior of the true class."""
    metrics = topk_errors(posteriors, labels)
    true = posteriors[np.arange(len(labels)), labels]
    metrics["loss"] = float(-np.log(np.maximum(true, 1e-12)).mean()) if len(labels) else float("nan")
    return metrics


def evaluate_params(
    config: ml_collections.ConfigDict,
    params: Any,
    protocol: TestProtocol | None = None,
    *,
    split: str | None = None,
    mesh: Mesh | None = None,
    max_examples: int | None = None,
    examples: Iterable[Mapping[str, Any]] | None = None,
    name: str = "eval",
    net: int = 0,
) -> dict[str, Any]:
    """Evaluates `params` of the net `config` describes on `split` (default config.eval_split).

    `protocol` (default: dense at Q = S, flips as trained, the config's pooling) is resolved for this net
    (net number `net` of a fusion: its own scales). Returns top1_error, top5_error (fractions), loss (mean
    −log posterior of the true class), num_examples, method, scales, flips, the resolved 'protocol', and
    'posteriors' (N, C), 'labels', 'indices' for fusion; 'by_method' holds the same per component
    ('dense', 'multicrop' for method='both'). Pass `examples` (see `run_evaluation`) to bypass the data pipeline.
    """
    protocol = (protocol or TestProtocol()).resolve(config, net)
    if protocol.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {protocol.method!r}")
    scales = list(protocol.test_scales)
    split = split or config.eval_split
    if examples is None:
        full_split = _split_with_limit(split, max_examples)
        total = _num_examples(config, split, max_examples)
        examples = _scaled_examples(config, full_split, scales)
    else:
        total = max_examples
    model = models.from_config(config)
    raw = run_evaluation(
        model, params, examples, protocol, mean_rgb=config.mean_rgb, mesh=mesh, total_examples=total, name=name
    )
    methods = protocol.components
    by_method = {
        m: dict(summarize(raw["posteriors"][m], raw["labels"]), posteriors=raw["posteriors"][m]) for m in methods
    }
    posteriors = fuse_posteriors([raw["posteriors"][m] for m in methods])
    return dict(
        summarize(posteriors, raw["labels"]),
        num_examples=len(raw["labels"]),
        method=protocol.method,
        scales=scales,
        flips=protocol.flips,
        protocol=protocol,
        split=split,
        posteriors=posteriors,
        labels=raw["labels"],
        indices=raw["indices"],
        by_method=by_method,
    )


# ----------------------------------------------------------------------------- checkpoints, fusion, table


def _train_scale(config: ml_collections.ConfigDict) -> str:
    low, high = int(config.scale_min), int(config.scale_max)
    return str(low) if low == high else f"[{low};{high}]"


def _row(net: str, train_scale: str, method: str, scales: Sequence[int], metrics: Mapping[str, Any]) -> dict:
    return dict(
        net=net,
        train_scale=train_scale,
        method=method,
        scales=list(scales),
        flips=bool(metrics.get("flips", True)),
        top1_error=float(metrics["top1_error"]),
        top5_error=float(metrics["top5_error"]),
        num_examples=int(metrics["num_examples"]),
    )


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The paper's layout: net, train S, method, test Q, top-1 and top-5 error (%); then the step and flips used."""
    lines = [
        "| net | train S | method | test Q | top-1 error (%) | top-5 error (%) | step | flips |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['net']} | {row['train_scale']} | {METHOD_LABELS.get(row['method'], row['method'])} | "
            f"{','.join(str(q) for q in row['scales'])} | {100 * row['top1_error']:.1f} | "
            f"{100 * row['top5_error']:.1f} | {row.get('step', '–')} | {'yes' if row.get('flips', True) else 'no'} |"
        )
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _Run:
    directory: str
    config: ml_collections.ConfigDict
    step: int
    protocol: TestProtocol  # resolved for this net

    @property
    def scales(self) -> list[int]:
        return list(self.protocol.test_scales)

    @property
    def net(self) -> str:
        return f"{self.config.model.variant} ({os.path.basename(os.path.normpath(str(self.directory)))})"


def _load_runs(
    directories: Sequence[str], protocol: TestProtocol, step: int | str | None, overrides: Mapping
) -> list[_Run]:
    """Every run's config, step and resolved protocol, and that the nets can be fused — before any evaluation."""
    if not directories:
        raise ValueError("give at least one --checkpoint=DIR")
    protocol.check_nets(len(directories))
    runs = []
    for number, directory in enumerate(directories):
        config = checkpoints.load_config(directory, overrides)  # FileNotFoundError names a missing config.json
        resolved = checkpoints.resolve_step(directory, step)  # FileNotFoundError: no checkpoint
        try:
            run_protocol = protocol.resolve(config, number)
        except ValueError as error:
            raise ValueError(f"{directory}: {error}") from None
        runs.append(_Run(directory, config, resolved, run_protocol))
    first = runs[0]
    for run in runs[1:]:
        if int(run.config.model.num_classes) != int(first.config.model.num_classes):
            raise ValueError(
                f"cannot fuse {first.directory} ({first.config.model.num_classes} classes) with {run.directory} "
                f"({run.config.model.num_classes} classes): fused nets must share the class set"
            )
        if run.config.dataset != first.config.dataset:
            raise ValueError(
                f"cannot fuse {first.directory} ({first.config.dataset}) with {run.directory} ({run.config.dataset})"
            )
    return runs


def _component(result: Mapping[str, Any], method: str, component: str) -> Mapping[str, Any]:
    """The metrics and posteriors of one component ('dense', 'multicrop') of a `method` evaluation, or all of it."""
    if component == method:
        return result
    return dict(result["by_method"][component], num_examples=len(result["labels"]), flips=result["flips"])


def _fusion_rows(
    runs: Sequence[_Run], results: Sequence[Mapping[str, Any]], method: str, components: Sequence[str]
) -> list[dict]:
    """Paper Table 6: one row per component for the mean posterior of all the nets."""
    base = results[0]
    for run, result in zip(runs[1:], results[1:], strict=True):
        if not np.array_equal(result["indices"], base["indices"]):
            raise ValueError(f"{run.directory} was evaluated on other examples than {runs[0].directory}; cannot fuse")
    net = "+".join(run.net for run in runs)
    all_scales = sorted({q for run in runs for q in run.scales})
    checkpoint = "+".join(str(run.directory) for run in runs)
    rows = []
    for component in components:
        fused = fuse_posteriors([_component(result, method, component)["posteriors"] for result in results])
        flips = all(result["flips"] for result in results)
        metrics = dict(summarize(fused, base["labels"]), num_examples=len(base["labels"]), flips=flips)
        steps = "+".join(str(run.step) for run in runs)
        rows.append(dict(_row(net, "fusion", component, all_scales, metrics), checkpoint=checkpoint, step=steps))
    return rows


def evaluate_checkpoints(
    directories: Sequence[str],
    protocol: TestProtocol | None = None,
    *,
    split: str | None = None,
    step: int | str | None = "latest",
    out: str | None = None,
    max_examples: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """Evaluates each run directory the paper's way and fuses them (posteriors averaged per example).

    `protocol` (default: dense, Q = S, flips as trained, each run's pooling rule) is resolved per run: its
    scales once for all runs ('single' / 'multi': the paper's for each run's training scale, or explicit
    Qs) or one entry per run. `step`: 'latest' (default: the final network, as the paper reports), 'best'
    or a number; the table and JSON give the step each run used. `overrides` replace config fields (e.g.
    data_dir, eval_batch_size). Prints the table on process 0, writes JSON to `out`, returns {'rows',
    'table', 'split', 'checkpoints'}. Every check (run directories, scales, class counts) happens before
    any evaluation.
    """
    protocol = protocol or TestProtocol()
    if protocol.method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {protocol.method!r}")
    directories = [paths.resolve(directory) for directory in directories]
    out = paths.resolve(out) if out else None
    runs = _load_runs(directories, protocol, step, overrides or {})
    split = split or runs[0].config.eval_split
    rows, results = [], []
    method = protocol.method
    components = ("dense", "multicrop", "both") if method == "both" else (method,)
    for run in runs:
        params, _, _ = checkpoints.restore_params(run.directory, run.step)
        result = evaluate_params(
            run.config,
            params,
            run.protocol,
            split=split,
            mesh=mesh,
            max_examples=max_examples,
            name=f"eval {run.directory}",
        )
        results.append(result)
        for component in components:
            metrics = _component(result, method, component)
            row = _row(run.net, _train_scale(run.config), component, run.scales, metrics)
            rows.append(dict(row, checkpoint=str(run.directory), step=run.step, protocol=run.protocol.describe()))
    if len(results) > 1:
        rows += _fusion_rows(runs, results, method, components)
    table = format_table(rows)
    steps = {str(run.directory): run.step for run in runs}
    report = {"split": split, "method": method, "step": step, "steps": steps, "rows": rows, "table": table}
    if jax.process_index() == 0:
        print(table, flush=True)
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "w") as stream:
                json.dump(report, stream, indent=2)
    return report


# ----------------------------------------------------------------------------- command line


def _main(argv: Sequence[str]) -> None:
    values = flags.FLAGS
    overrides = {}
    process.start_command()
    if values.data_dir:
        overrides["data_dir"] = paths.resolve(values.data_dir)
    if values.eval_batch_size:
        overrides["eval_batch_size"] = values.eval_batch_size
    step = cli.argument("--step", checkpoints.parse_step, values.step)
    protocol = TestProtocol(
        method=values.method,
        scales=values.scales or ["single"],
        flips=values.flips,
        pooling=values.dense_pooling,
        buckets=values.dense_buckets,
    )
    # The environment alone says whether this is one of several processes: the trained run's
    # `distributed` settings (a coordinator address of another job) would be stale here.
    parallel.initialize(None)
    evaluate_checkpoints(
        values.checkpoint,
        protocol,
        split=values.split,
        step=step,
        out=values.out,
        max_examples=values.max_examples,
        overrides=overrides,
    )


def _define_flags() -> None:
    flags.DEFINE_multi_string("checkpoint", None, "Run directory (config.json + checkpoints/); repeat to fuse nets.")
    flags.DEFINE_enum("method", "dense", list(METHODS), "dense, multicrop, both (dense + multi-crop) or center_crop.")
    flags.DEFINE_multi_string(
        "scales",
        [],
        "'single' (default) / 'multi' (the paper's Q for each run) or e.g. 256,384,512; once for every run, or "
        "once per --checkpoint in the same order.",
    )
    flags.DEFINE_string("split", None, "Data set split (default: the run's eval_split); TFDS slicing allowed.")
    flags.DEFINE_string(
        "step", "latest", "'latest' (the final network, as the paper), 'best' (lowest validation top-1) or a number."
    )
    flags.DEFINE_enum(
        "dense_pooling",
        None,
        list(DENSE_POOLING),
        "Which part of the image the dense net runs on (default: the run's config.dense_pooling): ceil (the whole "
        "image; Caffe's pooling, the map covers every pixel), centre (sides trimmed evenly to multiples of 32) or "
        "floor (the top-left multiple of 32). Measured in bench/RESULTS.md, 'Dense pooling'.",
    )
    flags.DEFINE_enum(
        "flips", "auto", ["auto", "yes", "no"], "Test-time horizontal flips; auto: as in training (random_flip)."
    )
    flags.DEFINE_string("out", None, "Write the results as JSON here.")
    flags.DEFINE_integer("max_examples", None, "Evaluate only the first N examples of the split.")
    flags.DEFINE_string("data_dir", None, "Override the run's TFDS data_dir.")
    flags.DEFINE_integer("eval_batch_size", None, "Override the global batch (in crops).")
    flags.DEFINE_enum(
        "dense_buckets",
        "aspect",
        ["aspect", "exact"],
        "aspect: a few padded canvas shapes per Q, computed exactly (masked; max |posterior difference| "
        "to per-image ~1e-6, bench/RESULTS.md); exact: one compilation per image shape (one process).",
    )


def run() -> None:
    """`python -m vgg_jax evaluate` / `vgg-jax evaluate`; `--help` lists the flags."""
    cli.run_absl(
        _main,
        define=_define_flags,
        usage="vgg-jax evaluate --checkpoint=RUN [--checkpoint=RUN2 …] [--method=dense|multicrop|both] [--scales=…]",
        required=("checkpoint",),
        expected=(ValueError, OSError),  # one `error:` line, status 1 (runtime.cli)
    )


if __name__ == "__main__":
    run()
