"""Stage 4: instances for every stage 1 instruction, from both arms.

* ``self_instruct``: the untrained backbone (the Self-Instruct baseline dataset);
* ``refine_af``: the backbone with stage 3's trained LoRA adapter.

Same instructions, same prompts, same decoding and random seeds, same filters; only the
generator differs. Raw completions are appended batch by batch to ``instance_generation/raw_<arm>.jsonl``
(a rerun continues after the last complete batch); both arms are scored with stage 2's
reward and exported as JSONL that ``datasets.load_dataset("json", ...)`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from refine_af_utils.files import atomic_write_text
from refine_af_utils.arm_views import word_lengths, yield_counts
from refine_af_utils.figures import arm_comparison_figure, arm_rewards_figure, lengths_figure, yield_funnel_figure
from refine_af_utils.instances import extract_instances, generate_instances, instance_prompts
from refine_af_utils.layout import ARMS, RunLayout, stage_of_module
from refine_af_utils.params import Params
from refine_af_utils.files import sha256_file
from refine_af_utils.resumable import resume_batches
from refine_af_utils.run_folder import StageResult, open_stage, stage_entry
from refine_af_utils.reward import COMPONENTS, build_scorers, score_instances
from refine_af_utils.scorers import InstanceText
from refine_af_utils.seeding import derive_seed

_STAGE = stage_of_module(__name__)  # this module's stage in the registry


def load_generator(params: Params, arm: str, run_dir: Path) -> Any:
    """The engine over the backbone for ``self_instruct``, over backbone + stage 3 adapter (merged) for ``refine_af``."""
    from refine_af_utils.engines import load_engine

    return load_engine(params.model, RunLayout(run_dir).adapter if arm == "refine_af" else None, params.random_seed)


def generate_arm(params: Params, arm: str, records: Sequence[dict[str, Any]], run_dir: Path) -> list[dict[str, Any]]:
    """Raw completions of one arm for every instruction record, resuming from ``raw_<arm>.jsonl``.

    Batches are cut from the full record list and seeded by their first instruction (the same
    noise for both arms); a rerun regenerates a half-written batch whole and appends only the
    missing rows, so a resumed arm equals an uninterrupted one.
    """
    cfg = params.instance_generation
    layout = RunLayout(run_dir)
    seeds = layout.seed_tasks()

    def generate(engine: Any, batch: list[dict[str, Any]], seed: Optional[int]) -> list[dict[str, Any]]:
        generations = generate_instances(engine, instance_prompts(batch, seeds, cfg, params.random_seed), cfg, seed)
        return [{"instruction_id": r["id"], "instruction": r["instruction"], "text": g.text, "truncated": g.truncated}
                for r, g in zip(batch, generations)]

    rows = resume_batches(layout.arm_raw(arm), records, job_key=lambda r: r["instruction"],
                          record_key=lambda r: r["instruction"], batch_size=cfg.batch_size,
                          load=lambda: load_generator(params, arm, run_dir), generate=generate,
                          seed=lambda batch: derive_seed(params.random_seed, _STAGE.id, batch[0]["instruction"]),
                          desc=f"instances ({arm})")
    by_instruction = {r["instruction"]: r for r in rows}
    return [{**r, "text": by_instruction[r["instruction"]]["text"],
             "truncated": by_instruction[r["instruction"]]["truncated"]} for r in records]


def arm_instances(completions: Sequence[dict[str, Any]], max_instances: int) -> pd.DataFrame:
    """Parsed and filtered instances of one arm (the shared extraction rule), one row per instance."""
    rows = []
    for record in completions:
        kept, _ = extract_instances(record["text"], record["is_classification"], record["truncated"], max_instances)
        rows.extend({"instruction_id": record["id"], "instruction": record["instruction"], "input": i.input,
                     "output": i.output, "is_classification": record["is_classification"]} for i in kept)
    return pd.DataFrame(rows, columns=["instruction_id", "instruction", "input", "output", "is_classification"])


def per_instruction_rewards(records: Sequence[dict[str, Any]], instances: dict[str, pd.DataFrame],
                            split: dict[str, str], unparsed: float) -> pd.DataFrame:
    """One row per instruction: its RL split and, per arm, whether it has instances and its rewards.

    ``<arm>_reward`` is the mean reward of the arm's kept instances, or ``unparsed`` (the RL
    parse penalty) when it has none, as in RL; ``<arm>_content`` is that mean over kept
    instances only (empty when none).
    """
    table = pd.DataFrame({"instruction": [r["instruction"] for r in records],
                          "split": [split.get(r["instruction"], "unused") for r in records]})
    for arm, frame in instances.items():
        means = frame.groupby("instruction")["reward"].mean() if len(frame) else pd.Series(dtype=float)
        content = table["instruction"].map(means)
        table[f"{arm}_has_instances"] = content.notna().astype(float)
        table[f"{arm}_reward"] = content.fillna(unparsed)
        table[f"{arm}_content"] = content
    return table


ARM_MEASURES = {"has_instances": "share of instructions with at least one kept instance",
                "reward": "mean reward over all instructions (none kept: the parse penalty)",
                "content": "mean reward over instructions with kept instances"}


def arm_comparison(table: pd.DataFrame, random_seed: int) -> pd.DataFrame:
    """REFINE-AF minus Self-Instruct per measure, paired by instruction, for all, RL-train and held-out ones."""
    from refine_af_utils.stats import paired_summary

    groups = {"all": table, "rl-train": table[table["split"] == "train"],
              "held-out": table[table["split"] == "heldout"]}
    parts = []
    for group, rows in groups.items():
        if rows.empty:
            continue
        summary = paired_summary(rows, {m: (f"{ARMS[0]}_{m}", f"{ARMS[1]}_{m}") for m in ARM_MEASURES},
                                 derive_seed(random_seed, _STAGE.id, "ci", group))
        parts.append(summary.assign(group=group, instructions=len(rows)))
    columns = ["group", "instructions", "measure", "mean_before", "mean_after", "mean_difference", "ci_low",
               "ci_high", "pairs"]
    return pd.concat(parts, ignore_index=True)[columns].rename(
        columns={"mean_before": f"{ARMS[0]}_mean", "mean_after": f"{ARMS[1]}_mean"})


def _mean_word_count(texts: Sequence[str]) -> float:
    """The mean number of whitespace-separated words per text, rounded to 0.1 (0.0 with no texts)."""
    return round(float(np.mean([len(t.split()) for t in texts])), 1) if len(texts) else 0.0


def dataset_statistics(instances: pd.DataFrame, instructions: int) -> dict[str, Any]:
    """Self-Instruct's Table 1 layout: instructions, types, instances, empty inputs, mean lengths."""
    per_instruction = instances.drop_duplicates("instruction_id")
    non_empty = instances.loc[instances["input"].str.strip() != "", "input"]
    return {
        "instructions (stage 1)": instructions,
        "instructions with instances": len(per_instruction),
        "classification instructions": int(per_instruction["is_classification"].sum()),
        "non-classification instructions": int((~per_instruction["is_classification"].astype(bool)).sum()),
        "instances": len(instances),
        "instances with empty input": int((instances["input"].str.strip() == "").sum()),
        "mean instruction length (words)": _mean_word_count(per_instruction["instruction"].tolist()),
        "mean non-empty input length (words)": _mean_word_count(non_empty.tolist()),
        "mean output length (words)": _mean_word_count(instances["output"].tolist()),
    }


