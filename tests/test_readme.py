"""The README's figure, main table and stage times are those of the committed runs it links."""

from __future__ import annotations

import csv
import re

from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def _rows_linking(suffix: str) -> list[tuple[str, list[str]]]:
    """Table rows of the README whose last cell links ``results/<run>/<suffix>``: (run folder, cells)."""
    rows = []
    for line in README.splitlines():
        found = re.search(r"\]\((results/[^)]+)/" + re.escape(suffix) + r"\) \|$", line)
        if line.startswith("|") and found:
            rows.append((found.group(1), [cell.strip() for cell in line.strip().strip("|").split("|")]))
    return rows


def test_the_readme_stage_times_are_those_of_the_committed_runs():
    rows = _rows_linking("report.md")
    assert [run for run, _ in rows] == ["results/default", "results/default-bf16"]
    for run, cells in rows:
        with (REPO_ROOT / run / "table_wall_time.csv").open() as table:
            seconds = {row["stage"]: float(row["seconds"]) for row in csv.DictReader(table)}
        assert [int(cell) for cell in cells[2:9]] == [round(seconds[f"0{n}"]) for n in range(7)], run
        assert cells[9].startswith(f"{round(seconds['0-6'])} s"), run


def test_the_readme_opens_with_the_headline_figure_of_the_committed_run():
    first = re.search(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert first and first.group(1) == "results/default/fig_06_task_forest.png"
    assert (REPO_ROOT / first.group(1)).stat().st_size > 0


def test_the_readme_main_table_is_the_committed_one():
    with (REPO_ROOT / "results" / "default" / "table_main.csv").open() as table:
        committed = {row["model"]: row for row in csv.DictReader(table)}
    labels = {"base": "base (", "self_instruct": "SFT on the Self-Instruct", "refine_af": "SFT on the REFINE-AF",
              "refine_af - self_instruct": "REFINE-AF - Self-Instruct"}
    for model, label in labels.items():
        line = next(line for line in README.splitlines() if line.startswith(f"| {label}"))
        shown = [float(x) for x in re.findall(r"[-+]?\d+\.\d+", line)]
        row = committed[model]
        expected = [float(row[k]) for k in ("ROUGE-L", "ROUGE-L CI low", "ROUGE-L CI high", "exact match",
                                            "exact match CI low", "exact match CI high")]
        assert shown == expected, model
