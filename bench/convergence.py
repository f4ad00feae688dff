"""Does every demo recipe converge for every seed, on the digits and on photos nobody tuned it for? (issue 17)

    python bench/convergence.py                                    # a.py:demo, e.py:demo × 2 data sets × 5 seeds
    python bench/convergence.py --configs=e --datasets=sample_photos --seeds=0,1
    python bench/convergence.py --diagnose=/tmp/vgg_convergence/a_sklearn_digits_s0   # a finished run's spike

Each run is the user's own command, ``python -m vgg_jax.main --config=configs/<net>.py:demo[,dataset=…]
--workdir=… --config.seed=N``, in a fresh process, one at a time on every core (two e.py:demo runs pinned to a
core each trained 1.3× slower in all); its metrics.jsonl gives the test top-1 error of every evaluation. A run
*converged* when it finished, its final error is within ``--margin`` of its best evaluation after the first
rate drop (it settled) and within ``--collapse-margin`` of its best of all (no unrecovered collapse), and at
most ``--max-error`` (`summarize`). ``--layer-stats`` also records per-layer gradient norms and
update/parameter ratios at every step (config.log_layer_stats, log_every_steps=1), which ``--diagnose`` reads
back around the worst jump of the training loss.
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
DATASETS = ("sklearn_digits", "sample_photos")


def command(net: str, dataset: str, seed: int, workdir: pathlib.Path, layer_stats: bool) -> list[str]:
    arg = "demo" if dataset == "sklearn_digits" else f"demo,dataset={dataset}"
    line = [sys.executable, "-m", "vgg_jax.main", f"--config=configs/{net}.py:{arg}", f"--workdir={workdir}"]
    line.append(f"--config.seed={seed}")
    if layer_stats:
        line += ["--config.log_every_steps=1", "--config.log_layer_stats=True"]
    return line


def read_rows(workdir: pathlib.Path) -> list[dict[str, Any]]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def summarize(workdir: pathlib.Path, margin: float, collapse_margin: float, max_error: float) -> dict[str, Any]:
    """The run's test top-1 errors and whether it converged.

    Converged: the final error is within `margin` of the best evaluation after the first rate drop (the run
    settled), within `collapse_margin` of the best evaluation of the whole run (no collapse it did not
    recover from), and at most `max_error`. Before the first drop the error of a net still moving at the
    full rate is noisy, and the best of many noisy evaluations is an optimistic target.
    """
    evals = [row for row in read_rows(workdir) if row.get("split") not in (None, "train")]
    if not evals:
        return {"final": float("nan"), "best": float("nan"), "settled": float("nan"), "converged": False, "curve": []}
    curve = [round(row["top1_error"], 4) for row in evals]
    after_drop = [round(row["top1_error"], 4) for row in evals if row.get("lr", 0.0) < 0.5 * evals[0].get("lr", 0.0)]
    final, best, settled = curve[-1], min(curve), min(after_drop or curve[-3:])
    converged = final - settled <= margin and final - best <= collapse_margin and final <= max_error
    return {"final": final, "best": best, "settled": settled, "converged": converged, "curve": curve}


def run_one(job: tuple[str, str, int], args: argparse.Namespace) -> dict[str, Any]:
    net, dataset, seed = job
    workdir = pathlib.Path(args.root) / f"{net}_{dataset}_s{seed}"
    record = workdir / "bench_result.json"
    if args.reuse and record.exists():  # a finished run of the same command: read again, not rerun
        return report(workdir, json.loads(record.read_text()), args, "reused")
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, not a resumed one
    workdir.mkdir(parents=True)
    start = time.perf_counter()
    with open(workdir.parent / f"{workdir.name}.log", "w") as log:
        process = subprocess.run(
            command(net, dataset, seed, workdir, args.layer_stats),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    run = dict(net=net, dataset=dataset, seed=seed, seconds=time.perf_counter() - start, rc=process.returncode)
    record.write_text(json.dumps(run))
    return report(workdir, run, args)


def report(workdir: pathlib.Path, run: dict[str, Any], args: argparse.Namespace, how: str = "") -> dict[str, Any]:
    """The run's summary (`summarize`), printed as one line."""
    run = {key: run[key] for key in ("net", "dataset", "seed", "seconds", "rc")}
    result = summarize(workdir, args.margin, args.collapse_margin, args.max_error) | run
    result["converged"] &= run["rc"] == 0  # a run that stopped (non-finite loss) did not converge
    took = how or f"{run['seconds']:.0f} s"
    print(
        f"  {run['net']}.py:demo {run['dataset']} seed {run['seed']}: final {result['final']:.3f} "
        f"best {result['best']:.3f} after the first drop {result['settled']:.3f} "
        f"{'converged' if result['converged'] else 'NOT converged'} ({took}) {result['curve']}",
        flush=True,
    )
    return result


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"converged = finished, final test top-1 error within {args.margin:.2f} of the best after the first rate "
        f"drop, within {args.collapse_margin:.2f} of the run's best, and ≤ {args.max_error:.2f}",
        "| config | data set | converged | final top-1 error per seed | best after the first drop | best of the run "
        "| mean final |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault((result["net"], result["dataset"]), []).append(result)
    for (net, dataset), rows in groups.items():
        rows.sort(key=lambda r: r["seed"])
        finals = " / ".join(f"{r['final']:.3f}" for r in rows)
        bests = " / ".join(f"{r['best']:.3f}" for r in rows)
        settled = " / ".join(f"{r['settled']:.3f}" for r in rows)
        mean = sum(r["final"] for r in rows) / len(rows)
        done = sum(r["converged"] for r in rows)
        lines.append(
            f"| {net}.py:demo | {dataset} | {done}/{len(rows)} | {finals} | {settled} | {bests} | {mean:.3f} |"
        )
    return "\n".join(lines)


