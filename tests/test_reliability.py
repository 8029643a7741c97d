"""Issue 12's reliability findings: the run lock, safe run names, validation before writing, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from refine_af_utils.errors import RefineAFError, StageConfigError, decode_utf8
from refine_af_utils.models import DeviceUnavailableError, ModelNotFoundError, check_device
from refine_af_utils.params import ParamsError, load_params, params_from_dict
from refine_af_utils.locking import run_lock
from refine_af_utils.run_folder import check_stage_config, run_folder
from refine_af_utils.errors import RunLockedError
from refine_af_utils.run import main
from refine_af_utils.seeds import MAX_SEED_LINE_BYTES, SeedTaskError, load_seed_tasks
from refine_af_utils.superni import BUNDLED_SUPERNI, SuperNIError, load_tasks

from conftest import REPO_ROOT

# PPO needs instance_generation.top_p 1.0; every params dict here sets it so only the tested key is wrong.
BASE = "run_name: r\ninstance_generation:\n  top_p: 1.0\n"


def _params_file(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def one_line(kind: type, call, *args) -> str:
    """The one-line message of the ``kind`` error ``call(*args)`` raises."""
    with pytest.raises(kind) as error:
        call(*args)
    return _one_line(error)


# --- item 2: one runner per run folder ----------------------------------------------------------

HOLDER = (
    "import sys, time\n"
    "from refine_af_utils.locking import run_lock\n"
    "with run_lock(sys.argv[1]):\n"
    "    print('locked', flush=True)\n"
    "    time.sleep(300)\n"
)


def test_stage_entry_points_and_notebooks_by_hand_refuse_a_held_run_and_the_holders_children_join(tmp_path):
    """Issue 24 item 1: `python -m refine_af_utils.stages.sft` beside a runner rewrote the runner's params.yaml;
    now every writer takes the run's lock or joins its holder (the runner's kernels, ranks of one job)."""
    from refine_af_utils.locking import LOCK_TOKEN_ENV, hold_or_join_lock
    from refine_af_utils.stages import seed_tasks

    smoke = REPO_ROOT / "params" / "smoke.yaml"
    root = tmp_path / "results"
    run_dir = root / "smoke"
    run_dir.mkdir(parents=True)
    (run_dir / "params.yaml").write_text("the runner's\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO_ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        entry = subprocess.run([sys.executable, "-m", "refine_af_utils.stages.sft", str(smoke), "--results-root",
                                str(root), "--set", "seed_tasks=elsewhere.jsonl"],
                               capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
        assert entry.returncode == 2, entry.stderr
        assert entry.stderr.count("\n") == 1 and f"another runner is using this run (pid {holder.pid}" in entry.stderr
        assert (run_dir / "params.yaml").read_text() == "the runner's\n"  # not rewritten
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):  # a notebook run by hand
            seed_tasks.run(load_params(smoke), run_dir)
        assert not (run_dir / "seed_tasks").exists()
        token = json.loads((run_dir / ".lock").read_text())["token"]
        os.environ[LOCK_TOKEN_ENV] = f"{token} {run_dir.resolve()}"  # what the runner gives the kernels it starts
        try:
            with hold_or_join_lock(run_dir):
                pass
            assert seed_tasks.run(load_params(smoke), run_dir).summary is not None  # joined: it writes
            os.environ[LOCK_TOKEN_ENV] = f"not-the-token {run_dir.resolve()}"
            with pytest.raises(RunLockedError):
                seed_tasks.run(load_params(smoke), run_dir)
        finally:
            os.environ.pop(LOCK_TOKEN_ENV, None)
    finally:
        holder.kill()
        holder.wait()


def test_a_stage_that_fails_at_run_time_is_started_over_by_corrected_params_without_force(tmp_path, capsys):
    """Issue 24 item 2: a run-time failure after config.json was written used to refuse the corrected rerun
    ("made with other settings ... --force"). The stage's session marks the config failed; the same settings
    resume it, other settings start it over."""
    from refine_af_utils.layout import STAGE
    from refine_af_utils.run_folder import stage_session

    run_dir = tmp_path / "r"
    folder = run_dir / STAGE["02"].output_dir
    check_stage_config(folder, {"reward.weight": 1})
    (folder / "candidates.jsonl").write_text("{}\n")
    with pytest.raises(ZeroDivisionError):
        with stage_session(STAGE["02"], run_dir):
            1 / 0
    assert json.loads((folder / "config.json").read_text())["_failed"] == "ZeroDivisionError: division by zero"
    check_stage_config(folder, {"reward.weight": 1})  # the same settings: resumed, outputs kept, mark gone
    assert (folder / "candidates.jsonl").is_file() and "_failed" not in (folder / "config.json").read_text()
    with pytest.raises(StageConfigError, match="made with other settings"):  # not failed: refused as before
        check_stage_config(folder, {"reward.weight": 2})
    with pytest.raises(RuntimeError):
        with stage_session(STAGE["02"], run_dir):
            raise RuntimeError("out of memory")
    check_stage_config(folder, {"reward.weight": 2})
    assert not (folder / "candidates.jsonl").exists()  # started over
    assert json.loads((folder / "config.json").read_text()) == {"reward.weight": 2}
    assert "its last run failed (RuntimeError: out of memory); starting it over" in capsys.readouterr().err


def test_errors_validation_could_catch_stop_before_the_stage_writes(tmp_path):
    """Issue 24 item 2: model.device=meta, LoRA target modules that match nothing, too few seeds for a prompt:
    one line each, before any config.json."""
    from refine_af_utils.models import check_lora_targets
    from refine_af_utils.stages import instruction_generation, seed_tasks

    smoke = load_params(REPO_ROOT / "params" / "smoke.yaml")
    run_dir = tmp_path / "r"
    seed_tasks.run(smoke, run_dir)
    meta = load_params(REPO_ROOT / "params" / "smoke.yaml", overrides={"model.device": "meta"})
    assert "model.device: 'meta' cannot run a model" in one_line(DeviceUnavailableError, instruction_generation.run,
                                                                meta, run_dir)
    few = load_params(REPO_ROOT / "params" / "smoke.yaml",
                      overrides={"instruction_generation.num_prompt_instructions": 40})
    assert "36 seed tasks, but a prompt takes instruction_generation.num_prompt_instructions = 40" in one_line(
        SeedTaskError, instruction_generation.run, few, run_dir)
    assert not (run_dir / "instruction_generation").exists()
    bad = load_params(REPO_ROOT / "params" / "smoke.yaml", overrides={"rl.lora.target_modules": ["q_projx"]})
    assert "rl.lora.target_modules: ['q_projx'] match no module of embedded:smollm2-135m-instruct (its linear " \
           "layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)" in one_line(
               ParamsError, check_lora_targets, bad.model, bad.rl.lora, "rl.lora")


def test_a_second_runner_exits_at_once_naming_the_holder_and_a_killed_holder_does_not_block(tmp_path):
    params_path = _params_file(tmp_path, BASE)
    root = tmp_path / "results"
    run_dir = root / "r"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO_ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert json.loads((run_dir / ".lock").read_text())["pid"] == holder.pid
        second = subprocess.run(
            [sys.executable, "-m", "refine_af_utils.run", str(params_path), "--only", "00",
             "--results-root", str(root)],
            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
        assert second.returncode == 2
        assert f"pid {holder.pid}: " in second.stderr and "time.sleep(300)" in second.stderr
        assert second.stderr.count("\n") == 1 and "another runner is using this run" in second.stderr
        assert not (run_dir / "notebooks").exists()  # it ran nothing
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            with run_lock(run_dir):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
        holder.wait()
    assert (run_dir / ".lock").exists()
    with run_lock(run_dir):  # the OS released the dead holder's lock
        assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
    assert (run_dir / ".lock").read_text() == ""  # released: no stale holder recorded


# --- item 3: safe run names ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x", "", "a b", "x\\y", "naïve"])
def test_unsafe_run_names_are_refused(tmp_path, name):
    path = _params_file(tmp_path, f"run_name: {json.dumps(name)}\ninstance_generation:\n  top_p: 1.0\n")
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert f"{path}: key 'run_name' must be a folder name" in _one_line(error)
    with pytest.raises(ParamsError, match="key 'run_name'"):
        run_folder(tmp_path / "results", name)


def test_safe_run_names_and_the_results_root(tmp_path):
    root = tmp_path / "results"
    root.mkdir()
    for name in ("default", "smoke-2.v1", "a_b", "..x", "x.."):
        assert run_folder(root, name) == root / name
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(ParamsError, match="not inside the results root") as error:
        run_folder(root, "link")
    _one_line(error)


def test_the_runner_refuses_dot_dot_before_writing_anything(tmp_path, capsys):
    root = tmp_path / "a" / "results"
    root.mkdir(parents=True)
    params_path = _params_file(tmp_path, 'run_name: ".."\ninstance_generation:\n  top_p: 1.0\n')
    assert main([str(params_path), "--results-root", str(root)]) == 2
    assert "key 'run_name'" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["results"] and not any(root.iterdir())


# --- item 4: validate before writing -------------------------------------------------------------

def _stage_5_done(run_dir: Path, model_source: Path | None = None) -> None:
    """Stand-ins for both arms' finished stage 5 (the tiny model itself when given)."""
    for arm in ("self_instruct", "refine_af"):
        folder = run_dir / "sft" / arm / "model"
        if model_source is not None:
            shutil.copytree(model_source, folder)
        else:
            folder.mkdir(parents=True)
            (folder / "model.safetensors").write_bytes(arm.encode())
        (folder.parent / "complete").write_text("{}")


