"""Paper §3.1 training, observed: one log line per log step and per evaluation, TensorBoard, metrics.jsonl.

metrics.jsonl holds one JSON object per line: `split: "train"` rows (means over
the log interval: step, epoch, loss, top1_error, top5_error, lr,
images_per_second, grad_norm, update_ratio, and per layer with config.log_layer_stats)
and evaluation rows (`split`: the eval split; loss, top-1/5
error, lr, num_examples and, when records could not be decoded, skipped), so a
notebook plots both curves from one file. Only process 0 writes.
"""

from __future__ import annotations

import logging

import jax
import ml_collections
import numpy as np
from clu import metric_writers
from etils import epath

from vgg_jax import console, jsonl, progress


class Reporter:
    """Writes what the loop measured: log lines on every process, files on process 0 only."""

    def __init__(
        self, config: ml_collections.ConfigDict, workdir: str, total_steps: int, start_step: int, steps_per_epoch: int
    ) -> None:
        self.config, self.workdir, self.total_steps = config, workdir, total_steps
        self.steps_per_epoch = steps_per_epoch
        self.is_chief = jax.process_index() == 0
        # TensorBoard only: clu's default writer also logs every scalar, a second line per step.
        self.writer = metric_writers.SummaryWriter(workdir) if self.is_chief else metric_writers.MultiWriter([])
        if start_step == 0 and self.is_chief:
            self.writer.write_hparams(console.flatten(config.to_dict()))
        self.progress = progress.Progress(total_steps, done=start_step)

    def restart(self, step: int) -> None:
        """The loop went back to `step` (spike-guard rollback): rates are measured from there."""
        self.progress = progress.Progress(self.total_steps, done=step)

    def train(self, step: int, interval: list[dict[str, float]]) -> None:
        means = {name: float(np.mean([m[name] for m in interval])) for name in interval[-1]}
        steps_per_second, eta = self.progress.measure(step)
        images_per_second = steps_per_second * self.config.global_batch_size
        logging.info(
            "step %d/%d  epoch %.2f  loss %.4f  top-1 err %.3f  top-5 err %.3f  lr %.2g  %.1f img/s  ETA %s",
            step,
            self.total_steps,
            step / self.steps_per_epoch,
            means["loss"],
            means["top1_error"],
            means["top5_error"],
            means["learning_rate"],
            images_per_second,
            progress.format_eta(eta),
        )
        self.writer.write_scalars(
            step, {f"train/{k}": v for k, v in means.items()} | {"images_per_second": images_per_second}
        )
        row = {k: means[k] for k in ("loss", "top1_error", "top5_error")}
        row |= {k: v for k, v in means.items() if k.startswith(("grad_norm", "update_ratio"))}
        self._append(step, "train", row | {"lr": means["learning_rate"], "images_per_second": images_per_second})

    def eval(self, step: int, metrics: dict[str, float], learning_rate: float) -> None:
        split = self.config.eval_split
        skipped = int(metrics.get("skipped", 0))
        logging.info(
            "eval %s at step %d: loss %.4f  top-1 err %.4f  top-5 err %.4f%s",
            split,
            step,
            metrics["loss"],
            metrics["top1_error"],
            metrics["top5_error"],
            f"  ({skipped} undecodable record(s) skipped: errors are over {int(metrics['num_examples'])})"
            if skipped
            else "",
        )
        row = {k: metrics[k] for k in ("loss", "top1_error", "top5_error")}
        self.writer.write_scalars(step, {f"eval/{k}": v for k, v in row.items()})
        counts = {
            k: int(metrics[k]) for k in ("num_examples", "skipped") if k in metrics and (k != "skipped" or skipped)
        }
        self._append(step, split, row | {"lr": learning_rate} | counts)

    def _append(self, step: int, split: str, values: dict[str, float]) -> None:
        if self.is_chief:
            record = {"step": step, "epoch": step / self.steps_per_epoch, "split": split, **values}
            jsonl.append(epath.Path(self.workdir) / "metrics.jsonl", record)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
