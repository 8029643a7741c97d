"""docs/adding-a-stage.md, followed literally: its code blocks make a new stage in a copy of the
repository, which then runs through the real runner (papermill, markers, metrics) after the smoke run
and passes the structure tests. If the page goes stale, this fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGE = REPO_ROOT / "docs" / "adding-a-stage.md"
BLOCK = re.compile(r'^```python title="([^"]+)"\n(.*?)^```', re.M | re.S)


def page_blocks() -> dict[str, str]:
    """The page's code blocks by their title (a file, or ``file: what``)."""
    return {title: code for title, code in BLOCK.findall(PAGE.read_text())}


def _insert_before_closing(text: str, opening: str, closing: str, addition: str) -> str:
    start = text.index(opening)
    end = text.index(closing, start)
    return text[:end] + "\n" + addition.rstrip("\n") + text[end:]


def build_stage_from_page(repo: Path) -> None:
    """Apply every block of the page to the repository copy ``repo``."""
    blocks = page_blocks()
    layout = repo / "refine_af_utils" / "layout.py"
    text = layout.read_text()
    text = _insert_before_closing(text, "STAGES = [", "\n]\n", blocks["refine_af_utils/layout.py: STAGES"])
    text = _insert_before_closing(text, "STAGE_FILES: dict", "\n}\n", blocks["refine_af_utils/layout.py: STAGE_FILES"])
    layout.write_text(text)
    for title in blocks:
        if title.startswith(("refine_af_utils/stages/", "tests/")):
            (repo / title).write_text(blocks[title])
    (cells_title,) = [title for title in blocks if title.startswith("notebooks/")]
    template = nbformat.read(REPO_ROOT / "notebooks" / "00_seed_tasks.ipynb", as_version=4)
    cells = [nbformat.v4.new_code_cell(source.strip("\n")) for source in blocks[cells_title].split("# %%\n")]
    cells[0].metadata["tags"] = ["parameters"]
    notebook = nbformat.v4.new_notebook(cells=cells, metadata=template.metadata)
    nbformat.write(notebook, repo / cells_title.split(":")[0])


def copy_repository(target: Path) -> Path:
    """The checkout's files (tracked, and new ones git does not ignore) copied to ``target``."""
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO_ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        source = REPO_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_the_page_has_every_block_the_test_needs():
    titles = set(page_blocks())
    assert {"refine_af_utils/layout.py: STAGES", "refine_af_utils/layout.py: STAGE_FILES",
            "refine_af_utils/stages/instruction_words.py", "notebooks/08_instruction_words.ipynb: cells",
            "tests/test_instruction_words.py"} <= titles


@pytest.mark.slow
def test_a_stage_built_from_the_page_runs_through_the_real_runner(smoke_run, tmp_path):
    if smoke_run.error is not None:
        pytest.skip(f"the smoke run failed: {smoke_run.error}")
    repo = copy_repository(tmp_path / "repo")
    build_stage_from_page(repo)
    results = tmp_path / "results"
    shutil.copytree(smoke_run.run_dir, results / "smoke", ignore=shutil.ignore_patterns(".lock"))
    env = {**os.environ, "PYTHONPATH": str(repo)}  # the copy's package, in the runner and in the kernel

    def runner(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "refine_af_utils.run", "params/smoke.yaml", *args,
                               "--results-root", str(results)], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=600)

    done = runner("--only", "08")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[08] 08_instruction_words.ipynb: done" in done.stdout
    run_dir = results / "smoke"
    counts = pd.read_csv(run_dir / "instruction_words" / "first_words.csv")
    instructions = [json.loads(line) for line in (run_dir / "instruction_generation" / "instructions.jsonl").open()]
    assert counts["instructions"].sum() == len(instructions) > 0
    metrics = json.loads((run_dir / "metrics" / "08.json").read_text())
    assert {k: v for k, v in metrics.items() if not k.startswith("peak_")} == {  # peak memory: the process's
        "instructions": len(instructions), "distinct_first_words": len(counts)}
    assert metrics["peak_rss_gb"] > 0
    assert (run_dir / "instruction_words" / "first_words.png").stat().st_size > 0
    assert json.loads((run_dir / "stages" / "08.json").read_text())["outputs"]  # the runner's marker
    assert (run_dir / "notebooks" / "08_instruction_words.ipynb").is_file()

    dry = runner("--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    lines = [line for line in dry.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 9 and all(": skip (complete" in line for line in lines), dry.stdout

    structure = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                "tests/test_structure.py", "tests/test_instruction_words.py"], cwd=repo, env=env,
                               capture_output=True, text=True, timeout=300)
    assert structure.returncode == 0, structure.stdout[-3000:]
