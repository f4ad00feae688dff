"""Paper §3.2 dense evaluation: which part of the image should the fully-convolutional net run on?

The pooling rule (`vgg_jax.evaluation.arithmetic.DENSE_POOLING`) decides how the net meets a side that is not a
multiple of 32: ``ceil`` runs it on the whole image (the last cells partly padding), ``centre`` on the
image trimmed evenly to multiples of 32, ``floor`` on the top-left multiple of 32. The digit demos (32-px
crops, 36-px images: one window) cannot tell what the paper's geometry wants — 224-px crops, Q = 256, a
4:3 image 341 px wide: 2×5 windows. This measures it where the geometry resembles the paper's:

* a net A (¼ widths, fc 256) trained here with 64-px crops (fc6 a 2×2 window, as the paper's 7×7 is
  most of the crop) of photo regions rescaled to S ~ U{72..144} (the paper's [256, 512] for 224-px
  crops, scaled), flips and colour shift, the §3.1 step (`vgg_jax.training.steps`) — from scratch, `--steps`;
* the task: which of the ten photographs scikit-image / scikit-learn ship a region comes from
  (`vgg_jax.data.embedded_photos`: train regions in the chessboard's "white" tiles, test in the "black");
  regions of aspect ratio U[1, 1.6] (a third portrait), 75–100 % of a tile's height;
* tested through the real runner (`TestProtocol`, masked canvases, flips) at Q = 100 and 150: images
  1.5–3.1× the crop, sides not multiples of 32 (100 × 100…160, 150 × 150…240) — dense under each rule,
  and the centre crop and multi-crop for reference.

``python bench/dense_pooling.py --seeds=0,1 --steps=1200`` (bench/RESULTS.md, "Dense pooling"). Top-1 error
depends on nothing but the seed: it needs no quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

CROP, SCALES, TEST_QS, PER_CLASS = 64, (72, 144), (100, 150), 50


def region(shape: tuple[int, int], split: str, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a region of aspect U[1, 1.6] (a third portrait) inside one tile of `split`."""
    from vgg_jax.data import embedded_photos

    parity = 0 if split == "train" else 1
    grid = embedded_photos.GRID
    tiles = [(r, c) for r in range(grid) for c in range(grid) if (r + c) % 2 == parity]
    top, left, bottom, right = embedded_photos.tile_bounds(*shape, *tiles[int(rng.integers(len(tiles)))])
    aspect = rng.uniform(1.0, 1.6)
    tall = rng.random() < 1 / 3
    height = rng.uniform(0.75, 1.0) * (bottom - top)
    width = height * (1 / aspect if tall else aspect)
    scale = min(1.0, (right - left) / width)  # fit the tile, keeping the aspect ratio
    height, width = max(8, int(height * scale)), max(8, int(width * scale))
    return int(rng.integers(top, bottom - height + 1)), int(rng.integers(left, right - width + 1)), height, width


