"""Dense evaluation (paper §3.2) speed: our fully-convolutional forward against the same net in PyTorch.

    python bench/dense_speed.py --variant D --crop 224 --height 256 --width 352 --batch 2

Both frameworks run the net the paper tests with: the convs, then fc6 as a k×k convolution and fc7/fc8 as
1×1 convolutions over a whole rescaled image (here a fixed canvas, a multiple of 32 so no pooling rule is
involved), the class-score map averaged spatially and soft-maxed. Same weights (ours, copied into PyTorch:
the posteriors are compared), same images, float32, channels-last in PyTorch; one process, rounds
alternating; the median of ``--repeats`` rounds; the machine's quietness recorded (bench/common.py).
This times the network only: `python bench/evaluation.py` times the whole protocol (canvases, crops, flips).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402


def ours(args: argparse.Namespace):
    import jax
    import jax.numpy as jnp

    from vgg_jax import models

    model = models.VGG(
        variant=args.variant,
        num_classes=1000,
        width_multiplier=args.width_multiplier,
        fc_width=args.fc_width,
        crop_size=args.crop,
    )
    params = model.init(jax.random.key(0), jnp.zeros((1, args.crop, args.crop, 3)))["params"]

    @jax.jit
    def posteriors(params, x):
        scores = model.apply({"params": params}, x, dense=True).mean(axis=(1, 2))
        return jax.nn.softmax(scores, axis=-1), scores

    return model, params, posteriors


def theirs(torch, model, params, args: argparse.Namespace):
    """The same fully-convolutional net in PyTorch, with our weights."""
    from vgg_jax import models

    nn, layers, block = torch.nn, [], 1
    for name in models.layer_names(args.variant):
        kernel = np.asarray(params[name]["kernel"])
        bias = torch.from_numpy(np.array(params[name]["bias"]))
        if name.startswith("conv"):
            this_block = int(name[4 : name.index("_")])
            if this_block != block:
                layers.append(nn.MaxPool2d(2, 2))
                block = this_block
            weight = kernel.transpose(3, 2, 0, 1)
        else:
            if name == "fc6":
                layers.append(nn.MaxPool2d(2, 2))
                window = model.fc6_window
                kernel = kernel.reshape(window, window, -1, kernel.shape[-1])
            else:
                kernel = kernel.reshape(1, 1, *kernel.shape)
            weight = kernel.transpose(3, 2, 0, 1)
        conv = nn.Conv2d(
            weight.shape[1],
            weight.shape[0],
            weight.shape[2],
            padding=weight.shape[2] // 2 if name.startswith("conv") else 0,
        )
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
            conv.bias.copy_(bias)
        layers.append(conv)
        if name != models.layer_names(args.variant)[-1]:
            layers.append(nn.ReLU(inplace=True))
    net = nn.Sequential(*layers).eval().to(memory_format=torch.channels_last)

    def posteriors(x):
        with torch.no_grad():
            scores = net(x).mean(dim=(2, 3))
            return torch.softmax(scores, dim=-1), scores

    return posteriors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="D")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=352)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--width-multiplier", type=float, default=1.0)
    parser.add_argument("--fc-width", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-cpu-defaults", action="store_true")
    args = parser.parse_args(argv)
    common.quiet_tensorflow()
    if not args.no_cpu_defaults:
        from vgg_jax.runtime import cpu_defaults

        cpu_defaults.apply()
    import os

    import jax
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model, params, jax_posteriors = ours(args)
    torch_posteriors = theirs(torch, model, params, args)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, args.height, args.width, 3)).astype(np.float32) - 120.0
    x_jax = jax.device_put(images)
    x_torch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    ours_scores = np.asarray(jax_posteriors(params, x_jax)[1])  # warm-up + parity of the class scores
    their_scores = torch_posteriors(x_torch)[1].numpy()
    parity = float(np.abs(ours_scores - their_scores).max() / np.abs(their_scores).max())
    times: dict[str, list[float]] = {"ours": [], "PyTorch": []}
    quietness = common.Quietness().start()
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(jax_posteriors(params, x_jax))
        times["ours"].append(time.perf_counter() - start)
        start = time.perf_counter()
        torch_posteriors(x_torch)
        times["PyTorch"].append(time.perf_counter() - start)
    load = quietness.stop()
    median = {name: common.median(values) for name, values in times.items()}
    print(
        f"VGG-{args.variant} dense, crop {args.crop}, {args.height}×{args.width} canvas, batch {args.batch}, "
        f"float32 (jax {jax.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    for name, seconds in median.items():
        print(f"  {name:8s} {seconds * 1e3:9.1f} ms/batch  {args.batch / seconds:8.2f} images/s")
    verdict = "" if load["quiet"] else " (busy machine: not a measurement)"
    print(
        f"  ours/PyTorch: {median['PyTorch'] / median['ours']:.2f}x{verdict}; "
        f"class scores differ by {parity:.1e} (relative)"
    )
    print("  " + common.load_line(load))


if __name__ == "__main__":
    main()
