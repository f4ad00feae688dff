"""The benchmarks are code too: they run in tiny mode; the FLOP count; the CPU default flags keep the results."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from vgg_jax import cpu_defaults

REPO = pathlib.Path(__file__).resolve().parents[1]

HAS_TORCH = importlib.util.find_spec("torch") is not None
pytestmark = pytest.mark.xdist_group("bench")


def _load_train_step():
    spec = importlib.util.spec_from_file_location("bench_train_step", REPO / "bench" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_tiny(tmp_path, name, *extra, xla_flags=None):
    """bench/train_step.py --tiny in a fresh process; its JSON result."""
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    command = [sys.executable, str(REPO / "bench" / "train_step.py"), "--tiny", f"--json={out}", *extra]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return json.loads(out.read_text()), run.stdout


@pytest.fixture(scope="module")
def tiny_with_defaults(tmp_path_factory):
    """The tiny benchmark as users get it: vgg_jax.cpu_defaults applied, PyTorch interleaved when installed."""
    return _run_tiny(tmp_path_factory.mktemp("bench"), "defaults", *(["--torch"] if HAS_TORCH else []))


def test_train_step_tiny_runs_and_reports(tiny_with_defaults):
    result, stdout = tiny_with_defaults
    assert result["images_per_s"] > 0 and result["compile_s"] > 0
    assert 0 < result["mfu"] and result["matmul_flops_per_s"] > 0
    assert result["xla_peak_bytes"] > 0
    assert all(flag in result["xla_flags"] for flag in cpu_defaults.CPU_XLA_FLAGS)
    assert "ours:" in stdout and "FLOPs/image" in stdout
    if HAS_TORCH:
        assert result["ratio_ours_over_torch"] > 0 and result["torch_images_per_s"] > 0
        assert "ours/PyTorch" in stdout


def test_cpu_default_flags_do_not_change_results(tiny_with_defaults, tmp_path):
    defaults, _ = tiny_with_defaults
    xla_own, _ = _run_tiny(tmp_path, "xla_defaults", "--no-cpu-defaults", xla_flags="")
    assert xla_own["xla_flags"] == ""
    # Three SGD steps of the same tiny net from the same seed: only the conv/dot kernels differ.
    assert xla_own["loss"] == pytest.approx(defaults["loss"], rel=1e-4, abs=1e-5)


@pytest.mark.skipif(not HAS_TORCH, reason="torch is an optional extra")
def test_torch_reference_standalone_tiny():
    command = [
        sys.executable,
        str(REPO / "bench" / "torch_reference.py"),
        "--variant=A",
        "--batch=2",
        "--image-size=32",
        "--width-multiplier=0.0625",
        "--fc-width=32",
        "--classes=10",
        "--warmup=1",
        "--repeats=1",
        "--steps=1",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "images/s" in run.stdout


def test_vgg16_flops_match_the_analytic_count():
    """XLA's cost analysis of the VGG-16 train step at 224² (lowered on abstract shapes, nothing runs)."""
    train_step = _load_train_step()
    args = train_step.parse_args(["--variant=D", "--image-size=224", "--batch=2"])
    result = train_step.flop_check(args, compile_step=False)
    assert result["forward_gmacs_per_image"] == pytest.approx(15.47, abs=0.005)  # paper §2
    assert result["analytic_flops_per_image"] == pytest.approx(92.8e9, rel=0.005)  # ≈ 3 × forward
    assert result["xla_over_analytic"] == pytest.approx(1.0, abs=0.02)


def test_cpu_defaults_respect_user_flags_and_accelerators():
    user = "--xla_cpu_use_onednn=false --xla_dump_to=/tmp/x"
    merged = cpu_defaults.merged_flags(user)
    assert merged.startswith(user) and "--xla_cpu_use_onednn=true" not in merged
    assert all(flag.split("=")[0] in merged for flag in cpu_defaults.CPU_XLA_FLAGS)
    assert cpu_defaults.backend_will_be_cpu({"JAX_PLATFORMS": "cpu"})
    assert not cpu_defaults.backend_will_be_cpu({"JAX_PLATFORMS": "cuda,cpu"})
    assert not cpu_defaults.backend_will_be_cpu({"JAX_PLATFORMS": "tpu"})
