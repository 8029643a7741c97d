"""The notebooks' display helpers and the pre-save hook of ``make lab`` (refine_af_utils.notebook)."""

from __future__ import annotations

import json

import nbformat
import pandas as pd

from conftest import REPO_ROOT
from refine_af_utils.notebook import as_table, keep_committed_notebooks_clean
from refine_af_utils.params import load_params


def test_as_table_shows_whole_numbers_as_integers_and_flattens_sections():
    table = as_table({"tasks": 36.0, "share": 0.278, "lora": {"r": 16.0, "target_modules": ["q_proj", "v_proj"]}})
    assert table["value"].to_dict() == {"tasks": 36, "share": 0.278, "lora.r": 16, "lora.target_modules": "q_proj, v_proj"}
    assert "36.0" not in table.to_string() and "36" in table.to_string()
    frame = as_table(pd.DataFrame({"a": [36.0, 1.5]}, index=["steps", "loss"]))
    assert frame.loc["steps", "a"] == 36 and isinstance(frame.loc["steps", "a"], int) and frame.loc["loss", "a"] == 1.5
    rl = as_table(load_params(REPO_ROOT / "params" / "smoke.yaml").rl)
    assert rl.loc["algorithm", "value"] == "ppo" and "lora.r" in rl.index


def _model(path: str) -> dict:
    notebook = nbformat.read(REPO_ROOT / path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="x\n")]
            cell.execution_count = 3
    notebook.metadata["widgets"] = {"state": {}}
    return {"type": "notebook", "content": json.loads(nbformat.writes(notebook))}


class _Manager:
    root_dir = str(REPO_ROOT)


def test_the_pre_save_hook_writes_committed_notebooks_back_without_outputs():
    path = "notebooks/00_seed_tasks.ipynb"
    model = _model(path)
    keep_committed_notebooks_clean(model, path, _Manager())
    assert nbformat.writes(model["content"]) + "\n" == (REPO_ROOT / path).read_text()  # byte for byte as committed
    edited = _model(path)
    edited["content"]["cells"][0]["source"] = "# my note"
    keep_committed_notebooks_clean(edited, path, _Manager())
    cells = edited["content"].cells
    assert cells[0].source == "# my note" and all(not c.get("outputs") for c in cells if c.cell_type == "code")


def test_the_pre_save_hook_leaves_other_notebooks_alone(tmp_path):
    model = _model("notebooks/00_seed_tasks.ipynb")
    keep_committed_notebooks_clean(model, "results/smoke/notebooks/00_seed_tasks.ipynb", _Manager())
    assert any(c.get("outputs") for c in model["content"]["cells"] if c["cell_type"] == "code")