def diagnose(workdir: pathlib.Path, context: int = 3) -> str:
    """The steps around the largest rise of the training loss, with what the step did to each layer."""
    rows = [row for row in read_rows(workdir) if row.get("split") == "train"]
    if len(rows) < 2:
        return f"{workdir}: no per-step train rows (run with --layer-stats)"
    jumps = [(rows[i]["loss"] - rows[i - 1]["loss"], i) for i in range(1, len(rows))]
    _, at = max(jumps)
    layers = sorted(k.split("/", 1)[1] for k in rows[at] if k.startswith("update_ratio/"))
    out = [f"{workdir}: largest loss rise at step {rows[at]['step']}"]
    out.append("| step | loss | lr | grad norm | update/param | largest layer update/param |")
    out.append("|---|---|---|---|---|---|")
    for row in rows[max(0, at - context) : at + context + 1]:
        ratios = sorted(((row.get(f"update_ratio/{n}", 0.0), n) for n in layers), reverse=True)[:3]
        top = ", ".join(f"{n} {r:.2e}" for r, n in ratios)
        out.append(
            f"| {row['step']} | {row['loss']:.3f} | {row['lr']:.3g} | {row.get('grad_norm', float('nan')):.3g} | "
            f"{row.get('update_ratio', float('nan')):.2e} | {top} |"
        )
    typical = rows[max(0, at - 50) : max(1, at - context)]
    if typical and layers:
        out.append("median over the 50 steps before, per layer (grad norm, update/param):")
        for name in layers:
            norms = sorted(r.get(f"grad_norm/{name}", 0.0) for r in typical)
            ratios = sorted(r.get(f"update_ratio/{name}", 0.0) for r in typical)
            spike = rows[at]
            out.append(
                f"  {name}: {norms[len(norms) // 2]:.3g}, {ratios[len(ratios) // 2]:.2e}  → at the spike "
                f"{spike.get(f'grad_norm/{name}', 0.0):.3g}, {spike.get(f'update_ratio/{name}', 0.0):.2e}"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="a,e", help="demo configs (configs/<name>.py:demo), comma-separated")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--root", default="/tmp/vgg_convergence", help="run directories (replaced)")
    parser.add_argument("--margin", type=float, default=0.02, help="final vs best after the first rate drop")
    parser.add_argument("--collapse-margin", type=float, default=0.10, help="final vs best of the whole run")
    parser.add_argument("--max-error", type=float, default=0.4, help="learned something: chance is 0.9")
    parser.add_argument("--layer-stats", action="store_true", help="per-step, per-layer statistics (slower)")
    parser.add_argument("--reuse", action="store_true", help="keep runs of --root that finished (bench_result.json)")
    parser.add_argument("--diagnose", default="", help="only analyse this finished run directory")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.diagnose:
        print(diagnose(pathlib.Path(args.diagnose)))
        return
    jobs = [
        (net, dataset, int(seed))
        for net in args.configs.split(",")
        for dataset in args.datasets.split(",")
        for seed in args.seeds.split(",")
    ]
    started = time.time()
    print(f"{len(jobs)} runs, one at a time; load average {os.getloadavg()[0]:.2f}", flush=True)
    results = [run_one(job, args) for job in jobs]
    print(table(results, args))
    print(f"{time.time() - started:.0f} s in all; load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
