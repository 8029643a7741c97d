"""Stage 2: the REFINE-AF reward (the paper's Eq. 1) and the reward-analysis stage.

    r = intercept + w_rm * Rew + w_und * Und + w_nat * Nat + w_coh * Coh

Every component is kept per instance (``scores.csv``), so any figure can be redrawn
without rerunning a model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from refine_af_utils.jsonl import append_jsonl, read_jsonl, truncate_torn_tail
from refine_af_utils.params import Params, RewardParams
from refine_af_utils.scorers import InstanceText, Scorer, build_scorer

COMPONENTS = ("reward_model", "understandability", "naturalness", "coherence")
REWARD_ANALYSIS_DIR = "reward_analysis"


def component_weights(reward: RewardParams) -> dict[str, float]:
    """The weight of each component, in :data:`COMPONENTS` order."""
    return {name: getattr(reward, name).weight for name in COMPONENTS}


def composite_reward(components: pd.DataFrame | dict[str, Any], reward: RewardParams) -> np.ndarray:
    """``intercept + sum(weight * component)`` for every row (columns named as :data:`COMPONENTS`)."""
    total = np.full(len(np.atleast_1d(components[COMPONENTS[0]])), reward.intercept, dtype=np.float64)
    for name, weight in component_weights(reward).items():
        total = total + weight * np.asarray(components[name], dtype=np.float64)
    return total


def build_scorers(reward: RewardParams, cache_dir: Optional[Path] = None) -> dict[str, Scorer]:
    """One scorer per component, with a score cache per scorer in ``cache_dir``."""
    return {name: build_scorer(name, getattr(reward, name), cache_dir) for name in COMPONENTS}


def score_instances(scorers: dict[str, Scorer], instances: Sequence[InstanceText],
                    ids: Optional[Sequence[str]] = None, reward: Optional[RewardParams] = None) -> pd.DataFrame:
    """A table with one column per component and, when ``reward`` is given, the composite ``reward``."""
    table = pd.DataFrame({name: scorer.score(instances, ids) for name, scorer in scorers.items()})
    if reward is not None:
        table["reward"] = composite_reward(table, reward)
    return table


@dataclass
class RewardAnalysisResult:
    """What stage 2 made: per-instance scores and the summary tables and figures."""

    scores: pd.DataFrame
    correlations: pd.DataFrame
    by_type: pd.DataFrame
    best: pd.DataFrame
    worst: pd.DataFrame
    filter_counts: pd.DataFrame
    truncated: dict[str, int]
    figures: dict[str, Path]


def _candidates(params: Params, run_dir: Path, out: Path) -> list[dict[str, Any]]:
    """Sampled instructions' raw candidate continuations, generated once and appended batch by batch."""
    from refine_af_utils.instances import generate_instances, instance_prompts
    from refine_af_utils.instructions import instructions_of_run
    from refine_af_utils.models import load_causal_lm
    from refine_af_utils.seeds import seed_tasks_of_run

    analysis, cfg = params.reward_analysis, params.instance_generation
    instructions = instructions_of_run(run_dir)
    rng = random.Random(params.random_seed)
    chosen = rng.sample(instructions, min(analysis.num_instructions, len(instructions)))
    jobs = [(record, c) for record in chosen for c in range(analysis.candidates_per_instruction)]
    path = out / "candidates.jsonl"
    truncate_torn_tail(path)
    done = {(r["instruction_id"], r["candidate"]) for r in read_jsonl(path)}
    todo = [(record, c) for record, c in jobs if (record["id"], c) not in done]
    if todo:
        import torch

        model, tokenizer = load_causal_lm(params.model)
        seeds = seed_tasks_of_run(run_dir)
        for start in tqdm(range(0, len(todo), cfg.batch_size), desc="candidate instances"):
            batch = todo[start:start + cfg.batch_size]
            torch.manual_seed(params.random_seed + start)
            prompts = instance_prompts([r for r, _ in batch], seeds, cfg, params.random_seed)
            texts = generate_instances(model, tokenizer, prompts, cfg)
            append_jsonl(path, [
                {"instruction_id": r["id"], "instruction": r["instruction"],
                 "is_classification": r["is_classification"], "candidate": c, "text": text}
                for (r, c), text in zip(batch, texts)
            ])
    wanted = {(r["id"], c) for r, c in jobs}
    return [r for r in read_jsonl(path) if (r["instruction_id"], r["candidate"]) in wanted]


