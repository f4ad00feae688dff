"""Throughput, FLOPs, MFU, memory and compile time of our jitted train step (paper §3.1), optionally against PyTorch.

    python bench/train_step.py --variant D --image-size 128 --batch 8 --torch
    python bench/train_step.py --variant D --image-size 224 --batch 256 --dtype bfloat16 --torch   # a GPU
    python bench/train_step.py --tiny --torch                                                    # the test suite

What it measures, in one process (plus one PyTorch worker process with ``--torch``):

* the step: `steps.make_train_step` jitted exactly as training does (donated
  state, uint8 batch, colour shift, dropout, SGD momentum + L2), on a fixed
  synthetic batch; compile time; then ``--repeats`` timed rounds of
  ``--steps`` steps after ``--warmup`` untimed ones; the median round.
  With ``--torch`` each of our rounds is followed by one PyTorch round, so
  both see the same machine load; the ratio is ours/PyTorch in images/s.
* FLOPs: XLA's cost analysis of the compiled step, and the analytic count
  (bench/common.py; the paper's 15.47 GMACs for D at 224); their ratio.
* MFU: achieved FLOP/s (paper-convention FLOPs) over the device's matmul rate,
  measured here (a large square matmul in the compute dtype, best of repeats).
* memory: XLA's memory analysis of the compiled step (arguments + outputs +
  temporaries − aliased), and the device's peak bytes where it reports them.

``--no-cpu-defaults`` measures XLA's own CPU defaults (otherwise
vgg_jax.cpu_defaults applies, as `python -m vgg_jax.main` does); ``--sweep``
runs every candidate XLA:CPU flag set of CPU_FLAG_VARIANTS in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402

# Candidate XLA:CPU set-ups for `--sweep` (each is checked to exist in this jaxlib by running it).
NO_YNN_CONV = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
CPU_FLAG_VARIANTS: dict[str, str] = {
    "XLA defaults (YNNPACK convs)": "",
    "oneDNN": "--xla_cpu_use_onednn=true",
    "no YNNPACK convs (Eigen)": NO_YNN_CONV,
    "no YNNPACK convs + oneDNN": f"{NO_YNN_CONV} --xla_cpu_use_onednn=true",
    "no YNNPACK convs + oneDNN + oneDNN dot,eltwise fusion": f"{NO_YNN_CONV} --xla_cpu_use_onednn=true "
    "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise",
    "no YNNPACK convs + oneDNN + YNNPACK dots": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,"
    "+individual_dot --xla_cpu_use_onednn=true",
    "no YNNPACK convs + oneDNN + concurrency scheduler": f"{NO_YNN_CONV} --xla_cpu_use_onednn=true "
    "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
    "no YNNPACK convs + oneDNN + XNNPACK graph fusion": f"{NO_YNN_CONV} --xla_cpu_use_onednn=true "
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    # XLA's oneDNN convolution rewriter, if this jaxlib has it (the compiled step shows whether convs moved).
    "no YNNPACK convs + oneDNN custom calls": f"{NO_YNN_CONV} --xla_cpu_use_onednn=true "
    "--xla_cpu_experimental_onednn_custom_call=true",
}

# A common GPU image lacks these; bench/gpu.sh's runs (--bare) must not import them.
NOT_ON_A_BARE_GPU_BOX = ("tensorflow", "tensorflow_datasets", "ml_collections", "clu")

TINY = dict(
    variant="A", image_size=32, batch=2, width_multiplier=1 / 16, fc_width=32, classes=10, repeats=2, steps=1, warmup=1
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="D", help="A, A-LRN, B, C, D or E (paper Table 1)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=128, help="crop side, a multiple of 32")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--remat", action="store_true", help="config.remat: recompute the conv blocks")
    parser.add_argument(
        "--resample-on-device", action="store_true", help="config.resample_on_device: canvases in, crops resampled"
    )
    parser.add_argument("--width-multiplier", type=float, default=1.0)
    parser.add_argument("--fc-width", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed round")
    parser.add_argument("--matmul-size", type=int, default=0, help="side of the rate matmul (0: 2048 CPU, 8192 GPU)")
    parser.add_argument("--torch", action="store_true", help="also time bench/torch_reference.py, interleaved")
    parser.add_argument("--torch-compile", action="store_true", help="torch.compile the PyTorch step")
    parser.add_argument("--no-cpu-defaults", action="store_true", help="XLA's own CPU flags (no vgg_jax.cpu_defaults)")
    parser.add_argument("--flops-only", action="store_true", help="cost analysis only (no compile of a run, no timing)")
    parser.add_argument("--matmul-only", action="store_true", help="only the matmul rate, at a few sizes")
    parser.add_argument("--tiny", action="store_true", help="a tiny net and batch (for tests)")
    parser.add_argument("--sweep", action="store_true", help="run every CPU_FLAG_VARIANTS entry in its own process")
    parser.add_argument("--only", default="", help="with --sweep: comma-separated indices of the variants to run")
    parser.add_argument("--json", default="", help="also write the result as JSON to this file")
    parser.add_argument(
        "--bare", action="store_true", help="fail if TensorFlow, TFDS, ml_collections or clu got imported"
    )
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


def make_config(args: argparse.Namespace):
    config = common.paper_config(args.variant)
    config.crop_size = args.image_size
    config.scale_min = config.scale_max = config.eval_scale = max(args.image_size, 256)
    config.compute_dtype = args.dtype
    config.remat = bool(args.remat)
    config.model.width_multiplier = args.width_multiplier
    config.model.fc_width = args.fc_width
    config.model.num_classes = args.classes
    config.global_batch_size = args.batch
    return config


def build(args: argparse.Namespace):
    """(jitted step, state, batch, key) exactly as train.py builds them; the synthetic batch is made on the device.

    With ``--resample-on-device`` the batch is what ``config.resample_on_device`` sends: decoded windows on
    2 × crop canvases and their geometry (a 334² window resampled to the crop, as at S = 256 from a
    500×375 image; every other image flipped).
    """
    import jax

    from vgg_jax import models, optim, steps

    config = make_config(args)
    model = models.from_config(config)
    tx = optim.create_optimizer(config, steps_per_epoch=1000)
    state = steps.create_train_state(config, model, tx, optim.PlateauControl(config))
    step = jax.jit(steps.make_train_step(config, model, tx), donate_argnums=(0,))
    return step, state, synthetic_batch(args), jax.random.key(0)


def synthetic_batch(args: argparse.Namespace) -> dict[str, Any]:
    """Random uint8 images and labels, generated on the default device (nothing crosses the host link)."""
    import jax
    import jax.numpy as jnp

    side = 2 * args.image_size if args.resample_on_device else args.image_size
    image_key, label_key = jax.random.split(jax.random.key(1))
    batch = {
        "image": jax.jit(lambda k: jax.random.bits(k, (args.batch, side, side, 3), jnp.uint8))(image_key),
        "label": jax.random.randint(label_key, (args.batch,), 0, args.classes, jnp.int32),
    }
    if args.resample_on_device:
        window = round(args.image_size * 375 / 256) - 4  # inside the canvas, the filter's margin included
        scale = args.image_size / (window - 6)
        row = [scale, scale, -3.0 * scale, -3.0 * scale, window, window]
        batch["geometry"] = jnp.asarray([row + [float(i % 2)] for i in range(args.batch)], jnp.float32)
    return batch


def _cost(analysis: Any) -> dict[str, float]:
    """cost_analysis() is a dict (newer JAX) or a one-element list of dicts (older)."""
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    return dict(analysis or {})


def flop_check(args: argparse.Namespace, compile_step: bool = True) -> dict[str, Any]:
    """XLA's FLOPs of the step (optimised HLO when `compile_step`, else the lowered HLO) vs the analytic count."""
    import jax

    from vgg_jax import models, optim, steps

    config = make_config(args)
    model = models.from_config(config)
    tx = optim.create_optimizer(config, steps_per_epoch=1000)
    # Abstract state: no parameters are allocated, nothing runs.
    size = args.image_size
    params = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, size, size, 3), jax.numpy.float32))["params"]
    )
    state = steps.TrainState(
        step=jax.ShapeDtypeStruct((), jax.numpy.int32),
        params=params,
        opt_state=jax.eval_shape(tx.init, params),
        plateau=jax.eval_shape(optim.PlateauControl(config).init),
    )
    batch = jax.eval_shape(lambda: synthetic_batch(args))
    key = jax.eval_shape(lambda: jax.random.key(0))
    start = time.perf_counter()
    lowered = jax.jit(steps.make_train_step(config, model, tx), donate_argnums=(0,)).lower(state, batch, key)
    result: dict[str, Any] = {"lower_s": time.perf_counter() - start}
    if compile_step:
        start = time.perf_counter()
        compiled = lowered.compile()
        result["compile_s"] = time.perf_counter() - start
        xla_flops = _cost(compiled.cost_analysis()).get("flops", 0.0)
        result |= _memory_fields(compiled, args.batch)
    else:
        xla_flops = _cost(lowered.cost_analysis()).get("flops", 0.0)
    analytic = common.analytic_train_flops(
        args.variant, args.image_size, args.width_multiplier, args.fc_width, args.classes
    )
    result.update(_flop_fields(xla_flops / args.batch, analytic))
    return result


