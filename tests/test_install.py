"""A non-editable install works from any directory: train the demo's first steps and convert weights.

The package is built into a wheel from a copy of this checkout and installed
(without dependencies, offline) into a fresh virtual environment that sees the
dependencies of the environment running the tests (a venv or the system
Python); every command then runs from an unrelated directory with relative
paths, where no `configs/` folder exists.
"""

import json
import os
import pathlib
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
from conftest import copy_checkout

h5py = pytest.importorskip("h5py")

KERAS_VGG16_CONVS = (2, 2, 3, 3, 3)


def _write_keras_vgg16(path: pathlib.Path, *, width: int = 4, fc_width: int = 16, classes: int = 10, crop: int = 64):
    """A narrow VGG16 in the layout of the published Keras file (layer groups at the root, 'layer_names')."""
    rng = np.random.default_rng(0)
    layers, channels = [], 3
    for block, convs in enumerate(KERAS_VGG16_CONVS, start=1):
        out = width * 2 ** min(block - 1, 3)
        for index in range(1, convs + 1):
            layers.append((f"block{block}_conv{index}", (3, 3, channels, out)))
            channels = out
    flat = (crop // 32) ** 2 * channels
    layers += [("fc1", (flat, fc_width)), ("fc2", (fc_width, fc_width)), ("predictions", (fc_width, classes))]
    with h5py.File(path, "w") as f:
        for name, shape in layers:
            group = f.create_group(name)
            kernel = (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))).astype(np.float32)
            group.create_dataset(f"{name}_W_1:0", data=kernel)
            group.create_dataset(f"{name}_b_1:0", data=np.full(shape[-1], 0.01, np.float32))
            group.attrs["weight_names"] = [f"{name}_W_1:0".encode(), f"{name}_b_1:0".encode()]
        f.attrs["layer_names"] = [name.encode() for name, _ in layers]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv holding a non-editable vgg_jax, an unrelated working directory)."""
    root = tmp_path_factory.mktemp("install")
    source = copy_checkout(root / "source")
    wheels = root / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The dependencies are those of the environment running the tests (a reader's venv or the system Python):
    # `--system-site-packages` would see the base interpreter's packages instead, without flax in a venv.
    # A .pth file lists this environment's site directories after the new venv's own, so the wheel
    # installed there is the vgg_jax imported (an editable install's finder is not loaded from a plain path).
    site_dirs = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    new_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (pathlib.Path(new_site) / "outer_environment.pth").write_text("\n".join(site_dirs) + "\n")
    wheel = next(wheels.glob("vgg_jax-*.whl"))
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        capture_output=True,
    )
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return python, elsewhere


def _run(python, cwd, *args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [str(python), *args],
        cwd=cwd,
        env=dict(env, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_installed_package_is_the_one_imported(installed):
    python, elsewhere = installed
    result = _run(python, elsewhere, "-c", "import vgg_jax, vgg_jax.configs; print(vgg_jax.__file__)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "site-packages" in result.stdout and str(python.parents[1]) in result.stdout


def test_installed_package_trains_two_demo_steps_from_another_directory(installed):
    python, elsewhere = installed
    assert not (elsewhere / "configs").exists()
    narrow = ["--config.model.width_multiplier=0.0625", "--config.model.fc_width=16", "--config.global_batch_size=8"]
    # Net A's demo at test_main's widths: the shortest compile, shared through the compilation cache.
    args = ["--config=configs/a.py:demo", "--config.num_train_steps=2", "--config.eval_every_steps=2", *narrow]
    result = _run(python, elsewhere, "-m", "vgg_jax.main", *args, "--workdir=runs/two_steps")
    assert result.returncode == 0, result.stderr[-3000:]
    workdir = elsewhere / "runs" / "two_steps"
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["split"] == "test"] == [2]
    assert json.loads((workdir / "config.json").read_text())["model"]["variant"] == "A"
    assert (workdir / "checkpoints" / "2").is_dir()


# Two more fresh interpreters of the install; the fast tier imports and trains from it (above)
@pytest.mark.slow
def test_installed_package_converts_and_loads_with_relative_paths(installed):
    python, elsewhere = installed
    _write_keras_vgg16(elsewhere / "vgg16_narrow.h5")
    args = ["--source=keras", "--weights=vgg16_narrow.h5", "--variant=D", "--out=weights/vgg16"]
    result = _run(python, elsewhere, "-m", "vgg_jax.weights.convert", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    load = (
        "import numpy as np, vgg_jax\n"
        "clf = vgg_jax.load('weights/vgg16')\n"
        "print(clf.num_classes, clf.crop_size, clf.predict(np.zeros((1, 64, 64, 3), np.uint8), top_k=3).class_ids)\n"
    )
    loaded = _run(python, elsewhere, "-c", load)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    classes, crop, *_ = loaded.stdout.split()
    assert (int(classes), int(crop)) == (10, 64)
