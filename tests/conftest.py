"""Shared test set-up: quiet TensorFlow, keep it off any accelerator, one README demo run per session."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Many tests compile the same tiny networks (also in subprocesses): reuse XLA's executables.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
# Every executable, however quick its compile: the same computation compiles again in many tests and processes.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Compiling, not running, is most of a fresh checkout's test time: the test nets are tiny and run a few steps,
# and XLA's LLVM optimisations are most of each compile (bench/RESULTS.md, "The test command"). The tests and
# the commands they start compile unoptimised code; the README's demo command runs as a reader's does.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
_flags = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join([*_flags, *(flag for flag in TEST_XLA_FLAGS if flag not in _flags)])

import dataclasses  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import selectors  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def demo_config():
    """The README's demo (configs/e.py:demo), exactly as users run it."""
    from vgg_jax.configs import e

    return e.get_config("demo")


def readme_blocks(language: str, *, skip_sections: tuple[str, ...] = ()) -> list[str]:
    """The README's fenced code blocks of `language`, in order, leaving out the `## ` sections named."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    sections = re.split(r"^(?=## )", text, flags=re.M)
    kept = "".join(s for s in sections if not any(s.startswith(f"## {name}") for name in skip_sections))
    return re.findall(rf"```{language}\n(.*?)```", kept, re.S)


def readme_train_command() -> str:
    """The training command of the README's first bash block (the part after the install)."""
    first = readme_blocks("bash")[0].strip()
    commands = [part.strip() for part in first.split("&&")]
    training = [c for c in commands if "vgg_jax.main" in c]
    assert len(training) == 1, f"the README's first bash block has no single training command: {first!r}"
    return training[0]


def copy_checkout(destination: pathlib.Path) -> pathlib.Path:
    """Copies what a clone of this checkout holds (tracked and untracked-not-ignored files) to `destination`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (entry.decode() for entry in listed)):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


# The README's command cut short: the same net, data and output, 2 of its 40 epochs (44 steps: a progress
# line, an evaluation, a checkpoint). The fast tier's trained run (examples, docs pages, resume, output
# format); the whole command, and that it learns, run in the slow tier (`--slow`, CI).
SHORT_DEMO_OVERRIDES = ("--config.num_train_steps=44",)


def pytest_configure(config):
    # The README's and the docs' commands say `python`: the reader's is the one that runs the tests (their
    # activated venv), whatever else PATH holds.
    here = os.path.dirname(sys.executable)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != here:
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")


def pytest_addoption(parser):
    parser.addoption(
        "--slow",
        action="store_true",
        help="also run the slow tier (the README's whole demo, convergence, multi-host resumes); CI runs it",
    )


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist turns xdist_group marks into node-id suffixes
def pytest_collection_modifyitems(config, items):
    # One module's tests run on one worker, one after another, so a module-scoped fixture (a trained tiny
    # net, a launched multi-host run) is built once, not once per worker; xdist_group marks that span
    # modules (the demo run's readers) keep theirs.
    for item in items:
        if not any(item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    if config.getoption("--slow"):
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        items[:] = [item for item in items if "slow" not in item.keywords]
        config.hook.pytest_deselected(items=slow)


def pytest_collection_finish(session):
    """Refuses to run when pytest-xdist's groups are silently ignored (as with pytest 9.2 and xdist 3.8)."""
    if getattr(session.config.option, "loadgroup", False):
        ungrouped = [item.nodeid for item in session.items if "@" not in item.nodeid]
        if ungrouped:
            raise pytest.UsageError(
                f"pytest-xdist did not tag {ungrouped[0]} with its xdist_group: this pytest/pytest-xdist pair "
                "ignores groups (module fixtures would be rebuilt per worker); install the versions setup.py's "
                "test extra pins"
            )


def pytest_sessionfinish(session, exitstatus):
    """With VGG_JAX_FAIL_ON_SKIP=1 (CI) a skipped test fails the run: no check may pass by not running."""
    if hasattr(session.config, "workerinput") or os.environ.get("VGG_JAX_FAIL_ON_SKIP", "") in ("", "0"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.write_line(
            f"VGG_JAX_FAIL_ON_SKIP: {len(skipped)} test(s) skipped: "
            + "; ".join(
                f"{r.nodeid} ({r.longrepr[-1] if isinstance(r.longrepr, tuple) else r.longrepr})" for r in skipped
            ),
            red=True,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@dataclasses.dataclass
class ReadmeRun:
    root: pathlib.Path  # the copy of the checkout the command ran in
    workdir: pathlib.Path
    command: str
    result: subprocess.CompletedProcess  # the command's status and output


def with_xla_flags(env: dict[str, str], *flags: str) -> dict[str, str]:
    """`env` whose XLA_FLAGS are `flags` and the tests' own (`TEST_XLA_FLAGS`)."""
    return dict(env, XLA_FLAGS=" ".join([*flags, *TEST_XLA_FLAGS]))


def readers_env() -> dict[str, str]:
    """This environment as a reader's shell has it: without the tests' XLA flags (`TEST_XLA_FLAGS`)."""
    flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split() if flag not in TEST_XLA_FLAGS]
    env = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}
    return dict(env, XLA_FLAGS=" ".join(flags)) if flags else env