def _eval_params(superni_dir: str, model: str = "embedded:smollm2-135m-instruct", device: str = "cpu") -> object:
    return params_from_dict({
        "run_name": "r", "instance_generation": {"top_p": 1.0}, "sft": {"full_fine_tuning": True},
        "model": {"name_or_path": model, "dtype": "float32", "device": device},
        "evaluation": {"superni_dir": superni_dir, "max_instances": 1, "max_new_tokens": 3, "batch_size": 12,
                       "max_prompt_tokens": 64},
    }, "<test>")


def test_a_failed_stage_6_leaves_no_config_that_blocks_the_fix(tmp_path):
    from refine_af_utils.stages.superni_evaluation import run as run_evaluation_stage

    run_dir = tmp_path / "run"
    _stage_5_done(run_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SuperNIError, match="test task list not found"):
        run_evaluation_stage(_eval_params(str(empty)), run_dir)
    assert not (run_dir / "superni_evaluation" / "config.json").exists()
    (empty / "splits" / "default").mkdir(parents=True)
    (empty / "splits" / "default" / "test_tasks.txt").write_text("\n")
    with pytest.raises(SuperNIError, match="no task names"):
        run_evaluation_stage(_eval_params(str(empty)), run_dir)
    with pytest.raises(DeviceUnavailableError, match="cuda:99"):
        run_evaluation_stage(_eval_params("bundled", device="cuda:99"), run_dir)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        run_evaluation_stage(_eval_params("bundled", model=str(tmp_path / "no-model")), run_dir)
    assert not (run_dir / "superni_evaluation" / "config.json").exists()


