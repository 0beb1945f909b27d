"""The Markdown report: written in one folder with its figures, linking only files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mnist_mlops.report import REPORT_FILE, Report

LINK = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")


def test_report_links_only_existing_figures_copied_beside_it(tmp_path):
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "confusion.png").write_bytes(b"\x89PNG fake")
    report = Report("Evaluation")
    report.heading("Numbers")
    report.table([{"metric": "accuracy", "baseline": 0.98765, "note": "a | b"}])
    report.figure(figures / "confusion.png", "Confusion matrix")
    report.figure(figures / "feature_maps.png", "Feature maps")
    out = tmp_path / "reports" / "evaluate"
    (out.parent).mkdir()
    out.mkdir()
    (out / "stale.png").write_bytes(b"old run")

    page = report.write(out)

    assert page == out / REPORT_FILE
    text = page.read_text()
    assert text.startswith("# Evaluation\n")
    assert "## Numbers" in text
    assert "| metric | baseline | note |" in text and "| accuracy | 0.9877 | a \\| b |" in text
    links = LINK.findall(text)
    assert links == ["confusion.png"]
    assert all((out / link).is_file() for link in links)
    assert (out / "confusion.png").read_bytes() == b"\x89PNG fake"
    assert "Feature maps: not produced (feature_maps.png does not exist)" in text
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", REPORT_FILE]


def test_report_empty_table_and_duplicate_figure_names(tmp_path):
    report = Report("r")
    report.table([])
    assert "_(none)_" in report.write(tmp_path / "out").read_text()
    report.figure(Path("a/x.png"), "one")
    with pytest.raises(ValueError, match=r"two figures named x\.png"):
        report.figure(Path("b/x.png"), "two")
