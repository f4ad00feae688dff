"""The PyTorch reference for bench/train_step.py: the same VGG and the same SGD step (paper §3.1), in PyTorch.

Same network (layer shapes taken from our flax model, so every configuration,
width multiplier and crop size matches), same step: uint8 NHWC crops → float,
PCA-style per-image colour offset, mean subtraction, forward with dropout,
softmax cross-entropy, backward, SGD momentum 0.9 with coupled L2 5e-4 on the
kernels only (biases undecayed, as `optim.py`). Channels-last memory format;
autocast to bfloat16 (``--dtype bfloat16``, the GPU default in bench/gpu.sh);
optional ``torch.compile``.

Standalone: ``python bench/torch_reference.py --variant D --batch 8 --image-size 112``.
As a worker of bench/train_step.py (``--worker``) it prints one protocol line
when ready, then runs ``run K`` requests from stdin (K timed steps each) so the
harness can interleave our rounds and PyTorch's under the same machine load.

torch is an optional extra (``pip install -e .[torch]``); nothing in vgg_jax imports it.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections import OrderedDict

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

MEAN_RGB = (123.68, 116.779, 103.939)


def build_model(torch, shapes: dict[str, tuple[int, ...]], dropout_rate: float):
    """nn.Sequential with our layer names and shapes (conv kernels HWIO → OIHW, fc kernels (in, out))."""
    nn = torch.nn
    layers: list[tuple[str, object]] = []
    block = 1
    fc_window = None
    for name, shape in shapes.items():
        if name.startswith("conv"):
            this_block = int(name[4 : name.index("_")])
            if this_block != block:
                layers.append((f"pool{block}", nn.MaxPool2d(2, 2)))
                block = this_block
            kernel, _, cin, cout = shape
            layers += [(name, nn.Conv2d(cin, cout, kernel, padding=kernel // 2)), (f"relu_{name}", nn.ReLU(True))]
        else:
            if fc_window is None:
                layers += [(f"pool{block}", nn.MaxPool2d(2, 2)), ("flatten", nn.Flatten())]
                fc_window = True
            layers.append((name, nn.Linear(shape[0], shape[1])))
            if name != "fc8":
                layers += [(f"relu_{name}", nn.ReLU(True)), (f"drop_{name}", nn.Dropout(dropout_rate))]
    return nn.Sequential(OrderedDict(layers))


class Reference:
    """Model, optimiser and one jit-free (or torch.compile'd) train step on a fixed synthetic batch."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.torch = torch
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.backends.cudnn.benchmark = True  # pick the fastest conv algorithms, as a tuned PyTorch run does
        shapes = common.model_shapes(args.variant, args.image_size, args.width_multiplier, args.fc_width, args.classes)
        torch.manual_seed(0)
        model = build_model(torch, shapes, args.dropout).to(self.device).to(memory_format=torch.channels_last)
        decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
        no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
        self.optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-2,
            momentum=0.9,
        )
        self.model = model.train()
        self.autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
        generator = torch.Generator().manual_seed(0)
        shape = (args.batch, args.image_size, args.image_size, 3)
        self.images = torch.randint(0, 256, shape, dtype=torch.uint8, device=self.device)  # made on the device
        self.labels = torch.randint(0, args.classes, (args.batch,), generator=generator).to(self.device)
        self.mean = torch.tensor(MEAN_RGB, device=self.device).view(1, 3, 1, 1)
        self.color_std = 0.1
        self.scaler = torch.amp.GradScaler(enabled=args.dtype == "float16")
        self.step_fn = torch.compile(self._step) if args.compile else self._step

    def _step(self, images, labels):
        torch = self.torch
        # uint8 NHWC → float NCHW view in channels-last memory (no copy), colour offset, mean subtraction.
        x = images.permute(0, 3, 1, 2).float()
        shift = torch.randn(x.shape[0], 3, 1, 1, device=x.device) * (self.color_std * 255.0 / 3.0)
        x = (x + shift - self.mean).contiguous(memory_format=torch.channels_last)
        dtype, enabled = self.autocast_dtype or torch.float32, self.autocast_dtype is not None
        with torch.autocast(self.device.type, dtype=dtype, enabled=enabled):
            logits = self.model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def run(self, steps: int) -> float:
        """Seconds for `steps` steps (the last loss is fetched, so the work is done)."""
        self.synchronize()
        start = time.perf_counter()
        loss = None
        for _ in range(steps):
            loss = self.step_fn(self.images, self.labels)
        self.last_loss = float(loss)
        self.synchronize()
        return time.perf_counter() - start

    def peak_memory(self) -> int | None:
        if self.device.type == "cuda":
            return int(self.torch.cuda.max_memory_allocated())
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="D")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--width-multiplier", type=float, default=1.0)
    parser.add_argument("--fc-width", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="", help="'cpu' or 'cuda' (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the step")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed round")
    parser.add_argument("--worker", action="store_true", help="serve 'run K' requests on stdin (for train_step.py)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    reference = Reference(args)
    reference.run(args.warmup)
    info = {
        "torch": reference.torch.__version__,
        "device": str(reference.device),
        "threads": reference.torch.get_num_threads(),
        "setup_s": time.perf_counter() - start,
    }
    if args.worker:
        common.emit({"ready": True, **info})
        for line in sys.stdin:
            command = line.split()
            if not command or command[0] == "quit":
                break
            seconds = reference.run(int(command[1]))
            common.emit({"seconds": seconds, "loss": reference.last_loss, "peak_bytes": reference.peak_memory()})
        return
    times = [reference.run(args.steps) / args.steps for _ in range(args.repeats)]
    step = common.median(times)
    print(
        f"PyTorch {info['torch']} on {info['device']} ({info['threads']} threads): VGG-{args.variant} "
        f"{args.image_size}px batch {args.batch} {args.dtype}: {step * 1e3:.1f} ms/step, "
        f"{args.batch / step:.1f} images/s (median of {args.repeats}), loss {reference.last_loss:.4f}"
    )


if __name__ == "__main__":
    main()
