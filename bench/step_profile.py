"""Where a train step's time goes, by kind of work (paper §3.1): our compiled step's ops (jax.profiler) against
PyTorch's (torch.profiler), the convolutions apart from everything else.

    python bench/step_profile.py --variant D --image-size 128 --batch 8

Ours: the step `bench/train_step.py` times (steps.make_train_step, jitted, donated state), traced for
``--steps`` steps; each XLA op's duration is assigned to a kind through the compiled HLO (its opcode, the
ops fused into it, and the JAX name scope in its metadata: `steps.py` names the preprocessing, optimizer and
statistics scopes). PyTorch: `bench/torch_reference.py`'s step under torch.profiler, each aten op's self
time assigned by its name and the `record_function` scope it ran in. Milliseconds per step, summed over ops
(two threads can run ops side by side, so a column can exceed the step's wall time). XLA:CPU's
convolutions run as thread-pool tasks the trace does not name: ours are the step's wall time less the rest.
"XLA's share" is what this code cannot change from Python: the convolutions, the transposes XLA inserts for
their weight gradients, and the parameter copies its copy insertion adds before the in-place update.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import pathlib
import re
import sys
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402

KINDS = (
    "convolutions",
    "transposes for the convolutions",
    "parameter copies (XLA copy insertion)",
    "fc matmuls",
    "bias add / bias grad",
    "ReLU (+grad)",
    "max-pool (+grad)",
    "dropout (mask + RNG)",
    "resampling the crops (device resampling)",
    "colour shift + mean + cast",
    "loss + top-k",
    "optimizer update",
    "update statistics",
    "layout copies / other",
)

XLAS_SHARE = KINDS[:3]

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S.*? ([a-z][a-z0-9\-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) [({]")


def hlo_ops(hlo_text: str) -> dict[str, dict[str, Any]]:
    """name → {'opcode', 'op_name', 'calls'} for every instruction of a compiled HLO module, and per fused
    computation the set of opcodes it holds (under the computation's name, key 'opcodes')."""
    ops: dict[str, dict[str, Any]] = {}
    computation = ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line.startswith(" "):
            computation = header.group(1)
            ops.setdefault(computation, {"opcodes": set(), "names": []})
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, opcode = match.groups()
        op_name = re.search(r'op_name="([^"]*)"', line)
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        operands = re.findall(r"%([\w.\-]+)", line.split("=", 1)[1].split(", metadata=")[0])
        ops[name] = {
            "opcode": opcode,
            "op_name": op_name.group(1) if op_name else "",
            "calls": calls and calls[1],
            "operands": operands,
            "users": [],
        }
        for operand in operands:
            if operand in ops and "users" in ops[operand]:
                ops[operand]["users"].append(name)
        if computation:
            ops[computation]["opcodes"].add(opcode)
            ops[computation]["names"].append(op_name.group(1) if op_name else "")
    return ops


def classify_xla(name: str, ops: dict[str, dict[str, Any]]) -> str:
    """The kind of work of one compiled op (a thunk name of the trace)."""
    op = ops.get(name) or ops.get(name.split(":")[0]) or {"opcode": "", "op_name": "", "calls": None}
    fused = ops.get(op["calls"] or "", {"opcodes": set(), "names": []})
    opcodes = fused["opcodes"] | {op["opcode"]}
    scope = " ".join([op["op_name"], *fused["names"]])
    if "convolution" in opcodes:
        return "convolutions"
    if op["opcode"] == "copy" and any(o.startswith("state_params") for o in op.get("operands", [])):
        return "parameter copies (XLA copy insertion)"
    users = [ops.get(u, {}) for u in op.get("users", [])]
    if opcodes & {"copy", "transpose"} and users:  # (a fused ReLU gradient may ride along)
        if all("convolution" in _opcodes(u, ops) for u in users):
            return "transposes for the convolutions"
    if "resample" in scope:
        return "resampling the crops (device resampling)"
    if "preprocess" in scope:
        return "colour shift + mean + cast"
    if "optimizer" in scope:
        return "optimizer update"
    if "statistics" in scope:
        return "update statistics"
    if "Dropout" in scope or "threefry" in scope or "random_bits" in scope or "random_wrap" in scope:
        return "dropout (mask + RNG)"
    if "dot" in opcodes or "dot_general" in scope:
        return "fc matmuls"
    if opcodes & {"reduce-window", "select-and-scatter"} or "max_pool" in scope or "reduce_window" in scope:
        return "max-pool (+grad)"
    if "relu" in scope or "max(" in scope:
        return "ReLU (+grad)"
    if re.search(r"(conv\d_\d|fc\d)/(add|reduce_sum)", scope) or "/add" in scope and "conv" in scope:
        return "bias add / bias grad"
    if any(word in scope for word in ("softmax", "log_softmax", "cross_entropy", "take_along_axis", "ge", "reduce")):
        return "loss + top-k"
    return "layout copies / other"


def _opcodes(op: dict[str, Any], ops: dict[str, dict[str, Any]]) -> set[str]:
    return ops.get(op.get("calls") or "", {"opcodes": set()})["opcodes"] | {op.get("opcode", "")}


def ours(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from bench import train_step

    step, state, batch, key = train_step.build(train_step.parse_args(_bench_argv(args)))
    compiled = step.lower(state, batch, key).compile()
    ops = hlo_ops(compiled.as_text())
    state, batch = jax.device_put(state), jax.device_put(batch)
    for _ in range(2):
        state, metrics = compiled(state, batch, key)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, batch, key)
        jax.block_until_ready((state, metrics))
        wall = (time.perf_counter() - start) / args.steps
        jax.profiler.stop_trace()
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[-1])
    totals: dict[str, float] = collections.defaultdict(float)
    per_op: dict[str, float] = collections.defaultdict(float)
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" not in stats or "train_step" not in str(stats.get("hlo_module", "")):
                    continue
                ms = event.duration_ns / 1e6 / args.steps
                totals[classify_xla(event.name, ops)] += ms
                per_op[event.name] += ms
    # XLA:CPU runs a convolution as many thread-pool tasks that the trace does not attribute to the op: the
    # convolutions' time is the step's wall time less every other op's.
    rest = sum(ms for kind, ms in totals.items() if kind != "convolutions")
    totals["convolutions"] = max(0.0, wall * 1e3 - rest)
    top = sorted(per_op.items(), key=lambda item: -item[1])[: args.top]
    return {"kinds": dict(totals), "wall_ms": wall * 1e3, "top_ops": [(n, ms, classify_xla(n, ops)) for n, ms in top]}


