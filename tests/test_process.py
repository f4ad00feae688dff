"""Importing vgg_jax changes nothing in the process; the commands set it up (`runtime.process`)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from vgg_jax.runtime import cpu_defaults

REPO = pathlib.Path(__file__).resolve().parents[1]

_IMPORT_EVERYTHING = """
import json, logging, os, pkgutil, sys, importlib
# Libraries change the process when imported (TensorFlow sets TF_CPP_MIN_LOG_LEVEL, orbax adds a root
# handler): import them first, so that what is measured is vgg_jax's own doing.
for library in ("tensorflow", "tensorflow_datasets", "orbax.checkpoint", "flax.linen", "optax", "clu.metric_writers"):
    importlib.import_module(library)
before = {"xla": os.environ.get("XLA_FLAGS"), "tf_log": os.environ.get("TF_CPP_MIN_LOG_LEVEL"),
          "root_level": logging.getLogger().level, "root_handlers": len(logging.getLogger().handlers)}
import vgg_jax
for module in pkgutil.walk_packages(vgg_jax.__path__, "vgg_jax."):
    if module.name != "vgg_jax.__main__":
        importlib.import_module(module.name)
after = {"xla": os.environ.get("XLA_FLAGS"), "tf_log": os.environ.get("TF_CPP_MIN_LOG_LEVEL"),
         "root_level": logging.getLogger().level, "root_handlers": len(logging.getLogger().handlers)}
import jax
after["jax_backend"] = jax.default_backend()
after["applied"] = list(vgg_jax.prepare_process(tensorflow=False))
after["xla_after_prepare"] = os.environ.get("XLA_FLAGS")
print(json.dumps({"before": before, "after": after}))
"""


def test_importing_every_module_leaves_flags_and_logging_alone():
    """Every vgg_jax module imported: XLA_FLAGS, TensorFlow's log level and the root logger are as they were."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL")}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run([sys.executable, "-c", _IMPORT_EVERYTHING], env=env, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    before, after = seen["before"], seen["after"]
    assert (after["xla"], after["tf_log"]) == (before["xla"], before["tf_log"])
    assert after["xla"] is None
    assert (after["root_level"], after["root_handlers"]) == (before["root_level"], before["root_handlers"])
    # prepare_process() after JAX started its backend is too late for XLA, and says so; it still reports the flags
    assert after["applied"] == [flag for flag in cpu_defaults.CPU_XLA_FLAGS if cpu_defaults.xla_knows(flag)]


def test_cpu_flags_are_applied_only_where_xla_knows_them(tmp_path, monkeypatch):
    """A jaxlib whose library lacks a flag's name (simulated): the flag is not added, so JAX still starts."""
    without = tmp_path / "libold_xla.so"
    without.write_bytes(b"\x7fELF" + b"--xla_cpu_some_other_flag\x00" * 100)
    monkeypatch.setattr(cpu_defaults, "_xla_libraries", lambda: [str(without)])
    monkeypatch.setattr(cpu_defaults, "backend_will_be_cpu", lambda environ=None: True)
    cpu_defaults.xla_knows.cache_clear()
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    assert cpu_defaults.apply() == ()
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"

    with_flag = tmp_path / "libnew_xla.so"
    names = b"\x00".join(flag.split("=")[0].lstrip("-").encode() for flag in cpu_defaults.CPU_XLA_FLAGS)
    with_flag.write_bytes(b"\x7fELF\x00" + names + b"\x00")
    monkeypatch.setattr(cpu_defaults, "_xla_libraries", lambda: [str(with_flag)])
    cpu_defaults.xla_knows.cache_clear()
    assert cpu_defaults.apply() == cpu_defaults.CPU_XLA_FLAGS
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x " + " ".join(cpu_defaults.CPU_XLA_FLAGS)
    cpu_defaults.xla_knows.cache_clear()


def test_the_installed_jaxlib_runs_with_what_apply_adds():
    """The real check on this jaxlib: an unknown flag is refused, and the flags apply() adds start JAX."""
    assert not cpu_defaults.xla_knows("--xla_no_such_flag_for_vgg_jax=1")
    code = (
        "import os; from vgg_jax.runtime import cpu_defaults; added = cpu_defaults.apply(); import jax.numpy as jnp; "
        "print(float(jnp.ones(3).sum()), os.environ.get('XLA_FLAGS', ''), len(added))"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    total, *flags, count = done.stdout.split()
    assert total == "3.0" and len(flags) == int(count)


@pytest.mark.parametrize("command", ["train", "evaluate", "transfer", "localise", "convert", "mean-rgb"])
def test_every_command_lists_its_flags(command_lines, command):
    done = command_lines.run("vgg_jax", command, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    flag_lines = [line for line in done.stdout.splitlines() if line.startswith("  --")]
    assert done.stdout.startswith(f"vgg-jax {command} ")
    assert len(flag_lines) >= 2 and all(": " in line and len(line.split(": ", 1)[1]) > 5 for line in flag_lines)


def test_vgg_jax_without_a_command_lists_the_commands(command_lines):
    done = command_lines.run("vgg_jax")
    assert done.returncode == 2
    assert all(name in done.stdout for name in ("train", "evaluate", "transfer", "localise", "convert", "mean-rgb"))
