"""Stage 4 (instance generation, both arms): its tables, computed by hand on small inputs.

The generation itself runs in the smoke run (tests/test_notebooks.py) and its SIGKILL resume in
tests/test_reliability.py; the shared extraction rule is tested in tests/test_instances.py.
"""

from __future__ import annotations

import pandas as pd
import pytest

from refine_af_utils.stages.instance_generation import (
    arm_comparison,
    arm_instances,
    dataset_statistics,
    per_instruction_rewards,
)

RECORDS = [{"id": f"m{n}", "instruction": f"Instruction number {n}.", "is_classification": n == 0} for n in range(4)]
SPLIT = {"Instruction number 0.": "train", "Instruction number 1.": "train", "Instruction number 2.": "heldout"}


def _instances(rewards: dict[int, list[float]]) -> pd.DataFrame:
    rows = [{"instruction_id": f"m{n}", "instruction": f"Instruction number {n}.", "input": "", "output": "x",
             "is_classification": n == 0, "reward": r} for n, values in rewards.items() for r in values]
    return pd.DataFrame(rows)


def test_arm_instances_applies_the_shared_extraction_rule_per_record():
    two = "Example 1\nInput: the first one\nOutput: an answer\n\nExample 2\nInput: a second one\nOutput: another answer"
    completions = [{**RECORDS[1], "text": two, "truncated": False}, {**RECORDS[2], "text": two, "truncated": True},
                   {**RECORDS[3], "text": "no instance here", "truncated": False}]
    table = arm_instances(completions, max_instances=5)
    assert table["instruction_id"].tolist() == ["m1", "m1", "m2"]  # a truncated completion loses its last instance
    assert table.loc[0, ["input", "output"]].tolist() == ["the first one", "an answer"]
    assert arm_instances([], 5).columns.tolist() == ["instruction_id", "instruction", "input", "output",
                                                     "is_classification"]


def test_an_instruction_without_instances_gets_the_parse_penalty_in_reward_but_not_in_content():
    instances = {"self_instruct": _instances({0: [0.2, 0.4], 1: [0.1]}),
                 "refine_af": _instances({0: [0.5], 1: [0.3], 2: [0.0]})}
    table = per_instruction_rewards(RECORDS, instances, SPLIT, unparsed=-1.0)
    assert table["split"].tolist() == ["train", "train", "heldout", "unused"]
    assert table["self_instruct_has_instances"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert table["self_instruct_reward"].tolist() == pytest.approx([0.3, 0.1, -1.0, -1.0])
    assert table["self_instruct_content"].isna().tolist() == [False, False, True, True]
    assert table["refine_af_reward"].tolist() == pytest.approx([0.5, 0.3, 0.0, -1.0])


def test_arm_comparison_pairs_by_instruction_in_each_group():
    instances = {"self_instruct": _instances({0: [0.2], 1: [0.1], 2: [0.4]}),
                 "refine_af": _instances({0: [0.5], 1: [0.3], 2: [0.0], 3: [0.2]})}
    table = per_instruction_rewards(RECORDS, instances, SPLIT, unparsed=-1.0)
    comparison = arm_comparison(table, random_seed=3).set_index(["group", "measure"])
    assert set(comparison.index.get_level_values("group")) == {"all", "rl-train", "held-out"}
    everything = comparison.loc[("all", "reward")]
    assert everything["instructions"] == 4 and everything["pairs"] == 4
    assert everything["mean_difference"] == pytest.approx(((0.3) + (0.2) + (-0.4) + (1.2)) / 4)
    assert everything["ci_low"] <= everything["mean_difference"] <= everything["ci_high"]
    assert comparison.loc[("held-out", "reward"), "mean_difference"] == pytest.approx(-0.4)
    assert comparison.loc[("rl-train", "has_instances"), "mean_difference"] == 0.0
    assert arm_comparison(table, random_seed=3).equals(arm_comparison(table, random_seed=3))  # seeded


def test_dataset_statistics_follow_self_instructs_table_1():
    instances = _instances({0: [0.1, 0.2], 2: [0.3]})
    instances.loc[1, "input"] = "three word input"
    stats = dataset_statistics(instances, instructions=4)
    assert stats["instructions (stage 1)"] == 4 and stats["instructions with instances"] == 2
    assert stats["classification instructions"] == 1 and stats["non-classification instructions"] == 1
    assert stats["instances"] == 3 and stats["instances with empty input"] == 2
    assert stats["mean instruction length (words)"] == 3.0
    assert stats["mean non-empty input length (words)"] == 3.0
    assert stats["mean output length (words)"] == 1.0


def _arm(rows: list[tuple[str, str, str, float]]) -> pd.DataFrame:
    from refine_af_utils.reward import COMPONENTS

    return pd.DataFrame([{"instruction_id": i, "instruction": f"do {i}", "input": x, "output": y, "reward": r,
                          **{c: 0.5 for c in COMPONENTS}} for i, x, y, r in rows])


def test_the_yield_lengths_and_paired_views_count_what_each_arm_kept(tmp_path):
    from refine_af_utils.figures import lengths_figure, yield_funnel_figure
    from refine_af_utils.arm_views import paired_instances, word_lengths, yield_counts

    arms = {"self_instruct": _arm([("machine_2", "", "a b", 0.1), ("machine_10", "x y z", "c", 0.2),
                                   ("machine_10", "", "d", 0.3)]),
            "refine_af": _arm([("machine_10", "w", "e f g", 0.4), ("machine_5", "", "h", 0.5)])}
    counts = yield_counts(arms, instructions=12)
    assert counts.to_dict() == {"self_instruct": {"instructions": 12, "with a kept instance": 2, "kept instances": 3},
                                "refine_af": {"instructions": 12, "with a kept instance": 2, "kept instances": 2}}
    assert word_lengths(arms) == {"input": {"self_instruct": [3], "refine_af": [1]},
                                  "output": {"self_instruct": [2, 1, 1], "refine_af": [3, 1]}}
    pairs = paired_instances(arms)  # only machine_10 has instances in both arms; each arm's first one
    assert list(pairs["instruction_id"]) == ["machine_10"]
    assert (pairs.loc[0, "self_instruct_output"], pairs.loc[0, "refine_af_output"]) == ("c", "e f g")
    assert (pairs.loc[0, "self_instruct_reward"], pairs.loc[0, "refine_af_reward"]) == (0.2, 0.4)
    empty = {"self_instruct": arms["self_instruct"], "refine_af": arms["refine_af"].iloc[0:0]}
    assert paired_instances(empty).empty and yield_counts(empty, 12)["refine_af"].tolist() == [12, 0, 0]
    for figure in (yield_funnel_figure(counts, tmp_path / "yield.png"),
                   lengths_figure(word_lengths(empty), tmp_path / "lengths.png")):  # an empty arm draws too
        assert figure.stat().st_size > 0
