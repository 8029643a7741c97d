"""Notebook conclusions say what the numbers show, and change with them."""

from __future__ import annotations

import json

import pytest

from refine_af_utils.conclusions import CONCLUSIONS, conclusion, interval_verdict
from refine_af_utils.layout import STAGES


@pytest.mark.parametrize("low, high, verdict", [(-0.01, 0.02, "not distinguishable from 0"), (0.001, 0.02, "above 0"),
                                                (-0.02, -0.001, "below 0"), (0.0, 0.0, "not distinguishable from 0")])
def test_an_interval_is_read_by_whether_it_includes_0(low, high, verdict):
    assert interval_verdict((low + high) / 2, low, high).endswith(f": {verdict}")


def test_every_stage_has_a_conclusion():
    assert list(CONCLUSIONS) == [stage.id for stage in STAGES]


def test_the_result_conclusion_follows_the_run(tmp_path):
    metrics = {"wins": 8, "ties": 2, "losses": 2, "tasks": 12, "win_share_percent": 66.7, "win_share_ci_low": 0.349,
               "win_share_ci_high": 0.901, "sign_test_p": 0.109, "significant_wins": 4, "significant_losses": 1,
               "refine_af_rougeL": 18.56, "self_instruct_rougeL": 12.79, "base_rougeL": 12.88,
               "refine_af_minus_self_instruct_rougeL_ci": [-6.18, 16.97]}
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "06.json").write_text(json.dumps(metrics))
    text = conclusion("06", tmp_path)
    assert "8 of 12 tasks (67%, exact 95% CI 35-90%" in text
    assert text.endswith("+5.77 [-6.18, +16.97] (95% CI): not distinguishable from 0.")
    metrics.update(refine_af_rougeL=22.0, refine_af_minus_self_instruct_rougeL_ci=[1.5, 16.0], wins=11, losses=0)
    (tmp_path / "metrics" / "06.json").write_text(json.dumps(metrics))
    text = conclusion("06", tmp_path)
    assert "11 of 12 tasks" in text and text.endswith("+9.21 [+1.5, +16] (95% CI): above 0.")


def test_the_result_conclusion_of_a_run_where_every_task_tied(tmp_path):
    # the smoke run on several CPUs: 12 ties, no win or loss, so the sign test has no p-value (stored as null)
    metrics = {"wins": 0, "ties": 12, "losses": 0, "tasks": 12, "win_share_percent": 0.0, "win_share_ci_low": 0.0,
               "win_share_ci_high": 0.265, "sign_test_p": None, "significant_wins": 0, "significant_losses": 0,
               "refine_af_rougeL": 3.5, "self_instruct_rougeL": 3.5, "base_rougeL": 3.1,
               "refine_af_minus_self_instruct_rougeL_ci": [0.0, 0.0]}
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "06.json").write_text(json.dumps(metrics))
    text = conclusion("06", tmp_path)
    assert "sign test p = undefined (no task was won or lost)" in text and "tied on 12 and lost 0" in text


@pytest.mark.parametrize("algorithm, unit", [("ppo", "nat per sequence"), ("grpo", "nat per token"),
                                             ("rloo", "nat per token")])
def test_the_rl_conclusion_gives_the_kl_in_the_unit_trl_logged_it(tmp_path, algorithm, unit):
    # trl 1.9.2's PPO sums the KL over a response's tokens; its GRPO and RLOO average it over the tokens
    metrics = {"algorithm": algorithm, "updates": 12, "first_kl": 0.0, "last_kl": 0.036}
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "03.json").write_text(json.dumps(metrics))
    text = conclusion("03", tmp_path)
    assert text.startswith(f"**This run's RL:** 12 {algorithm.upper()} updates.")
    assert text.endswith(f"KL to the reference: 0.000 at update 1 (0 where policy and reference agree), 0.036 {unit} "
                         "at the last update.")
