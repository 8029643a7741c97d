"""The runner: content-keyed completion markers, --dry-run, --set and the resolved params file (issues 11, 12)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from refine_af_utils.params import load_params
from refine_af_utils.run_folder import hash_outputs, stage_command_line, stage_outputs, stage_status, write_marker
from refine_af_utils.layout import STAGES
from refine_af_utils.run import main, run_pipeline

from conftest import REPO_ROOT

SMOKE = REPO_ROOT / "params" / "smoke.yaml"


def _fake_stage(run_dir: Path, stage, text: str = "v1") -> None:
    """Stand-in outputs of one stage: a file in its folder (the report: report.md) and its metrics."""
    target = run_dir / (stage.output_dir or "") / ("report.md" if stage.output_dir is None else "out.txt")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"{stage.id} {text}\n")
    (run_dir / "metrics").mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics" / f"{stage.id}.json").write_text(json.dumps({"stage": stage.id}))


@pytest.fixture
def finished_run(tmp_path):
    """A run folder where every stage 'ran' (fake outputs) with the smoke params and left its marker."""
    params = load_params(SMOKE)
    run_dir = tmp_path / "results" / params.run_name
    for stage in STAGES:
        _fake_stage(run_dir, stage)
        write_marker(run_dir, stage, params, seconds=1.0)
    return params, run_dir


def _statuses(run_dir, params):
    return {s.id: stage_status(run_dir, s, params) for s in STAGES}


def test_a_finished_run_is_complete_and_outputs_follow_the_rule(finished_run):
    params, run_dir = finished_run
    assert not any(status.run for status in _statuses(run_dir, params).values())
    assert stage_outputs(run_dir, STAGES[1]) == ["instruction_generation/out.txt", "metrics/01.json"]
    assert stage_outputs(run_dir, STAGES[-1]) == ["metrics/07.json", "report.md"]
    marker = json.loads((run_dir / "stages" / "02.json").read_text())
    assert set(marker["inputs"]) == {"00", "01"}
    assert set(marker["inputs"]["01"]) == {"instruction_generation/out.txt", "metrics/01.json"}
    assert marker["params"]["reward_analysis"] == params.to_dict()["reward_analysis"]
    assert "evaluation" not in marker["params"] and "evaluation" in json.loads(
        (run_dir / "stages" / "06.json").read_text())["params"]


def test_caches_checkpoints_hidden_and_partial_files_are_not_outputs(finished_run):
    params, run_dir = finished_run
    for extra in ("reward_analysis/cache/scores.jsonl", "rl_training/checkpoints/update-2/adapter.bin",
                  "sft/self_instruct/checkpoint-4/model.bin", "instance_generation/.raw.swp", "instance_generation/raw.jsonl.123.partial",
                  "params.yaml", ".lock"):
        (run_dir / extra).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / extra).write_text("anything")
    assert not any(status.run for status in _statuses(run_dir, params).values())


def test_an_edited_output_reruns_its_stage_and_the_later_ones_from_scratch(finished_run):
    params, run_dir = finished_run
    (run_dir / "instruction_generation" / "out.txt").write_text("edited by hand\n")
    statuses = _statuses(run_dir, params)
    assert [s for s, status in statuses.items() if status.run] == ["01", "02", "03", "04", "05", "06", "07"]
    assert statuses["01"].from_scratch and "its outputs changed since it ran: instruction_generation/out.txt changed" \
        in statuses["01"].reason
    assert statuses["02"].from_scratch
    assert statuses["02"].reason == "stage 01's outputs changed since it ran: instruction_generation/out.txt changed"


def test_a_deleted_output_folder_or_metrics_file_is_named(finished_run):
    params, run_dir = finished_run
    for path in (run_dir / "instance_generation").iterdir():
        path.unlink()
    (run_dir / "instance_generation").rmdir()
    status = stage_status(run_dir, STAGES[4], params)
    assert status.run and status.from_scratch and "instance_generation/out.txt deleted" in status.reason
    (run_dir / "metrics" / "02.json").unlink()
    assert stage_status(run_dir, STAGES[2], params).reason == "its outputs changed since it ran: metrics/02.json deleted"


def test_same_content_rewritten_stays_complete_and_sizes_and_times_spare_rehashing(finished_run, monkeypatch):
    params, run_dir = finished_run
    path = run_dir / "seed_tasks" / "out.txt"
    path.write_text(path.read_text())  # new modification time, same bytes: rehashed, equal
    os.utime(path, ns=(1, 1))
    assert not any(status.run for status in _statuses(run_dir, params).values())
    recorded = json.loads((run_dir / "stages" / "00.json").read_text())["outputs"]
    assert set(recorded["seed_tasks/out.txt"]) == {"sha256", "size", "mtime_ns"}

    import refine_af_utils.run_folder as run_folder_module

    write_marker(run_dir, STAGES[0], params, 1.0, inputs={})  # records the current sizes and times
    monkeypatch.setattr(run_folder_module, "sha256_file", lambda p: pytest.fail(f"{p} was rehashed"))
    hash_outputs(run_dir, STAGES[0], json.loads((run_dir / "stages" / "00.json").read_text())["outputs"])


def test_a_params_change_names_the_keys_and_reruns_in_place_only_under_resumable_keys(finished_run):
    params, run_dir = finished_run
    changed = load_params(SMOKE, overrides={"rl.kl_coef": 0.2, "rl.updates": 3})
    statuses = _statuses(run_dir, changed)
    assert [s for s, status in statuses.items() if status.run] == ["03", "04", "05", "06", "07"]
    assert statuses["03"].reason == "params changed: rl.kl_coef, rl.updates" and statuses["03"].from_scratch
    more_updates = _statuses(run_dir, load_params(SMOKE, overrides={"rl.updates": 3}))["03"]
    assert more_updates.run and not more_updates.from_scratch  # training continues from its checkpoint


def test_old_torn_and_missing_markers_mean_run(finished_run):
    params, run_dir = finished_run
    (run_dir / "stages" / "00.json").write_text(json.dumps({"stage": "00", "params_fingerprint": "x", "seconds": 1}))
    (run_dir / "stages" / "01.json").write_text('{"stage": "01", "par')
    (run_dir / "stages" / "02.json").unlink()
    statuses = _statuses(run_dir, params)
    assert "predates output hashes" in statuses["00"].reason
    assert statuses["01"].reason == statuses["02"].reason == "not run yet (no marker)"


def test_a_marker_from_an_older_outputs_version_reruns_from_scratch_and_markers_name_the_code(finished_run):
    """A code change that alters outputs for the same params (the seed rule) bumps OUTPUTS_VERSION:
    stages made before it are not complete, so a run never mixes the two versions' outputs."""
    import re

    from refine_af_utils.layout import OUTPUTS_VERSION

    params, run_dir = finished_run
    marker_path = run_dir / "stages" / "03.json"
    marker = json.loads(marker_path.read_text())
    assert marker["outputs_version"] == OUTPUTS_VERSION
    in_checkout = (REPO_ROOT / ".git").exists()  # a clone (CI): the commit; an installed package: its version
    assert re.fullmatch(r"[0-9a-f]{12}(-dirty)?" if in_checkout else r"refine-af .+|unknown", marker["code"]), marker["code"]
    del marker["outputs_version"]  # what the runner wrote before versions were recorded (version 1)
    marker_path.write_text(json.dumps(marker))
    statuses = _statuses(run_dir, params)
    assert [s for s, status in statuses.items() if status.run] == ["03"]  # later ones rerun if its new outputs differ
    assert statuses["03"].from_scratch
    assert statuses["03"].reason == (f"made by an older package (outputs version 1, now {OUTPUTS_VERSION}: "
                                     "the same params give other outputs)")