@pytest.mark.slow
def test_the_corrected_stage_6_runs_after_a_failed_one(tmp_path, tiny_llama_dir):
    from refine_af_utils.stages.superni_evaluation import run as run_evaluation_stage

    run_dir = tmp_path / "run"
    _stage_5_done(run_dir, tiny_llama_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SuperNIError):
        run_evaluation_stage(_eval_params(str(empty), model=str(tiny_llama_dir)), run_dir)
    result = run_evaluation_stage(_eval_params("bundled", model=str(tiny_llama_dir)), run_dir)  # not refused
    assert result.improvement["tasks"] == 12
    assert json.loads((run_dir / "superni_evaluation" / "config.json").read_text())["evaluation.superni_dir"] == "bundled"


def test_stage_config_error_is_a_project_error(tmp_path):
    check_stage_config(tmp_path, {"a": 1})
    with pytest.raises(StageConfigError, match=r"\(a differ\).*--force") as error:
        check_stage_config(tmp_path, {"a": 2})
    assert isinstance(error.value, RuntimeError) and isinstance(error.value, RefineAFError)


# --- item 6: every bad input in one line ---------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    (BASE + "num_instructions: 5\nnum_instructions: 6\n", ":5: duplicate key 'num_instructions' (first given on line 4)"),
    (BASE + "model:\n  device: cpu\n  device: cuda\n", ":6: duplicate key 'device' (first given on line 5)"),
    (BASE + "instance_generation:\n  temperature: 1\n", ":4: duplicate key 'instance_generation' (first given on line 2)"),
    (BASE + "model: {device: cpu, device: cuda}\n", ":4: duplicate key 'device'"),
    ("run_name: r\ninstruction_generation:\n  temperature: .nan\n",
     "key 'instruction_generation.temperature' must be a finite number, got nan"),
    ("run_name: r\ninstance_generation:\n  top_p: 1.0\n  temperature: -1\n",
     "key 'instance_generation.temperature' must be at least 0"),
    ("run_name: r\ninstance_generation:\n  top_p: 5\nrl:\n  algorithm: grpo\n",
     "key 'instance_generation.top_p' must be in (0, 1], got 5.0"),
    ("run_name: r\ninstance_generation:\n  top_p: 0\nrl:\n  algorithm: rloo\n",
     "key 'instance_generation.top_p' must be in (0, 1]"),
    (BASE + "rl:\n  kl_coef: -1\n", "key 'rl.kl_coef' must be at least 0, got -1.0"),
    (BASE + "rl:\n  lora: {lora_dropout: 2}\n", "key 'rl.lora.lora_dropout' must be in [0, 1), got 2.0"),
    (BASE + "sft:\n  lora: {lora_dropout: 1}\n", "key 'sft.lora.lora_dropout' must be in [0, 1)"),
    (BASE + "rl:\n  learning_rate: .inf\n", "key 'rl.learning_rate' must be a finite number, got inf"),
    (BASE + "reward:\n  naturalness:\n    kind: yes_no\n    model: m\n    template: '{output}'\n    weight: .nan\n",
     "key 'reward.naturalness.weight' must be a finite number, got nan"),
    (BASE + "reward:\n  intercept: -.inf\n", "key 'reward.intercept' must be a finite number, got -inf"),
    (BASE + "instruction_generation:\n  novelty_threshold: 1.5\n",
     "key 'instruction_generation.novelty_threshold' must be in [0, 1]"),
    (BASE + "instruction_generation:\n  top_p: 0\n", "key 'instruction_generation.top_p' must be in (0, 1]"),
    (BASE + "model: [unclosed\n", ":5: not valid YAML (while parsing a flow sequence (line 4): expected ','"),
    (BASE.encode() + b"# caf\xe9\n", ":4: not UTF-8 text (byte 0xe9 at column 6)"),
])
def test_bad_params_give_one_line_naming_the_file_and_line_or_key(tmp_path, text, message):
    path = _params_file(tmp_path, text)
    with pytest.raises(ParamsError) as error:
        load_params(path)
    line = _one_line(error)
    assert line.startswith(str(path)) and message in line, line


