"""Paper §3.2 dense evaluation on a trained run: pooling rule and canvas bucketing against the exact computation.

`python bench/dense_fidelity.py --checkpoint=runs/demo` (bench/RESULTS.md, "Dense evaluation fidelity"):

1. pooling: top-1 error of dense evaluation computed per image (no canvases) under each rule of
   `protocols.DENSE_POOLING` (ceil: the whole image, Caffe's pooling; centre: sides trimmed evenly to
   multiples of 32; floor: the top-left multiple of 32), at each Q of `--scales`;
2. bucketing: the test images padded with background to random aspect ratios in [1, 2.5] (the
   digits are square, so their canvases would be exact anyway), then dense posteriors from shared
   canvases with the conv masking (`executor.masked_dense_apply`), without it (the former
   bucketing), and per image shape ('exact'), under each rule: max |Δ posterior| to
   'exact' and the top-1 errors.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--scales", default="32,36,40")
    parser.add_argument("--step", default="latest")
    args = parser.parse_args()

    from vgg_jax import models
    from vgg_jax.checkpointing import checkpoints
    from vgg_jax.data import streams
    from vgg_jax.evaluation import arithmetic as protocols
    from vgg_jax.evaluation import executor, runner
    from vgg_jax.evaluation.protocol import TestProtocol

    params, config, step = checkpoints.restore_params(args.checkpoint, args.step)
    images, labels = [], []
    for example in streams.load_eval_images(config, split=config.eval_split).as_numpy_iterator():
        images.append(example["image"])
        labels.append(int(example["label"]))
    labels = np.array(labels)
    rows = {"step": step, "pooling": {}, "bucketing": {}}
    flips = protocols.resolve_flips("auto", config)

    def error(posteriors):
        return float(protocols.topk_errors(posteriors, labels, ks=(1,))["top1_error"])

    def dense(model, examples, scales, buckets, pooling):
        protocol = TestProtocol("dense", scales, flips, pooling, buckets, batch_size=200).resolve(config)
        result = runner.run_evaluation(model, params, examples, protocol, mean_rgb=config.mean_rgb, log_every_s=1e9)
        return result["posteriors"]["dense"]

    base = models.from_config(config)
    for q in [int(v) for v in args.scales.split(",") if v]:
        scaled = [{"index": i, "label": 0, "scaled": {q: np.asarray(protocols.resize_smaller_side(im[None], q))[0]}}
                  for i, im in enumerate(images)]  # fmt: skip
        rows["pooling"][q] = {mode: error(dense(base, scaled, [q], "exact", mode)) for mode in protocols.DENSE_POOLING}
        print("pooling", q, rows["pooling"][q], flush=True)

    rng = np.random.default_rng(0)
    q = int(config.eval_scale)
    padded = []
    for i, image in enumerate(images):  # background (0) added left and right: aspect 1 … 2.5
        extra = int(rng.integers(0, 13))
        left = int(rng.integers(0, extra + 1))
        wide = np.pad(image, ((0, 0), (left, extra - left), (0, 0)))
        wide = wide if i % 4 else wide.transpose(1, 0, 2)  # a quarter portrait
        padded.append(
            {"index": i, "label": 0, "scaled": {q: np.asarray(protocols.resize_smaller_side(wide[None], q))[0]}}
        )
    for mode in protocols.DENSE_POOLING:
        model = base
        exact = dense(model, padded, [q], "exact", mode)
        masked = dense(model, padded, [q], "aspect", mode)
        plain = executor.masked_dense_apply
        executor.masked_dense_apply = lambda model, p, x, h, w, **kw: model.apply({"params": p}, x, dense=True, **kw)
        executor.clear_cache()
        try:
            unmasked = dense(model, padded, [q], "aspect", mode)  # the former bucketing: padding seen by the convs
        finally:
            executor.masked_dense_apply = plain
            executor.clear_cache()
        rows["bucketing"][mode] = {
            name: {"top1_error": error(value), "max_abs_diff": float(np.abs(value - exact).max())}
            for name, value in (("exact", exact), ("masked canvases", masked), ("unmasked canvases", unmasked))
        }
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
