"""Studies (issue 10, item 3): spec validation, reuse of shared stages, kill and resume, submitit, study.md."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT

from refine_af_utils.layout import STAGES
from refine_af_utils.params import load_params
from refine_af_utils.run_folder import stage_status, write_marker
from refine_af_utils.study import (
    STUDY_FILE,
    StudySpecError,
    copy_stage,
    donor_plan,
    dry_run,
    load_spec,
    main,
    placebo_contrast,
    placebo_pairs,
    reuse_stages,
    reused_stages,
    run_is_complete,
    write_study_report,
)

SMOKE = REPO_ROOT / "params" / "smoke.yaml"
STAGE = {s.id: s for s in STAGES}


def _write_spec(folder: Path, params: Path, until: str = "07", seeds=(1, 2), name: str = "tiny", **extra) -> Path:
    """A 2 x 2 study: settings ``a`` (the params as they are) and ``b`` (a stage 02 key changed)."""
    spec = {"name": name, "params": str(params), "seeds": list(seeds), "until": until,
            "grid": [{"name": "a", "set": {}}, {"name": "b", "set": {"reward.coherence.weight": 0.5}}], **extra}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# --- The spec ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"seeds": []}, "key 'seeds' must be a non-empty list of integers"),
    ({"seeds": [1, 1]}, "key 'seeds' lists a seed twice"),
    ({"until": "09"}, "key 'until' must be a stage id"),
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"reuse_from": ["tiny"]}, "key 'reuse_from' must be a list of other studies' names"),
    ({"params": "nowhere.yaml"}, "key 'params': "),
    ({"grid": [{"name": "a", "sets": {}}]}, "unknown key 'grid[0].sets'"),
    ({"grid": [{"name": "a b"}]}, "key 'grid[0].name' must be a folder name"),
    ({"grid": [{"name": "a"}, {"name": "a"}]}, "setting 'a' is named twice"),
    ({"grid": [{"name": "a", "set": {"random_seed": 3}}]}, "key 'grid[0].set.random_seed' is set by the study"),
    ({"grid": [{"name": "a", "set": {"rl.colour": 3}}]}, "setting 'a' (seed 1): "),
    ({"grid": [{"name": "a", "set": {"rl.updates": "many"}}]}, "key 'rl.updates' must be int"),
])
def test_a_bad_spec_is_one_line_naming_the_file_and_key(tmp_path, change, message):
    path = _write_spec(tmp_path, SMOKE)
    data = yaml.safe_load(path.read_text())
    data.update(change)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(StudySpecError) as error:
        load_spec(path)
    text = str(error.value)
    assert message in text and str(path) in text and "\n" not in text


def test_a_key_given_twice_in_a_spec_is_refused_like_in_a_params_file(tmp_path):
    """The spec is read by the params loader's strict YAML reader: a duplicate key is not "the last wins"."""
    path = _write_spec(tmp_path, SMOKE)
    text = path.read_text()
    path.write_text(text + "seeds: [7]\n")  # `seeds` again, after the first
    line = len(text.splitlines()) + 1
    with pytest.raises(StudySpecError) as error:
        load_spec(path)
    first = 1 + next(i for i, row in enumerate(text.splitlines()) if row.startswith("seeds:"))
    assert str(error.value) == f"{path}:{line}: duplicate key 'seeds' (first given on line {first})"
    path.write_text(text + "grid_note: !!python/name:os.system ''\n")  # a tag the safe loader refuses
    with pytest.raises(StudySpecError, match="not valid YAML") as error:
        load_spec(path)
    assert str(error.value).startswith(f"{path}:{line}: ") and "\n" not in str(error.value)


def test_a_spec_gives_runs_seeds_and_per_setting_params_files(tmp_path):
    path = _write_spec(tmp_path, SMOKE, until=1)  # an int until reads as a stage id
    spec = load_spec(path)
    assert spec.until == "01" and [s.id for s in spec.stages] == ["00", "01"]
    assert [r.name for r in spec.runs] == ["a-seed1", "a-seed2", "b-seed1", "b-seed2"]
    params = spec.runs[3].load()
    assert (params.run_name, params.random_seed, params.reward.coherence.weight) == ("b-seed2", 2, 0.5)
    # settings sharing stages 00-01 (same seed) wait for each other under slurm; stage 00 alone is not worth it
    assert donor_plan(spec) == {"a-seed1": None, "a-seed2": None, "b-seed1": "a-seed1", "b-seed2": "a-seed2"}
    backbones = load_spec(REPO_ROOT / "params" / "studies" / "backbones.yaml")
    names = [r.load().model.name_or_path for r in backbones.runs]
    assert names == ["meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "mistralai/Mistral-7B-v0.1",
                     "meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B", "google/gemma-2-9b"]


