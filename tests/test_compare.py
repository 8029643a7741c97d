"""The reproduction check (``python -m refine_af_utils.compare``) on hand-made runs: identical, consistent,
different, and the inputs it refuses in one line. The real pair (two smoke runs) is in test_notebooks.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from refine_af_utils.compare import (
    CONSISTENT,
    DIFFERENT,
    IDENTICAL,
    NOT_JUDGED,
    CompareError,
    Quantity,
    compare_runs,
    judge,
    main,
    run_quantities,
)
from refine_af_utils.params import load_params
from refine_af_utils.run_folder import write_resolved_params

from conftest import REPO_ROOT

COMMITTED = REPO_ROOT / "results" / "default"


def hand_made_run(folder: Path, **overrides) -> Path:
    """A run folder with the committed default run's report tables and the default params (resolved)."""
    folder.mkdir(parents=True)
    for table in COMMITTED.glob("table_*.csv"):
        shutil.copy(table, folder / table.name)
    params = load_params(REPO_ROOT / "params" / "default.yaml", overrides={"model.dtype": "float32", **overrides})
    write_resolved_params(folder, params)
    return folder


def edit_table(run: Path, name: str, edit) -> None:
    path = run / f"table_{name}.csv"
    table = pd.read_csv(path)
    edit(table)
    table.to_csv(path, index=False)


def test_the_committed_report_gives_every_headline():
    names = [q.name for q in run_quantities(COMMITTED)]
    assert len(names) == len(set(names))
    for expected in ("ROUGE-L: refine_af - self_instruct", "win share (REFINE-AF better)", "sign test p",
                     "Wilcoxon test p", "per category, REFINE-AF - Self-Instruct: Title Generation",
                     "stage 3 held-out gain: reward", "stage 4 REFINE-AF - Self-Instruct: held-out content",
                     "dataset refine_af: instances"):
        assert expected in names
    win = next(q for q in run_quantities(COMMITTED) if q.name == "win share (REFINE-AF better)")
    assert (win.estimate, win.low, win.high) == pytest.approx((4 / 12, 0.099, 0.651))  # table_tasks_improved.csv


def test_a_copy_is_identical(tmp_path):
    a, b = hand_made_run(tmp_path / "a"), hand_made_run(tmp_path / "b", run_name="other")
    comparison = compare_runs(a, b)
    assert comparison.verdict == IDENTICAL and len(comparison.rows) > 50
    assert set(comparison.table["judgement"]) == {IDENTICAL}
    assert comparison.count(IDENTICAL) == 27 and comparison.count(IDENTICAL, "detail") == 37


def test_moves_inside_the_intervals_are_consistent_and_another_dtype_may_be_compared(tmp_path):
    a = hand_made_run(tmp_path / "a")
    b = hand_made_run(tmp_path / "b", **{"model.dtype": "bfloat16"})

    def shift(table):  # every model's ROUGE-L 2 points up, interval with it (well inside the other's interval)
        for column in ("ROUGE-L", "ROUGE-L CI low", "ROUGE-L CI high"):
            table[column] = table[column] + 2.0
    edit_table(b, "main", shift)
    comparison = compare_runs(a, b)
    rows = comparison.table.set_index("quantity")
    assert rows.loc["ROUGE-L: refine_af", "judgement"] == CONSISTENT
    assert rows.loc["ROUGE-L: refine_af", "rule"] == "intervals"
    assert rows.loc["exact match: refine_af", "judgement"] == IDENTICAL
    assert comparison.verdict == CONSISTENT and comparison.count(DIFFERENT) == 0


def test_one_headline_off_is_chance_and_many_are_different(tmp_path):
    a, b = hand_made_run(tmp_path / "a"), hand_made_run(tmp_path / "b")

    def far(table):  # the paired difference at +60 [55, 65]: outside its interval and the seeds' band
        last = table.index[-1]
        table.loc[last, ["ROUGE-L", "ROUGE-L CI low", "ROUGE-L CI high"]] = [60.0, 55.0, 65.0]
    edit_table(b, "main", far)
    comparison = compare_runs(a, b)
    row = comparison.table.set_index("quantity").loc["ROUGE-L: refine_af - self_instruct"]
    assert (row["judgement"], row["rule"]) == (DIFFERENT, "beyond noise")
    assert comparison.count(DIFFERENT) == 1 and comparison.chance_limit == 4
    assert comparison.verdict == CONSISTENT  # one of 27 tests at 5% is what chance gives

    def far_gains(table):  # RL's held-out gains far outside every interval
        table[["mean_difference", "ci_low", "ci_high"]] = [[1.0, 0.9, 1.1]] * len(table)
    edit_table(b, "rl_heldout", far_gains)
    comparison = compare_runs(a, b)
    assert comparison.count(DIFFERENT) == 4
    assert comparison.verdict == "different beyond noise"
    assert comparison.verdict_line().startswith("verdict: different beyond noise (27 headlines: ")


