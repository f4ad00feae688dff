"""Paper App. B (Tables 11–12): very deep features on other data sets — descriptors, linear SVM, mAP / recall.

The nets stay frozen. A descriptor is the fc7 map of the fully-convolutional net, averaged spatially
and with the flipped image's, per scale (`runner.run_evaluation` with method 'descriptor', shared with
`inference.Classifier.features`); the scales are averaged or stacked, then L2-normalised; several
nets' descriptors are stacked. A one-vs-rest `LinearSVC` is trained with C chosen on a held-out 20 %
of the training images, then refit on all of them. Metrics as the paper's: VOC-2007's 11-point mAP on
multi-label sets, mean class recall over random splits on single-label ones. [choice] where the
paper is silent: the C grid (`C_GRID`), the seeded held-out split, LinearSVC's squared hinge, no
per-scale normalisation, difficult objects trained on but ignored when scoring (the VOC devkit's rule).
Command line and data sets: docs/transfer.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from absl import flags

from vgg_jax import models
from vgg_jax.checkpointing import checkpoints
from vgg_jax.evaluation import arithmetic as protocols
from vgg_jax.evaluation.protocol import TestProtocol
from vgg_jax.evaluation.runner import run_evaluation
from vgg_jax.runtime import cli, paths, process

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
HELD_OUT = 0.2  # paper App. B: 20 % of the training images choose the hyper-parameters

# ----------------------------------------------------------------------------- metrics


def voc07_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """VOC-2007 11-point interpolated AP of one class: mean over t ∈ {0, 0.1, …, 1} of max precision at recall ≥ t.

    `targets`: 1 positive, 0 negative, −1 ignored (difficult only). NaN without positives.
    """
    keep = targets >= 0
    scores, targets = np.asarray(scores)[keep], np.asarray(targets)[keep]
    positives = int((targets == 1).sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = (targets[order] == 1).astype(np.float64)
    true_positives = np.cumsum(hits)
    recall = true_positives / positives
    precision = true_positives / np.arange(1, len(hits) + 1)
    points = [precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in np.linspace(0, 1, 11)]
    return float(np.mean(points))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over classes (columns) with a positive of the 11-point AP (paper Table 11, VOC)."""
    values = [voc07_average_precision(scores[:, c], targets[:, c]) for c in range(targets.shape[1])]
    return float(np.nanmean(values))


