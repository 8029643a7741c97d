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
    # Batches are cut from the full job list and seeded by their first job, so a resumed stage
    # regenerates a half-written batch whole, with the same noise, and appends only what is missing.
    batches = [jobs[i:i + cfg.batch_size] for i in range(0, len(jobs), cfg.batch_size)]
    todo = [batch for batch in batches if any((r["id"], c) not in done for r, c in batch)]
    if todo:
        import torch

        from refine_af_utils.seeding import derive_seed

        model, tokenizer = load_causal_lm(params.model)
        seeds = seed_tasks_of_run(run_dir)
        for batch in tqdm(todo, desc="candidate instances"):
            first, candidate = batch[0]
            torch.manual_seed(derive_seed(params.random_seed, "02", first["instruction"], candidate))
            prompts = instance_prompts([r for r, _ in batch], seeds, cfg, params.random_seed)
            generations = generate_instances(model, tokenizer, prompts, cfg)
            append_jsonl(path, [
                {"instruction_id": r["id"], "instruction": r["instruction"],
                 "is_classification": r["is_classification"], "candidate": c, "text": g.text,
                 "truncated": g.truncated}
                for (r, c), g in zip(batch, generations) if (r["id"], c) not in done
            ])
    wanted = {(r["id"], c) for r, c in jobs}
    return [r for r in read_jsonl(path) if (r["instruction_id"], r["candidate"]) in wanted]


def _parse_candidates(candidates: Sequence[dict[str, Any]], max_instances: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    from refine_af_utils.instances import extract_instances

    rows, totals = [], {"candidates": len(candidates), "unparseable": 0}
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


def content_reward_scale(run_dir: str | Path, reward: RewardParams) -> tuple[float, float, int]:
    """Mean and standard deviation of the content reward per parsed stage 2 candidate, and their count.

    A candidate's content reward is the mean Eq. 1 reward of its kept instances, recomputed
    from ``scores.csv``'s components with ``reward``'s weights. The RL parse penalty is
    measured in these units (see :func:`refine_af_utils.rl.unparsed_reward`).
    """
    path = Path(run_dir) / REWARD_ANALYSIS_DIR / "scores.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: stage 2's scores are missing; run stage 02 first")
    scores = pd.read_csv(path)
    scores["content"] = composite_reward(scores, reward)
    per_candidate = scores.groupby(["instruction_id", "candidate"])["content"].mean()
    if len(per_candidate) < 2:
        raise ValueError(f"{path}: fewer than 2 parsed candidates; the parse penalty needs a spread "
                         "(raise reward_analysis.num_instructions)")
    return float(per_candidate.mean()), float(per_candidate.std(ddof=1)), int(len(per_candidate))


def unparsed_reward(run_dir: str | Path, params: Params) -> float:
    """The reward of a completion that yields no instance: stage 2's mean content reward minus k SD.

    k is ``rl.parse_penalty_sd``. Measured in the content reward's own spread, the penalty stays
    comparable to the signal whatever the weights (the reward-weight ablation changes them).
    Stage 3 trains with it and stage 4 counts an instruction without instances with it.
    """
    mean, sd, _ = content_reward_scale(run_dir, params.reward)
    return mean - params.rl.parse_penalty_sd * sd


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
