"""What a run says about itself: the devices on its start line, the warning for an idle NVIDIA GPU, and the
summary it ends with (final and best error with their steps, the checkpoints, the evaluate command)."""

import collections
import json
import logging

from vgg_jax.runtime import devices
from vgg_jax.training import reporting

Device = collections.namedtuple("Device", "platform device_kind")


def test_start_line_names_platform_and_kind():
    assert devices.describe([Device("cpu", "cpu")]) == "1 × cpu (cpu)"
    gpus = [Device("gpu", "NVIDIA H100 80GB HBM3")] * 8
    assert devices.describe(gpus) == "8 × gpu (NVIDIA H100 80GB HBM3)"
    assert (
        devices.describe([Device("tpu", "TPU v4")] * 4 + [Device("cpu", "cpu")]) == "4 × tpu (TPU v4) + 1 × cpu (cpu)"
    )


def test_warns_when_an_nvidia_gpu_sits_idle(monkeypatch, caplog):
    monkeypatch.setattr(devices.os.path, "exists", lambda path: path == "/dev/nvidia0")
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING):
        assert devices.warn_if_gpu_unused("cpu", environ={})
    expected = "an NVIDIA GPU is present (/dev/nvidia0) but JAX runs on the CPU: install JAX for CUDA"
    assert f'{expected} (`pip install -U "jax[cuda13]"`)' in caplog.text
    assert not devices.warn_if_gpu_unused("gpu", environ={})  # JAX uses it
    assert not devices.warn_if_gpu_unused("cpu", environ={"JAX_PLATFORMS": "cpu"})  # the CPU on purpose
    assert not devices.warn_if_gpu_unused("cpu", environ={"CUDA_VISIBLE_DEVICES": ""})
    monkeypatch.setattr(devices.os.path, "exists", lambda path: False)
    monkeypatch.setattr(devices.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    assert devices.nvidia_gpu_evidence({}) == "nvidia-smi"
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    assert not devices.warn_if_gpu_unused("cpu", environ={})  # no GPU: nothing to say


def test_summary_reads_every_evaluation(tmp_path):
    rows = [
        {"step": 10, "split": "train", "loss": 2.0, "top1_error": 0.9, "top5_error": 0.5},
        {"step": 10, "split": "test", "top1_error": 0.30, "top5_error": 0.10},
        {"step": 20, "split": "test", "top1_error": 0.20, "top5_error": 0.05},
        {"step": 30, "split": "test", "top1_error": 0.20, "top5_error": 0.04},  # a tie: the later step is kept
        {"step": 40, "split": "test", "top1_error": 0.25, "top5_error": 0.06},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    lines = reporting.summary_lines(str(tmp_path), "test")
    assert lines[0] == (
        "summary: test top-1 err 0.2500 (top-5 0.0600) at the final step 40; best 0.2000 (top-5 0.0400) at step 30"
    )
    assert (
        lines[1]
        == f"summary: checkpoints in {tmp_path / 'checkpoints'} (steps 40, the final, and 30, the best, among them)"
    )
    assert lines[2].startswith(f"summary: next, `python -m vgg_jax evaluate --checkpoint={tmp_path}` evaluates")
    assert reporting.summary_lines(str(tmp_path / "nothing"), "test")[0].startswith("summary: checkpoints in")
    rows.append({"step": 50, "split": "test", "top1_error": 0.1, "top5_error": 0.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert reporting.summary_lines(str(tmp_path), "test")[1].endswith("(step 50, the final and best)")