def test_details_are_judged_but_do_not_decide(tmp_path):
    a, b = hand_made_run(tmp_path / "a"), hand_made_run(tmp_path / "b")

    def flip(table):  # every category's difference far from run A's
        table["refine_af - self_instruct"] = "90.00 [89.00, 91.00]"
    edit_table(b, "per_category", flip)
    comparison = compare_runs(a, b)
    assert comparison.count(DIFFERENT, "detail") == 12 and comparison.count(DIFFERENT) == 0
    assert comparison.verdict == CONSISTENT


def test_the_rules():
    assert judge(Quantity("x", 1.0, 0.0, 2.0), Quantity("x", 1.00001, 0.0, 2.0)) == (IDENTICAL, "equal")
    assert judge(Quantity("x", 1.0, 0.0, 2.0), Quantity("x", 1.5, 0.5, 2.5)) == (CONSISTENT, "intervals")
    # 2.5 lies outside [0, 2], but the z-test on the difference 1.5 (SEs 0.51 and 0.77: 1.96 x 0.92 = 1.80)
    # is not significant; 3.0 [1.5, 4.5] is (2.0 > 1.80)
    assert judge(Quantity("x", 1.0, 0.0, 2.0), Quantity("x", 2.5, 1.0, 4.0)) == (CONSISTENT, "z-test")
    assert judge(Quantity("x", 1.0, 0.0, 2.0), Quantity("x", 3.0, 1.5, 4.5)) == (DIFFERENT, "beyond noise")
    assert judge(Quantity("x", 0.0, 0.0, 0.0), Quantity("x", 3.0, 2.9, 3.1)) == (DIFFERENT, "beyond noise")
    assert judge(Quantity("x", 0.0, 0.0, 0.0), Quantity("x", 3.0, 2.9, 3.1), seeds_threshold=5.0) == (CONSISTENT,
                                                                                                      "seeds")
    assert judge(Quantity("n", 36.0), Quantity("n", 42.0)) == (NOT_JUDGED, "no interval")
    words = Quantity("p", float("nan"), text="n/a (no non-tied tasks)")  # what a report writes without a test
    assert judge(words, Quantity("p", float("nan"), text="n/a (no non-tied tasks)")) == (IDENTICAL, "equal")
    assert judge(words, Quantity("p", 0.5)) == (NOT_JUDGED, "not a number")
    assert judge(Quantity("x", float("nan")), Quantity("x", float("nan"))) == (IDENTICAL, "equal")


def test_bad_input_gets_one_line(tmp_path, capsys):
    a = hand_made_run(tmp_path / "a")
    assert main([str(a), str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'nowhere'}: no such run folder\n"
    other = hand_made_run(tmp_path / "other", random_seed=7, **{"rl.updates": 9})
    assert main([str(a), str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other params" in err and "random_seed, rl.updates differ" in err
    empty = tmp_path / "empty"
    shutil.copytree(a, empty)
    (empty / "table_main.csv").unlink()
    assert main([str(a), str(empty)]) == 2
    assert "table_main.csv: missing" in capsys.readouterr().err
    no_params = tmp_path / "no-params"
    shutil.copytree(a, no_params)
    (no_params / "params.yaml").unlink()
    with pytest.raises(CompareError, match="params.yaml: missing"):
        compare_runs(a, no_params)


def test_the_command_prints_every_quantity_and_writes_markdown(tmp_path, capsys):
    a, b = hand_made_run(tmp_path / "a"), hand_made_run(tmp_path / "b")
    output = tmp_path / "check.md"
    assert main([str(a), str(b), "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("verdict: identical (")
    assert "ROUGE-L: refine_af - self_instruct" in out
    page = output.read_text()
    assert page.startswith("# Reproduction check") and "**verdict: identical" in page and "| quantity |" in page


def test_notebook_07_s_reference_check(tmp_path):
    from refine_af_utils.compare import reference_check

    run = hand_made_run(tmp_path / "run")
    assert reference_check(None, run).startswith("No reference run set")
    assert "**verdict: identical" in reference_check("results/default", run)  # relative to the repository
    assert reference_check(str(tmp_path / "nowhere"), run) == f"**Not compared:** {tmp_path / 'nowhere'}: no such run folder"