def test_the_committed_specs_and_new_backbone_recipes_load():
    for name in ("reward_ablation", "default_seeds", "backbones", "rl_learns", "rl_optimises", "rl_optimises_ppo",
                 "rl_learning_rate"):
        spec = load_spec(REPO_ROOT / "params" / "studies" / f"{name}.yaml")
        assert len(spec.seeds) >= (3 if name == "default_seeds" else 1)  # the ablation: 1 seed, to fit 2 CPU-hours
    rl = {r.name: r.load().rl for r in load_spec(REPO_ROOT / "params" / "studies" / "rl_optimises.yaml").runs}
    assert all(c.heldout_instructions >= 64 and c.heldout_samples >= 4 for c in rl.values())  # issue 20's power
    assert rl["placebo-seed42"].placebo and not rl["grpo-seed42"].placebo
    assert {k: v for k, v in vars(rl["placebo-seed42"]).items() if k != "placebo"} == \
        {k: v for k, v in vars(rl["grpo-seed42"]).items() if k != "placebo"}  # the control differs in the reward only
    for name in ("rl_optimises", "rl_learning_rate"):  # each GRPO setting has its placebo, for the contrast
        spec = load_spec(REPO_ROOT / "params" / "studies" / f"{name}.yaml")
        assert [(s.name, p.name) for s, p in placebo_pairs(spec)] == [(spec.grid[0].name, spec.grid[1].name)]
    half = {r.name: r.load().rl for r in load_spec(REPO_ROOT / "params" / "studies" / "rl_learning_rate.yaml").runs}
    assert {k: v for k, v in vars(half["grpo-lr1.5e-4-seed43"]).items() if k != "learning_rate"} == \
        {k: v for k, v in vars(rl["grpo-seed43"]).items() if k != "learning_rate"}  # half the lr, all else the same
    assert half["grpo-lr1.5e-4-seed43"].learning_rate * 2 == rl["grpo-seed43"].learning_rate
    ablation = {r.setting.name: r.load().reward for r in load_spec(
        REPO_ROOT / "params" / "studies" / "reward_ablation.yaml").runs}
    weights = {k: (v.reward_model.weight, v.understandability.weight, v.naturalness.weight, v.coherence.weight)
               for k, v in ablation.items()}
    assert weights["paper"] == (0.0078, -0.4421, 0.3212, 0.1520)
    assert weights["und-plus"] == (0.0078, 0.4421, 0.3212, 0.1520)
    assert weights["rm-only"] == (0.0078, 0, 0, 0) and weights["und-only"] == (0, -0.4421, 0, 0)
    assert weights["nat-only"] == (0, 0, 0.3212, 0) and weights["coh-only"] == (0, 0, 0, 0.1520)
    assert weights["equal"] == (0.25, 0.25, 0.25, 0.25)
    recipes = REPO_ROOT / "params" / "recipes"
    paper = load_params(recipes / "llama2-7b" / "paper.yaml").to_dict()
    for folder, run_name, hub_id in (("llama31-8b", "paper_llama31_8b", "meta-llama/Llama-3.1-8B"),
                                     ("qwen25-7b", "paper_qwen25_7b", "Qwen/Qwen2.5-7B"),
                                     ("gemma2-9b", "paper_gemma2_9b", "google/gemma-2-9b")):
        params = load_params(recipes / folder / "paper.yaml").to_dict()
        assert params["model"]["name_or_path"] == hub_id and params["run_name"] == run_name
        # same reward and scale: everything but the backbone and the run name is the paper recipe's
        params["model"]["name_or_path"], params["run_name"] = paper["model"]["name_or_path"], paper["run_name"]
        assert params == paper


# --- Reuse on fake stages (no notebooks) -------------------------------------------------------------

