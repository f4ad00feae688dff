"""Shared test set-up: quiet TensorFlow, keep it off any accelerator, one README demo run per session."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Many tests compile the same tiny networks (also in subprocesses): reuse XLA's executables.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))

import dataclasses  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

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


@dataclasses.dataclass
class ReadmeRun:
    root: pathlib.Path  # the copy of the checkout the command ran in
    workdir: pathlib.Path
    command: str
    result: subprocess.CompletedProcess | None  # None when reusing VGG_DEMO_WORKDIR


@pytest.fixture(scope="session")
def readme_demo(tmp_path_factory):
    """The README's first command, verbatim, from the root of a copy of this checkout (relative workdir and all).

    Shared by the tests in xdist group 'demo'. Set VGG_DEMO_WORKDIR to reuse a finished run while iterating
    locally (the tests that check the command's own output then skip).
    """
    command = readme_train_command()
    reuse = os.environ.get("VGG_DEMO_WORKDIR")
    if reuse and (pathlib.Path(reuse) / "metrics.jsonl").exists():
        workdir = pathlib.Path(reuse).resolve()
        return ReadmeRun(root=workdir.parents[1], workdir=workdir, command=command, result=None)
    root = copy_checkout(tmp_path_factory.mktemp("readme") / "vgg_jax")
    result = subprocess.run(command, shell=True, cwd=root, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"{command!r} failed:\n{result.stderr[-4000:]}"
    workdir = root / re.search(r"--workdir=(\S+)", command).group(1)
    return ReadmeRun(root=root, workdir=workdir, command=command, result=result)


@pytest.fixture(scope="session")
def demo_workdir(readme_demo):
    """A trained demo run directory: the one the README's first command wrote."""
    return readme_demo.workdir
