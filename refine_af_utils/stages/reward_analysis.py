"""Stage 2: candidate instances from the untrained backbone, every reward component scored and analysed.

The reward itself (the paper's Eq. 1, its scorers and the parse penalty) is :mod:`refine_af_utils.reward`;
every component is kept per instance (``scores.csv``), so any figure can be redrawn without rerunning a model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from refine_af_utils.figures import component_histograms_figure, correlations_figure
from refine_af_utils.params import Params
from refine_af_utils.resumable import resume_batches
from refine_af_utils.run_folder import StageResult, StageRun, open_stage, stage_entry
from refine_af_utils.reward import COMPONENTS, build_scorers, score_instances
from refine_af_utils.scorers import InstanceText
from refine_af_utils.seeds import SeedTask


@dataclass
class RewardAnalysisResult(StageResult):
    """What stage 2 made: per-instance scores and the summary tables and figures."""

    scores: pd.DataFrame
    correlations: pd.DataFrame
    by_type: pd.DataFrame
    best: pd.DataFrame
    worst: pd.DataFrame
    filter_counts: pd.DataFrame
    truncated: dict[str, int]


def _candidates(stage: StageRun, instructions: Sequence[dict[str, Any]], seeds: Sequence[SeedTask]
                ) -> list[dict[str, Any]]:
    """Sampled instructions' raw candidate continuations, generated once and appended batch by batch."""
    from refine_af_utils.engines import load_engine
    from refine_af_utils.instances import generate_instances, instance_prompts

    params = stage.params
    analysis, cfg = params.reward_analysis, params.instance_generation
    rng = random.Random(stage.derive_seed("instruction-sample"))
    chosen = rng.sample(instructions, min(analysis.num_instructions, len(instructions)))
    jobs = [(record, c) for record in chosen for c in range(analysis.candidates_per_instruction)]

    def generate(engine: Any, batch: list[tuple[dict[str, Any], int]], seed: Optional[int]) -> list[dict[str, Any]]:
        prompts = instance_prompts([r for r, _ in batch], seeds, cfg, params.random_seed)
        return [{"instruction_id": r["id"], "instruction": r["instruction"], "is_classification": r["is_classification"],
                 "candidate": c, "text": g.text, "truncated": g.truncated}
                for (r, c), g in zip(batch, generate_instances(engine, prompts, cfg, seed))]

    return resume_batches(stage.file("candidates"), jobs, job_key=lambda job: (job[0]["id"], job[1]),
                          record_key=lambda r: (r["instruction_id"], r["candidate"]), batch_size=cfg.batch_size,
                          load=lambda: load_engine(params.model, random_seed=params.random_seed), generate=generate,
                          seed=lambda batch: stage.derive_seed(batch[0][0]["instruction"], batch[0][1]),
                          desc="candidate instances")


def _parse_candidates(candidates: Sequence[dict[str, Any]], max_instances: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    from refine_af_utils.instances import FILTER_REASONS, extract_instances

    rows, totals = [], {"candidates": len(candidates), "unparseable": 0, **dict.fromkeys(FILTER_REASONS, 0)}
    for candidate in candidates:
        kept, counts = extract_instances(candidate["text"], candidate["is_classification"],
                                         candidate["truncated"], max_instances)
        if not kept:
            totals["unparseable"] += 1
        for reason, count in counts.items():
            totals[reason] = totals.get(reason, 0) + count
        for index, instance in enumerate(kept):
            rows.append({
                "instance_id": f"{candidate['instruction_id']}-c{candidate['candidate']}-{index}",
                "instruction_id": candidate["instruction_id"], "instruction": candidate["instruction"],
                "is_classification": candidate["is_classification"], "candidate": candidate["candidate"],
                "input": instance.input, "output": instance.output,
            })
    totals["kept"] = len(rows)
    counts_table = pd.DataFrame(list(totals.items()), columns=["stage", "count"])
    return pd.DataFrame(rows), counts_table


@stage_entry
def run(params: Params, run_dir: str | Path) -> RewardAnalysisResult:
    """Stage 2: candidate instances from the untrained backbone, every component scored, figures."""
    from refine_af_utils.plots import histogram, save_figure
    from refine_af_utils.models import check_model_params
    from refine_af_utils.reward import check_scorers

    stage = open_stage(__name__, params, run_dir)
    layout = stage.layout
    instructions, seeds = layout.instructions(), layout.seed_tasks()  # inputs first: a failed run leaves no config
    check_model_params(params.model)
    check_scorers(params.reward)
    stage.check_config()
    candidates = _candidates(stage, instructions, seeds)
    instances, filter_counts = _parse_candidates(candidates, params.instance_generation.max_instances_per_task)
    filter_counts.to_csv(stage.file("filter_counts"), index=False)
    if instances.empty:
        raise RuntimeError(f"{stage.folder}: no candidate instance survived parsing and filtering; see "
                           f"{stage.file('filter_counts').name}")
    texts = [InstanceText(r.instruction, r.input, r.output) for r in instances.itertuples()]
    scorers = build_scorers(params.reward, layout.score_cache)
    components = score_instances(scorers, texts, list(instances["instance_id"]), params.reward)
    scores = pd.concat([instances.reset_index(drop=True), components], axis=1)
    scores.to_csv(stage.file("scores"), index=False)

    columns = [*COMPONENTS, "reward"]
    correlations = scores[columns].corr()
    correlations.to_csv(stage.file("correlations"))
    grouped = scores.assign(type=np.where(scores["is_classification"], "classification", "generation")).groupby("type")
    by_type = grouped[columns].mean().round(4)
    by_type.insert(0, "instances", grouped.size())
    by_type.to_csv(stage.file("reward_by_type"))
    shown = ["instruction", "input", "output", *columns]
    ranked = scores.sort_values("reward", ascending=False, kind="stable")
    best = ranked.head(params.reward_analysis.num_examples_shown)[shown]
    worst = ranked.tail(params.reward_analysis.num_examples_shown)[shown].iloc[::-1]
    best.to_csv(stage.file("best_examples"), index=False)
    worst.to_csv(stage.file("worst_examples"), index=False)
    figures = {
        "components": component_histograms_figure(scores, stage.file("fig_components")),
        "correlations": correlations_figure(correlations, stage.file("fig_correlations"), len(scores)),
        "reward": save_figure(histogram(scores["reward"], f"Composite REFINE-AF reward (Eq. 1; n = {len(scores)})", "reward"),
                              stage.file("fig_reward")),
    }
    truncated = {name: scorer.truncated for name, scorer in scorers.items()}
    stage.record_metrics({
        "instances": len(scores),
        "instructions": int(scores["instruction_id"].nunique()),
        "mean_reward": round(float(scores["reward"].mean()), 6),
        **{f"mean_{name}": round(float(scores[name].mean()), 6) for name in COMPONENTS},
        **{f"truncated_{name}": count for name, count in truncated.items()},
        **{f"count_{k}": int(v) for k, v in zip(filter_counts["stage"], filter_counts["count"])},
    })
    return RewardAnalysisResult(scores, correlations, by_type, best, worst, filter_counts, truncated, figures=figures)
