"""Does fine-tuning from a trained run beat training from scratch on the same small folder of photos? (issue 22)

    python bench/finetune.py                       # the source run once, then 3 seeds of each arm
    python bench/finetune.py --seeds=0 --arms=fine-tune,scratch --root=/tmp/vgg_finetune --reuse

The source is the shipped photo demo, ``configs/e.py:demo,dataset=sample_photos`` (10 classes of patches of
ten photographs, 930 steps). The target is a folder a user might have: crops of 8 *other* photographs that
scikit-image ships (`embedded_photos.write_folder`: JPEG and PNG, 32–96 px, some grey), 15 to train on and 10
to test per class. Each arm is the user's own command on that folder, the same batch (32) and steps (40
epochs, 120 steps):

* fine-tune: ``configs/finetune.py:demo`` from the source run (fc8 re-initialised for 8 classes, conv1–3
  frozen, conv4–fc7 at a tenth of the rate);
* scratch: ``configs/e.py:demo`` — the demo's own recipe, tuned for training from random init;
* both for 4× the epochs (480 steps), and the fine-tune with every layer at the full rate (the paper's
  warm start: nothing frozen, no per-layer rates).

Accuracy, not speed: the numbers do not depend on how busy the machine is. The final test top-1 error of
each run is printed, and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
TARGET = ("hubble_deep_field", "immunohistochemistry", "retina", "coins", "moon", "page", "text", "cell")
PER_CLASS = {"train": 15, "test": 10}
SCRATCH = ("--config.global_batch_size=32", "--config.eval_batch_size=40")
# 4× the epochs, each recipe's rate drops moved with them.
LONGER = {
    "fine-tune": ("--config.num_epochs=160", "--config.step_boundaries_epochs=(120.0,)"),
    "scratch": ("--config.num_epochs=160", "--config.step_boundaries_epochs=(120.0,144.0)"),
}
EVERY_LAYER = ("--config.finetune.freeze_through=", "--config.finetune.body_lr_multiplier=1.0")


def arms(folder: pathlib.Path, source: pathlib.Path) -> dict[str, list[str]]:
    """{arm: the command-line arguments of its run} (the workdir and seed are added per run)."""
    data = f"folder:{folder}"
    finetune = [
        "--config=configs/finetune.py:demo",
        f"--config.dataset={data}",
        f"--config.warm_start.checkpoint={source}",
    ]
    scratch = [f"--config=configs/e.py:demo,dataset={data}", *SCRATCH]
    return {
        "fine-tune": finetune,
        "scratch": scratch,
        "fine-tune x4": [*finetune, *LONGER["fine-tune"]],
        "scratch x4": [*scratch, *LONGER["scratch"]],
        "fine-tune x4, every layer at the rate": [*finetune, *LONGER["fine-tune"], *EVERY_LAYER],
    }


def train(arguments: list[str], workdir: pathlib.Path, reuse: bool) -> dict[str, Any]:
    """Runs `python -m vgg_jax.main ARGUMENTS --workdir=WORKDIR` (unless `reuse` finds it finished)."""
    record = workdir / "bench_result.json"
    if reuse and record.exists():
        return json.loads(record.read_text())
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    start = time.perf_counter()
    with open(workdir.parent / f"{workdir.name}.log", "w") as log:
        command = [sys.executable, "-m", "vgg_jax.main", *arguments, f"--workdir={workdir}"]
        process = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    result = final_error(workdir) | {"seconds": time.perf_counter() - start, "rc": process.returncode}
    record.write_text(json.dumps(result))
    return result


def final_error(workdir: pathlib.Path) -> dict[str, Any]:
    """The last evaluation's test top-1 error and step, and the curve of all of them."""
    from vgg_jax.checkpointing import jsonl

    rows = jsonl.read(workdir / "metrics.jsonl")
    evaluations = [row for row in rows if row.get("split") not in (None, "train")]
    if not evaluations:
        return {"final": float("nan"), "step": 0, "curve": []}
    curve = [round(row["top1_error"], 4) for row in evaluations]
    return {"final": curve[-1], "step": evaluations[-1]["step"], "curve": curve}


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| arm | steps | final test top-1 error per seed | mean |", "|---|---|---|---|"]
    for arm, runs in results.items():
        finals = " / ".join(f"{100 * run['final']:.1f} %" for run in runs)
        mean = 100 * sum(run["final"] for run in runs) / len(runs)
        lines.append(f"| {arm} | {runs[0]['step']} | {finals} | {mean:.1f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/vgg_finetune", help="the folder, the source and every run")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arms", default="", help="comma-separated arm names (default: every arm)")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs of --root (bench_result.json)")
    args = parser.parse_args(argv)
    root = pathlib.Path(args.root)
    folder, source = root / "folder", root / "source"
    chosen = arms(folder, source)
    unknown = [arm for arm in args.arms.split(",") if arm and arm not in chosen]
    if unknown:  # before any work
        parser.error(f"--arms: {unknown} not among {list(chosen)}")
    sys.path.insert(0, str(REPO))
    from vgg_jax.data import embedded_photos

    if not folder.exists():
        embedded_photos.write_folder(str(folder), TARGET, PER_CLASS, max_side=96)
    started = time.time()
    print(f"load average {os.getloadavg()[0]:.2f}; the source run (photo demo) first", flush=True)
    made = train(["--config=configs/e.py:demo,dataset=sample_photos"], source, args.reuse)
    print(f"  source: sample_photos test top-1 error {100 * made['final']:.1f} % at step {made['step']}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {}
    for arm, arguments in chosen.items():
        if args.arms and arm not in args.arms.split(","):
            continue
        for seed in (int(s) for s in args.seeds.split(",")):
            workdir = root / f"{arm.replace(', ', '_').replace(' ', '_')}_s{seed}"
            run = train([*arguments, f"--config.seed={seed}"], workdir, args.reuse)
            results.setdefault(arm, []).append(run)
            print(f"  {arm} seed {seed}: final {100 * run['final']:.1f} % (rc {run['rc']}) {run['curve']}", flush=True)
    print(table(results))
    print(f"{time.time() - started:.0f} s in all; load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
