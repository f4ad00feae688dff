"""Fenced code blocks of the README's docs/ pages, for the tests that run them."""

from __future__ import annotations

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def code_blocks(path: pathlib.Path, language: str, *, skip_sections: tuple[str, ...] = ()) -> list[str]:
    """The fenced `language` blocks of the Markdown file `path`, in order, leaving out the `## ` sections named."""
    sections = re.split(r"^(?=## )", path.read_text(encoding="utf-8"), flags=re.M)
    kept = "".join(s for s in sections if not any(s.startswith(f"## {name}") for name in skip_sections))
    return re.findall(rf"```{language}\n(.*?)```", kept, re.S)


def pages_with(language: str) -> set[str]:
    """Names of the docs/ pages holding at least one `language` block."""
    return {page.name for page in DOCS.glob("*.md") if code_blocks(page, language)}