def test_bad_seed_files_name_the_file_and_line(tmp_path):
    good = json.dumps({"id": "s1", "name": "n", "instruction": "Do it.", "is_classification": False,
                       "instances": [{"input": "", "output": "ok"}]})
    path = tmp_path / "seeds.jsonl"
    path.write_bytes(good.encode() + b"\n" + good.replace("s1", "s2").replace("Do it.", "Caf\xe9").encode("latin-1")
                     + b"\n")
    with pytest.raises(SeedTaskError) as error:
        load_seed_tasks(path)
    assert _one_line(error).startswith(f"{path}:2: not UTF-8 text (byte 0xe9")
    huge = json.dumps({"id": "s3", "name": "n", "instruction": "x " * MAX_SEED_LINE_BYTES, "is_classification": False,
                       "instances": [{"input": "", "output": "ok"}]})
    path.write_text(good + "\n\n" + huge + "\n")
    with pytest.raises(SeedTaskError) as error:
        load_seed_tasks(path)
    assert _one_line(error).startswith(f"{path}:3: line longer than {MAX_SEED_LINE_BYTES} bytes")
    path.write_text(good + "\r\n")  # Windows line ends still load
    assert [t.id for t in load_seed_tasks(path)] == ["s1"]


def test_bad_superni_split_files_get_clear_messages(tmp_path):
    root = tmp_path / "ni"
    shutil.copytree(BUNDLED_SUPERNI, root)
    split = root / "splits" / "default" / "test_tasks.txt"
    split.write_text("")
    with pytest.raises(SuperNIError) as error:
        load_tasks(root)
    assert _one_line(error).startswith(f"{split}: no task names (the file is empty)")
    split.write_text("task1415_excluded\n")
    with pytest.raises(SuperNIError, match="only excluded tasks"):
        load_tasks(root)
    split.write_bytes(b"mini001_textual_entailment\nmini\xff\n")
    with pytest.raises(SuperNIError) as error:
        load_tasks(root)
    assert _one_line(error).startswith(f"{split}:2: not UTF-8 text (byte 0xff at column 5)")
    task = root / "tasks" / "mini001_textual_entailment.json"
    split.write_text("mini001_textual_entailment\n")
    task.write_text('{\n  "Definition": [\n')
    with pytest.raises(SuperNIError) as error:
        load_tasks(root)
    assert _one_line(error).startswith(f"{task}:3: not valid JSON")