@dataclass
class InstanceGenerationResult(StageResult):
    """Both arms' scored instances, their statistics, the per-instruction comparison and the figures."""

    instances: dict[str, pd.DataFrame]
    statistics: pd.DataFrame
    reward_summary: pd.DataFrame
    per_instruction: pd.DataFrame
    comparison: pd.DataFrame


@stage_entry
def run(params: Params, run_dir: str | Path) -> InstanceGenerationResult:
    """Stage 4: generate, filter, score and export both arms' datasets under ``<run_dir>/data``."""
    from refine_af_utils.models import check_model_params
    from refine_af_utils.reward import check_scorers, unparsed_reward

    stage = open_stage(__name__, params, run_dir)
    run_dir, layout = stage.run_dir, stage.layout
    layout.seed_tasks()  # every input is checked before the stage writes anything
    records = layout.instructions()
    split = layout.rl_split()
    unparsed = unparsed_reward(run_dir, params)
    adapter = layout.adapter / "adapter_model.safetensors"
    if not adapter.is_file():
        raise FileNotFoundError(f"{adapter}: stage 3's trained adapter is missing; run stage 03 first")
    check_model_params(params.model)
    check_scorers(params.reward)
    stage.check_config(adapter_sha256=sha256_file(adapter))  # the REFINE-AF arm's completions belong to one adapter
    scorers = build_scorers(params.reward, layout.score_cache)
    instances, stats = {}, {}
    for arm in ARMS:
        table = arm_instances(generate_arm(params, arm, records, run_dir),
                              params.instance_generation.max_instances_per_task)
        texts = [InstanceText(r.instruction, r.input, r.output) for r in table.itertuples()]
        ids = [f"{arm}:{r.instruction_id}:{n}" for n, r in enumerate(table.itertuples())]
        scores = score_instances(scorers, texts, ids, params.reward) if texts else pd.DataFrame(
            columns=[*COMPONENTS, "reward"])
        table = pd.concat([table.reset_index(drop=True), scores.reset_index(drop=True)], axis=1)
        atomic_write_text(layout.arm_data(arm), table.to_json(orient="records", lines=True, force_ascii=False))
        instances[arm] = table
        stats[arm] = dataset_statistics(table, len(records))
    statistics = pd.DataFrame(stats)
    statistics.to_csv(stage.file("statistics"))
    summary = pd.DataFrame({arm: table[[*COMPONENTS, "reward"]].mean() for arm, table in instances.items()}).round(4)
    summary.to_csv(stage.file("reward_by_arm"))
    per_instruction = per_instruction_rewards(records, instances, split, unparsed)
    per_instruction.to_csv(stage.file("per_instruction"), index=False)
    comparison = arm_comparison(per_instruction, params.random_seed)
    comparison.to_csv(stage.file("arm_comparison"), index=False)
    figures = {"rewards": arm_rewards_figure({arm: t["reward"] for arm, t in instances.items()},
                                             stage.file("fig_rewards")),
               "comparison": arm_comparison_figure(comparison, stage.file("fig_comparison")),
               "yield": yield_funnel_figure(yield_counts(instances, len(records)), stage.file("fig_yield")),
               "lengths": lengths_figure(word_lengths(instances), stage.file("fig_lengths"))}
    overall = comparison[comparison["group"] == "all"].set_index("measure")
    stage.record_metrics({
        **{f"{arm}_instances": len(t) for arm, t in instances.items()},
        **{f"{arm}_mean_reward": round(float(t["reward"].mean()), 6) if len(t) else None
           for arm, t in instances.items()},
        **{f"{arm}_instructions_with_instances": int(per_instruction[f"{arm}_has_instances"].sum()) for arm in ARMS},
        **{f"{arm}_reward_all_instructions": round(float(per_instruction[f"{arm}_reward"].mean()), 6) for arm in ARMS},
        "reward_all_instructions_difference": float(overall.loc["reward", "mean_difference"]),
        "reward_all_instructions_ci_low": float(overall.loc["reward", "ci_low"]),
        "reward_all_instructions_ci_high": float(overall.loc["reward", "ci_high"]),
    })
    return InstanceGenerationResult(instances, statistics, summary, per_instruction, comparison, figures=figures)
