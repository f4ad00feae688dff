"""Paper App. A testing over a data set: protocol 1 (centre crop, Table 8) and protocol 2 (dense, top-5, Table 9).

    python -m vgg_jax localise --checkpoint=runs/loc_pcr --protocol=both
    python -m vgg_jax localise --checkpoint=runs/loc256 --scales=256 --checkpoint=runs/loc384 \\
        --scales=352,384 --classifier=runs/djit --classifier=runs/ejit --classifier_scales=multi \\
        --protocol=dense                                                         # Table 9's fusion row

Protocol 1 (settings comparison): each localisation net on the centre crop at Q (the first of its
--scales, else ``config.eval_scale``), only the box of the ground-truth class, right when IoU > 0.5
with one of that class's boxes — the validation of training (`vgg_jax.localisation.train`), on the mesh.
Protocol 2: whole images in batches (`vgg_jax.localisation.dense`): each localisation net dense at its
own Qs (``--scales`` once for all nets or once per ``--checkpoint``; default its
``config.loc.test_scales``), the top-5 classes from the classification system (each ``--classifier``
under ``--classifier_method``, default dense + multi-crop, at its ``--classifier_scales``, the nets
fused), the boxes of all localisation nets merged; top-1 and top-5 localisation error. Each process
takes its shard of the images; the counts are summed over processes, so every example counts once.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from vgg_jax import inference
from vgg_jax.checkpointing import checkpoints
from vgg_jax.evaluation import arithmetic as protocols
from vgg_jax.evaluation.protocol import CLASSIFICATION_METHODS, TestProtocol
from vgg_jax.localisation import arithmetic as localise
from vgg_jax.localisation import boxes
from vgg_jax.localisation import dense as localise_dense
from vgg_jax.localisation import train as localise_train
from vgg_jax.runtime import cli, parallel, paths, process, progress

Net = localise_dense.Net
CHUNK = 64  # images per protocol-2 batch of work (each net's runner batches them further)


def protocol1(net: inference.Classifier, split: str | None = None, scale: int | None = None) -> dict[str, float]:
    """Ground-truth-class localisation error of `net` on centre crops at Q = `scale` (paper Table 8)."""
    from vgg_jax.training import train

    config = net.config.copy_and_resolve_references()
    if scale is not None:
        config.eval_scale = int(scale)
    mesh = parallel.create_mesh()
    step = jax.jit(localise_train.make_eval_step(config, net.model))
    result = train.run_validation(config, parallel.replicate(net.params, mesh), mesh, step, split)
    return {"localisation_error": result["top1_error"], "loss": result["loss"], "count": result["num_examples"]}


def _all_done(done: bool) -> bool:
    """True once every process has run out of images (they run the same number of batches)."""
    if jax.process_count() == 1:
        return done
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(done))).all())


def _examples(config: Any, split: str | None, scales: Sequence[int], max_examples: int) -> Iterator[dict]:
    """This process's images with their boxes, each rescaled to every Q (TensorFlow, as `evaluate`)."""
    import tensorflow as tf

    from vgg_jax.data import image_ops, sources

    data = boxes.load_eval_images(config, split)
    if max_examples:
        data = data.take(max_examples // jax.process_count())

    def rescale(example):
        return example | {"scaled": {str(q): image_ops.rescale_smaller_side(example["image"], q) for q in scales}}

    data = data.map(sources.graph_function(rescale), num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
    for example in data.as_numpy_iterator():
        yield example | {"scaled": {q: example["scaled"][str(q)] for q in scales}}


def protocol2(
    localisers: Sequence[Net],
    classifiers: Sequence[Net],
    *,
    split: str | None = None,
    max_examples: int = 0,
    merge_iou: float | None = None,
    top_k: int = 5,
) -> dict[str, float]:
    """Top-1 / top-5 localisation error of the dense protocol (paper Table 9), summed over processes."""
    config = localisers[0][0].config
    merge_iou = float(config.loc.merge_iou if merge_iou is None else merge_iou)
    examples = _examples(config, split, localise_dense.scales_needed([*localisers, *classifiers]), max_examples)
    counts = np.zeros(3, np.int64)  # top-1 hits, top-5 hits, images
    meter = progress.Progress(max_examples // jax.process_count() if max_examples else None)
    while True:
        chunk = list(itertools.islice(examples, CHUNK))
        if _all_done(not chunk):
            break
        found = localise_dense.localise_examples(localisers, classifiers, chunk, merge_iou=merge_iou, top_k=top_k)
        for example, classes, guesses in zip(chunk, found.class_ids, found.boxes, strict=True):
            truth = example["boxes"][example["box_mask"]]
            counts += (*localise.top5_correct(classes, guesses, int(example["label"]), truth, k=top_k), 1)
        _, eta = meter.measure(int(counts[2]))
        logging.info("protocol 2: %d images, ETA %s", counts[2], progress.format_eta(eta))
    if jax.process_count() > 1:
        counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 3).sum(axis=0)
    images = max(int(counts[2]), 1)
    return {"top1_error": 1 - counts[0] / images, "top5_error": 1 - counts[1] / images, "count": int(counts[2])}


def _name(run: inference.Classifier) -> str:
    model = run.config.model
    return f"{model.variant}-{model.box_head.upper()} S={run.config.scale_min} ({run.config.loc.finetune} layers)"


def _scales_text(protocol: TestProtocol) -> str:
    return ",".join(str(q) for q in protocol.test_scales)


def report(
    localisers: Sequence[Net],
    classifiers: Sequence[Net],
    *,
    protocol: str,
    split: str | None,
    max_examples: int = 0,
) -> list[str]:
    """The Markdown rows of Tables 8 (protocol 1) and 9 (protocol 2)."""
    lines = []
    if protocol in ("crop", "both"):
        lines += ["| localisation net (protocol 1: centre crop, GT class) | Q | loc. error % |", "|---|---|---|"]
        for net, net_protocol in localisers:
            q = net_protocol.test_scales[0]
            result = protocol1(net, split, q)
            lines.append(f"| {_name(net)} | {q} | {100 * result['localisation_error']:.1f} |")
    if protocol in ("dense", "both"):
        result = protocol2(localisers, classifiers, split=split, max_examples=max_examples)
        nets = " + ".join(f"{_name(net)} at Q={_scales_text(p)}" for net, p in localisers)
        system = " + ".join(f"{c.config.model.variant} {p.method} Q={_scales_text(p)}" for c, p in classifiers)
        lines += [
            "| localisation nets (protocol 2: dense) | classes from | top-1 loc. error % | top-5 loc. error % |",
            "|---|---|---|---|",
            f"| {nets} | {system} | {100 * result['top1_error']:.1f} | {100 * result['top5_error']:.1f} |",
        ]
    return lines


def nets(args: Any, step: int | str) -> tuple[list[Net], list[Net]]:
    """The localisation and classification nets, each with its resolved protocol — checked before any work."""
    localisers = [inference.load(paths.resolve(run), step=step) for run in args.checkpoint]
    classifiers = [inference.load(paths.resolve(run), step=step) for run in args.classifier]
    classifiers = classifiers or localisers[0].default_classifiers()
    scales = args.scales or [",".join(str(q) for q in net.config.loc.test_scales) for net in localisers]
    boxes_of = TestProtocol("maps", scales, pooling=args.dense_pooling)
    boxes_of.check_nets(len(localisers), "--scales")
    classes_of = TestProtocol(args.classifier_method, args.classifier_scales or "single", pooling=args.dense_pooling)
    classes_of.check_nets(len(classifiers), "--classifier_scales")
    loc = [
        (net, dataclasses.replace(boxes_of, flips=args.flips or net.config.loc.flip).resolve(net.config, number))
        for number, net in enumerate(localisers)
    ]
    return loc, [(net, classes_of.resolve(net.config, number)) for number, net in enumerate(classifiers)]


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_multi_string("checkpoint", None, "Localisation run(s); several: their boxes' union.")
    flags.DEFINE_multi_string("scales", [], "Test scales Q, e.g. 352,384: once for all nets, or once per --checkpoint.")
    flags.DEFINE_multi_string("classifier", [], "Classification run(s) giving the top-5 classes (default: loc's).")
    flags.DEFINE_multi_string("classifier_scales", [], "single, multi or Qs; once for all, or once per --classifier.")
    flags.DEFINE_enum("classifier_method", "both", list(CLASSIFICATION_METHODS), "The classifiers' test protocol.")
    flags.DEFINE_enum("flips", None, ["auto", "yes", "no"], "Mirrored images too (default: config.loc.flip).")
    flags.DEFINE_enum("dense_pooling", None, list(protocols.DENSE_POOLING), "Pooling rule (default: the run's).")
    flags.DEFINE_string("step", "best", "'best', 'latest' or a step number, for every run.")
    flags.DEFINE_enum("protocol", "both", ["crop", "dense", "both"], "crop: protocol 1 (Table 8); dense: 2 (Table 9).")
    flags.DEFINE_string("split", None, "The split to test (default: config.eval_split).")
    flags.DEFINE_integer("max_examples", 0, "Protocol 2 on the first N images (0: all).", lower_bound=0)


def _main(argv: list[str]) -> None:
    from absl import flags

    process.start_command()
    args = flags.FLAGS
    step = cli.argument("--step", checkpoints.parse_step, args.step)
    for name, texts in (("--scales", args.scales), ("--classifier_scales", args.classifier_scales)):
        for text in texts:
            if text not in ("single", "multi"):  # Qs: one error line naming the flag, before any loading
                cli.argument(name, cli.integers, text)
    parallel.initialize(None)
    localisers, classifiers = nets(args, step)
    lines = report(localisers, classifiers, protocol=args.protocol, split=args.split, max_examples=args.max_examples)
    if jax.process_index() == 0:
        print("\n".join(lines))


def run(argv: list[str] | None = None) -> None:
    """`vgg-jax localise` (`python -m vgg_jax localise`); `--help` lists the flags."""
    cli.run_absl(
        _main,
        define=_define_flags,
        usage="vgg-jax localise --checkpoint=LOC_RUN [--scales=Qs …] [--classifier=RUN …] [--protocol=crop|dense|both]",
        required=("checkpoint",),
        argv=[sys.argv[0], *argv] if argv is not None else None,
        expected=(ValueError, FileNotFoundError),
    )


if __name__ == "__main__":
    run()
