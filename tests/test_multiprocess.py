"""Stages 3 and 5 under a real two-process launch: the shipped ``multi_gpu.yaml`` with ``--num_processes 2``
(torchrun; without a GPU the processes form a gloo group) on the tiny Llama, as the paper recipes run them. The job must complete, leave one consistent set of
artefacts (one writer per file, checkpoints whole before any rank reads them) and a single-process rerun must
accept them without training again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from refine_af_utils.files import append_jsonl
from refine_af_utils.layout import ARMS, RunLayout
from test_rl_training import tiny_rl_params, tiny_run  # noqa: F401 (tiny_run is a fixture used below)

pytestmark = pytest.mark.slow
ACCELERATE = Path(sys.executable).with_name("accelerate")
MULTI_GPU_CONFIG = Path(__file__).resolve().parents[1] / "params" / "accelerate_configs" / "multi_gpu.yaml"
INSTANCES = [{"instruction": f"Name colour number {i}.", "input": "" if i % 2 else f"index {i}",
              "output": ["Blue", "Red", "Green", "Amber"][i % 4]} for i in range(8)]


def _launch(module: str, params_path: Path, root: Path, processes: int) -> subprocess.CompletedProcess:
    # The shipped multi-GPU config with 2 processes: accelerate starts them with torchrun; without a GPU each
    # process runs on the CPU (trl's use_cpu, as model.device asks) in a gloo group. (`accelerate launch --cpu`
    # would start one process: accelerate's own CPU route needs MPI.)
    launcher = ([str(ACCELERATE), "launch", "--config_file", str(MULTI_GPU_CONFIG), "--num_processes", str(processes),
                 "--mixed_precision", "no", "--dynamo_backend", "no", "-m"] if processes > 1 else [sys.executable, "-m"])
    # no GPU visible: the run is a CPU run even on a machine with one
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([*launcher, module, str(params_path), "--results-root", str(root)], capture_output=True,
                          text=True, env=env, timeout=900)
    assert done.returncode == 0, f"{module} x{processes} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def test_two_processes_train_stages_3_and_5_and_a_single_process_rerun_accepts_what_they_left(
        tmp_path, tiny_llama_dir, tiny_run):  # noqa: F811 (the fixture)
    root, run_dir = tmp_path / "results", tmp_path / "results" / "tiny-2proc"
    root.mkdir()
    tiny_run.rename(run_dir)  # stages 0-2 written by the fixture, under the run name the params give
    layout = RunLayout(run_dir)
    for arm in ARMS:  # stage 4's datasets, for stage 5
        append_jsonl(layout.arm_data(arm), INSTANCES)
    # two segments of two updates: trl counts episodes over both processes, and each segment resumes the last
    params = tiny_rl_params(tiny_llama_dir, updates=4, checkpoint_every=2, critic="lora") | {
        "run_name": "tiny-2proc",
        "sft": {"epochs": 1, "batch_size": 2, "max_length": 64, "lora": {"r": 4, "lora_alpha": 8}, "save_steps": 100}}
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))

    launched = _launch("refine_af_utils.stages.rl_training", params_path, root, 2)
    assert launched.stdout.count("policy_loss") == 2  # each of the two processes printed the metrics it ended with
    metrics = pd.read_csv(layout.rl_metrics_file)
    assert list(metrics["update"]) == [1, 2, 3, 4]  # one row per update: one writer, no duplicate, none missing
    assert metrics["kl"].iloc[0] == pytest.approx(0.0, abs=1e-3)
    checkpoints = list(layout.rl_checkpoints.iterdir())
    assert [c.name for c in checkpoints] == ["update-4"]  # the second segment resumed the first, then removed it
    assert json.loads((checkpoints[0] / "complete").read_text()) == {"updates": 4}
    prompts = pd.read_json(layout.rl_prompts_file, lines=True)
    assert len(prompts) == 6 and not list(layout.rl_checkpoints.parent.glob("*.partial"))
    adapter = (layout.adapter / "adapter_model.safetensors").read_bytes()

    _launch("refine_af_utils.stages.sft", params_path, root, 2)
    for arm in ARMS:
        assert (layout.sft_arm(arm) / "complete").is_file() and (layout.sft_arm(arm) / "model").is_dir()
        assert pd.read_csv(layout.sft_arm(arm) / "loss.csv")["loss"].notna().all()
    losses = {arm: (layout.sft_arm(arm) / "loss.csv").read_text() for arm in ARMS}

    # A single process accepts what the two left: nothing is trained again, nothing changes.
    rerun = _launch("refine_af_utils.stages.rl_training", params_path, root, 1)
    assert "stage 3: PPO updates" not in rerun.stderr
    assert pd.read_csv(layout.rl_metrics_file).equals(metrics)
    assert (layout.adapter / "adapter_model.safetensors").read_bytes() == adapter
    _launch("refine_af_utils.stages.sft", params_path, root, 1)
    assert {arm: (layout.sft_arm(arm) / "loss.csv").read_text() for arm in ARMS} == losses
