"""Runs `python -m MODULE ARGS…` command lines in one interpreter, as `python -m` would run each one.

Usage: ``python tests/command_lines.py CASES.json`` where the file holds a list of
``{"module": …, "args": […], "env": {…}}``; prints a JSON list of ``{"status", "stdout", "stderr"}``.
Each command line runs through `runpy.run_module(…, run_name="__main__")` with its own `sys.argv`,
its file descriptors 1 and 2 captured, and an uncaught exception reported as the interpreter does
(traceback, status 1). Flags a command defines are removed after it, so the next one can define its
own. One interpreter imports TensorFlow and JAX once for all the cases (seconds instead of minutes).
"""

import json
import os
import runpy
import sys
import tempfile
import traceback
import warnings


def run_case(module: str, args: list[str], env: dict[str, str]) -> dict:
    from absl import flags

    before = set(flags.FLAGS)
    saved_env = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.argv = [module, *args]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            status = 0
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:  # noqa: BLE001 - reported as the interpreter reports it
            traceback.print_exc()
            status = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for descriptor in saved:
                os.close(descriptor)
        out.seek(0)
        err.seek(0)
        result = {"status": status, "stdout": out.read().decode(errors="replace")}
        result["stderr"] = err.read().decode(errors="replace")
    for name in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return result


def import_quietly() -> None:
    """TensorFlow's C++ start-up notices go to fd 2 once, at its first import: not into a case's output."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)


if __name__ == "__main__":
    # runpy warns when a module it runs as __main__ was imported by an earlier case; `python -m` never sees that.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
    sys.path.insert(0, os.getcwd())  # as `python -m` does: the checkout in the working directory comes first
    import_quietly()
    with open(sys.argv[1]) as stream:
        cases = json.load(stream)
    results = [run_case(case["module"], case["args"], case.get("env", {})) for case in cases]
    print(json.dumps(results))