def _run_readme_command(tmp_path_factory, command: str) -> ReadmeRun:
    """`command` from the root of a fresh copy of this checkout (relative workdir and all), as a user pastes it."""
    root = copy_checkout(tmp_path_factory.mktemp("readme") / "vgg_jax")
    result = subprocess.run(
        command, shell=True, cwd=root, env=readers_env(), capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 0, f"{command!r} failed:\n{result.stderr[-4000:]}"
    workdir = root / re.search(r"--workdir=(\S+)", command).group(1)
    return ReadmeRun(root=root, workdir=workdir, command=command, result=result)


def _recorded_readme_run(record: pathlib.Path, command: str) -> ReadmeRun:
    """The run of `command` that .ci/run made from this checkout's root, its output kept in `record`."""
    recorded = (record / "command").read_text(encoding="utf-8").strip()
    if recorded != command:
        raise pytest.UsageError(
            f"VGG_README_DEMO={record} holds a run of {recorded!r}, not the README's {command!r}: unset it"
        )
    workdir = REPO / re.search(r"--workdir=(\S+)", command).group(1)
    if not (workdir / "metrics.jsonl").is_file():
        raise pytest.UsageError(f"VGG_README_DEMO={record}: the run it records wrote no {workdir / 'metrics.jsonl'}")
    output = {name: (record / name).read_text(encoding="utf-8") for name in ("stdout", "stderr")}
    result = subprocess.CompletedProcess(command, 0, output["stdout"], output["stderr"])
    return ReadmeRun(root=REPO, workdir=workdir, command=command, result=result)


@pytest.fixture(scope="session")
def readme_demo(tmp_path_factory):
    """The README's first command, verbatim (slow tier). Shared by the tests in xdist group 'demo'.

    CI has run it already, as a reader does, from this checkout's root: VGG_README_DEMO names the folder where
    .ci/run kept that run's command line, stdout and stderr, and the tests check that run instead of training
    the demo a second time.
    """
    command = readme_train_command()
    if os.environ.get("VGG_README_DEMO"):
        return _recorded_readme_run(pathlib.Path(os.environ["VGG_README_DEMO"]), command)
    return _run_readme_command(tmp_path_factory, command)


@pytest.fixture(scope="session")
def short_demo(tmp_path_factory):
    """The README's first command with `SHORT_DEMO_OVERRIDES` (fast tier), from a copy of the checkout."""
    return _run_readme_command(tmp_path_factory, " ".join([readme_train_command(), *SHORT_DEMO_OVERRIDES]))


@pytest.fixture(scope="session")
def demo_workdir(readme_demo):
    """The run directory the README's whole first command wrote (slow tier)."""
    return readme_demo.workdir


@pytest.fixture(scope="session")
def short_demo_workdir(short_demo):
    """A few epochs of the README's demo (fast tier): a real run directory of the same net."""
    return short_demo.workdir


class CommandLines:
    """`python -m MODULE ARGS…`, each in a fork of one interpreter per test worker (tests/command_lines.py).

    A fresh `python -m` spends ~8 s importing TensorFlow and JAX before any work, and the command-line tests
    run dozens; the fork starts with them imported (not started) and is otherwise the command's own process.
    The README's commands verbatim, start-up flags and kills keep fresh interpreters elsewhere in the suite.
    """

    def __init__(self):
        self._server: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        if self._server is None or self._server.poll() is not None:
            self._server = subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "command_lines.py")],
                cwd=REPO,
                env=dict(os.environ, JAX_PLATFORMS="cpu"),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,  # its forked cases share its process group: `close` stops them too
            )
        return self._server

    def run(self, module: str, *args: str, cwd=REPO, env: dict | None = None, timeout: float = 600):
        """The command line's status, stdout and stderr, as `subprocess.run(…, capture_output=True)` gives."""
        server = self._start()
        case = {"module": module, "args": list(args), "env": env or {}, "cwd": str(cwd)}
        server.stdin.write(json.dumps(case) + "\n")
        server.stdin.flush()
        with selectors.DefaultSelector() as selector:
            selector.register(server.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                self.close()
                raise TimeoutError(f"python -m {module} {' '.join(args)} ran past {timeout} s")
        line = server.stdout.readline()
        if not line:
            raise RuntimeError(f"the command-line interpreter died (status {server.wait()}) running {module} {args}")
        result = json.loads(line)
        return subprocess.CompletedProcess([module, *args], result["status"], result["stdout"], result["stderr"])

    def close(self) -> None:
        if self._server is not None:
            os.killpg(self._server.pid, signal.SIGKILL)
            self._server.wait()
            self._server = None


@pytest.fixture(scope="session")
def command_lines():
    """Runs command lines as `python -m` would, forked from one interpreter shared by this worker's tests."""
    runner = CommandLines()
    yield runner
    runner.close()
