"""bench/gpu.sh runs on a bare GPU box (no TensorFlow, TFDS, ml_collections, clu); bench/step_profile.py sorts
a step's ops by kind of work (paper §3.1's step)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import step_profile  # noqa: E402

# Imports of these raise in the child, as on a GPU image that does not have them.
BLOCKER = """
import importlib.abc, runpy, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'tensorflow', 'tensorflow_datasets', 'ml_collections', 'clu'}:
            raise ImportError(f'{name} is not on a bare GPU box')
sys.meta_path.insert(0, Absent())
sys.argv = ['bench/train_step.py', *sys.argv[1:]]
runpy.run_path('bench/train_step.py', run_name='__main__')
"""


@pytest.mark.slow  # a whole benchmark in a blocked-import interpreter; the bare import path is tested fast
def test_train_step_bench_runs_without_tensorflow_or_ml_collections(tmp_path):
    """gpu.sh's import path: the recipe, the step (with device resampling), the synthetic batch — and nothing
    of TensorFlow, TFDS, ml_collections or clu (importing them fails here, and --bare checks sys.modules)."""
    out = tmp_path / "bare.json"
    command = [sys.executable, "-c", BLOCKER, "--tiny", "--bare", "--resample-on-device", f"--json={out}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config"]["resample_on_device"] is True
    assert result["images_per_s"] > 0 and 2.0 < result["loss"] < 2.6  # ln 10 = 2.30 for a fresh 10-class net
    assert 0 < result["mfu"] < 1 and result["matmul_flops_per_s"] > 0


# What a common GPU image holds, no more: no TensorFlow, TFDS, ml_collections or clu (torch: the CPU build here).
BARE_PACKAGES = ("jax", "flax", "optax", "orbax-checkpoint", "absl-py", "numpy", "torch==2.13.0")


def _bare_python(root: pathlib.Path) -> str:
    """VGG_BARE_GPU_PYTHON, else the Python of a new venv holding exactly `BARE_PACKAGES` (from the registry)."""
    if os.environ.get("VGG_BARE_GPU_PYTHON"):
        return os.environ["VGG_BARE_GPU_PYTHON"]
    subprocess.run([sys.executable, "-m", "venv", str(root / "bare")], check=True)
    python = str(root / "bare" / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", *BARE_PACKAGES], capture_output=True, text=True, timeout=1800
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return python


@pytest.mark.slow  # ~2-8 min: a venv of the bare set, six processes each compiling a net and loading torch
def test_gpu_sh_dry_run_in_the_bare_package_set(tmp_path):
    """`bash bench/gpu.sh --dry-run` with the Python of a venv holding only jax, flax, optax, orbax-checkpoint,
    torch, absl-py and numpy: every run of the sequence writes its JSON, PyTorch's included."""
    python = _bare_python(tmp_path)
    absent = subprocess.run([python, "-c", "import tensorflow"], capture_output=True)
    assert absent.returncode != 0, "the bare set must not hold TensorFlow"
    env = dict(os.environ, PYTHON=python, OUT=str(tmp_path / "out"))
    run = subprocess.run(
        ["bash", "bench/gpu.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=1200, env=env
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    names = {path.stem for path in (tmp_path / "out").glob("*.json")}
    expected = {"vgg_D_b256", "vgg_E_b256", "vgg_D_b128", "vgg_E_b128", "vgg_D_b256_resample", "vgg_D_b256_remat"}
    assert names == expected | {"matmul"}
    first = json.loads((tmp_path / "out" / "vgg_D_b256.json").read_text())
    assert first["ratio_ours_over_torch"] > 0 and first["torch_images_per_s"] > 0 and 0 < first["mfu"] < 1


HLO = """HloModule jit_train_step, is_scheduled=true

%fused_computation.1 (param_0: f32[8,4,4,2]) -> f32[8,4,4,2] {
  %param_0 = f32[8,4,4,2]{3,2,1,0} parameter(0)
  ROOT %transpose.1 = f32[2,8,4,4]{3,2,1,0} transpose(%param_0), dimensions={3,0,1,2}
}

ENTRY %main (state_params__fc6____kernel__.1: f32[4,4], x: f32[8,4,4,2]) -> f32[4,4] {
  %state_params__fc6____kernel__.1 = f32[4,4]{1,0} parameter(0)
  %x = f32[8,4,4,2]{3,2,1,0} parameter(1)
  %copy.7 = f32[4,4]{1,0} copy(%state_params__fc6____kernel__.1)
  %transpose_copy_fusion = f32[2,8,4,4]{3,2,1,0} fusion(%x), kind=kLoop, calls=%fused_computation.1
  %convolution.3 = f32[2,2,3,3]{3,2,1,0} convolution(%transpose_copy_fusion, %x), metadata={op_name="conv"}
  %dot.2 = f32[4,4]{1,0} dot(%copy.7, %copy.7), metadata={op_name="jit(train_step)/jvp(VGG)/fc6/dot_general"}
  %multiply.4 = f32[4,4]{1,0} multiply(%dot.2, %copy.7), metadata={op_name="jit(train_step)/optimizer/mul"}
  ROOT %add.5 = f32[4,4]{1,0} add(%multiply.4, %copy.7), metadata={op_name="jit(train_step)/statistics/add"}
}
"""


def test_step_profile_sorts_compiled_ops_by_kind_of_work():
    ops = step_profile.hlo_ops(HLO)
    kinds = {
        name: step_profile.classify_xla(name, ops) for name in ("copy.7", "transpose_copy_fusion", "convolution.3")
    }
    assert kinds == {
        "copy.7": "parameter copies (XLA copy insertion)",
        "transpose_copy_fusion": "transposes for the convolutions",
        "convolution.3": "convolutions",
    }
    assert step_profile.classify_xla("dot.2", ops) == "fc matmuls"
    assert step_profile.classify_xla("multiply.4", ops) == "optimizer update"
    assert step_profile.classify_xla("add.5", ops) == "update statistics"
    assert set(kinds.values()) <= set(step_profile.KINDS)


def test_step_profile_sorts_torch_ops_by_kind_of_work():
    assert step_profile.classify_torch("aten::convolution_backward", "backward") == "convolutions"
    assert step_profile.classify_torch("aten::add", "preprocess") == "colour shift + mean + cast"
    assert step_profile.classify_torch("aten::add_", "optimizer") == "optimizer update"
    assert step_profile.classify_torch("aten::mm", "backward") == "fc matmuls"
    assert step_profile.classify_torch("aten::threshold_backward", "backward") == "ReLU (+grad)"
    assert step_profile.classify_torch("aten::max_pool2d_with_indices", "forward") == "max-pool (+grad)"
    assert step_profile.classify_torch("aten::native_dropout", "forward") == "dropout (mask + RNG)"
