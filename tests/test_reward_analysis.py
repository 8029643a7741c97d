"""Stage 2 resumed after SIGKILL writes exactly the candidates an uninterrupted run writes (issue 12 item 5).

Stage 2's candidate batches are cut from the full job list and seeded by their first job
(``derive_seed(random_seed, "02", instruction, candidate)``), never by the offset into the jobs still
to do, so a resumed run draws what an uninterrupted one draws.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from refine_af_utils.files import append_jsonl, read_jsonl
from refine_af_utils.seeds import load_seed_tasks, write_seed_tasks

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

CANDIDATES = "reward_analysis/candidates.jsonl"
STAGE_2_CANDIDATES = (
    "import sys, yaml\n"
    "from pathlib import Path\n"
    "from refine_af_utils.params import params_from_dict\n"
    "from refine_af_utils.run_folder import open_stage\n"
    "from refine_af_utils.stages.reward_analysis import _candidates\n"
    "params = params_from_dict(yaml.safe_load(Path(sys.argv[1]).read_text()))\n"
    "stage = open_stage('refine_af_utils.stages.reward_analysis', params, sys.argv[2])\n"
    "_candidates(stage, stage.layout.instructions(), stage.layout.seed_tasks())\n"
)
TOPICS = ["a river", "a city", "a teacher", "a storm", "a market", "a garden", "a train", "a letter", "a song",
          "a mountain", "a robot", "a library"]


def _run_folder(run_dir: Path) -> Path:
    """Stage 0 and stage 1 outputs: the bundled seeds and 12 instructions, a third of them classification."""
    write_seed_tasks(load_seed_tasks("bundled"), run_dir / "seed_tasks" / "seed_tasks.jsonl")
    append_jsonl(run_dir / "instruction_generation" / "instructions.jsonl", [
        {"id": f"machine_{i}", "instruction": (f"Is this sentence about {topic} positive or negative?" if i % 3 == 0
                                               else f"Write a short description of {topic}."),
         "is_classification": i % 3 == 0}
        for i, topic in enumerate(TOPICS)])
    return run_dir


def _params(tiny_llama_dir: Path) -> dict:
    return {
        "run_name": "stage2-resume",
        "model": {"name_or_path": str(tiny_llama_dir), "dtype": "float32"},
        "instance_generation": {"batch_size": 2, "max_new_tokens": 48, "num_demonstrations": 1},
        "reward_analysis": {"num_instructions": 10, "candidates_per_instruction": 2},  # 20 jobs, 10 batches
    }


def _start(params_file: Path, run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", STAGE_2_CANDIDATES, str(params_file), str(run_dir)],
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()[-2000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama_dir) -> tuple[Path, list[dict]]:
    """The params file and the candidates of a run that nobody killed."""
    folder = tmp_path_factory.mktemp("stage2")
    params_file = folder / "params.yaml"
    params_file.write_text(yaml.safe_dump(_params(tiny_llama_dir)))
    reference = _run_folder(folder / "reference")
    _finish(_start(params_file, reference))
    expected = read_jsonl(reference / CANDIDATES)
    assert len(expected) == 20 and len({(r["instruction_id"], r["candidate"]) for r in expected}) == 20
    assert len({r["text"] for r in expected}) > 10  # the candidates differ: each batch has its own noise
    return params_file, expected


@pytest.mark.parametrize("kill_after_records, tear_last_line", [(2, False), (8, True)])
def test_stage_2_resumed_after_sigkill_equals_an_uninterrupted_run(tmp_path, uninterrupted, kill_after_records,
                                                                   tear_last_line):
    params_file, expected = uninterrupted
    crashed = _run_folder(tmp_path / "crashed")

    process = _start(params_file, crashed)
    path = crashed / CANDIDATES
    deadline = time.time() + 180
    while time.time() < deadline and process.poll() is None:
        if path.is_file() and path.read_bytes().count(b"\n") >= kill_after_records:
            break
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "stage 2 finished before it could be killed"
    committed = path.read_bytes().count(b"\n")
    assert kill_after_records <= committed < 20
    if tear_last_line:  # a crash in the middle of a write: half a record at the end
        data = path.read_bytes()
        start = data.rstrip(b"\n").rfind(b"\n") + 1
        path.write_bytes(data[: start + (len(data) - start) // 2])

    _finish(_start(params_file, crashed))
    resumed = read_jsonl(path)
    assert resumed == expected  # same records, same texts, same order: nothing lost, nothing duplicated