def _fake_run(study_dir: Path, run, stage_ids) -> Path:
    """Stand-in outputs and markers of the given stages, as the runner would leave them."""
    params = run.load()
    run_dir = study_dir / run.name
    for stage_id in stage_ids:
        stage = STAGE[stage_id]
        target = run_dir / stage.output_dir / "out.txt"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"{stage_id} of {run.name}\n")
        (run_dir / stage.output_dir / "cache").mkdir(exist_ok=True)
        (run_dir / stage.output_dir / "cache" / "scores.jsonl").write_text("{}\n")
        (run_dir / "metrics").mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics" / f"{stage_id}.json").write_text(json.dumps({"stage": stage_id}))
        write_marker(run_dir, stage, params, seconds=1.0)
    return run_dir


def test_reuse_copies_the_longest_shared_chain_and_a_cut_copy_never_looks_complete(tmp_path, monkeypatch, capsys):
    spec = load_spec(_write_spec(tmp_path, SMOKE, until="03"))
    runs = {r.name: r for r in spec.runs}
    study_dir = tmp_path / "results" / "tiny"
    donor = _fake_run(study_dir, runs["a-seed1"], ["00", "01", "02"])
    _fake_run(study_dir, runs["a-seed2"], ["00"])
    params = runs["b-seed1"].load()

    # a kill in the middle of the copy (here: as the marker, the last file, is written) leaves no marker
    import refine_af_utils.run_copy as reuse  # copy_stage calls run_copy's _replace_file

    real = reuse._replace_file

    def crash_on_marker(source, target):
        if target.parent.name == "stages":
            raise KeyboardInterrupt("killed")
        real(source, target)

    monkeypatch.setattr(reuse, "_replace_file", crash_on_marker)
    with pytest.raises(KeyboardInterrupt):
        reuse_stages(study_dir, runs["b-seed1"], params, spec.stages)
    run_dir = study_dir / "b-seed1"
    assert (run_dir / "seed_tasks" / "out.txt").is_file() and not (run_dir / "stages" / "00.json").exists()
    assert stage_status(run_dir, STAGE["00"], params).run
    monkeypatch.setattr(reuse, "_replace_file", real)

    # the rerun copies stages 00 and 01 from a-seed1 (02 reads the changed reward), keeping times
    copied = reuse_stages(study_dir, runs["b-seed1"], params, spec.stages)
    assert copied == {"00": "a-seed1", "01": "a-seed1"}
    assert "[01] 01_instruction_generation.ipynb: reused from a-seed1" in capsys.readouterr().out
    assert not stage_status(run_dir, STAGE["01"], params).run and stage_status(run_dir, STAGE["02"], params).run
    assert (run_dir / "stages" / "01.json").read_bytes() == (donor / "stages" / "01.json").read_bytes()
    assert (run_dir / "instruction_generation" / "out.txt").stat().st_mtime_ns == \
        (donor / "instruction_generation" / "out.txt").stat().st_mtime_ns
    assert (run_dir / "instruction_generation" / "cache" / "scores.jsonl").is_file()  # caches come along
    assert not (run_dir / ".study-tmp").exists() or not any((run_dir / ".study-tmp").iterdir())
    assert reused_stages(run_dir) == {"00": "a-seed1", "01": "a-seed1"}
    assert reuse_stages(study_dir, runs["b-seed1"], params, spec.stages) == {}  # nothing left to copy

    # b-seed2 shares only stage 00 with a-seed1 and a-seed2 (its seed differs from a-seed1's)
    assert reuse_stages(study_dir, runs["b-seed2"], runs["b-seed2"].load(), spec.stages) == {"00": "a-seed1"}
    # a stage rerun by the runner is no longer reported as reused
    (run_dir / "stages" / "01.json").write_text((run_dir / "stages" / "01.json").read_text() + " ")
    assert reused_stages(run_dir) == {"00": "a-seed1"}
    with pytest.raises(ValueError):
        copy_stage(donor, run_dir, STAGE["07"])


