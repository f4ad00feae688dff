"""Where a VGG train step's time goes on this machine: every conv layer's forward, input gradient and weight gradient,
timed alone, in XLA (as our step compiles them) and in PyTorch (oneDNN, channels_last), side by side.

    python bench/layer_profile.py --variant D --image-size 128 --batch 8

One process, both frameworks, rounds interleaved layer by layer so both see the same load; the median of
``--repeats`` rounds. The three parts of a conv's training cost (paper §3.1: a step is about three forwards)
are timed separately because XLA and oneDNN implement them differently: XLA rewrites the weight gradient as a
convolution whose "window" is the whole activation map, PyTorch calls oneDNN's backward-weights primitive.
``--formulations`` also times the weight gradient written as explicit matrix products (im2col patches × the
output gradient, and nine shifted products), the candidates for a custom VJP.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402


def conv_shapes(variant: str, image_size: int) -> list[tuple[str, int, int, int]]:
    """(layer, map side, input channels, output channels) of every conv, in forward order."""
    shapes = common.model_shapes(variant, image_size)
    out = []
    for name, kernel in shapes.items():
        if name.startswith("conv"):
            block = int(name[4 : name.index("_")])
            out.append((name, image_size // 2 ** (block - 1), kernel[2], kernel[3]))
    return out


def _time(fn: Callable[[], Any], sync: Callable[[Any], Any], repeats: int) -> list[float]:
    sync(fn())  # warm-up (compiles / allocates)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return times


def jax_parts(batch: int, side: int, cin: int, cout: int, formulations: bool) -> dict[str, Callable[[], Any]]:
    import jax
    import jax.numpy as jnp

    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, side, side, cin), jnp.float32)
    w = jax.random.normal(key, (3, 3, cin, cout), jnp.float32) * 0.01
    g = jax.random.normal(key, (batch, side, side, cout), jnp.float32)

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    forward = jax.jit(conv)
    input_grad = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    weight_grad = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    parts = {
        "forward": lambda: forward(x, w),
        "input grad": lambda: input_grad(x, w, g),
        "weight grad": lambda: weight_grad(x, w, g),
    }
    if formulations:

        @jax.jit
        def weight_grad_im2col(x, g):
            patches = jax.lax.conv_general_dilated_patches(
                x, (3, 3), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )  # features ordered (cin, kh, kw)
            dw = patches.reshape(-1, cin * 9).T @ g.reshape(-1, cout)
            return dw.reshape(cin, 3, 3, cout).transpose(1, 2, 0, 3)

        @jax.jit
        def weight_grad_shifted(x, g):
            padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            rows = [
                padded[:, i : i + side, j : j + side, :].reshape(-1, cin).T @ g.reshape(-1, cout)
                for i in range(3)
                for j in range(3)
            ]
            return jnp.stack(rows).reshape(3, 3, cin, cout)

        parts["weight grad, im2col dot"] = lambda: weight_grad_im2col(x, g)
        parts["weight grad, 9 dots"] = lambda: weight_grad_shifted(x, g)
    return parts


def torch_parts(batch: int, side: int, cin: int, cout: int) -> dict[str, Callable[[], Any]]:
    import torch

    x = torch.randn(batch, cin, side, side).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, 3, 3) * 0.01).contiguous(memory_format=torch.channels_last)
    g = torch.randn(batch, cout, side, side).contiguous(memory_format=torch.channels_last)
    backward = torch.ops.aten.convolution_backward

    def part(mask: list[bool]) -> Callable[[], Any]:
        return lambda: backward(g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

    return {
        "forward": lambda: torch.nn.functional.conv2d(x, w, padding=1),
        "input grad": part([True, False, False]),
        "weight grad": part([False, True, False]),
    }


def profile(args: argparse.Namespace) -> list[dict[str, Any]]:
    import jax
    import torch

    torch.set_grad_enabled(False)
    rows = []
    seen: dict[tuple[int, int, int], dict[str, Any]] = {}
    for name, side, cin, cout in conv_shapes(args.variant, args.image_size):
        if (side, cin, cout) in seen:  # same shape as an earlier layer: same times
            rows.append(seen[(side, cin, cout)] | {"layer": name})
            continue
        ours = jax_parts(args.batch, side, cin, cout, args.formulations)
        theirs = torch_parts(args.batch, side, cin, cout)
        row: dict[str, Any] = {"layer": name, "side": side, "cin": cin, "cout": cout}
        for part, fn in ours.items():
            row[f"ours {part}"] = common.median(_time(fn, jax.block_until_ready, args.repeats))
            if part in theirs:
                row[f"torch {part}"] = common.median(_time(theirs[part], lambda r: r, args.repeats))
        row["gflop"] = 2 * args.batch * side * side * 9 * cin * cout / 1e9
        seen[(side, cin, cout)] = row
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row: dict[str, Any]) -> str:
    cells = [f"{row['layer']} {row['side']}² {row['cin']}→{row['cout']}"]
    for part in ("forward", "input grad", "weight grad"):
        ours, theirs = row[f"ours {part}"], row[f"torch {part}"]
        cells.append(f"{ours * 1e3:.1f} / {theirs * 1e3:.1f} ms ({theirs / ours:.2f}×)")
    for part in ("weight grad, im2col dot", "weight grad, 9 dots"):
        if f"ours {part}" in row:
            cells.append(f"{row[f'ours {part}'] * 1e3:.1f} ms")
    return "| " + " | ".join(cells) + " |"


def totals(rows: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(("ours ", "torch ")):
                # conv1_1's input gradient is never computed in a train step
                if row["layer"] == rows[0]["layer"] and key.endswith("input grad"):
                    continue
                out[key] = out.get(key, 0.0) + value
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="D")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--formulations", action="store_true", help="also time matmul forms of the weight grad")
    parser.add_argument("--no-cpu-defaults", action="store_true")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    common.quiet_tensorflow()
    if not args.no_cpu_defaults:
        from vgg_jax.runtime import cpu_defaults

        cpu_defaults.apply()
    import torch

    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    quietness = common.Quietness().start()
    header = "| layer | forward ours / PyTorch | input grad | weight grad |"
    if args.formulations:
        header += " wgrad im2col dot | wgrad 9 dots |"
    print(f"VGG-{args.variant} {args.image_size}px batch {args.batch}; ratio = PyTorch time / ours (>1: we are faster)")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rows = profile(args)
    load = quietness.stop()
    sums = totals(rows)
    print("sums (s):", json.dumps({k: round(v, 4) for k, v in sums.items()}))
    print(common.load_line(load))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"rows": rows, "sums": sums, "load": load}))


if __name__ == "__main__":
    main()