def test_dry_run_after_an_evaluation_change_skips_stages_0_to_5_and_names_the_key(finished_run, capsys):
    params, run_dir = finished_run
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    assert main([str(SMOKE), "--results-root", str(run_dir.parent), "--set", "evaluation.max_new_tokens=64",
                 "--dry-run", "--in-place"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == ["skip"] * 6 + ["run"] * 2
    assert [line[1:3] for line in lines] == [s.id for s in STAGES]
    assert "params changed: evaluation.max_new_tokens" in lines[6] and "params changed: evaluation.max_new_tokens" \
        in lines[7]
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # nothing written, no lock


def test_dry_run_names_an_upstream_change_and_what_it_implies_later(finished_run, capsys):
    params, run_dir = finished_run
    (run_dir / "rl_training" / "out.txt").unlink()
    assert main([str(SMOKE), "--results-root", str(run_dir.parent), "--from", "02", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[02] 02_reward_analysis.ipynb: skip (complete, skipped")
    assert lines[1] == ("[03] 03_rl_training.ipynb: run (its outputs changed since it ran: rl_training/out.txt deleted; "
                        "from scratch)")
    assert lines[2].startswith("[04] 04_instance_generation.ipynb: run (stage 03's outputs changed")


def _tree(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run folder by content, less the runner's empty lock file (taken before it checks)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("dry", [True, False])
def test_only_refuses_a_stage_whose_upstream_is_stale_and_dry_run_agrees(finished_run, capsys, dry):
    """--only 04 after a stage 1 change would write instances for new instructions with an adapter trained on
    the old ones: refused in one line, by --dry-run and by the run alike, and the run folder is untouched."""
    params, run_dir = finished_run
    before = _tree(run_dir)
    args = [str(SMOKE), "--results-root", str(run_dir.parent), "--set", "num_instructions=9", "--only", "04",
            "--in-place"]
    assert main(args + (["--dry-run"] if dry else [])) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert ("stage 04 (instance generation (both arms)) needs stage 01 (instruction generation) first, which would "
            "run: params changed: num_instructions; run `python -m refine_af_utils.run") in captured.err
    assert '--set num_instructions=9 --from 01`' in captured.err
    assert _tree(run_dir) == before  # params.yaml, markers, outputs: byte-identical


def _verdicts(out: str) -> dict[str, str]:
    """``{stage id: "run" | "skip"}`` from the runner's per-stage lines (dry or real)."""
    verdicts = {}
    for line in out.splitlines():
        if line.startswith("[") and line[3] == "]":
            verdict = line.split(": ", 1)[1]
            verdicts[line[1:3]] = "skip" if verdict.startswith(("skip", "complete")) else "run"
    return verdicts


def test_set_on_a_finished_run_writes_a_derived_run_that_copies_the_unchanged_stages(finished_run, capsys):
    """--set on a finished run leaves it as it was: a derived run gets the stages the change leaves unchanged
    (copied, not rerun); --dry-run says the same, per stage, and writes nothing."""
    params, run_dir = finished_run
    before = _tree(run_dir)
    args = [str(SMOKE), "--results-root", str(run_dir.parent), "--set", "evaluation.max_new_tokens=64", "--until", "05"]
    assert main(args + ["--dry-run"]) == 0
    dry = capsys.readouterr().out
    derived = run_dir.parent / "smoke--max_new_tokens-64"
    assert dry.splitlines()[0] == (f"--set changes the finished run 'smoke': writing to {derived} instead (stages "
                                   "00, 01, 02, 03, 04, 05 copied from it, same settings; --in-place changes 'smoke' itself)")
    assert not derived.exists() and _tree(run_dir) == before  # the dry run wrote nothing
    assert main(args) == 0
    real = capsys.readouterr().out
    assert _verdicts(dry) == _verdicts(real) == {f"0{i}": "skip" for i in range(6)}
    assert _tree(run_dir) == before  # the finished run is untouched
    assert {name: data for name, data in _tree(derived).items() if not name.startswith(("stages/", "params.yaml"))} \
        == {name: data for name, data in before.items() if name.split("/")[0] in
            {"seed_tasks", "instruction_generation", "reward_analysis", "rl_training", "instance_generation", "sft",
             "metrics", "notebooks"} and not name.startswith(("metrics/06", "metrics/07"))}
    changed = load_params(SMOKE, overrides={"evaluation.max_new_tokens": 64, "run_name": derived.name})
    assert [s.id for s, status in zip(STAGES, _statuses(derived, changed).values()) if status.run] == ["06", "07"]
    assert main([*args[:-2], "--dry-run"]) == 0  # the same --set again: the derived run, now with 00-05
    assert _verdicts(capsys.readouterr().out) == {**{f"0{i}": "skip" for i in range(6)}, "06": "run", "07": "run"}


def test_set_naming_run_name_or_in_place_or_on_an_unfinished_run_is_not_derived(finished_run, tmp_path, capsys):
    params, run_dir = finished_run
    for extra in (["--set", "run_name=mine"], ["--in-place"]):
        assert main([str(SMOKE), "--results-root", str(run_dir.parent), "--set", "evaluation.max_new_tokens=64",
                     *extra, "--dry-run"]) == 0
        assert "writing to" not in capsys.readouterr().out
    empty = tmp_path / "elsewhere"
    assert main([str(SMOKE), "--results-root", str(empty), "--set", "evaluation.max_new_tokens=64", "--dry-run"]) == 0
    assert "writing to" not in capsys.readouterr().out
    assert main([str(SMOKE), "--results-root", str(run_dir.parent), "--set", "evaluation.max_new_tokens=8",
                 "--dry-run"]) == 0  # smoke.yaml's own value: nothing changes, so nothing is derived
    assert "writing to" not in capsys.readouterr().out


@pytest.mark.parametrize("text, name", [
    ({"evaluation.max_new_tokens": 64}, "smoke--max_new_tokens-64"),
    ({"rl.learning_rate": 1e-4, "model.dtype": "bfloat16"}, "smoke--dtype-bfloat16_learning_rate-0.0001"),
    ({"rl.lora.target_modules": ["q_proj", "v_proj"]}, "smoke--target_modules-q_projv_proj"),
    ({"seed_tasks": "https://example.org/a/very/long/path/to/some/seed_tasks_file.jsonl"}, None),
])
def test_derived_run_names_are_readable_folder_names(text, name):
    from refine_af_utils.params import check_run_name
    from refine_af_utils.run import derived_run_name

    derived = derived_run_name("smoke", text)
    check_run_name(derived)
    assert derived == name if name else (derived.startswith("smoke--set-") and len(derived) == len("smoke--set-") + 10)


def test_a_refused_derived_run_leaves_no_folder(finished_run, capsys):
    params, run_dir = finished_run
    before = set(run_dir.parent.iterdir())
    assert main([str(SMOKE), "--results-root", str(run_dir.parent), "--set", "num_instructions=9", "--only", "04"]) == 2
    assert "needs stage 01 (instruction generation) first" in capsys.readouterr().err
    assert set(run_dir.parent.iterdir()) == before


def test_only_refuses_a_report_over_a_torn_upstream_file(finished_run, capsys):
    """A torn last row of rl_training/metrics.csv (a crash mid-append) changes stage 3's outputs: --only 07 would
    put the torn row in the report, so it is refused, naming stage 3."""
    params, run_dir = finished_run
    with open(run_dir / "rl_training" / "out.txt", "a") as handle:
        handle.write("4,0.46")  # no newline: torn
    assert main([str(SMOKE), "--results-root", str(run_dir.parent), "--only", "07"]) == 2
    err = capsys.readouterr().err
    assert "needs stage 03 (RL training) first, which would run: its outputs changed since it ran: " \
           "rl_training/out.txt changed" in err and "--from 03`" in err
    assert main([str(SMOKE), "--results-root", str(run_dir.parent), "--from", "03", "--dry-run"]) == 0


def test_a_bad_set_key_is_rejected_by_its_dotted_name_before_anything_is_written(tmp_path, capsys):
    root = tmp_path / "results"
    root.mkdir()
    assert main([str(SMOKE), "--results-root", str(root), "--set", "evaluation.max_new_tokes=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--set (over {SMOKE}): unknown key 'evaluation.max_new_tokes'" in err
    assert main([str(SMOKE), "--results-root", str(root), "--set", "evaluation.max_new_tokens"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert main([str(SMOKE), "--results-root", str(root), "--set", "rl.kl_coef=-1"]) == 2
    assert f"--set rl.kl_coef=-1 (over {SMOKE}): key 'rl.kl_coef' must be at least 0" in capsys.readouterr().err
    assert not any(root.iterdir())


def test_stage_entry_points_take_set_and_record_the_resolved_params(tmp_path, capsys):
    root = tmp_path / "results"
    with stage_command_line("test", [str(SMOKE), "--results-root", str(root),
                                     "--set", "rl.updates=5", "--set", "model.device=cuda"]) as (params, run_dir):
        pass
    assert params.rl.updates == 5 and params.model.device == "cuda" and run_dir == root / "smoke"
    assert load_params(run_dir / "params.yaml") == params
    assert "--set rl.updates=5 --set model.device=\"cuda\"" in (run_dir / "params.yaml").read_text()
    with pytest.raises(SystemExit) as exit_info:
        with stage_command_line("test", [str(SMOKE), "--results-root", str(root), "--set", "rl.update=5"]):
            pass
    assert exit_info.value.code == 2 and "unknown key 'rl.update'" in capsys.readouterr().err


@pytest.mark.slow
def test_the_runner_reruns_stage_0_from_scratch_after_its_output_is_edited(tmp_path, capsys):
    """Through papermill, stage 0 only (no model): resolved params injected, hashes recorded, edits caught."""
    root = tmp_path / "results"
    run_dir = run_pipeline(SMOKE, only="00", results_root=root, overrides={"num_instructions": 7})
    resolved = run_dir / "params.yaml"
    assert load_params(resolved) == load_params(SMOKE, overrides={"num_instructions": 7})
    assert "extends" not in yaml.safe_load(resolved.read_text())
    executed = json.loads((run_dir / "notebooks" / STAGES[0].notebook).read_text())
    injected = "".join(next(c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", []))
                       ["source"])
    assert f"params_path = {str(resolved.resolve())!r}" in injected.replace('"', "'")
    marker = json.loads((run_dir / "stages" / "00.json").read_text())
    assert {"seed_tasks/seed_tasks.jsonl", "seed_tasks/seed_summary.csv", "metrics/00.json"} <= set(marker["outputs"])
    original = (run_dir / "seed_tasks" / "seed_tasks.jsonl").read_bytes()

    (run_dir / "seed_tasks" / "seed_tasks.jsonl").write_bytes(original[: len(original) // 2])
    capsys.readouterr()
    run_pipeline(SMOKE, only="00", results_root=root, overrides={"num_instructions": 7})
    out = capsys.readouterr().out
    assert ("[00] 00_seed_tasks.ipynb: rerunning from scratch: its outputs changed since it ran: "
            "seed_tasks/seed_tasks.jsonl changed") in out.splitlines()
    assert (run_dir / "seed_tasks" / "seed_tasks.jsonl").read_bytes() == original

    run_pipeline(SMOKE, only="00", results_root=root, overrides={"num_instructions": 7})
    assert "[00] 00_seed_tasks.ipynb: complete, skipped" in capsys.readouterr().out


def test_local_inputs_are_fingerprinted_by_content(tmp_path):
    """Issue 24 item 4: an edited local seed file or Super-NI checkout left stages 0 and 6 'complete'."""
    import shutil

    from refine_af_utils.seeds import BUNDLED_SEED_TASKS
    from refine_af_utils.superni import BUNDLED_SUPERNI

    seeds, superni = tmp_path / "seeds.jsonl", tmp_path / "superni"
    shutil.copy(BUNDLED_SEED_TASKS, seeds)
    shutil.copytree(BUNDLED_SUPERNI, superni)
    params = load_params(SMOKE, overrides={"seed_tasks": str(seeds), "evaluation.superni_dir": str(superni)})
    run_dir = tmp_path / "results" / "smoke"
    for stage in STAGES:
        _fake_stage(run_dir, stage)
        write_marker(run_dir, stage, params, seconds=1.0)
    assert not any(status.run for status in _statuses(run_dir, params).values())
    marker = json.loads((run_dir / "stages" / "06.json").read_text())
    assert set(marker["params"]["inputs"]) == {"seed_tasks", "evaluation.superni_dir"}
    task = next((superni / "tasks").glob("*.json"))
    task.write_text(task.read_text().replace('"Definition"', '"Definition" ', 1))  # same path, other content
    statuses = _statuses(run_dir, params)
    assert [s for s, status in statuses.items() if status.run] == ["06", "07"]
    assert statuses["06"].reason == "params changed: inputs.evaluation.superni_dir" and statuses["06"].from_scratch
    with open(seeds, "a") as handle:
        handle.write("\n")
    assert _statuses(run_dir, params)["00"].reason == "params changed: inputs.seed_tasks"


def test_a_seed_url_is_fingerprinted_by_its_download_and_refreshed_by_one_flag(tmp_path, monkeypatch):
    import functools
    import http.server
    import threading

    from refine_af_utils.seeds import BUNDLED_SEED_TASKS, refresh_seed_download, resolve_seed_source

    monkeypatch.setenv("REFINE_AF_CACHE", str(tmp_path / "cache"))
    served = tmp_path / "served"
    served.mkdir()
    (served / "seeds.jsonl").write_bytes(BUNDLED_SEED_TASKS.read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/seeds.jsonl"
        params = load_params(SMOKE, overrides={"seed_tasks": url})
        resolve_seed_source(url)  # stage 0's download
        run_dir = tmp_path / "results" / "smoke"
        _fake_stage(run_dir, STAGES[0])
        write_marker(run_dir, STAGES[0], params, seconds=1.0)
        (served / "seeds.jsonl").write_bytes(BUNDLED_SEED_TASKS.read_bytes() + b"\n")  # the server's file changes
        assert not stage_status(run_dir, STAGES[0], params).run  # the downloaded copy is what the run used
        refresh_seed_download(url)  # python -m refine_af_utils.run ... --refresh-downloads
        assert stage_status(run_dir, STAGES[0], params).reason == "params changed: inputs.seed_tasks"
    finally:
        server.shutdown()


@pytest.mark.slow  # a real kernel through papermill
def test_a_kernel_killed_mid_stage_ends_in_one_line_and_no_marker(tmp_path, monkeypatch, capsys):
    """A stage whose kernel dies (SIGKILL, the OOM killer) ends in one line naming the executed notebook and
    the rerun, not nbclient's DeadKernelError traceback, and the stage is not marked complete."""
    import nbformat

    from refine_af_utils import run

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    dying = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("params_path = run_dir = None", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")])
    dying.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(dying, notebooks / STAGES[0].notebook)
    monkeypatch.setattr(run, "NOTEBOOK_DIR", notebooks)  # stage 00's notebook is this one
    assert main([str(REPO_ROOT / "params" / "smoke.yaml"), "--results-root", str(tmp_path / "results"),
                 "--only", "00"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[00] " in err[0] and "the notebook's kernel died" in err[0] and "rerun" in err[0]
    assert "Traceback" not in err[0]
    assert not (tmp_path / "results" / "smoke" / "stages" / "00.json").exists()