def test_reuse_from_another_study_copies_its_runs_stages(tmp_path):
    spec = load_spec(_write_spec(tmp_path, SMOKE, until="03"))
    donor = _fake_run(tmp_path / "results" / "tiny", spec.runs[0], ["00", "01"])
    other_path = _write_spec(tmp_path, SMOKE, until="03", name="other", reuse_from=["tiny"])
    other = load_spec(other_path)
    assert other.reuse_from == ("tiny",)
    run = other.runs[0]
    study_dir = tmp_path / "results" / "other"
    assert dry_run(other, tmp_path / "results")[0].endswith("reuses 00 from tiny/a-seed1, 01 from tiny/a-seed1)")
    study_dir.mkdir(parents=True)
    copied = reuse_stages(study_dir, run, run.load(), other.stages,
                          [tmp_path / "results" / "tiny"])
    assert copied == {"00": "tiny/a-seed1", "01": "tiny/a-seed1"}
    assert (study_dir / run.name / "stages" / "01.json").read_bytes() == (donor / "stages" / "01.json").read_bytes()
    assert reused_stages(study_dir / run.name) == {"00": "tiny/a-seed1", "01": "tiny/a-seed1"}
    with pytest.raises(StudySpecError, match="reuse_from"):  # a study cannot reuse from itself
        load_spec(_write_spec(tmp_path, SMOKE, until="03", name="other", reuse_from=["other"]))


# --- The study report on hand-made run folders -------------------------------------------------------

TASKS = ["t1", "t2", "t3", "t4"]
# Self-Instruct arm per task and seed: seed 2 beats seed 1 on t1 and t2, loses t3, ties t4 (setting a)
SELF_INSTRUCT = {1: [10.0, 20.0, 30.0, 40.0], 2: [12.0, 25.0, 29.0, 40.0]}


def _fake_evaluated_run(run_dir: Path, seed: int, shift: float, eval_done: bool = True, t_interval: bool = True
                        ) -> None:
    """A run's stage 3, 4 and 6 files with known numbers (REFINE-AF = Self-Instruct + shift on every task);
    without ``t_interval``, a held-out summary as runs made before the t interval wrote it."""
    (run_dir / "rl_training").mkdir(parents=True)
    summary = {"measure": "reward", "mean_difference": 0.1 * seed, "ci_low": 0.05 * seed - 0.06,
               "ci_high": 0.2 * seed, "pairs": 5, "mean_before": 0.5, "mean_after": 0.5 + 0.1 * seed}
    if t_interval:
        summary |= {"t_ci_low": 0.02 * seed - 0.01, "t_ci_high": 0.3 * seed, "sign_flip_p": 0.0625}
    pd.DataFrame([summary]).to_csv(run_dir / "rl_training" / "heldout_summary.csv", index=False)
    (run_dir / "metrics").mkdir()
    (run_dir / "metrics" / "03.json").write_text(json.dumps({"algorithm": "grpo", "first_kl": 0.0, "last_kl": 0.25,
                                                             "probe_exploitable": True, "peak_rss_gb": 3.5}))
    (run_dir / "instance_generation").mkdir()
    pd.DataFrame({"self_instruct": [0.5, 0.6, 0.7, 0.8, 0.1], "refine_af": [0.6, 0.6, 0.5, 0.8, 0.2]},
                 index=["reward_model", "understandability", "naturalness", "coherence", "reward"]).to_csv(
        run_dir / "instance_generation" / "reward_by_arm.csv")
    if not eval_done:
        return
    (run_dir / "superni_evaluation").mkdir()
    si = SELF_INSTRUCT[seed]
    pd.DataFrame({"task": TASKS, "category": ["c"] * 4, "rougeL_base": [1.0] * 4, "rougeL_self_instruct": si,
                  "rougeL_refine_af": [v + shift for v in si], "instances": [3] * 4}).to_csv(
        run_dir / "superni_evaluation" / "per_task.csv", index=False)
    mean = sum(si) / 4
    pd.DataFrame([{"model": "self_instruct", "metric": "rougeL", "mean": mean, "ci_low": mean - 1, "ci_high": mean + 1},
                  {"model": "refine_af", "metric": "rougeL", "mean": mean + shift, "ci_low": mean + shift - 1,
                   "ci_high": mean + shift + 1},
                  {"model": "refine_af - self_instruct", "metric": "rougeL", "mean": shift, "ci_low": shift - 0.5,
                   "ci_high": shift + 0.5}]).to_csv(run_dir / "superni_evaluation" / "overall_ci.csv", index=False)
    wins = 4 if shift > 0 else 0
    pd.Series({"tasks": 4, "wins": wins, "ties": 0, "losses": 4 - wins, "win_share": wins / 4,
               "win_share_ci_low": 0.1, "win_share_ci_high": 0.9, "sign_test_p": 0.125}).to_csv(
        run_dir / "superni_evaluation" / "tasks_improved.csv", header=["value"], index_label="measure")
    (run_dir / "metrics" / "06.json").write_text(json.dumps({"base_rougeL": 1.0}))


