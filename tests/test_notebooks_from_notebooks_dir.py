"""Notebooks opened where a person opens them: working directory notebooks/, no injected parameters.

The parameters cell's defaults resolve against the repository; ``REFINE_AF_PARAMS`` and
``REFINE_AF_RUN_DIR`` point them at the smoke params and a run folder in a temporary directory.
The kernels are real (nbclient, the venv's python3 kernel).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from refine_af_utils.notebook import kernel_config
from refine_af_utils.run import NOTEBOOK_DIR
from refine_af_utils.layout import STAGES

SMOKE = "params/smoke.yaml"  # relative on purpose: resolved against the repository, not the cwd


def execute(notebook: str, stops: bool = False) -> nbformat.NotebookNode:
    """Run a committed notebook top to bottom in notebooks/, stopping at an error as JupyterLab's "Run All" does.

    ``stops``: the notebook is expected to stop at an error; its outputs up to there are returned.
    """
    nb = nbformat.read(NOTEBOOK_DIR / notebook, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=1800,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}}, config=kernel_config())
    if stops:
        with pytest.raises(CellExecutionError):
            client.execute()
    else:
        client.execute()
    return nb


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


@pytest.fixture
def smoke_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty run folder for the smoke params, set through the environment (the kernel inherits it)."""
    run_dir = tmp_path / "smoke"
    monkeypatch.setenv("REFINE_AF_PARAMS", SMOKE)
    monkeypatch.setenv("REFINE_AF_RUN_DIR", str(run_dir))
    return run_dir


def test_defaults_resolve_against_the_repository(monkeypatch, tmp_path):
    from refine_af_utils.notebook import REPO_ROOT, default_params_path, default_run_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REFINE_AF_PARAMS", raising=False)
    monkeypatch.delenv("REFINE_AF_RUN_DIR", raising=False)
    assert default_params_path() == str(REPO_ROOT / "params" / "default.yaml")
    assert default_run_dir() == str(REPO_ROOT / "results" / "default")
    monkeypatch.setenv("REFINE_AF_PARAMS", SMOKE)
    assert default_run_dir(default_params_path()) == str(REPO_ROOT / "results" / "smoke")


@pytest.mark.slow
def test_a_stage_opened_too_early_names_the_command_instead_of_a_traceback(smoke_env):
    nb = execute(STAGES[2].notebook, stops=True)  # stage 02, on an empty run folder
    first = outputs(nb)[0]
    assert first["output_type"] == "error" and first["ename"] == "StageNotReady"
    text = "\n".join(first["traceback"])
    assert "Traceback" not in text and 'File "' not in text
    assert "Stage 02 (reward analysis) needs the outputs of stage 00 (seed tasks)" in text
    assert f"python -m refine_af_utils.run {SMOKE} --only 00 --results-root {smoke_env.parent}" in text
    assert f"python -m refine_af_utils.run {SMOKE} --only 01 --results-root {smoke_env.parent}" in text
    assert len(outputs(nb)) == 1  # Run All stops at the message


@pytest.mark.slow
def test_a_missing_params_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("REFINE_AF_PARAMS", str(tmp_path / "nope.yaml"))
    monkeypatch.setenv("REFINE_AF_RUN_DIR", str(tmp_path / "run"))
    first = outputs(execute(STAGES[0].notebook, stops=True))[0]
    assert first["ename"] == "StageNotReady"
    assert first["traceback"][0].startswith(f"{tmp_path / 'nope.yaml'}: params file not found")


@pytest.mark.slow
def test_stage_00_runs_from_the_notebooks_folder(smoke_env):
    nb = execute(STAGES[0].notebook)
    assert not [o for o in outputs(nb) if o["output_type"] == "error"]
    assert (smoke_env / "seed_tasks" / "seed_tasks.jsonl").read_text().count("\n") == 36
    assert any("classification" in o.get("data", {}).get("text/html", "") for o in outputs(nb))


@pytest.mark.slow
def test_every_notebook_runs_from_the_notebooks_folder_with_its_defaults(smoke_env):
    """Stages 00-07 in order, each notebook as committed: together they make the smoke run."""
    stderr = ""
    for stage in STAGES:
        nb = execute(stage.notebook)
        errors = [o for o in outputs(nb) if o["output_type"] == "error"]
        assert not errors, f"{stage.notebook}: {errors}"
        assert (smoke_env / "metrics" / f"{stage.id}.json").is_file(), stage.notebook
        stderr += "".join(o.get("text", "") for o in outputs(nb) if o.get("name") == "stderr")
    assert (smoke_env / "report.md").stat().st_size > 0
    assert "IProgress not found" not in stderr  # ipywidgets is installed: tqdm draws widgets