def test_an_unavailable_device_names_itself_and_what_is_available():
    import torch

    check_device("cpu")
    with pytest.raises(DeviceUnavailableError) as error:
        check_device("cuda:99")
    message = _one_line(error)
    assert "model.device: device 'cuda:99' is not available on this machine (available: cpu" in message
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match=r"reward.coherence.device: device 'cuda'.*available: cpu"):
            check_device("cuda", key="reward.coherence.device")
    with pytest.raises(DeviceUnavailableError, match="'gpu' is not a device name"):
        check_device("gpu")


def test_decode_utf8_counts_lines_from_the_given_first_line():
    assert decode_utf8("é".encode(), "f", SeedTaskError) == "é"
    with pytest.raises(SeedTaskError, match=r"^f:12: not UTF-8 text \(byte 0x80 at column 3\)"):
        decode_utf8(b"ok\nab\x80", "f", SeedTaskError, first_line=11)


def test_project_errors_keep_their_builtin_classes():
    for cls, builtin in ((ParamsError, ValueError), (SeedTaskError, ValueError), (SuperNIError, ValueError),
                         (ModelNotFoundError, FileNotFoundError), (StageConfigError, RuntimeError),
                         (DeviceUnavailableError, ValueError)):
        assert issubclass(cls, RefineAFError) and issubclass(cls, builtin)


def test_scoring_errors_are_project_errors_the_runner_prints_as_one_line():
    from refine_af_utils.errors import project_error_names
    from refine_af_utils.scorers import ScoringError

    error = ScoringError("scorer 'x': instance i-1 has an empty output")
    assert isinstance(error, RefineAFError) and isinstance(error, ValueError)
    assert "ScoringError" in project_error_names()