def test_study_report_tables_spread_and_aa_control_from_hand_made_runs(tmp_path):
    spec = load_spec(_write_spec(tmp_path, SMOKE))
    study_dir = tmp_path / "results" / "tiny"
    _fake_evaluated_run(study_dir / "a-seed1", 1, shift=1.0)
    _fake_evaluated_run(study_dir / "a-seed2", 2, shift=3.0)
    _fake_evaluated_run(study_dir / "b-seed1", 1, shift=-2.0)
    _fake_evaluated_run(study_dir / "b-seed2", 2, shift=0.0, eval_done=False, t_interval=False)  # stopped after 4
    for run, code in (("a-seed1", "abc123def456"), ("a-seed2", "abc123def456-dirty")):  # markers name the code
        (study_dir / run / "stages").mkdir(parents=True, exist_ok=True)
        (study_dir / run / "stages" / "00.json").write_text(json.dumps({"stage": "00", "code": code}))

    report = write_study_report(spec, study_dir)
    runs = pd.read_csv(study_dir / "study_runs.csv").set_index("run")
    assert runs.loc["a-seed2", "rougeL_difference"] == 3.0 and runs.loc["a-seed2", "rougeL_difference_ci_low"] == 2.5
    assert runs.loc["a-seed1", "self_instruct_rougeL"] == 25.0 and runs.loc["a-seed1", "win_share"] == 1.0
    assert runs.loc["b-seed1", "heldout_reward_gain"] == pytest.approx(0.1)
    assert runs.loc["a-seed1", "understandability_change"] == 0.0
    assert runs.loc["a-seed1", "naturalness_change"] == pytest.approx(-0.2)
    assert "superni_evaluation/overall_ci.csv" in runs.loc["b-seed2", "missing"] and pd.isna(runs.loc["b-seed2", "win_share"])

    settings = pd.read_csv(study_dir / "study_settings.csv").set_index("setting")
    assert settings.loc["a", "rougeL_difference_mean"] == 2.0
    assert settings.loc["a", "rougeL_difference_sd"] == pytest.approx(2 ** 0.5)
    assert settings.loc["b", "rougeL_difference_n"] == 1 and pd.isna(settings.loc["b", "rougeL_difference_sd"])
    assert settings.loc["b", "heldout_reward_gain_n"] == 2

    by_seed = pd.read_csv(study_dir / "study_win_share_by_seed.csv", index_col="setting")
    assert list(by_seed.columns) == ["seed1", "seed2"] and by_seed.loc["a", "seed2"] == 1.0
    assert by_seed.loc["b", "seed1"] == 0.0 and pd.isna(by_seed.loc["b", "seed2"])

    aa = pd.read_csv(study_dir / "study_aa_control.csv")
    assert len(aa) == 1  # setting b has one seed through stage 6: no pair
    row = aa.iloc[0]
    assert (row.setting, row.seed_a, row.seed_b, row.tasks) == ("a", 1, 2, 4)
    assert (row.a_better, row.ties, row.b_better) == (1, 1, 2)
    assert row.b_better_share == 0.5 and row.decided_share == 0.75
    assert row.mean_abs_difference == pytest.approx((2 + 5 + 1 + 0) / 4)

    assert (runs.loc["a-seed1", "code"], runs.loc["a-seed2", "code"]) == ("abc123def456", "abc123def456-dirty")
    text = report.read_text()
    assert "made by package revision(s) `abc123def456`, `abc123def456-dirty`" in text
    assert "## A/A control" in text and "a given seed's arm 'won' 38% of tasks" in text
    assert "| a-seed2 | " in text and "3.00 [2.50, 3.50]" in text
    assert "2.000 ± 1.414 (range 1.000 to 3.000, 2 seeds)" in text
    # stage 3's held-out section: base -> trained, both intervals, p, KL and the probe; a gain counts as above 0
    # only when its bootstrap and t intervals both are (seed 1's bootstrap interval, [-0.01, 0.2], includes 0)
    assert "## Stage 3 on held-out instructions" in text
    assert "| a-seed2 | 5 | 0.5000 -> 0.7000: 0.2000 [0.0400, 0.4000]; t [0.0300, 0.6000]; p 0.062 |" in text
    assert "| 0.0000 | 0.2500 | True | 3.50 |" in text
    assert "- `a`: full-reward gain above 0 (both intervals) in 1 of 2 run(s) (a-seed2); interval includes 0 in 1." in text
    assert ("- `b`: full-reward gain above 0 (both intervals) in 0 of 2 run(s); above 0 by the bootstrap CI alone "
            "(no t interval recorded) in 1 (b-seed2); interval includes 0 in 1.") in text
    for figure in ("fig_settings.png", "fig_aa_control.png"):
        assert (study_dir / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({figure})" in text


def _heldout_eval(run_dir: Path, base: list[float], trained: list[float], parsed: list[float]) -> None:
    """A run's ``heldout_eval.csv`` over instructions i0, i1, ...: the full reward base and trained, the parsed
    share and (only where parsed) the content reward."""
    (run_dir / "rl_training").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"instruction": [f"i{k}" for k in range(len(base))], "base_reward": base, "trained_reward": trained,
                  "base_parsed": [1.0] * len(base), "trained_parsed": parsed,
                  "base_content": base, "trained_content": [t if p else float("nan") for t, p in zip(trained, parsed)]}
                 ).to_csv(run_dir / "rl_training" / "heldout_eval.csv", index=False)