def mean_class_recall(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in `labels` of the fraction predicted right (paper Table 11, Caltech)."""
    return float(np.mean([(predictions[labels == c] == c).mean() for c in np.unique(labels)]))


# ----------------------------------------------------------------------------- the linear SVM


def _fit(features: np.ndarray, targets: np.ndarray, multilabel: bool, c: float) -> Any:
    """One-vs-rest linear SVMs; multi-label: one binary SVM per class (None where a class has one value)."""
    from sklearn.svm import LinearSVC  # the only user of scikit-learn here

    if not multilabel:
        return LinearSVC(C=c, max_iter=10_000).fit(features, targets)
    svms = []
    for column in (targets > 0).T:
        svms.append(LinearSVC(C=c, max_iter=10_000).fit(features, column) if 0 < column.sum() < len(column) else None)
    return svms


def _score(model: Any, features: np.ndarray, multilabel: bool) -> np.ndarray:
    if not multilabel:
        return model.decision_function(features)
    return np.stack([s.decision_function(features) if s else np.zeros(len(features)) for s in model], axis=1)


def _metric(scores: np.ndarray, targets: np.ndarray, multilabel: bool, classes: np.ndarray | None = None) -> float:
    if multilabel:
        return mean_average_precision(scores, targets)
    predictions = np.asarray(classes)[scores.argmax(-1)] if classes is not None else scores.argmax(-1)
    return mean_class_recall(predictions, targets)


def train_and_test(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    multilabel: bool,
    c_grid: Sequence[float] = C_GRID,
    seed: int = 0,
) -> dict[str, float]:
    """App. B: C chosen on a random 20 % of `train` (fit on the other 80 %), refit on all of `train`, `test` scored."""
    features, targets = train
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(features))
    held = max(1, int(round(HELD_OUT * len(features))))
    fit_rows, held_rows = order[held:], order[:held]
    results = {}
    for c in c_grid:
        model = _fit(features[fit_rows], targets[fit_rows], multilabel, c)
        classes = None if multilabel else model.classes_
        scores = _score(model, features[held_rows], multilabel)
        results[c] = _metric(scores, targets[held_rows], multilabel, classes)
    best = max(c_grid, key=lambda c: (np.nan_to_num(results[c], nan=-1.0), -c))  # ties: the smaller C
    model = _fit(features, targets, multilabel, best)
    classes = None if multilabel else model.classes_
    return {"score": _metric(_score(model, test[0], multilabel), test[1], multilabel, classes), "C": float(best)}


def per_class_split(
    labels: np.ndarray, train_per_class: int, test_per_class: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, test) row indices: `train_per_class` of each class, then up to `test_per_class` of the rest."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        train.append(rows[:train_per_class])
        rest = rows[train_per_class:]
        test.append(rest if test_per_class is None else rest[:test_per_class])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# ----------------------------------------------------------------------------- data and descriptors


@dataclasses.dataclass
class _Labels:
    """Targets and split of each example index, filled while the images stream to the runner."""

    multilabel: bool
    num_classes: int
    rows: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    split: dict[int, int] = dataclasses.field(default_factory=dict)

    def targets(self, indices: np.ndarray) -> np.ndarray:
        return np.stack([self.rows[int(i)] for i in indices])

    def splits(self, indices: np.ndarray) -> np.ndarray:
        return np.array([self.split[int(i)] for i in indices], np.int64)


def _builder(dataset: str, data_dir: str | None) -> Any:
    """The TFDS builder, prepared (the embedded sets offline, others by TFDS's download) — not under mock_data."""
    import ml_collections
    import tensorflow_datasets as tfds

    from vgg_jax.data import sources

    if sources.tfds_is_mocked():
        return tfds.builder(dataset, data_dir=data_dir)
    if dataset in sources.EMBEDDED_DATASETS:
        return sources.get_dataset_builder(ml_collections.ConfigDict({"dataset": dataset, "data_dir": data_dir or ""}))
    builder = tfds.builder(dataset, data_dir=data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare()
    return builder


def _label_kind(builder: Any) -> tuple[bool, int]:
    """(multi-label?, number of classes) from the features: a ``labels`` sequence (VOC) or a ``label``."""
    features = builder.info.features
    if "labels" in features:
        return True, int(features["labels"].feature.num_classes)
    if "label" in features:
        return False, int(features["label"].num_classes)
    raise ValueError(f"{builder.name!r} has neither a 'label' nor a 'labels' feature (it has {sorted(features)})")


def _examples(builder: Any, splits: Sequence[str], scales: Sequence[int], labels: _Labels) -> Iterator[dict]:
    """{'index', 'label': 0, 'scaled': {Q: uint8 image}} of `splits` in turn, recording targets in `labels`."""
    import tensorflow as tf

    from vgg_jax.data import image_ops, sources

    def prepare(example):
        image = example["image"]
        image = tf.image.grayscale_to_rgb(image) if image.shape[-1] == 1 else image
        out = {"scaled": {str(q): image_ops.rescale_smaller_side(image, q) for q in scales}}
        for key in ("label", "labels", "labels_no_difficult"):
            if key in example:
                out[key] = example[key]
        return out

    index = 0
    for split_id, split in enumerate(splits):
        dataset = builder.as_dataset(split=split, shuffle_files=False)
        dataset = dataset.map(sources.graph_function(prepare), num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
        for example in dataset.as_numpy_iterator():
            if labels.multilabel:
                row = np.zeros(labels.num_classes, np.int32)
                row[example["labels"]] = -1  # difficult-only classes: ignored when scoring
                row[example.get("labels_no_difficult", example["labels"])] = 1
                labels.rows[index] = row
            else:
                labels.rows[index] = np.int64(example["label"])
            labels.split[index] = split_id
            yield {"index": index, "label": 0, "scaled": {q: example["scaled"][str(q)] for q in scales}}
            index += 1


def net_descriptors(
    config: Any, params: Any, examples: Iterable[dict], protocol: TestProtocol, *, name: str = "descriptors"
) -> dict[str, Any]:
    """One net's App. B descriptors of `examples` ({'index', 'label', 'scaled': {Q: image}}) under `protocol`
    (method 'descriptor'): {'indices', 'descriptors' (N, scales, F) pooled per scale, not normalised}."""
    protocol = protocol.resolve(config)
    if protocol.method != "descriptor":
        raise ValueError(f"App. B descriptors need method='descriptor', got {protocol.method!r}")
    model = models.from_config(config)
    return run_evaluation(model, params, examples, protocol, mean_rgb=config.mean_rgb, name=name)


def descriptors(
    directories: Sequence[str],
    builder: Any,
    splits: Sequence[str],
    scales: Sequence[int],
    *,
    combine: str = "average",
    normalize_scales: bool = False,
    flips: str | bool = "auto",
    dense_pooling: str | None = None,
    step: int | str | None = "latest",
    batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """App. B descriptors of every example of `splits` (in order), the nets' stacked (D & E).

    `flips`, `dense_pooling` (None: each net's config) and `batch_size` form the `TestProtocol` of every net.
    Returns (N, D) float32 features, (N,) or (N, classes) targets, (N,) the index into `splits`, multi-label flag.
    """
    multilabel, num_classes = _label_kind(builder)
    scales = [int(q) for q in scales]
    protocol = TestProtocol("descriptor", scales, flips=flips, pooling=dense_pooling, batch_size=batch_size)
    per_net, labels, indices = [], _Labels(multilabel, num_classes), np.zeros(0, np.int64)
    for directory in directories:
        params, config, _ = checkpoints.restore_params(directory, step)
        protocol.resolve(config)  # the scales against the crop, before the data is read
        labels = _Labels(multilabel, num_classes)
        examples = _examples(builder, splits, scales, labels)
        result = net_descriptors(config, params, examples, protocol, name=f"descriptors {directory}")
        indices = result["indices"]
        per_net.append(protocols.combine_scales(result["descriptors"], combine, normalize_scales))
    features = np.concatenate(per_net, axis=1).astype(np.float32)
    return features, labels.targets(indices), labels.splits(indices), multilabel


# ----------------------------------------------------------------------------- the experiment and its row


def run_transfer(
    directories: Sequence[str],
    dataset: str,
    *,
    scales: Sequence[int],
    combine: str = "average",
    train_split: str | None = None,
    test_split: str = "test",
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    num_splits: int | None = None,
    c_grid: Sequence[float] = C_GRID,
    data_dir: str | None = None,
    seed: int = 0,
    **descriptor_options: Any,
) -> dict[str, Any]:
    """Paper App. B end to end: descriptors, SVM(s), the metric (mean ± std over splits); a Table 11-style row.

    `train_split` defaults to 'train+validation' (VOC's trainval) for multi-label sets, else 'train'.
    `descriptor_options`: normalize_scales/flips/dense_pooling/step/batch_size of `descriptors`.
    """
    if jax.process_count() > 1:
        raise ValueError("vgg_jax.evaluation.transfer runs on one process (the SVM and the labels are host-side)")
    directories = [paths.resolve(d) for d in directories]
    builder = _builder(dataset, paths.resolve(data_dir) if data_dir else None)
    multilabel, _ = _label_kind(builder)
    train_split = train_split or ("train+validation" if multilabel else "train")
    features, targets, split_of, _ = descriptors(
        directories, builder, [train_split, test_split], scales, combine=combine, **descriptor_options
    )
    runs = []
    if train_per_class:
        if multilabel:
            raise ValueError("train_per_class draws per-class splits of a single-label set; VOC has fixed splits")
        for k in range(num_splits or 3):
            train, test = per_class_split(targets, train_per_class, test_per_class, seed + k)
            train_set, test_set = (features[train], targets[train]), (features[test], targets[test])
            runs.append(train_and_test(train_set, test_set, multilabel=False, c_grid=c_grid, seed=seed + k))
    else:
        train, test = split_of == 0, split_of == 1
        runs.append(
            train_and_test(
                (features[train], targets[train]),
                (features[test], targets[test]),
                multilabel=multilabel,
                c_grid=c_grid,
                seed=seed,
            )
        )
    scores = np.array([run["score"] for run in runs])
    return {
        "net": " & ".join(_net_name(d) for d in directories),
        "dataset": dataset,
        "metric": "mAP (VOC-07 11-point)" if multilabel else "mean class recall",
        "scales": [int(q) for q in scales],
        "combine": combine,
        "mean": float(scores.mean()),
        "std": float(scores.std()) if len(scores) > 1 else None,
        "splits": [dict(run, split=k) for k, run in enumerate(runs)],
        "descriptor_dim": int(features.shape[1]),
        "num_train": int((split_of == 0).sum()) if not train_per_class else int(train_per_class),
    }


def _net_name(directory: str) -> str:
    config = checkpoints.load_config(directory)
    return f"{config.model.variant} ({os.path.basename(os.path.normpath(directory))})"


def format_row(row: dict[str, Any]) -> str:
    """Table 11's layout: net, data set, test Q, how scales combine, metric, result (%) (± std over splits)."""
    spread = f" ± {100 * row['std']:.1f}" if row.get("std") is not None else ""
    scales = ",".join(str(q) for q in row["scales"])
    return "\n".join(
        [
            "| net | data set | test Q | scales | metric | result (%) |",
            "|---|---|---|---|---|---|",
            f"| {row['net']} | {row['dataset']} | {scales} | {row['combine']} | {row['metric']} | "
            f"{100 * row['mean']:.1f}{spread} |",
        ]
    )


# ----------------------------------------------------------------------------- command line


def _main(argv: Sequence[str]) -> None:
    values = flags.FLAGS
    process.start_command()
    step = cli.argument("--step", checkpoints.parse_step, values.step)
    scales = cli.argument("--scales", cli.integers, values.scales)
    c_grid = cli.argument("--c_grid", cli.numbers, values.c_grid)
    row = run_transfer(
        values.checkpoint,
        values.dataset,
        scales=scales,
        combine=values.combine,
        train_split=values.train_split,
        test_split=values.test_split,
        train_per_class=values.train_per_class,
        test_per_class=values.test_per_class,
        num_splits=values.num_splits,
        c_grid=c_grid,
        data_dir=values.data_dir,
        seed=values.seed,
        normalize_scales=values.normalize_scales,
        flips=values.flips,
        dense_pooling=values.dense_pooling,
        step=step,
        batch_size=values.batch_size,
    )
    row["table"] = format_row(row)
    print(row["table"], flush=True)
    if values.out:
        out = paths.resolve(values.out)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as stream:
            json.dump(row, stream, indent=2)


def _define_flags() -> None:
    flags.DEFINE_multi_string("checkpoint", None, "Run directory; repeat to stack the nets' descriptors (D & E).")
    flags.DEFINE_string("dataset", None, "TFDS name: voc/2007, voc/2012, caltech101, sklearn_digits, …")
    flags.DEFINE_string("scales", "256,384,512", "Test scales Q (VOC in the paper: 256,384,512,640,768).")
    flags.DEFINE_enum("combine", "average", ["average", "stack"], "Scales averaged (VOC) or stacked (Caltech).")
    flags.DEFINE_bool("normalize_scales", False, "Also L2-normalise each scale's descriptor (not the paper's).")
    flags.DEFINE_string("train_split", None, "Default: train+validation (multi-label sets), else train.")
    flags.DEFINE_string("test_split", "test", "Split scored (pooled with train_split for per-class splits).")
    flags.DEFINE_integer("train_per_class", None, "Random splits of N training images per class (Caltech: 30).")
    flags.DEFINE_integer("test_per_class", None, "At most this many test images per class (Caltech-101: 50).")
    flags.DEFINE_integer("num_splits", 3, "How many random per-class splits (mean ± std reported).")
    flags.DEFINE_string("c_grid", ",".join(str(c) for c in C_GRID), "SVM C values tried on the held-out 20 %.")
    flags.DEFINE_enum("flips", "auto", ["auto", "yes", "no"], "Average with the flipped image; auto: as trained.")
    flags.DEFINE_enum(
        "dense_pooling",
        None,
        list(protocols.DENSE_POOLING),
        "Which part of the image the dense net runs on (default: the run's config.dense_pooling; as evaluate).",
    )
    flags.DEFINE_string("step", "latest", "Checkpoint step: 'latest' (final net), 'best' or a number.")
    flags.DEFINE_integer("batch_size", None, "Global batch in crops' worth of pixels (default: eval_batch_size).")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
    flags.DEFINE_integer("seed", 0, "Seed of the held-out and per-class splits.")
    flags.DEFINE_string("out", None, "Write the row (and each split's score and C) as JSON here.")


def run() -> None:
    """`python -m vgg_jax transfer` / `vgg-jax transfer`; `--help` lists the flags."""
    cli.run_absl(
        _main,
        define=_define_flags,
        usage="vgg-jax transfer --checkpoint=RUN --dataset=NAME [--scales=…] [--combine=…]",
        required=("checkpoint", "dataset"),
        expected=(ValueError, OSError),  # one `error:` line, status 1 (runtime.cli)
    )


if __name__ == "__main__":
    run()