def test_the_runner_knows_every_project_error_in_a_fresh_process():
    """Each RefineAFError subclass defined anywhere in the package, found by a fresh interpreter (as the runner
    is after a notebook failed): a missing one would print a traceback instead of one line."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "refine_af_utils"
    defined = {node.name for path in package.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.ClassDef) and any(getattr(b, "id", "") == "RefineAFError" for b in node.bases)}
    assert {"DataError", "StudySpecError", "UpstreamNotReadyError", "CompareError"} <= defined
    found = subprocess.run([sys.executable, "-c", "from refine_af_utils.errors import project_error_names as p; "
                            "print(' '.join(sorted(p())))"], capture_output=True, text=True, check=True).stdout.split()
    assert defined <= set(found)


@pytest.mark.slow
def test_a_project_error_inside_a_notebook_is_one_line_with_the_executed_notebook(tmp_path, capsys):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"id": "s1"}\n')
    params_path = _params_file(tmp_path, BASE + f"seed_tasks: {json.dumps(str(seeds))}\n")
    assert main([str(params_path), "--only", "00", "--results-root", str(tmp_path / "results")]) == 1
    executed = tmp_path / "results" / "r" / "notebooks" / "00_seed_tasks.ipynb"
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"[00] seed tasks: {seeds}:1: missing field 'name' (full traceback in {executed})")
    assert "Traceback" in executed.read_text() or "SeedTaskError" in executed.read_text()
    assert not (tmp_path / "results" / "r" / "stages" / "00.json").exists()


def _upstream_of_stages_2_to_5(run_dir: Path) -> None:
    """Hand-made outputs of stages 0-4, enough for stages 2-5 to pass their input checks."""
    from refine_af_utils.layout import ARMS, RunLayout
    from refine_af_utils.seeds import write_seed_tasks

    layout = RunLayout(run_dir)
    for stage in ("00", "01", "02", "03", "04"):
        layout.stage_folder(stage, create=True)
    write_seed_tasks(load_seed_tasks("bundled"), layout.seed_tasks_file)
    records = [{"id": f"machine_{i}", "instruction": f"Instruction {i}.", "is_classification": False} for i in range(4)]
    layout.instructions_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = ["instruction_id,candidate,instance_id,reward_model,understandability,naturalness,coherence"]
    rows += [f"machine_{i},0,machine_{i}:0,0.{i},0.{i + 1},0.{i + 2},0.{i + 3}" for i in range(3)]
    layout.scores_file.write_text("\n".join(rows) + "\n")
    layout.rl_prompts_file.write_text("".join(json.dumps({"instruction": r["instruction"], "is_classification": False,
                                                          "split": "train"}) + "\n" for r in records))
    layout.adapter.mkdir(parents=True)
    (layout.adapter / "adapter_model.safetensors").write_bytes(b"not read before the checks")
    for arm in ARMS:
        layout.arm_data(arm).write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")


@pytest.mark.parametrize("stage", ["02", "03", "04", "05"])
def test_stages_2_to_5_check_inputs_device_and_model_before_writing_their_config(tmp_path, stage):
    """A run that fails on a missing input or a bad device leaves no config.json that would refuse the fix."""
    from refine_af_utils.stages.instance_generation import run as run_instance_stage
    from refine_af_utils.layout import RunLayout
    from refine_af_utils.stages.reward_analysis import run as run_reward_analysis
    from refine_af_utils.stages.rl_training import train_generator
    from refine_af_utils.stages.sft import train_arms

    entry = {"02": run_reward_analysis, "03": train_generator, "04": run_instance_stage, "05": train_arms}[stage]
    run_dir = tmp_path / "run"
    config = RunLayout(run_dir).stage_folder(stage) / "config.json"
    smoke = load_params(REPO_ROOT / "params" / "smoke.yaml")
    with pytest.raises(FileNotFoundError, match="run stage 0"):  # nothing upstream yet
        entry(smoke, run_dir)
    assert not config.exists()
    _upstream_of_stages_2_to_5(run_dir)
    with pytest.raises(DeviceUnavailableError, match="model.device: device 'cuda:99'"):
        entry(load_params(REPO_ROOT / "params" / "smoke.yaml", overrides={"model.device": "cuda:99"}), run_dir)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        entry(load_params(REPO_ROOT / "params" / "smoke.yaml", overrides={"model.name_or_path": str(tmp_path / "none")}),
              run_dir)
    if stage != "05":  # stage 5 runs no scorer
        with pytest.raises(DeviceUnavailableError, match="reward.coherence.device"):
            entry(load_params(REPO_ROOT / "params" / "smoke.yaml", overrides={"reward.coherence.device": "cuda:99"}),
                  run_dir)
    assert not config.exists()


# --- issue 24, the next-in-line list ------------------------------------------------------------------

def test_downloads_have_a_size_cap_and_a_total_time_limit():
    import io

    from refine_af_utils.errors import DownloadLimitError
    from refine_af_utils.files import copy_capped

    out = io.BytesIO()
    assert copy_capped(io.BytesIO(b"x" * 10), out, "http://h/f", max_bytes=10) == 10 and out.getvalue() == b"x" * 10
    with pytest.raises(DownloadLimitError, match=r"^http://h/f: over the 9-byte limit$"):
        copy_capped(io.BytesIO(b"x" * 10), io.BytesIO(), "http://h/f", max_bytes=9)

    class Trickle(io.BytesIO):  # a server that sends one byte at a time, slowly
        def read(self, size: int = -1) -> bytes:
            import time

            time.sleep(0.02)
            return super().read(1)

    with pytest.raises(DownloadLimitError, match=r"http://h/f: not done after 0 s \(the limit for one download\)"):
        copy_capped(Trickle(b"y" * 100), io.BytesIO(), "http://h/f", seconds=0.05)
    assert issubclass(DownloadLimitError, OSError)  # the downloaders' one-line OSError handling applies


def test_a_symlinked_stage_folder_is_refused_in_one_line(tmp_path):
    from refine_af_utils.layout import RunLayout

    outside = tmp_path / "outside"
    outside.mkdir()
    run_dir = tmp_path / "results" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "superni_evaluation").symlink_to(outside)
    message = one_line(StageConfigError, RunLayout(run_dir).stage_folder, "06", True)
    assert "superni_evaluation is a symbolic link" in message and "replace the link by a folder" in message
    assert not any(outside.iterdir())


def test_duplicate_superni_tasks_and_ids_and_deeply_nested_json_are_one_line(tmp_path):
    folder = tmp_path / "superni"
    shutil.copytree(BUNDLED_SUPERNI, folder)
    split = folder / "splits" / "default" / "test_tasks.txt"
    first = split.read_text().splitlines()[0]
    split.write_text(split.read_text() + first + "\n")
    assert f"lists {first} more than once" in one_line(SuperNIError, load_tasks, folder)
    split.write_text("\n".join(split.read_text().splitlines()[:-1]) + "\n")
    task = folder / "tasks" / f"{first}.json"
    data = json.loads(task.read_text())
    data["Instances"][1]["id"] = data["Instances"][0]["id"]
    task.write_text(json.dumps(data))
    assert f"id {data['Instances'][0]['id']!r} duplicates that of 'Instances[0]'" in one_line(
        SuperNIError, load_tasks, folder)
    task.write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in one_line(SuperNIError, load_tasks, folder)
    seeds = _params_file(tmp_path, "[" * 20_000 + "]" * 20_000 + "\n", "seeds.jsonl")  # under the line limit
    assert "seeds.jsonl:1: JSON nested too deeply" in one_line(SeedTaskError, load_seed_tasks, seeds)


def test_a_truncated_seed_download_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    """Issue 24: a seed URL whose server stops mid-body (IncompleteRead) printed a raw traceback."""
    import http.server
    import threading

    from refine_af_utils.seeds import cached_seed_file, resolve_seed_source

    class Truncating(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"id": "seed_task_0", "na')  # then the connection closes

        def log_message(self, *args) -> None:
            pass

    monkeypatch.setenv("REFINE_AF_CACHE", str(tmp_path / "cache"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Truncating)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/seed_tasks.jsonl"
        message = one_line(SeedTaskError, resolve_seed_source, url)
        assert message == f"{url}: download cut off (25 of 1000 bytes); run again"
        assert cached_seed_file(url) is None  # nothing half-downloaded is kept as the seed file
    finally:
        server.shutdown()