def test_each_setting_is_compared_with_its_placebo_paired_over_held_out_instructions(tmp_path):
    spec_path = _write_spec(tmp_path, SMOKE, until="03", seeds=(1, 2), grid=[
        {"name": "a", "set": {"rl.learning_rate": 2e-4}}, {"name": "b", "set": {}},
        {"name": "a-placebo", "set": {"rl.learning_rate": 2e-4, "rl.placebo": True}}])
    spec = load_spec(spec_path)
    assert [(s.name, p.name) for s, p in placebo_pairs(spec)] == [("a", "a-placebo")]  # b differs in lr too
    study_dir = tmp_path / "results" / "tiny"
    base = [0.1, 0.2, 0.3, 0.4, 0.5]
    _heldout_eval(study_dir / "a-seed1", base, [0.3, 0.4, 0.2, 0.6, 0.5], parsed=[1, 1, 0, 1, 1])
    _heldout_eval(study_dir / "a-placebo-seed1", base, [0.1, 0.1, 0.3, 0.5, 0.4], parsed=[1, 0, 1, 1, 1])
    _heldout_eval(study_dir / "a-seed2", base, [0.2] * 5, parsed=[1] * 5)  # seed 2's placebo not run: no row

    contrast = placebo_contrast(spec, study_dir).set_index("measure")
    assert set(contrast["seed"]) == {1} and contrast["same_base"].all()
    reward = contrast.loc["reward"]
    assert reward["pairs"] == 5 and reward["mean_before"] == pytest.approx(0.28)
    assert reward["mean_difference"] == pytest.approx((0.2 + 0.3 - 0.1 + 0.1 + 0.1) / 5)
    assert reward["t_ci_low"] < reward["mean_difference"] < reward["t_ci_high"]
    assert contrast.loc["parsed", "mean_difference"] == pytest.approx(0.0)
    assert contrast.loc["content", "pairs"] == 3  # content only where both kept an instance
    assert contrast.loc["content", "mean_difference"] == pytest.approx((0.2 + 0.1 + 0.1) / 3)

    report = write_study_report(spec, study_dir).read_text()
    assert "## Against the placebo" in report
    assert "| a | a-placebo | 1 | 5 | yes | 0.2800 -> 0.4000: 0.1200 [" in report
    assert pd.read_csv(study_dir / "study_placebo_contrast.csv")["measure"].tolist() == ["reward", "parsed", "content"]


# --- Through the real runner and papermill (slow) -------------------------------------------------------

@pytest.fixture
def tiny_params(tmp_path, tiny_llama_dir) -> Path:
    """Smoke params on the tiny random Llama, with the fewest instructions stage 1 can make."""
    path = tmp_path / "tiny_params.yaml"
    path.write_text(yaml.safe_dump({
        "extends": str(SMOKE), "run_name": "tiny", "num_instructions": 2,
        "model": {"name_or_path": str(tiny_llama_dir), "dtype": "float32"},
        "instruction_generation": {"batch_size": 2, "max_new_tokens": 24, "max_batches": 2},
        "classification": {"num_examples": 4, "batch_size": 2},
    }))
    return path


