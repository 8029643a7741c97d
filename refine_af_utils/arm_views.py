"""Views of stage 4's two datasets that stage 4's notebook and the report share: the yield funnel, the
lengths of the kept instances and the same instruction's instances side by side."""

from __future__ import annotations

from typing import Any

import pandas as pd

from refine_af_utils.layout import ARMS
from refine_af_utils.reward import COMPONENTS


def yield_counts(instances: dict[str, pd.DataFrame], instructions: int) -> pd.DataFrame:
    """How many of stage 1's instructions each arm turned into kept instances: rows ``instructions``,
    ``with a kept instance``, ``kept instances``; one column per arm (the yield funnel)."""
    return pd.DataFrame({arm: {"instructions": instructions,
                               "with a kept instance": int(table["instruction_id"].nunique()) if len(table) else 0,
                               "kept instances": len(table)}
                         for arm, table in instances.items()})


def word_lengths(instances: dict[str, pd.DataFrame]) -> dict[str, dict[str, list[int]]]:
    """Words per non-empty input and per output, per arm: ``{"input": {arm: [...]}, "output": {...}}``."""
    lengths: dict[str, dict[str, list[int]]] = {"input": {}, "output": {}}
    for arm, table in instances.items():
        inputs = table["input"] if len(table) else pd.Series([], dtype=str)
        lengths["input"][arm] = [len(str(t).split()) for t in inputs if str(t).strip()]
        lengths["output"][arm] = [len(str(t).split()) for t in (table["output"] if len(table) else [])]
    return lengths


def paired_instances(instances: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The same instruction's first kept instance from each arm, side by side with its reward and components,
    for every instruction both arms kept one for (by instruction id)."""
    first = {arm: table.drop_duplicates("instruction_id").set_index("instruction_id")
             for arm, table in instances.items() if len(table)}
    if len(first) < len(ARMS):
        return pd.DataFrame(columns=["instruction_id", "instruction"])
    shared = sorted(set.intersection(*(set(t.index) for t in first.values())), key=_id_order)
    rows = []
    for instruction_id in shared:
        row: dict[str, Any] = {"instruction_id": instruction_id,
                               "instruction": first[ARMS[0]].loc[instruction_id, "instruction"]}
        for arm in ARMS:
            instance = first[arm].loc[instruction_id]
            row.update({f"{arm}_input": instance["input"], f"{arm}_output": instance["output"],
                        f"{arm}_reward": round(float(instance["reward"]), 4),
                        **{f"{arm}_{c}": round(float(instance[c]), 4) for c in COMPONENTS}})
        rows.append(row)
    return pd.DataFrame(rows)


def _id_order(instruction_id: str) -> tuple[str, int]:
    """``machine_10`` after ``machine_9``."""
    prefix, _, number = str(instruction_id).rpartition("_")
    return (prefix, int(number)) if number.isdigit() else (str(instruction_id), -1)
