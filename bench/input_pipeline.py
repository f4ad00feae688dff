"""Training input-pipeline throughput (paper §3.1 augmentation), tf.data vs a PIL reference.

Makes ImageNet-like JPEGs (about 500×375, quality 90) by random crops and resizes of the photos that
scikit-learn and scikit-image ship, then times, on the same files and in the same run:

- ``tf_fast``: vgg_jax's training op (`vgg_jax.data.image_ops.random_rescaled_crop`): JPEG decoded only inside
  the crop's window (`tf.io.decode_and_crop_jpeg`), rescale+crop in one antialiased `ScaleAndTranslate`;
- ``tf_fast_bilinear``: the same with ``resize='fast'`` (config.resize_method): plain bilinear of the
  window (no antialiasing), nearest-pixel alignment;
- ``tf_canvas``: the host's part of ``config.resample_on_device`` (`image_ops.random_window_on_canvas`):
  the same draws, only the crop's window decoded and placed on a 2 × crop canvas (the accelerator resamples
  and flips it in the train step; its cost there: bench/step_profile.py --resample-on-device);
- ``tf_naive``: full decode → `rescale_smaller_side` → random crop → flip (the textbook tf.data way);
- ``pil``: what a PyTorch DataLoader typically runs: `Image.open().convert('RGB')`, resize smaller side
  to S (bilinear), random crop, flip, to uint8 array; on all cores with one worker process per core.

S ~ U{256..512}, crop 224, flip; batches of 64. Each measurement runs in a fresh process pinned to 1 core
or to all cores; images/s is the median over `--repeats` passes over the files (after one warm-up pass).

    python bench/input_pipeline.py            # ~500 images, a few minutes on 2 cores
    python bench/input_pipeline.py --tiny     # seconds: small images, for the tests
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import common  # noqa: E402


def make_images(out_dir: str, count: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    """`count` JPEGs (q90) of about `size` (W, H), random crops/resizes of packaged photos; a third portrait."""
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"):
        photo = getattr(skimage.data, name)()
        if photo.ndim == 3 and photo.shape[2] == 3:
            photos.append(photo)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        frac = rng.uniform(0.5, 1.0)
        ch, cw = max(8, int(h * frac)), max(8, int(w * frac * rng.uniform(0.8, 1.0)))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        target = size if i % 3 else size[::-1]
        jitter = rng.uniform(0.9, 1.1)
        target = (int(target[0] * jitter), int(target[1] * jitter))
        image = Image.fromarray(photo[y : y + ch, x : x + cw]).resize(target, Image.BILINEAR)
        path = os.path.join(out_dir, f"img_{i:04d}.jpg")
        image.save(path, quality=90)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------ workers


def _tf_worker(paths, args, cores: int, fast: bool, resize: str = "exact", canvas: int = 0) -> list[float]:
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(cores)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    sys.path.insert(0, REPO)
    from vgg_jax.data import image_ops

    smin, smax, crop = args.scale_min, args.scale_max, args.crop

    def naive(data, seed):
        seeds = tf.random.experimental.stateless_split(seed, 3)
        s = tf.random.stateless_uniform([], seed=seeds[0], minval=smin, maxval=smax + 1, dtype=tf.int32)
        image = image_ops.rescale_smaller_side(tf.io.decode_image(data, channels=3, expand_animations=False), s)
        image = tf.image.stateless_random_crop(image, [crop, crop, 3], seed=seeds[1])
        return tf.image.stateless_random_flip_left_right(image, seed=seeds[2])

    def augment(index, path):
        data = tf.io.read_file(path)
        seed = tf.stack([tf.constant(0, tf.int64), index])
        if canvas:
            kwargs = dict(scale_min=smin, scale_max=smax, crop=crop, flip=True, canvas=canvas)
            placed, geometry, _ = image_ops.random_window_on_canvas(data, seed, **kwargs)
            return {"image": placed, "geometry": geometry}
        if fast:
            kwargs = dict(scale_min=smin, scale_max=smax, crop=crop, flip=True, resize=resize)
            return image_ops.random_rescaled_crop(data, seed, **kwargs)[0]
        return naive(data, seed)

    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    options.threading.max_intra_op_parallelism = 1
    ds = tf.data.Dataset.from_tensor_slices(paths).enumerate()
    ds = ds.map(augment, num_parallel_calls=cores).batch(args.batch).prefetch(2).with_options(options)
    rates = []
    for _ in range(args.repeats + 1):
        start, n = time.perf_counter(), 0
        for batch in ds:
            n += int((batch["image"] if canvas else batch).shape[0])
        rates.append(n / (time.perf_counter() - start))
    return rates[1:]


def _pil_one(task):
    from PIL import Image

    path, s, u, v, flip, crop = task
    with Image.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        if w < h:
            new = (s, round(h * s / w))
        else:
            new = (round(w * s / h), s)
        image = image.resize(new, Image.BILINEAR)
        x, y = int(u * (new[0] - crop + 1)), int(v * (new[1] - crop + 1))
        image = image.crop((x, y, x + crop, y + crop))
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(image, np.uint8)


def _pil_worker(paths, args, cores: int) -> list[float]:
    import multiprocessing as mp

    rng = np.random.default_rng(0)
    tasks = []
    for path in paths:
        scale = int(rng.integers(args.scale_min, args.scale_max + 1))
        tasks.append((path, scale, rng.random(), rng.random(), rng.random() < 0.5, args.crop))
    pool = mp.get_context("fork").Pool(cores) if cores > 1 else None
    rates = []
    for _ in range(args.repeats + 1):
        start, n = time.perf_counter(), 0
        results = pool.imap(_pil_one, tasks, chunksize=8) if pool else map(_pil_one, tasks)
        batch = []
        for image in results:
            batch.append(image)
            if len(batch) == args.batch:
                n += len(np.stack(batch))
                batch = []
        n += len(np.stack(batch)) if batch else 0
        rates.append(n / (time.perf_counter() - start))
    if pool:
        pool.close()
    return rates[1:]


def _run_worker(args) -> None:
    cores = sorted(os.sched_getaffinity(0))
    if args.cores == 1:
        os.sched_setaffinity(0, {cores[0]})
    n = len(os.sched_getaffinity(0))
    paths = sorted(os.path.join(args.images, f) for f in os.listdir(args.images) if f.endswith(".jpg"))
    if args.worker == "pil":
        rates = _pil_worker(paths, args, n)
    else:
        resize = "fast" if args.worker == "tf_fast_bilinear" else "exact"
        canvas = 2 * args.crop if args.worker == "tf_canvas" else 0
        rates = _tf_worker(paths, args, n, fast=args.worker != "tf_naive", resize=resize, canvas=canvas)
    print("RESULT " + json.dumps({"pipeline": args.worker, "cores": n, "rates": rates}))


def _measure(args, pipeline: str, cores: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), f"--_worker={pipeline}", f"--_cores={cores}"]
    command += [f"--_images={args.images}", f"--repeats={args.repeats}", f"--batch={args.batch}"]
    command += [f"--scale_min={args.scale_min}", f"--scale_max={args.scale_max}", f"--crop={args.crop}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    quietness = common.Quietness().start()
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    load = quietness.stop()
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{pipeline} on {cores} core(s) failed:\n{out.stderr[-3000:]}")
    result = json.loads(line[len("RESULT ") :])
    result["median"] = statistics.median(result["rates"])
    result["load"] = load
    return result


def components(paths: list[str], repeats: int = 5) -> dict[str, float]:
    """Milliseconds per image of each stage of `tf_fast`, one thread, on the first benchmark image (about
    500×375): decoding (whole / the crop's window), resampling the window to 224² (the antialiased
    ScaleAndTranslate training uses; `crop_and_resize` and plain bilinear, the faster candidates for
    enlarging / without antialiasing), and the whole op at a shrinking and an enlarging S."""
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    from vgg_jax.data import image_ops

    data = tf.constant(open(paths[0], "rb").read())
    height, width = (int(v) for v in tf.io.extract_jpeg_shape(data)[:2])
    window = tf.constant([0, 0, min(height, 330), min(width, 330)])  # the window of a 224 crop at S = 256
    region = tf.io.decode_and_crop_jpeg(data, window, channels=3)

    def op(size):
        seed = tf.constant([0, 1], tf.int64)
        return lambda: image_ops.random_rescaled_crop(data, seed, scale_min=size, scale_max=size, crop=224, flip=True)

    def canvas_op(size):
        seed = tf.constant([0, 1], tf.int64)
        kwargs = dict(scale_min=size, scale_max=size, crop=224, flip=True, canvas=448)
        return lambda: image_ops.random_window_on_canvas(data, seed, **kwargs)[:2]

    stages = {
        "decode whole image": lambda: tf.io.decode_jpeg(data, channels=3),
        "decode 330² window": lambda: tf.io.decode_and_crop_jpeg(data, window, channels=3),
        "antialiased ScaleAndTranslate 330² → 224²": lambda: tf.raw_ops.ScaleAndTranslate(
            images=region[None],
            size=[224, 224],
            scale=[0.68, 0.68],
            translation=[-2.0, -2.0],
            kernel_type="triangle",
            antialias=True,
        ),  # fmt: skip
        "bilinear crop_and_resize 170² → 224²": lambda: tf.image.crop_and_resize(
            region[None], [[0.0, 0.0, 0.5, 0.5]], [0], [224, 224]
        ),
        "plain bilinear 330² → 224²": lambda: tf.image.resize(region, [224, 224], antialias=False),
        "window on a 448² canvas, S = 256 (resample_on_device)": canvas_op(256),
        "whole op, S = 256 (shrinking)": op(256),
        "whole op, S = 512 (enlarging)": op(512),
    }
    times = {}
    for name, stage in stages.items():
        function = tf.function(stage)
        function()
        rounds = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(50):
                function()
            rounds.append((time.perf_counter() - start) / 50 * 1e3)
        times[name] = statistics.median(rounds)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="16 small images, tf_fast and pil, 1 core: seconds")
    parser.add_argument("--num_images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--scale_min", type=int, default=256)
    parser.add_argument("--scale_max", type=int, default=512)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--pipelines", default="tf_fast,tf_canvas,tf_fast_bilinear,tf_naive,pil")
    parser.add_argument("--components", action="store_true", help="only time each stage of tf_fast, one thread")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--_worker", dest="worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--_cores", dest="cores", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--_images", dest="images", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _run_worker(args)
        return {}
    size = (500, 375)
    if args.tiny:
        args.num_images, args.repeats, args.batch = 16, 1, 8
        args.scale_min, args.scale_max, args.crop = 64, 96, 56
        size = (120, 90)
        args.pipelines = "tf_fast,tf_canvas,pil"
    all_cores = 1 if args.tiny else len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        args.images = tmp
        paths = make_images(tmp, 1 if args.components else args.num_images, size)
        if args.components:
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
            quietness = common.Quietness().start()
            times = components(paths)
            load = quietness.stop()
            for name, ms in times.items():
                print(f"{name:44s} {ms:7.3f} ms")
            print(common.load_line(load))
            return {"components_ms": times, "load": load}
        results = []
        for pipeline in args.pipelines.split(","):
            for cores in sorted({1, all_cores}):
                result = _measure(args, pipeline, cores)
                results.append(result)
                print(
                    f"{pipeline:16s} {result['cores']} core(s): {result['median']:8.1f} images/s   "
                    + common.load_line(result["load"]),
                    flush=True,
                )
    summary = {"results": results, "num_images": args.num_images, "image_size": size, "tiny": args.tiny}
    by = {(r["pipeline"], r["cores"]): r["median"] for r in results}
    for cores in sorted({r["cores"] for r in results}):
        for pipeline in ("tf_fast", "tf_canvas"):
            if (pipeline, cores) in by and ("pil", cores) in by:
                speedup = by[(pipeline, cores)] / by[("pil", cores)]
                summary[f"{pipeline}_speedup_vs_pil_{cores}core"] = speedup
                quiet = all(r["load"]["quiet"] for r in results if r["cores"] == cores)
                mark = "" if quiet else " (busy machine: not a measurement)"
                print(f"{pipeline} / pil on {cores} core(s): {speedup:.2f}x{mark}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
