"""Perceptual + style loss, forward and backward with respect to the images: vgg_jax.perceptual against PyTorch.

The computation of style-transfer and super-resolution training: VGG-19 (paper
Table 1, config E) activations relu1_1 … relu5_1 (Gatys et al.'s style
layers) of a batch of images and of fixed targets, the style loss (Gram
matrices) plus the perceptual (feature MSE) loss, and its gradient with
respect to the images. Same random weights, same images, same loss in both
frameworks, on the same CPU, in one process; rounds alternate (ours, theirs,
ours, …) so that both see the same machine load. Reported: median seconds per
step, images/s and the ratio; the load average and the CPU time other processes
took meanwhile (bench/common.py: a busy machine's numbers are marked, no verdict).

    python bench/perceptual.py                       # batch 16 at 256², VGG-19 relu1_1…relu5_1
    python bench/perceptual.py --batch 2 --reps 5    # what a 2-core machine manages
    python bench/perceptual.py --tiny                # the test's smoke run

torch is optional (``pip install -e .[torch]``); without it only ours is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402


def build_ours(args: argparse.Namespace):
    """(step function images → (loss, grad), parameters) for vgg_jax: jitted value_and_grad."""
    import jax
    import jax.numpy as jnp

    from vgg_jax import models, perceptual

    layers = perceptual.PRESETS["gatys_style"].layers
    net = perceptual.VGGFeatures(variant="E", layers=layers, width_multiplier=args.width, dtype=jnp.dtype(args.dtype))
    model = models.VGG(variant="E", width_multiplier=args.width, initializer="he")
    # Initialising with conv outputs only creates conv1_1 … conv5_1: the head never exists.
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), outputs=[layers[-1]])["params"]
    params = jax.tree_util.tree_map(lambda p: p + 0.01 if p.ndim == 1 else p, params)  # non-zero biases

    def loss(params, images, targets):
        style = perceptual.style_loss(net, params, images, targets)
        return style + perceptual.perceptual_loss(net, params, images, targets)

    # Parameters as an argument, not closed over: constants would be folded into the compiled program.
    step = jax.jit(jax.value_and_grad(loss, argnums=1))
    device_params = jax.device_put(params)

    def run(images, targets):
        value, grad = step(device_params, images, targets)
        grad.block_until_ready()
        return float(value)

    return run, jax.tree_util.tree_map(lambda p: jax.device_get(p), params), layers


def build_theirs(args: argparse.Namespace, params, layers):
    """The same network and loss in PyTorch (NCHW, autograd), from the same parameters."""
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    modules, names = [], []
    for name, leaves in params.items():  # conv1_1 … conv5_1 in order
        block = int(name[4])
        if names and int(names[-1][4]) != block:
            modules.append(torch.nn.MaxPool2d(2, 2))
            names.append(f"pool{block - 1}")
        kernel = np.asarray(leaves["kernel"])
        conv = torch.nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[0], padding=kernel.shape[0] // 2)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(np.asarray(leaves["bias"]).copy()))
        modules += [conv, torch.nn.ReLU()]
        names += [name, "relu" + name[4:]]
    for module in modules:
        module.requires_grad_(False)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    mean = torch.tensor([123.68, 116.779, 103.939]).view(1, 3, 1, 1)

    def features(x):
        out, x = {}, x * 255.0 - mean
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            for name, module in zip(names, modules, strict=True):
                x = module(x)
                if name in layers:
                    out[name] = x.float()
        return out

    def gram(f):
        n, c, h, w = f.shape
        flat = f.reshape(n, c, h * w)
        return flat @ flat.transpose(1, 2) / (c * h * w)

    def run(images, targets):
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
        with torch.no_grad():  # as ours: no backward pass through the targets' features
            target_features = features(torch.from_numpy(targets.transpose(0, 3, 1, 2).copy()))
        image_features = features(x)
        loss = 0.0
        for layer in layers:
            fx, fy = image_features[layer], target_features[layer]
            loss = loss + ((gram(fx) - gram(fy)) ** 2).sum(dim=(1, 2)).mean() + ((fx - fy) ** 2).mean()
        loss.backward()
        return float(loss.detach())

    return run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier (1.0: the real VGG-19)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--reps", type=int, default=5, help="timed rounds per framework (after one warm-up)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="batch 1, 32², width 1/16, 2 rounds (smoke test)")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.size, args.width, args.reps = 1, 32, 1 / 16, 2
    common.quiet_tensorflow()
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.random((args.batch, args.size, args.size, 3), dtype=np.float32)
    targets = rng.random((args.batch, args.size, args.size, 3), dtype=np.float32)
    ours, params, layers = build_ours(args)
    start = time.perf_counter()
    ours_loss = ours(images, targets)  # compiles
    compile_s = time.perf_counter() - start
    theirs = None
    if not args.no_torch:
        try:
            theirs = build_theirs(args, params, layers)
        except ImportError:
            print("PyTorch not installed: timing ours only")
    theirs_loss = theirs(images, targets) if theirs else None  # warm-up
    times: dict[str, list[float]] = {"ours": [], "torch": []}
    quietness = common.Quietness().start()
    for _ in range(args.reps):
        for name, run in (("ours", ours), ("torch", theirs)):
            if run is None:
                continue
            start = time.perf_counter()
            run(images, targets)
            times[name].append(time.perf_counter() - start)
    load = quietness.stop()
    result = dict(
        batch=args.batch,
        size=args.size,
        width=args.width,
        dtype=args.dtype,
        layers=list(layers),
        reps=args.reps,
        compile_s=compile_s,
        ours_s=common.median(times["ours"]),
        ours_loss=ours_loss,
        load=load,
        loaded=not load["quiet"],
        machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
    )
    if theirs:
        result.update(torch_s=common.median(times["torch"]), torch_loss=theirs_loss)
        result["ratio_ours_over_torch"] = result["torch_s"] / result["ours_s"]  # > 1: ours is faster
    print(f"VGG-19 {', '.join(layers)}; batch {args.batch} at {args.size}², width {args.width:g}, {args.dtype}")
    ours_rate = args.batch / result["ours_s"]
    print(f"ours: {result['ours_s']:.3f} s/step ({ours_rate:.2f} images/s), compile {compile_s:.1f} s")
    if theirs:
        print(f"PyTorch: {result['torch_s']:.3f} s/step ({args.batch / result['torch_s']:.2f} images/s)")
        ratio = result["ratio_ours_over_torch"]
        verdict = " (busy machine: not a measurement)" if result["loaded"] else ""
        print(f"ours/PyTorch speed: {ratio:.2f}x{verdict}; losses {ours_loss:.6g} vs {theirs_loss:.6g}")
    print(common.load_line(load))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
