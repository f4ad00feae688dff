"""The benchmarks are code too: they run in tiny mode; the FLOP count; the CPU default flags keep the results."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import with_xla_flags

from vgg_jax.runtime import cpu_defaults

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
    # The tests' own XLA flags (fast compiles) and `xla_flags`, instead of this process's.
    env = with_xla_flags(dict(os.environ, JAX_PLATFORMS="cpu"), *([xla_flags] if xla_flags else []))
    command = [sys.executable, str(REPO / "bench" / "train_step.py"), "--tiny", f"--json={out}", *extra]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return json.loads(out.read_text()), run.stdout


@pytest.fixture(scope="module")
def tiny_with_defaults(tmp_path_factory):
    """The tiny benchmark as users get it: vgg_jax.runtime.cpu_defaults applied, PyTorch interleaved when installed."""
    return _run_tiny(tmp_path_factory.mktemp("bench"), "defaults", *(["--torch"] if HAS_TORCH else []))


@pytest.mark.slow  # a benchmark's own run
def test_train_step_tiny_runs_and_reports(tiny_with_defaults):
    result, stdout = tiny_with_defaults
    load = result["load"]  # issue 16: every measurement says how busy the machine was
    assert set(load) >= {"load_before", "load_after", "foreign_cores", "quiet"} and load["foreign_cores"] >= 0
    assert "other work during the run" in stdout
    assert result["images_per_s"] > 0 and result["compile_s"] > 0
    assert 0 < result["mfu"] and result["matmul_flops_per_s"] > 0
    assert result["xla_peak_bytes"] > 0
    assert all(flag in result["xla_flags"] for flag in cpu_defaults.CPU_XLA_FLAGS)
    assert "ours:" in stdout and "FLOPs/image" in stdout
    if HAS_TORCH:
        assert result["ratio_ours_over_torch"] > 0 and result["torch_images_per_s"] > 0
        assert "ours/PyTorch" in stdout


@pytest.mark.slow  # two benchmark runs; test_process checks which flags are applied, in the fast tier
def test_cpu_default_flags_do_not_change_results(tiny_with_defaults, tmp_path):
    defaults, _ = tiny_with_defaults
    xla_own, _ = _run_tiny(tmp_path, "xla_defaults", "--no-cpu-defaults", xla_flags="")
    assert not any(flag in xla_own["xla_flags"] for flag in cpu_defaults.CPU_XLA_FLAGS), xla_own["xla_flags"]
    # Three SGD steps of the same tiny net from the same seed: only the conv/dot kernels differ.
    assert xla_own["loss"] == pytest.approx(defaults["loss"], rel=1e-4, abs=1e-5)


@pytest.mark.skipif(not HAS_TORCH, reason="torch is an optional extra")
@pytest.mark.slow  # a benchmark's own run
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
    user = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution --xla_dump_to=/tmp/x"
    merged = cpu_defaults.merged_flags(user)
    assert merged == user  # the user's setting of the same flag wins, nothing is added beside it
    assert cpu_defaults.merged_flags("--xla_dump_to=/tmp/x") == "--xla_dump_to=/tmp/x " + " ".join(
        cpu_defaults.CPU_XLA_FLAGS
    )
    assert cpu_defaults.backend_will_be_cpu({"JAX_PLATFORMS": "cpu"})
    assert not cpu_defaults.backend_will_be_cpu({"JAX_PLATFORMS": "cuda,cpu"})
    assert not cpu_defaults.backend_will_be_cpu({"JAX_PLATFORMS": "tpu"})


def _load_bench(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quietness_counts_other_processes_and_not_our_own():
    import resource
    import time

    common = _load_bench("common")
    ticks = os.sysconf("SC_CLK_TCK")
    # Our own tree: a child's CPU time counts as ours once we waited for it (other tests may run beside us,
    # so the "foreign" figure itself is only checked where we add foreign work).
    before, children = common._tree_ticks(os.getpid()), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", "import time\nwhile time.process_time() < 1: pass"], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_seconds = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    assert (common._tree_ticks(os.getpid()) - before) / ticks >= child_seconds - 0.05 > 0.5
    # A busy loop in a process that is not our descendant (its shell parent exits at once, so init adopts it)
    # is foreign work. Not a child we kill: an unreaped child's CPU time is still in our tree.
    spin = "import time\nt = time.time()\nwhile time.time() - t < 4: pass"
    watched = common.Quietness().start()
    subprocess.run(["sh", "-c", f'"{sys.executable}" -c "{spin}" >/dev/null 2>&1 &'], check=True)
    time.sleep(3)
    seen = watched.stop()
    assert seen["foreign_cores"] > 0.4 and not seen["quiet"]
    assert "BUSY MACHINE" in common.load_line(seen)


def test_convergence_bench_reads_runs_and_finds_the_spike(tmp_path):
    convergence = _load_bench("convergence")
    run = tmp_path / "a_sklearn_digits_s0"
    run.mkdir()
    rows = [
        {"split": "train", "step": s, "loss": 0.5, "lr": 0.02, "grad_norm": 5.0, "update_ratio": 1e-2}
        for s in range(1, 9)
    ]
    rows[5] |= {"loss": 90.0, "grad_norm": 600.0, "update_ratio": 0.3, "update_ratio/conv1_1": 0.4}
    evals = [(2, 0.3, 0.02), (4, 0.10, 0.02), (6, 0.16, 0.002), (8, 0.15, 0.0002)]
    rows += [{"split": "test", "step": step, "top1_error": error, "lr": lr} for step, error, lr in evals]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = convergence.summarize(run, margin=0.02, collapse_margin=0.1, max_error=0.25)
    # Settled: 0.15 is within 0.02 of the best after the first drop (0.15); no collapse: within 0.1 of 0.10.
    assert summary == {"final": 0.15, "best": 0.1, "settled": 0.15, "converged": True, "curve": [0.3, 0.1, 0.16, 0.15]}
    assert not convergence.summarize(run, margin=0.02, collapse_margin=0.04, max_error=0.25)["converged"]  # collapse
    assert not convergence.summarize(run, margin=0.02, collapse_margin=0.1, max_error=0.1)["converged"]
    report = convergence.diagnose(run)
    assert "largest loss rise at step 6" in report and "| 6 | 90.000 | 0.02 | 600 |" in report
    line = convergence.command("e", "sample_photos", 3, run, layer_stats=True)
    assert line[1:] == [
        "-m",
        "vgg_jax.main",
        "--config=configs/e.py:demo,dataset=sample_photos",
        f"--workdir={run}",
        "--config.seed=3",
        "--config.log_every_steps=1",
        "--config.log_layer_stats=True",
    ]
    args = convergence.argparse.Namespace(margin=0.02, collapse_margin=0.1, max_error=0.25)
    table = convergence.table([dict(summary, net="a", dataset="sklearn_digits", seed=0)], args)
    assert "| a.py:demo | sklearn_digits | 1/1 | 0.150 | 0.150 | 0.100 | 0.150 |" in table


def test_layer_profile_times_each_part_of_each_conv():
    profile = _load_bench("layer_profile")
    shapes = profile.conv_shapes("A", 64)
    assert shapes[0] == ("conv1_1", 64, 3, 64) and shapes[-1] == ("conv5_2", 4, 512, 512) and len(shapes) == 8
    parts = profile.jax_parts(1, 8, 4, 8, formulations=True)
    values = {name: np.asarray(fn()) for name, fn in parts.items()}
    assert values["forward"].shape == (1, 8, 8, 8) and values["input grad"].shape == (1, 8, 8, 4)
    for formulation in ("weight grad, im2col dot", "weight grad, 9 dots"):  # the same gradient, other programs
        np.testing.assert_allclose(values[formulation], values["weight grad"], rtol=2e-4, atol=2e-4)
    if HAS_TORCH:
        theirs = profile.torch_parts(1, 8, 4, 8)
        assert tuple(theirs["weight grad"]()[1].shape) == (8, 4, 3, 3)


@pytest.mark.skipif(not HAS_TORCH, reason="torch is an optional extra")
@pytest.mark.slow  # a benchmark's own run
def test_dense_speed_runs_the_same_net_in_both_frameworks():
    command = [sys.executable, str(REPO / "bench" / "dense_speed.py"), "--variant=A", "--crop=64", "--height=96"]
    command += ["--width=128", "--batch=1", "--width-multiplier=0.125", "--fc-width=32", "--repeats=1"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    relative = float(run.stdout.split("class scores differ by ")[1].split()[0])
    assert relative < 1e-4  # the same weights give the same dense class scores: the comparison is fair
    assert "images/s" in run.stdout and "other work during the run" in run.stdout
