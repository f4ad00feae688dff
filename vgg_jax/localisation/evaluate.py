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

import argparse
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
from vgg_jax.runtime import cli, parallel, paths, progress

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

    from vgg_jax.data import image_ops

    data = boxes.load_eval_images(config, split)
    if max_examples:
        data = data.take(max_examples // jax.process_count())

    def rescale(example):
        return example | {"scaled": {str(q): image_ops.rescale_smaller_side(example["image"], q) for q in scales}}

    data = data.map(rescale, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
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


def nets(args: argparse.Namespace, step: int | str) -> tuple[list[Net], list[Net]]:
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


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (a bad argument or an unusable run: one `error:` line, `runtime.cli`)."""
    return cli.run(lambda: _main(argv), argv=argv)


def _main(argv: list[str] | None) -> int:
    parser = cli.ArgumentParser(prog="python -m vgg_jax localise", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", required=True, help="localisation run(s); several: union")
    parser.add_argument("--scales", action="append", default=[], help="Qs, e.g. 352,384: once, or per --checkpoint")
    parser.add_argument("--classifier", action="append", default=[], help="classification run(s) (default: loc's)")
    parser.add_argument("--classifier_scales", action="append", default=[], help="single, multi or Qs; once or each")
    parser.add_argument("--classifier_method", choices=CLASSIFICATION_METHODS, default="both")
    parser.add_argument("--flips", choices=("auto", "yes", "no"), default=None, help="default: config.loc.flip")
    parser.add_argument("--dense_pooling", choices=protocols.DENSE_POOLING, default=None, help="default: config")
    parser.add_argument("--step", default="best", help="'best', 'latest' or a step number, for every run")
    parser.add_argument("--protocol", choices=("crop", "dense", "both"), default="both")
    parser.add_argument("--split", default=None, help="default: config.eval_split")
    parser.add_argument("--max_examples", type=int, default=0, help="protocol 2 on the first N images (0: all)")
    args = parser.parse_args(argv)
    step = cli.argument("--step", checkpoints.parse_step, args.step)
    for name, texts in (("--scales", args.scales), ("--classifier_scales", args.classifier_scales)):
        for text in texts:
            if text not in ("single", "multi"):  # Qs: one error line naming the flag, before any loading
                cli.argument(name, cli.integers, text)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parallel.initialize(None)
    try:
        localisers, classifiers = nets(args, step)
        lines = report(
            localisers, classifiers, protocol=args.protocol, split=args.split, max_examples=args.max_examples
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