def _memory_fields(compiled: Any, batch: int) -> dict[str, float]:
    """XLA's buffer assignment: peak = arguments + outputs + temporaries − donated (aliased) bytes."""
    memory = compiled.memory_analysis()
    if memory is None:
        return {}
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return {"xla_peak_bytes": int(peak), "xla_temp_bytes_per_example": memory.temp_size_in_bytes / batch}


def _flop_fields(xla_flops_per_image: float, analytic: dict[str, float]) -> dict[str, float]:
    return {
        "xla_flops_per_image": xla_flops_per_image,
        "analytic_flops_per_image": analytic["train_flops_per_image"],
        "analytic_flops_per_image_exact": analytic["train_flops_per_image_exact"],
        "forward_gmacs_per_image": analytic["forward_gmacs_per_image"],
        # XLA leaves out the taps on 'SAME' padding: compare it with the exact count.
        "xla_over_analytic": xla_flops_per_image / analytic["train_flops_per_image_exact"],
        "xla_over_paper_convention": xla_flops_per_image / analytic["train_flops_per_image"],
    }


def matmul_rate(dtype: str, size: int, repeats: int = 7) -> float:
    """FLOP/s of a jitted size×size matmul in `dtype` on the default device (best of `repeats` rounds: a capability)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(1), (size, size), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(2), (size, size), jnp.dtype(dtype))
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(a, b).block_until_ready()
    inner = 1 if jax.default_backend() == "cpu" else 20
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = matmul(a, b)
        out.block_until_ready()
        times.append((time.perf_counter() - start) / inner)
    return 2.0 * size**3 / min(times)


class TorchWorker:
    """bench/torch_reference.py in a child process, answering 'run K' with the seconds K steps took."""

    def __init__(self, args: argparse.Namespace):
        command = [
            sys.executable,
            str(REPO / "bench" / "torch_reference.py"),
            "--worker",
            f"--variant={args.variant}",
            f"--batch={args.batch}",
            f"--image-size={args.image_size}",
            f"--width-multiplier={args.width_multiplier}",
            f"--fc-width={args.fc_width}",
            f"--classes={args.classes}",
            f"--dtype={args.dtype}",
            f"--warmup={args.warmup}",
        ]
        if args.torch_compile:
            command.append("--compile")
        env = dict(os.environ, JAX_PLATFORMS="cpu")  # the worker only uses JAX for eval_shape
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = common.read_record(self.process.stdout)

    def run(self, steps: int) -> dict[str, Any]:
        self.process.stdin.write(f"run {steps}\n")
        self.process.stdin.flush()
        return common.read_record(self.process.stdout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    device = jax.devices()[0]
    result: dict[str, Any] = {
        "config": {
            k: getattr(args, k) for k in ("variant", "batch", "image_size", "dtype", "remat", "resample_on_device")
        }
        | {"width_multiplier": args.width_multiplier, "fc_width": args.fc_width, "classes": args.classes},
        "device": f"{device.platform}: {device.device_kind}",
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    # Start PyTorch first: its set-up (and warm-up) then does not overlap our timing.
    worker = TorchWorker(args) if args.torch else None
    try:
        step, host_state, batch, key = build(args)
        start = time.perf_counter()
        compiled = step.lower(host_state, batch, key).compile()
        result["compile_s"] = time.perf_counter() - start
        xla_flops = _cost(compiled.cost_analysis()).get("flops", 0.0) / args.batch
        result |= _memory_fields(compiled, args.batch)

        state = jax.device_put(host_state)
        for _ in range(args.warmup):
            state, metrics = compiled(state, batch, key)
        jax.block_until_ready(state)
        ours, theirs, torch_loss = [], [], None
        quietness = common.Quietness().start()
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = compiled(state, batch, key)
            jax.block_until_ready((state, metrics))
            ours.append((time.perf_counter() - start) / args.steps)
            if worker:
                record = worker.run(args.steps)
                theirs.append(record["seconds"] / args.steps)
                torch_loss = record["loss"]
                result["torch_peak_bytes"] = record.get("peak_bytes")
        result["load"] = quietness.stop()
        result["loss"] = float(metrics["loss"])
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            result["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
            result["device_peak_bytes_per_example"] = stats["peak_bytes_in_use"] / args.batch
    finally:
        if worker:
            worker.close()

    step_s = common.median(ours)
    result.update(step_s=step_s, step_s_all=ours, images_per_s=args.batch / step_s)
    analytic = common.analytic_train_flops(
        args.variant, args.image_size, args.width_multiplier, args.fc_width, args.classes
    )
    result.update(_flop_fields(xla_flops, analytic))
    size = args.matmul_size or (256 if args.tiny else 2048 if device.platform == "cpu" else 8192)
    rate = matmul_rate(args.dtype, size)
    achieved = analytic["train_flops_per_image"] * result["images_per_s"]
    result.update(matmul_flops_per_s=rate, matmul_size=size, achieved_flops_per_s=achieved, mfu=achieved / rate)
    if worker:
        torch_step = common.median(theirs)
        result.update(
            torch=worker.info,
            torch_step_s=torch_step,
            torch_step_s_all=theirs,
            torch_images_per_s=args.batch / torch_step,
            torch_loss=torch_loss,
            torch_mfu=analytic["train_flops_per_image"] * args.batch / torch_step / rate,
            ratio_ours_over_torch=torch_step / step_s,
        )
    return result


def report(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        f"VGG-{c['variant']} {c['image_size']}px batch {c['batch']} {c['dtype']}"
        + (" remat" if c["remat"] else "")
        + (" resampling on device" if c.get("resample_on_device") else "")
        + (f" width×{c['width_multiplier']:g}" if c["width_multiplier"] != 1 else "")
        + f" on {result['device']} (jax {result['jax']}; XLA_FLAGS={result['xla_flags']!r})",
        f"  ours:    {result['step_s'] * 1e3:9.1f} ms/step  {result['images_per_s']:9.2f} images/s  "
        f"MFU {result['mfu']:.1%}  compile {result['compile_s']:.1f} s  loss {result['loss']:.4f}",
    ]
    if "torch_step_s" in result:
        lines.append(
            f"  PyTorch: {result['torch_step_s'] * 1e3:9.1f} ms/step  {result['torch_images_per_s']:9.2f} images/s  "
            f"MFU {result['torch_mfu']:.1%}  ({result['torch']['torch']}, {result['torch']['threads']} threads)"
        )
        verdict = "" if result["load"]["quiet"] else " (busy machine: not a measurement)"
        lines.append(f"  ours/PyTorch: {result['ratio_ours_over_torch']:.2f}x{verdict}")
    lines.append(
        f"  FLOPs/image: XLA {result['xla_flops_per_image'] / 1e9:.2f} G; analytic "
        f"{result['analytic_flops_per_image_exact'] / 1e9:.2f} G without padding taps (XLA/analytic "
        f"{result['xla_over_analytic']:.4f}), {result['analytic_flops_per_image'] / 1e9:.2f} G paper convention "
        f"(MFU numerator); "
        f"matmul rate {result['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s ({result['matmul_size']}², {c['dtype']})"
    )
    if "xla_peak_bytes" in result:
        line = (
            f"  memory: XLA peak {result['xla_peak_bytes'] / 2**20:.0f} MiB, temporaries "
            f"{result['xla_temp_bytes_per_example'] / 2**20:.1f} MiB/example"
        )
        if "device_peak_bytes" in result:
            line += f", device peak {result['device_peak_bytes_per_example'] / 2**20:.1f} MiB/example"
        if result.get("torch_peak_bytes"):
            line += f", PyTorch peak {result['torch_peak_bytes'] / c['batch'] / 2**20:.1f} MiB/example"
        lines.append(line)
    lines.append("  " + common.load_line(result["load"]))
    return "\n".join(lines)


def sweep(args: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    """Each CPU_FLAG_VARIANTS entry in a fresh process (XLA reads its flags once), with PyTorch interleaved."""
    passthrough, skip = [], False
    for arg in argv:  # drop --sweep, --json and --only (and their values)
        if skip or arg == "--sweep" or arg.startswith(("--json", "--only")):
            skip = arg in ("--json", "--only")
            continue
        passthrough.append(arg)
    chosen = {int(i) for i in args.only.split(",") if i.strip()}
    results = []
    for index, (name, flags) in enumerate(CPU_FLAG_VARIANTS.items()):
        if chosen and index not in chosen:
            continue
        out = pathlib.Path(f"/tmp/vgg_bench_sweep_{os.getpid()}.json")
        env = dict(os.environ, XLA_FLAGS=flags)
        command = [sys.executable, __file__, *passthrough, "--no-cpu-defaults", "--torch", f"--json={out}"]
        run = subprocess.run(command, env=env, capture_output=True, text=True)
        if run.returncode:
            print(f"| {name} | `{flags}` | failed: {run.stderr.strip().splitlines()[-1:]} |", flush=True)
            continue
        result = json.loads(out.read_text())
        out.unlink()
        result["name"] = name
        results.append(result)
        print(
            f"| {name} | `{flags or '(none)'}` | {result['step_s']:.2f} | {result['torch_step_s']:.2f} | "
            f"{result['ratio_ours_over_torch']:.2f}x | {result['loss']:.4f} | {result['compile_s']:.0f} | "
            f"{result['load']['foreign_cores']:.2f}{'' if result['load']['quiet'] else ' BUSY'} |",
            flush=True,
        )
    return results


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    common.quiet_tensorflow()
    if args.sweep:
        print("| variant | XLA_FLAGS | ours s/step | PyTorch s/step | ours/PyTorch | loss | compile s | other work |")
        print("|---|---|---|---|---|---|---|---|")
        sweep(args, argv)
        return
    if not args.no_cpu_defaults:
        from vgg_jax import cpu_defaults

        cpu_defaults.apply()
    if args.matmul_only:
        import jax

        sizes = (128, 256) if args.tiny else (2048,) if jax.default_backend() == "cpu" else (4096, 8192, 16384)
        result = {"device": str(jax.devices()[0].device_kind), "dtype": args.dtype}
        result |= {f"matmul_{n}_flops_per_s": matmul_rate(args.dtype, n) for n in sizes}
        for key, value in result.items():
            print(f"{key}: {value / 1e12:.1f} TFLOP/s" if key.startswith("matmul") else f"{key}: {value}")
    elif args.flops_only:
        result = flop_check(args)
        print(json.dumps(result, indent=1))
    else:
        result = benchmark(args)
        print(report(result), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    leaked = sorted(name for name in NOT_ON_A_BARE_GPU_BOX if name in sys.modules)
    if args.bare and leaked:
        sys.exit(f"--bare: {leaked} got imported; a bare GPU box (bench/gpu.sh) does not have them")


if __name__ == "__main__":
    main()
