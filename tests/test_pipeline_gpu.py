"""The GPU smoke recipe (params/recipes/gpu-smoke/smoke.yaml) through the runner on a CUDA GPU, skipped without
one: every stage completes and records its peak GPU memory.

    .venv/bin/python -m pytest -m gpu      # on a machine with a GPU
"""

import json

import pytest
import torch

from conftest import REPO_ROOT
from refine_af_utils.layout import STAGES, RunLayout
from refine_af_utils.run import run_pipeline

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_the_gpu_smoke_recipe_runs_every_stage_on_the_gpu(tmp_path):
    run_dir = run_pipeline(REPO_ROOT / "params" / "recipes" / "gpu-smoke" / "smoke.yaml", results_root=tmp_path)
    layout = RunLayout(run_dir)
    for stage in STAGES:
        metrics = json.loads(layout.metrics(stage.id).read_text())
        if stage.id in ("01", "02", "03", "04", "05", "06"):
            assert metrics.get("peak_gpu_memory_gb", 0) > 0, stage.id
