"""Runs `python -m MODULE ARGS…` command lines from one interpreter, each in a process of its own.

Usage: ``python tests/command_lines.py`` reads one JSON object a line on stdin,
``{"module": …, "args": […], "env": {…}, "cwd": …}``, and answers each with one JSON line
``{"status", "stdout", "stderr"}`` (conftest's `command_lines` fixture drives it). The interpreter
imports TensorFlow, JAX and their kin once (seconds, before any backend starts); each command line runs
in a fork of it, as `python -m` would run it there: `runpy.run_module(…, run_name="__main__")` with its
own `sys.argv`, working directory and environment, file descriptors 1 and 2 captured, an uncaught
exception reported as the interpreter does (traceback, status 1) and the exit handlers run. Flags,
logging and JAX's backend start fresh in every case.
"""

import atexit
import json
import os
import runpy
import sys
import tempfile
import traceback
import warnings

# Imported once, started never: a fork must not inherit a running backend or thread pools.
PRELOADED = ("tensorflow", "tensorflow_datasets", "jax", "flax.linen", "optax", "orbax.checkpoint", "absl.app")


def _run_module(module: str, args: list[str], cwd: str) -> int:
    sys.argv = [module, *args]
    sys.path.insert(0, cwd)  # as `python -m` does: the working directory comes first
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported as the interpreter reports it
        traceback.print_exc()
        return 1


def run_case(module: str, args: list[str], env: dict[str, str], cwd: str) -> dict:
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the case's own process
            status = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                os.chdir(cwd)
                os.environ.update(env)
                status = _run_module(module, args, cwd)
                atexit._run_exitfuncs()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        _, wait_status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return {
            "status": os.waitstatus_to_exitcode(wait_status),
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
        }


def preload() -> None:
    """Imports `PRELOADED`; TensorFlow's C++ start-up notices go to fd 2 here, not into a case's output."""
    import importlib

    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            for name in PRELOADED:
                importlib.import_module(name)
        finally:
            os.dup2(saved, 2)
            os.close(saved)


if __name__ == "__main__":
    # runpy warns when a module it runs as __main__ was imported before; `python -m` never sees that.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
    # Python ≥ 3.12 warns on fork() once threads exist; the cases start no backend before it (PRELOADED).
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*fork")
    preload()
    for line in sys.stdin:
        case = json.loads(line)
        result = run_case(case["module"], case["args"], case.get("env", {}), case.get("cwd", os.getcwd()))
        print(json.dumps(result), flush=True)