def _marker_times(study_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(study_dir)): p.stat().st_mtime_ns for p in study_dir.glob("*/stages/*.json")}


@pytest.mark.slow
def test_a_study_killed_mid_run_resumes_and_reuses_stage_1_across_settings(tmp_path, tiny_params, capsys):
    spec_path = _write_spec(tmp_path, tiny_params, until="01")
    root = tmp_path / "results"
    study_dir = root / "tiny"
    log = tmp_path / "killed_study.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen([sys.executable, "-m", "refine_af_utils.study", str(spec_path), "--results-root",
                                    str(root)], cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    started = study_dir / "a-seed1" / "notebooks" / "01_instruction_generation.ipynb"  # stage 01 is under way
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None and not started.is_file():
        time.sleep(0.05)
    time.sleep(1.0)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    time.sleep(2.0)  # the orphaned notebook kernel notices its parent is gone (ipykernel polls every second)
    assert not (study_dir / "a-seed1" / "stages" / "01.json").exists()

    assert main([str(spec_path), "--results-root", str(root)]) == 0
    out = capsys.readouterr().out
    spec = load_spec(spec_path)
    for run in spec.runs:
        assert run_is_complete(study_dir / run.name, run.load(), spec.stages), run.name
    assert "[01] 01_instruction_generation.ipynb: reused from a-seed1" in out
    assert "[01] 01_instruction_generation.ipynb: reused from a-seed2" in out
    assert out.count("[01] 01_instruction_generation.ipynb: running") == 2  # a-seed1 (resumed) and a-seed2
    assert out.count("[00] 00_seed_tasks.ipynb: running") == 0  # a-seed1's stage 00 finished before the kill
    for setting_b, setting_a in (("b-seed1", "a-seed1"), ("b-seed2", "a-seed2")):
        a, b = study_dir / setting_a, study_dir / setting_b
        assert reused_stages(b) == {"00": setting_a, "01": setting_a}  # a-seed2 had 00 from a-seed1
        # not run again: the same marker (its recorded wall time) and the outputs' modification times
        assert (b / "stages" / "01.json").read_bytes() == (a / "stages" / "01.json").read_bytes()
        for path in (a / "instruction_generation").rglob("*"):
            if path.is_file():
                assert (b / path.relative_to(a)).stat().st_mtime_ns == path.stat().st_mtime_ns
        assert json.loads((b / STUDY_FILE).read_text())["setting"] == "b"
    assert (study_dir / "study.md").is_file() and "tiny" in (study_dir / "study.md").read_text()

    # a complete study: every run skipped, nothing rewritten
    before = _marker_times(study_dir)
    assert main([str(spec_path), "--results-root", str(root)]) == 0
    assert capsys.readouterr().out.count("complete, skipped") == 4
    assert _marker_times(study_dir) == before


@pytest.mark.slow
def test_a_study_runs_each_run_as_a_submitit_job_with_the_local_executor(tmp_path):
    spec_path = _write_spec(tmp_path, SMOKE, until="00", name="jobs")
    root = tmp_path / "results"
    # the command line in a process of its own, as a user runs it: submitit's job processes and
    # their redirected streams then never meet pytest's capture of this process's stderr
    done = subprocess.run([sys.executable, "-m", "refine_af_utils.study", str(spec_path), "--results-root", str(root),
                           "--launcher", "submitit-local", "--poll-seconds", "0.5"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    spec = load_spec(spec_path)
    study_dir = root / "jobs"
    for run in spec.runs:
        assert run_is_complete(study_dir / run.name, run.load(), spec.stages), run.name
        assert f"{run.name}: submitted as job" in out
    assert "[00] 00_seed_tasks.ipynb: done in" in out  # the jobs' stage lines, echoed from their logs
    logs = list((study_dir / ".submitit").glob("*_log.out"))
    assert len(logs) == 4 and all("[00] 00_seed_tasks.ipynb" in p.read_text() for p in logs)
    runs = pd.read_csv(study_dir / "study_runs.csv")
    assert list(runs["stages_done"]) == ["00-00"] * 4
    assert "metrics/06.json" in runs["missing"].iloc[0]
