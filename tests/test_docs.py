"""docs/ is executable truth too: every Python block of every page runs in some test, every link resolves.

The README's front page links each page; pages hold the manual (training at paper scale, evaluation,
localisation, transfer, several hosts, failures, pretrained weights, the module map). A page's Python
blocks run here (those needing the trained demo run, in the `short_demo` fixture's checkout) or in the
test named by `RUNNERS` (those needing downloads, against a local server there).
"""

import re
import subprocess
import sys

import pytest
from markdown_blocks import DOCS, REPO, code_blocks, pages_with
from test_readme import PREAMBLE

# docs page → the test that runs its Python blocks.
RUNNERS = {
    "inference.md": "tests/test_docs.py::test_inference_page_runs",
    "pretrained.md": "tests/test_pretrained.py::test_readme_pretrained_section_runs_offline",
}
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _links(path):
    return [target for target in _LINK.findall(path.read_text(encoding="utf-8")) if "://" not in target]


def test_every_page_with_python_has_a_runner():
    assert pages_with("python") == set(RUNNERS), "add the new page's Python blocks to a test and to RUNNERS"
    for runner in RUNNERS.values():
        module, name = runner.split("::")
        assert f"def {name}(" in (REPO / module).read_text(), runner


def test_links_resolve_and_the_front_page_links_every_page():
    for page in [REPO / "README.md", *DOCS.glob("*.md")]:
        broken = [target for target in _links(page) if not (page.parent / target).exists()]
        assert not broken, f"{page.name} links to missing files: {broken}"
    linked = {(REPO / target).resolve() for target in _links(REPO / "README.md")}
    unlinked = sorted(page.name for page in DOCS.glob("*.md") if page.resolve() not in linked)
    assert not unlinked, f"the README does not link {unlinked}"


def test_front_page_is_short():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 150


@pytest.mark.xdist_group("demo")
def test_inference_page_runs(short_demo, tmp_path):
    blocks = code_blocks(DOCS / "inference.md", "python")
    assert blocks
    checks = """
assert dense.class_ids.shape[0] == photos.shape[0], dense
assert descriptors.shape[0] == photos.shape[0] and abs(float((descriptors[0] ** 2).sum()) - 1) < 1e-4
print("docs/inference.md ran")
"""
    script = tmp_path / "inference_page.py"
    script.write_text(PREAMBLE + "\n".join(blocks) + checks)
    # From the root of the copy the README's command trained in: `runs/demo` is relative to it, as for a user.
    result = subprocess.run(
        [sys.executable, str(script)], cwd=short_demo.root, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "docs/inference.md ran" in result.stdout
