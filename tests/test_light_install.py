"""`pip install vgg_jax` without the train extra: perceptual losses and published weights with no TensorFlow.

A fresh virtual environment holds the wheel built from this checkout and exactly the files of the
distributions `pip install vgg_jax` would install: the closure of the wheel's requirements (markers
evaluated, extras followed) over the installed packages' metadata, each file linked from where the
running environment installed it. Everything else the running environment has — TensorFlow, TFDS, clu,
TensorBoard, scikit-learn — is absent from that venv, not merely hidden. Offline: nothing is downloaded.
"""

import email
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import weight_files
from conftest import copy_checkout
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from vgg_jax import perceptual
from vgg_jax.runtime import extras

TRAINING_ONLY = extras.TRAIN_MODULES


def _requirements(wheel: pathlib.Path) -> list[Requirement]:
    """The wheel's Requires-Dist that apply without any extra, on this platform."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        message = email.message_from_bytes(archive.read(metadata))
    found = [Requirement(line) for line in message.get_all("Requires-Dist") or []]
    return [r for r in found if r.marker is None or r.marker.evaluate(dict(default_environment(), extra=""))]


def _closure(requirements: list[Requirement]) -> dict[str, importlib.metadata.Distribution]:
    """Every installed distribution `requirements` pull in (as pip would resolve them here)."""
    seen: dict[str, set[str]] = {}
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(requirements)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen and set(requirement.extras) <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | set(requirement.extras)
        found[name] = importlib.metadata.distribution(requirement.name)  # not installed: the test cannot run
        environments = [dict(default_environment(), extra=extra) for extra in {"", *seen[name]}]
        for line in found[name].requires or []:
            needed = Requirement(line)
            if needed.marker is None or any(needed.marker.evaluate(env) for env in environments):
                todo.append(needed)
    return found


def _link_files(distributions, site: pathlib.Path) -> int:
    count = 0
    for distribution in distributions:
        for file in distribution.files or []:
            if ".." in file.parts:  # scripts and data outside site-packages
                continue
            source, target = pathlib.Path(distribution.locate_file(file)), site / file
            if source.exists() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(source)
                count += 1
    return count


@pytest.fixture(scope="module")
def light(tmp_path_factory):
    """(python of the light venv, a working directory, the distributions it holds)."""
    root = tmp_path_factory.mktemp("light")
    source = copy_checkout(root / "source")
    wheels = root / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), "."]
    subprocess.run(build, cwd=source, check=True, capture_output=True)
    wheel = next(wheels.glob("vgg_jax-*.whl"))
    distributions = _closure(_requirements(wheel))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = next((venv / "lib").glob("python*/site-packages"))
    assert _link_files(distributions.values(), site) > 100
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q"]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True)
    work = root / "work"
    work.mkdir()
    return python, work, set(distributions)


def _run(python, cwd, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(python), *args], cwd=cwd, env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600
    )


LOSSES = """
import importlib.util, json, sys
import numpy as np
from vgg_jax import perceptual
absent = [m for m in {modules!r} if importlib.util.find_spec(m) is None]
net, params = perceptual.pretrained("lpips", url={url!r}, sha256={sha256!r}, cache_dir="cache")
rng = np.random.default_rng(0)
x, y = rng.random((2, 48, 40, 3), dtype=np.float32), rng.random((2, 48, 40, 3), dtype=np.float32)
loss = float(perceptual.perceptual_loss(net, params, x, y))
per_image = perceptual.perceptual_loss(net, params, x, y, reduction="none").tolist()
loaded = sorted({{name.split(".")[0] for name in sys.modules}} & set({modules!r}))
print(json.dumps(dict(absent=absent, loss=loss, per_image=per_image, loaded=loaded)))
"""


def test_light_install_holds_no_training_dependency(light):
    _, _, distributions = light
    assert {"jax", "flax", "orbax-checkpoint", "h5py", "safetensors"} <= distributions
    heavy = {"tensorflow", "tensorflow-cpu", "tensorflow-datasets", "clu", "tensorboard", "scikit-learn"}
    assert not distributions & heavy, distributions & heavy


# Full-width VGG-16 in a fresh interpreter of the light install; the fast tier checks what it holds (above)
@pytest.mark.slow
def test_perceptual_loss_from_a_local_weight_file_without_tensorflow(light, tmp_path):
    python, work, _ = light
    h5 = weight_files.write_keras_h5(tmp_path / "vgg16_notop.h5", weight_files.random_params("D", 1, head=False))
    script = LOSSES.format(modules=TRAINING_ONLY, url=str(h5), sha256=weight_files.digest(h5))
    result = _run(python, work, "-c", script)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["absent"] == list(TRAINING_ONLY) and out["loaded"] == []
    # The same loss as in this (full) environment, from the same file.
    net, params = perceptual.pretrained("lpips", url=str(h5), sha256=weight_files.digest(h5), cache_dir=tmp_path)
    rng = np.random.default_rng(0)
    x, y = rng.random((2, 48, 40, 3), dtype=np.float32), rng.random((2, 48, 40, 3), dtype=np.float32)
    assert out["loss"] == pytest.approx(float(perceptual.perceptual_loss(net, params, x, y)), rel=1e-5)
    assert np.mean(out["per_image"]) == pytest.approx(out["loss"], rel=1e-5)


# A fresh interpreter of the light install; the fast tier checks what it holds (above)
@pytest.mark.slow
def test_a_training_command_says_which_extra_to_install(light):
    python, work, _ = light
    expected = f'which `pip install vgg_jax` leaves out: pip install "vgg_jax[{extras.TRAIN_EXTRA}]"'
    for module, args in (
        ("vgg_jax.main", ["--config=configs/e.py:demo", "--workdir=runs/demo"]),
        ("vgg_jax.evaluation.evaluate", ["--checkpoint=runs/demo"]),
    ):
        result = _run(python, work, "-m", module, *args)
        # Python's own warnings aside (evaluate's flag definitions raise one), one line and no traceback.
        lines = [line for line in result.stderr.splitlines() if line.strip() and "Warning" not in line]
        lines = [line for line in lines if not line.startswith("  ")]  # a warning's source line
        assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
        assert lines[0].startswith(f"error: python -m {module} needs tensorflow,") and lines[0].endswith(expected)
    library = _run(python, work, "-c", "import vgg_jax.training.train")
    assert library.returncode == 1
    last = library.stderr.strip().splitlines()[-1]
    assert last.startswith("vgg_jax.runtime.extras.MissingExtraError: vgg_jax.") and last.endswith(expected)
