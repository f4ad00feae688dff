"""Paper App. A testing over a data set: protocol 1 (centre crop, Table 8) and protocol 2 (dense, top-5, Table 9).

    python -m vgg_jax.localise_eval --checkpoint=runs/loc_pcr --protocol=both
    python -m vgg_jax.localise_eval --checkpoint=runs/loc256 --checkpoint=runs/loc384 \\
        --classifier=runs/d256 --classifier=runs/d384 --scales=352,384 --protocol=dense   # fusion row

Protocol 1 (settings comparison): each localisation net on the centre crop at Q (``config.eval_scale``
or the first of --scales), only the box of the ground-truth class, right when IoU > 0.5 with one of
that class's boxes — the validation of training (`vgg_jax.localise_train`), run on the mesh.
Protocol 2: whole images, dense at every Q of --scales (default ``config.loc.test_scales``), top-5
classes from the classification nets (fused), boxes of all localisation nets merged
(`vgg_jax.localise_dense`); top-1 and top-5 localisation error. Each process takes its shard of the
images; the counts are summed over processes, so every example counts once.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from vgg_jax import checkpoints, cli, inference, localise, localise_dense, localise_train, parallel, paths, progress
from vgg_jax.data import boxes


def protocol1(net: inference.Classifier, split: str | None = None, scale: int | None = None) -> dict[str, float]:
    """Ground-truth-class localisation error of `net` on centre crops at Q = `scale` (paper Table 8)."""
    from vgg_jax import train  # the loop's exact, masked, multi-host validation

    config = net.config.copy_and_resolve_references()
    if scale is not None:
        config.eval_scale = int(scale)
    mesh = parallel.create_mesh()
    step = jax.jit(localise_train.make_eval_step(config, net.model))
    result = train.run_validation(config, parallel.replicate(net.params, mesh), mesh, step, split)
    return {"localisation_error": result["top1_error"], "loss": result["loss"], "count": result["num_examples"]}


def protocol2(
    localisers: Sequence[inference.Classifier],
    classifiers: Sequence[inference.Classifier],
    *,
    split: str | None = None,
    scales: Sequence[int] | None = None,
    max_examples: int = 0,
) -> dict[str, float]:
    """Top-1 / top-5 localisation error of the dense protocol (paper Table 9) over this process's shard, summed."""
    config, loc = localisers[0].config, localisers[0].config.loc
    scales = list(scales or loc.test_scales)
    data = boxes.load_eval_images(config, split)
    if max_examples:
        data = data.take(max_examples // jax.process_count())
    counts = np.zeros(3, np.int64)  # top-1 hits, top-5 hits, images
    meter = progress.Progress(max_examples // jax.process_count() if max_examples else None)
    for example in data.as_numpy_iterator():
        found = localise_dense.localise_images(
            localisers, classifiers, [example["image"]], scales=scales, flip=loc.flip, merge_iou=loc.merge_iou, top_k=5
        )
        truth = example["boxes"][example["box_mask"]]
        top1, top5 = localise.top5_correct(found.class_ids[0], found.boxes[0], int(example["label"]), truth)
        counts += (top1, top5, 1)
        if counts[2] % 100 == 0:
            _, eta = meter.measure(int(counts[2]))
            logging.info("protocol 2: %d images, ETA %s", counts[2], progress.format_eta(eta))
    if jax.process_count() > 1:
        counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 3).sum(axis=0)
    images = max(int(counts[2]), 1)
    return {"top1_error": 1 - counts[0] / images, "top5_error": 1 - counts[1] / images, "count": int(counts[2])}


def _name(run: inference.Classifier) -> str:
    model = run.config.model
    return f"{model.variant}-{model.box_head.upper()} S={run.config.scale_min} ({run.config.loc.finetune} layers)"


def report(
    localisers: Sequence[inference.Classifier],
    classifiers: Sequence[inference.Classifier],
    *,
    protocol: str,
    split: str | None,
    scales: Sequence[int] | None,
    max_examples: int = 0,
) -> list[str]:
    """The Markdown rows of Tables 8 (protocol 1) and 9 (protocol 2)."""
    lines = []
    if protocol in ("crop", "both"):
        lines += ["| localisation net (protocol 1: centre crop, GT class) | Q | loc. error % |", "|---|---|---|"]
        for net in localisers:
            q = scales[0] if scales else int(net.config.eval_scale)
            result = protocol1(net, split, q)
            lines.append(f"| {_name(net)} | {q} | {100 * result['localisation_error']:.1f} |")
    if protocol in ("dense", "both"):
        result = protocol2(localisers, classifiers, split=split, scales=scales, max_examples=max_examples)
        q = ",".join(str(s) for s in (scales or localisers[0].config.loc.test_scales))
        lines += [
            "| localisation net(s) (protocol 2: dense, top-5 classes) | Q | top-1 loc. error % | top-5 loc. error % |",
            "|---|---|---|---|",
            f"| {' + '.join(_name(n) for n in localisers)} | {q} | {100 * result['top1_error']:.1f} | "
            f"{100 * result['top5_error']:.1f} |",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (a bad argument or an unusable run: one `error:` line, `vgg_jax.cli`)."""
    return cli.run(lambda: _main(argv), argv=argv)


def _main(argv: list[str] | None) -> int:
    parser = cli.ArgumentParser(prog="python -m vgg_jax.localise_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", required=True, help="localisation run(s); several: union")
    parser.add_argument("--classifier", action="append", default=[], help="classification run(s) (default: loc's)")
    parser.add_argument("--step", default="best", help="'best', 'latest' or a step number, for every run")
    parser.add_argument("--protocol", choices=("crop", "dense", "both"), default="both")
    parser.add_argument("--scales", default="", help="test scales Q, e.g. 352,384 (default: from the config)")
    parser.add_argument("--split", default=None, help="default: config.eval_split")
    parser.add_argument("--max_examples", type=int, default=0, help="protocol 2 on the first N images (0: all)")
    args = parser.parse_args(argv)
    step = cli.argument("--step", checkpoints.parse_step, args.step)
    scales = cli.argument("--scales", cli.integers, args.scales) or None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parallel.initialize(None)
    try:
        localisers = [inference.load(paths.resolve(run), step=step) for run in args.checkpoint]
        classifiers = [inference.load(paths.resolve(run), step=step) for run in args.classifier]
        classifiers = classifiers or localisers[0]._default_classifiers()
        lines = report(
            localisers,
            classifiers,
            protocol=args.protocol,
            split=args.split,
            scales=scales,
            max_examples=args.max_examples,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
