"""Stage 0: the seed tasks of the run, validated and summarised (the schema and loader are :mod:`refine_af_utils.seeds`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from refine_af_utils.params import Params
from refine_af_utils.run_folder import StageResult, open_stage, stage_entry
from refine_af_utils.seeds import SeedTask, load_seed_tasks, write_seed_tasks


def _word_count(text: str) -> int:
    """The number of whitespace-separated words in ``text``."""
    return len(text.split())


def seed_summary(tasks: list[SeedTask]) -> pd.DataFrame:
    """One-row-per-statistic table: tasks, classification share, instances, lengths."""
    instances = [i for t in tasks for i in t.instances]
    non_empty_inputs = [i.input for i in instances if i.input.strip()]
    rows = [
        ("tasks", len(tasks)),
        ("classification tasks", sum(t.is_classification for t in tasks)),
        ("classification share", round(sum(t.is_classification for t in tasks) / len(tasks), 3)),
        ("instances", len(instances)),
        ("instances with empty input", len(instances) - len(non_empty_inputs)),
        ("mean instruction length (words)", round(sum(_word_count(t.instruction) for t in tasks) / len(tasks), 1)),
        (
            "mean non-empty input length (words)",
            round(sum(map(_word_count, non_empty_inputs)) / len(non_empty_inputs), 1) if non_empty_inputs else 0.0,
        ),
        ("mean output length (words)", round(sum(_word_count(i.output) for i in instances) / len(instances), 1)),
    ]
    return pd.DataFrame(rows, columns=["statistic", "value"])


@dataclass
class SeedTasksResult(StageResult):
    """The run's seed tasks and their summary statistics."""

    tasks: list[SeedTask]
    summary: pd.DataFrame


@stage_entry
def run(params: "Params", run_dir: str | Path) -> SeedTasksResult:
    """Stage 0: load and validate the seed tasks, write them and their summary into the stage's folder."""
    tasks = load_seed_tasks(params.seed_tasks)
    stage = open_stage(__name__, params, run_dir)
    write_seed_tasks(tasks, stage.file("seed_tasks"))
    summary = seed_summary(tasks)
    summary.to_csv(stage.file("summary"), index=False)
    stage.record_metrics(dict(zip(summary["statistic"], summary["value"].tolist())))
    return SeedTasksResult(tasks, summary)


def seed_table(tasks: list[SeedTask]) -> pd.DataFrame:
    """Seed tasks as a table: id, name, instruction, instance count, classification flag."""
    return pd.DataFrame({
        "id": [t.id for t in tasks],
        "name": [t.name for t in tasks],
        "instruction": [t.instruction for t in tasks],
        "instances": [len(t.instances) for t in tasks],
        "is_classification": [t.is_classification for t in tasks],
    })
