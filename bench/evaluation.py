"""Images/s of the paper's test protocols (§3.2): dense (1 and 3 scales) vs multi-crop (50 and 150 crops).

Synthetic 4:3 images, already rescaled to each Q (the host-side rescale is
the input pipeline's cost, not measured here), run through
`vgg_jax.evaluation.runner.run_evaluation` — the same code path as real evaluation,
with its dense shape buckets, host-side crops and padded batches. Test
scales keep the paper's ratios to the crop: Q = 256/224·crop single,
{224, 256, 288}/224·crop multi. One untimed pass compiles; the median of
`--repeats` timed passes is reported.

    python bench/evaluation.py                       # narrow VGG-16, crop 64 (CPU)
    python bench/evaluation.py --width_multiplier=1 --fc_width=4096 --crop=224 \\
        --num_images=512 --batch_size=256             # full VGG-16 on an accelerator
    python bench/evaluation.py --tiny                 # seconds; for the tests
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402


def paper_test_scales(crop: int) -> tuple[list[int], list[int]]:
    single = [round(256 * crop / 224)]
    return single, [round(q * crop / 224) for q in (224, 256, 288)]


def synthetic_examples(num_images: int, scales: list[int], seed: int = 0) -> list[dict]:
    """Landscape and portrait 4:3 images (ImageNet's commonest shape), rescaled so the smaller side is Q."""
    rng = np.random.default_rng(seed)
    examples = []
    for index in range(num_images):
        scaled = {}
        for q in scales:
            shape = (q, round(q * 4 / 3)) if index % 4 else (round(q * 4 / 3), q)
            scaled[q] = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        examples.append({"index": index, "label": index % 10, "scaled": scaled})
    return examples


def gmacs_per_image(model, method: str, scales: list[int]) -> float:
    """Forward GMACs per image from XLA's cost analysis (no compilation), for the synthetic image mix.

    Dense: the bucket canvas the image is padded to, times 2 (the flip); multi-crop: 50 crops.
    """
    import jax
    import jax.numpy as jnp

    from vgg_jax.evaluation import arithmetic as protocols

    crop = model.crop_size
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, crop, crop, 3), jnp.float32))

    def macs(height: int, width: int, dense: bool) -> float:
        function = jax.jit(lambda p, x: model.apply(p, x, dense=dense))
        lowered = function.lower(shapes, jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32))
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost  # a list in some JAX versions
        return float(cost["flops"]) / 2

    total = 0.0
    for q in scales:
        if method == "dense":
            canvases = protocols.dense_canvases(q)
            landscape = protocols.choose_canvas(q, round(q * 4 / 3), canvases)
            portrait = protocols.choose_canvas(round(q * 4 / 3), q, canvases)
            total += 2 * (0.75 * macs(*landscape, True) + 0.25 * macs(*portrait, True))
        else:
            total += 2 * protocols.GRID**2 * macs(crop, crop, False)
    return total / 1e9


