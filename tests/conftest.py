"""Shared test set-up: quiet TensorFlow, keep it off any accelerator, one demo run per session."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Many tests compile the same tiny networks (also in subprocesses): reuse XLA's executables.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def demo_config():
    """The README's demo (configs/e.py:demo), exactly as users run it."""
    from vgg_jax.configs import e

    return e.get_config("demo")


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory):
    """A trained demo run (the README's main job), shared by the tests in xdist group 'demo'.

    Set VGG_DEMO_WORKDIR to reuse a finished run while iterating locally.
    """
    reuse = os.environ.get("VGG_DEMO_WORKDIR")
    if reuse and (pathlib.Path(reuse) / "metrics.jsonl").exists():
        return pathlib.Path(reuse)
    from vgg_jax import train

    workdir = tmp_path_factory.mktemp("demo")
    train.train_and_evaluate(demo_config(), str(workdir))
    return workdir
