"""The run's append-only JSON-lines files (metrics.jsonl, config_history.jsonl) survive the kills resume exists for.

Paper §3.1 training is interrupted and resumed; a process killed while it
appends a row leaves the file's last line cut short. `read` returns the rows
of such a file without that line (`repair=True` also removes it from the
file, with a log line showing what was dropped); a damaged line anywhere else
is not a kill's doing, and is a `DamagedFileError` naming the file, the line
and the way out. `rewrite` replaces a file atomically (a kill leaves the old
file or the new one); `append` writes one whole line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from etils import epath


class DamagedFileError(ValueError):
    """A JSON-lines file damaged before its last line: nothing a kill mid-append explains."""


def read(path: str | epath.Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file ([] when it does not exist); a torn last line is dropped (see the module doc)."""
    path = epath.Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    rows, torn = [], None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if any(rest.strip() for rest in lines[number:]):
                raise DamagedFileError(
                    f"{path} line {number} is not a JSON row ({error}): {_excerpt(line)}. Lines after it are intact, "
                    "so this is not a write cut short by a kill: fix or delete that line and rerun"
                ) from None
            torn = line
    if repair and (torn is not None or (text and not text.endswith("\n"))):
        rewrite(path, rows)
        if torn is not None:
            logging.warning(
                "%s: its last line was cut short (a process killed while writing it); removed it: %s",
                path,
                _excerpt(torn),
            )
    return rows


def rewrite(path: str | epath.Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Replaces the file with `rows`, one JSON object per line, atomically."""
    path = epath.Path(path)
    temporary = path.parent / (path.name + ".tmp")
    temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
    temporary.replace(path)


def append(path: str | epath.Path, row: Mapping[str, Any]) -> None:
    """Appends `row` as one line (one write call: a kill leaves at most this line torn)."""
    with epath.Path(path).open("a") as stream:
        stream.write(json.dumps(row) + "\n")


def _excerpt(line: str, limit: int = 80) -> str:
    return repr(line if len(line) <= limit else line[:limit] + "…")