def run_benchmark(
    *,
    variant: str = "D",
    width_multiplier: float = 1 / 16,
    fc_width: int = 32,
    crop: int = 64,
    num_images: int = 32,
    batch_size: int = 64,
    repeats: int = 3,
    compute_dtype: str = "float32",
    analytic_only: bool = False,
) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from vgg_jax import models
    from vgg_jax.evaluation import runner
    from vgg_jax.evaluation.protocol import TestProtocol

    model = models.VGG(
        variant=variant,
        num_classes=1000,
        width_multiplier=width_multiplier,
        fc_width=fc_width,
        crop_size=crop,
        dtype=jnp.dtype(compute_dtype),
    )
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, crop, crop, 3), jnp.float32))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.01, s.shape).astype(np.float32), shapes["params"])
    single, multi = paper_test_scales(crop)
    examples = synthetic_examples(num_images, multi + single)
    mean = (123.68, 116.779, 103.939)
    rows = []
    for method, scales, views in (
        ("dense", single, "1 scale"),
        ("dense", multi, "3 scales"),
        ("multicrop", single, "50 crops"),
        ("multicrop", multi, "150 crops"),
    ):
        gmacs = gmacs_per_image(model, method, scales)
        if analytic_only:
            rows.append(dict(method=method, views=views, scales=scales, gmacs_per_image=gmacs))
            continue
        subset = [dict(e, scaled={q: e["scaled"][q] for q in scales}) for e in examples]

        protocol = TestProtocol(method, scales, flips=True, pooling="ceil", batch_size=batch_size, resolved=True)

        def once(protocol=protocol, subset=subset):
            start = time.perf_counter()
            runner.run_evaluation(model, params, subset, protocol, mean_rgb=mean)
            return time.perf_counter() - start

        once()  # compile
        seconds = statistics.median(once() for _ in range(repeats))
        rows.append(
            dict(
                method=method,
                views=views,
                scales=scales,
                images_per_s=num_images / seconds,
                seconds=seconds,
                gmacs_per_image=gmacs,
            )
        )
    for row in rows:
        row["gmacs_relative_to_dense_1_scale"] = row["gmacs_per_image"] / rows[0]["gmacs_per_image"]
        if not analytic_only:
            row["speed_relative_to_dense_1_scale"] = row["images_per_s"] / rows[0]["images_per_s"]
    return rows


def main(argv: list[str]) -> None:
    from absl import flags

    flags.DEFINE_string("variant", "D", "VGG configuration.")
    flags.DEFINE_float("width_multiplier", 1 / 16, "Conv width multiplier (1 = the paper).")
    flags.DEFINE_integer("fc_width", 32, "fc6/fc7 width (4096 = the paper).")
    flags.DEFINE_integer("crop", 64, "Crop size (224 = the paper).")
    flags.DEFINE_integer("num_images", 32, "Images per timed pass.")
    flags.DEFINE_integer("batch_size", 64, "Global batch in crops (eval_batch_size).")
    flags.DEFINE_integer("repeats", 3, "Timed passes; the median is reported.")
    flags.DEFINE_string("compute_dtype", "float32", "float32 or bfloat16.")
    flags.DEFINE_bool("analytic_only", False, "Only the GMACs per image (XLA cost analysis; no run).")
    flags.DEFINE_bool("tiny", False, "A seconds-long smoke run (VGG-A, crop 32, 4 images).")
    values = flags.FLAGS
    values(argv)
    settings = dict(
        variant=values.variant,
        width_multiplier=values.width_multiplier,
        fc_width=values.fc_width,
        crop=values.crop,
        num_images=values.num_images,
        batch_size=values.batch_size,
        repeats=values.repeats,
        compute_dtype=values.compute_dtype,
        analytic_only=values.analytic_only,
    )
    if values.tiny:
        settings.update(variant="A", crop=32, num_images=4, batch_size=16, repeats=1)
    import jax

    quietness = common.Quietness().start()
    rows = run_benchmark(**settings)
    load = quietness.stop()
    print(f"# {jax.devices()[0].device_kind} x{jax.device_count()}, {platform.node()}, settings {settings}")
    print("| protocol | test Q | images/s | speed vs dense 1 scale | GMACs/image | GMACs vs dense 1 scale |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        scales = ",".join(map(str, row["scales"]))
        speed = "– | –"
        if "images_per_s" in row:
            speed = f"{row['images_per_s']:.2f} | {row['speed_relative_to_dense_1_scale']:.2f}x"
        print(
            f"| {row['method']} {row['views']} | {scales} | {speed} | {row['gmacs_per_image']:.3g} | "
            f"{row['gmacs_relative_to_dense_1_scale']:.1f}x |"
        )
    print(common.load_line(load))
    print(json.dumps({"settings": settings, "rows": rows, "load": load}))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main(sys.argv)