def _parse_candidates(candidates: Sequence[dict[str, Any]], max_instances: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    from refine_af_utils.instances import filter_instances, parse_instances

    rows, totals = [], {"candidates": len(candidates), "parsed": 0, "unparseable": 0}
    for candidate in candidates:
        parsed = parse_instances(candidate["text"], candidate["is_classification"])
        totals["parsed"] += len(parsed)
        if not parsed:
            totals["unparseable"] += 1
        kept, counts = filter_instances(parsed, max_instances)
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


def component_histograms_figure(scores: pd.DataFrame, path: Path) -> Path:
    """One histogram per reward component (stage 2 and the report draw the same figure)."""
    from refine_af_utils.plots import histogram_grid, save_figure

    return save_figure(histogram_grid(scores, list(COMPONENTS), "Reward components per instance"), path)


def correlations_figure(correlations: pd.DataFrame, path: Path) -> Path:
    """Heatmap of the components' correlations."""
    from refine_af_utils.plots import heatmap, save_figure

    return save_figure(heatmap(correlations, "Correlation of reward components"), path)


def run_reward_analysis(params: Params, run_dir: str | Path) -> RewardAnalysisResult:
    """Stage 2: candidate instances from the untrained backbone, every component scored, figures."""
    from refine_af_utils.plots import histogram, save_figure
    from refine_af_utils.results import check_stage_config, record_metrics, stage_dir

    run_dir = Path(run_dir)
    out = stage_dir(run_dir, REWARD_ANALYSIS_DIR)
    settings = params.to_dict()
    check_stage_config(out, {key: settings[key] for key in ("model", "random_seed", "instance_generation",
                                                             "reward_analysis")})
    candidates = _candidates(params, run_dir, out)
    instances, filter_counts = _parse_candidates(candidates, params.instance_generation.max_instances_per_task)
    if instances.empty:
        raise RuntimeError(f"{out}: no candidate instance survived parsing and filtering; see filter_counts.csv")
    texts = [InstanceText(r.instruction, r.input, r.output) for r in instances.itertuples()]
    scorers = build_scorers(params.reward, out / "cache")
    components = score_instances(scorers, texts, list(instances["instance_id"]), params.reward)
    scores = pd.concat([instances.reset_index(drop=True), components], axis=1)
    scores.to_csv(out / "scores.csv", index=False)
    filter_counts.to_csv(out / "filter_counts.csv", index=False)

    columns = [*COMPONENTS, "reward"]
    correlations = scores[columns].corr()
    correlations.to_csv(out / "correlations.csv")
    grouped = scores.assign(type=np.where(scores["is_classification"], "classification", "generation")).groupby("type")
    by_type = grouped[columns].mean().round(4)
    by_type.insert(0, "instances", grouped.size())
    by_type.to_csv(out / "reward_by_type.csv")
    shown = ["instruction", "input", "output", *columns]
    ranked = scores.sort_values("reward", ascending=False, kind="stable")
    best = ranked.head(params.reward_analysis.num_examples_shown)[shown]
    worst = ranked.tail(params.reward_analysis.num_examples_shown)[shown].iloc[::-1]
    best.to_csv(out / "best_examples.csv", index=False)
    worst.to_csv(out / "worst_examples.csv", index=False)
    figures = {
        "components": component_histograms_figure(scores, out / "component_histograms.png"),
        "correlations": correlations_figure(correlations, out / "component_correlations.png"),
        "reward": save_figure(histogram(scores["reward"], "Composite REFINE-AF reward (Eq. 1)", "reward"),
                              out / "reward_distribution.png"),
    }
    truncated = {name: scorer.truncated for name, scorer in scorers.items()}
    record_metrics(run_dir, "02", {
        "instances": len(scores),
        "instructions": int(scores["instruction_id"].nunique()),
        "mean_reward": round(float(scores["reward"].mean()), 6),
        **{f"mean_{name}": round(float(scores[name].mean()), 6) for name in COMPONENTS},
        **{f"truncated_{name}": count for name, count in truncated.items()},
        **{f"count_{k}": int(v) for k, v in zip(filter_counts["stage"], filter_counts["count"])},
    })
    return RewardAnalysisResult(scores, correlations, by_type, best, worst, filter_counts, truncated, figures)