def classify_torch(name: str, scope: str) -> str:
    """The kind of work of one aten op of the PyTorch step, given its record_function scope."""
    if "convolution" in name or "conv2d" in name:
        return "convolutions"
    if scope == "preprocess":
        return "colour shift + mean + cast"
    if scope == "optimizer" or "_foreach" in name or "sgd" in name:
        return "optimizer update"
    if any(word in name for word in ("addmm", "aten::mm", "aten::linear", "aten::matmul")):
        return "fc matmuls"
    if "relu" in name or "threshold_backward" in name:
        return "ReLU (+grad)"
    if "max_pool" in name:
        return "max-pool (+grad)"
    if "dropout" in name or "bernoulli" in name or (scope in ("forward", "backward") and name == "aten::mul"):
        return "dropout (mask + RNG)"
    if scope == "loss" or "nll" in name or "softmax" in name:
        return "loss + top-k"
    if name == "aten::sum" and scope == "backward":
        return "bias add / bias grad"
    return "layout copies / other"


def theirs(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from bench import torch_reference

    reference = torch_reference.Reference(torch_reference.parse_args(_torch_argv(args)))

    def step() -> None:  # bench/torch_reference.py's step, cut into named scopes
        model, optimizer = reference.model, reference.optimizer
        with record_function("preprocess"):
            x = reference.images.permute(0, 3, 1, 2).float()
            shift = torch.randn(x.shape[0], 3, 1, 1) * (reference.color_std * 255.0 / 3.0)
            x = (x + shift - reference.mean).contiguous(memory_format=torch.channels_last)
        with record_function("forward"):
            logits = model(x)
        with record_function("loss"):
            loss = torch.nn.functional.cross_entropy(logits.float(), reference.labels)
        optimizer.zero_grad(set_to_none=True)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            optimizer.step()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        wall = (time.perf_counter() - start) / args.steps
    scopes = {"preprocess", "forward", "loss", "backward", "optimizer"}
    totals: dict[str, float] = collections.defaultdict(float)
    per_op: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        if event.name in scopes:
            continue
        parent, scope = event.cpu_parent, ""
        while parent is not None:
            if parent.name in scopes:
                scope = parent.name
                break
            parent = parent.cpu_parent
        ms = event.self_cpu_time_total / 1e3 / args.steps
        totals[classify_torch(event.name, scope)] += ms
        per_op[f"{event.name} [{scope}]"] += ms
    top = sorted(per_op.items(), key=lambda item: -item[1])[: args.top]
    return {"kinds": dict(totals), "wall_ms": wall * 1e3, "top_ops": top}


def _bench_argv(args: argparse.Namespace) -> list[str]:
    argv = [f"--variant={args.variant}", f"--image-size={args.image_size}", f"--batch={args.batch}"]
    return argv + (["--tiny"] if args.tiny else []) + (["--resample-on-device"] if args.resample_on_device else [])


def _torch_argv(args: argparse.Namespace) -> list[str]:
    from bench import train_step

    bench = train_step.parse_args(_bench_argv(args))
    return [
        f"--variant={bench.variant}",
        f"--image-size={bench.image_size}",
        f"--batch={bench.batch}",
        f"--width-multiplier={bench.width_multiplier}",
        f"--fc-width={bench.fc_width}",
        f"--classes={bench.classes}",
        "--device=cpu",
    ]


def table(result: dict[str, Any]) -> str:
    lines = ["| kind of work | ours ms/step | PyTorch ms/step | ours/PyTorch time |", "|---|---|---|---|"]
    mine, their = result["ours"]["kinds"], result["torch"]["kinds"]
    for kind in KINDS:
        a, b = mine.get(kind, 0.0), their.get(kind, 0.0)
        lines.append(f"| {kind} | {a:.1f} | {b:.1f} | {a / b:.2f} |" if b else f"| {kind} | {a:.1f} | {b:.1f} | – |")
    for label, kinds in (("XLA's share (the first three rows)", XLAS_SHARE), ("the step's own work (the rest)", None)):
        a = sum(v for k, v in mine.items() if (k in XLAS_SHARE) == (kinds is not None))
        b = sum(v for k, v in their.items() if (k in XLAS_SHARE) == (kinds is not None))
        lines.append(f"| **{label}** | **{a:.1f}** | **{b:.1f}** | **{a / max(b, 1e-9):.2f}** |")
    lines.append(
        f"| step wall time | {result['ours']['wall_ms']:.1f} | {result['torch']['wall_ms']:.1f} | "
        f"{result['ours']['wall_ms'] / result['torch']['wall_ms']:.2f} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="D")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 untimed ones)")
    parser.add_argument("--top", type=int, default=15, help="also list this many most expensive ops")
    parser.add_argument("--tiny", action="store_true", help="bench/train_step.py's tiny net (tests)")
    parser.add_argument("--resample-on-device", action="store_true", help="our step resamples canvases (its cost)")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    common.quiet_tensorflow()
    from vgg_jax import cpu_defaults

    cpu_defaults.apply()
    import torch

    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    quietness = common.Quietness().start()
    result = {"ours": ours(args), "torch": theirs(args)}
    result["load"] = quietness.stop()
    print(f"VGG-{args.variant} {args.image_size}px batch {args.batch}, float32, {args.steps} profiled steps")
    print(table(result))
    for name in ("ours", "torch"):
        print(f"{name}: most expensive ops (ms/step)")
        for entry in result[name]["top_ops"]:
            print("  " + "  ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in entry))
    print(common.load_line(result["load"]))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