def rescaled(photo: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The region rescaled so that its smaller side is `size` (PIL bilinear, antialiased)."""
    from PIL import Image

    from vgg_jax.evaluation import arithmetic as protocols

    top, left, height, width = box
    new_h, new_w = protocols.rescaled_size(height, width, size)
    patch = Image.fromarray(photo[top : top + height, left : left + width])
    return np.asarray(patch.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None), np.uint8)


def train_net(photos: list[np.ndarray], seed: int, steps: int, config):
    """The §3.1 step on 64-px crops of train regions at S ~ U{72..144}, flipped, from seed `seed`."""
    import jax

    from vgg_jax import models
    from vgg_jax.training import optim
    from vgg_jax.training import steps as train_steps

    model = models.from_config(config)
    per_epoch = 100
    tx = optim.create_optimizer(config, per_epoch)
    plateau = optim.PlateauControl(config)
    state = train_steps.create_train_state(config, model, tx, plateau)
    step = jax.jit(train_steps.make_train_step(config, model, tx, per_epoch), donate_argnums=(0,))
    rng, key = np.random.default_rng([seed, 5]), jax.random.key(seed)
    for number in range(steps):
        images, labels = [], []
        for _ in range(config.global_batch_size):
            label = int(rng.integers(len(photos)))
            image = rescaled(photos[label], region(photos[label].shape[:2], "train", rng), int(rng.integers(*SCALES)))
            top, left = (int(rng.integers(0, side - CROP + 1)) for side in image.shape[:2])
            crop = image[top : top + CROP, left : left + CROP]
            images.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
            labels.append(label)
        batch = {"image": np.stack(images), "label": np.asarray(labels, np.int32)}
        state, metrics = step(state, batch, key)
        if (number + 1) % 100 == 0:
            print(f"seed {seed} step {number + 1}: loss {float(metrics['loss']):.3f}", flush=True)
    return model, jax.device_get(state.params)


def test_set(photos: list[np.ndarray], per_class: int) -> tuple[list[dict], np.ndarray]:
    """`per_class` test regions per photo, rescaled to every Q (fixed draws: the same for every net)."""
    examples, labels = [], []
    for label, photo in enumerate(photos):
        for k in range(per_class):
            box = region(photo.shape[:2], "test", np.random.default_rng([9, label, k]))
            scaled = {q: rescaled(photo, box, q) for q in TEST_QS}
            examples.append({"index": len(examples), "label": label, "scaled": scaled})
            labels.append(label)
    return examples, np.asarray(labels)


def errors(model, params, config, examples, labels) -> dict[str, dict[str, float]]:
    """Top-1 / top-5 error (%) of each rule and reference method at each Q, through the runner; for the rules
    also the % of images whose top-1 class differs from ceil's."""
    from vgg_jax.evaluation import arithmetic as protocols
    from vgg_jax.evaluation import runner
    from vgg_jax.evaluation.protocol import TestProtocol

    rows: dict[str, dict[str, float]] = {}
    methods = [("dense", rule) for rule in protocols.DENSE_POOLING] + [("center_crop", None), ("multicrop", None)]
    for q in TEST_QS:
        subset = [dict(e, scaled={q: e["scaled"][q]}) for e in examples]
        top1 = {}
        for method, rule in methods:
            protocol = TestProtocol(method, [q], flips="yes", pooling=rule, batch_size=256).resolve(config)
            result = runner.run_evaluation(model, params, subset, protocol, mean_rgb=config.mean_rgb, log_every_s=1e9)
            metrics = protocols.topk_errors(result["posteriors"][method], labels)
            name = f"dense {rule}" if rule else method
            top1[name] = result["posteriors"][method].argmax(-1)
            rows.setdefault(name, {})[str(q)] = round(100 * metrics["top1_error"], 1)
            rows[name][f"{q} top-5"] = round(100 * metrics["top5_error"], 1)
            if rule:
                rows[name][f"{q} top-1 differs from ceil"] = round(
                    100 * float((top1[name] != top1["dense ceil"]).mean()), 1
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--per_class", type=int, default=PER_CLASS, help="test regions per photograph")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    common.quiet_tensorflow()

    from vgg_jax.configs import common as recipes
    from vgg_jax.data import embedded_photos

    config = recipes.get_config("A", "demo,dataset=sample_photos")
    config.crop_size, (config.scale_min, config.scale_max) = CROP, SCALES
    config.eval_scale = 108
    config.model.width_multiplier, config.model.fc_width = 1 / 4, 256
    config.random_flip, config.num_epochs = True, args.steps / 100
    config.step_boundaries_epochs = (0.75 * args.steps / 100, 0.9 * args.steps / 100)
    photos = [embedded_photos.photo(name) for name in embedded_photos.CLASSES]
    examples, labels = test_set(photos, args.per_class)
    record = {
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_before": common.load_average(),
        "test_images": len(labels),
        "nets": {},
    }
    for seed in (int(s) for s in args.seeds.split(",")):
        config.seed = seed
        model, params = train_net(photos, seed, args.steps, config)
        record["nets"][seed] = errors(model, params, config, examples, labels)
        print(json.dumps({seed: record["nets"][seed]}), flush=True)
    record["load_average_after"] = common.load_average()
    print(json.dumps(record, indent=1))
    if args.out:
        with open(args.out, "w") as stream:
            json.dump(record, stream, indent=1)


if __name__ == "__main__":
    main()
