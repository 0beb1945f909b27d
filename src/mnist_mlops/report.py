"""A one-page Markdown report whose figures travel with it.

`write` puts `report.md` in a folder with copies of the figures beside it and links them by
file name, so the folder opens the same anywhere (a browser, an editor, MLflow's artifact view)
without network or the pipeline's other outputs. A figure whose file does not exist is named,
not linked, so the page never holds a broken link.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPORT_FILE = "report.md"


class Report:
    """Markdown assembled section by section, then written once with `write`."""

    def __init__(self, title: str) -> None:
        self._parts: list[str | tuple[Path, str]] = [f"# {title}\n"]

    def heading(self, text: str) -> None:
        self._parts.append(f"## {text}\n")

    def text(self, text: str) -> None:
        self._parts.append(f"{text}\n")

    def table(
        self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None
    ) -> None:
        """A Markdown table of `rows`; `columns` picks and orders them (default: row 1's keys)."""
        if not rows:
            self._parts.append("_(none)_\n")
            return
        columns = list(columns or rows[0])
        lines = [
            "| " + " | ".join(columns) + " |",
            "|" + "|".join("---" for _ in columns) + "|",
            *("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows),
        ]
        self._parts.append("\n".join(lines) + "\n")

    def figure(self, path: Path, caption: str) -> None:
        """Link the image at `path` (copied beside the page on `write`), if it exists by then."""
        taken = {part[0].name for part in self._parts if isinstance(part, tuple)}
        if path.name in taken:
            raise ValueError(f"two figures named {path.name}: their copies would overwrite")
        self._parts.append((path, caption))

    def write(self, directory: Path) -> Path:
        """Write the page and copies of its existing figures into `directory` (made empty)."""
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        blocks = []
        for part in self._parts:
            if isinstance(part, str):
                blocks.append(part)
                continue
            path, caption = part
            if path.is_file():
                shutil.copy2(path, directory / path.name)
                blocks.append(f"![{caption}]({path.name})\n\n_{caption}_\n")
            else:
                blocks.append(f"_{caption}: not produced ({path.name} does not exist)._\n")
        page = directory / REPORT_FILE
        page.write_text("\n".join(blocks))
        return page


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|")
