"""The REFINE-AF reward (the paper's Eq. 1), shared by stages 2, 3 and 4.

    r = intercept + w_rm * Rew + w_und * Und + w_nat * Nat + w_coh * Coh

Stage 2 (:mod:`refine_af_utils.stages.reward_analysis`) scores candidate instances with it; stage 3
trains on it; stage 4 scores both arms' datasets with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from refine_af_utils.layout import RunLayout
from refine_af_utils.params import Params, RewardParams
from refine_af_utils.scorers import InstanceText, Scorer, build_scorer

COMPONENTS = ("reward_model", "understandability", "naturalness", "coherence")


def component_weights(reward: RewardParams) -> dict[str, float]:
    """The weight of each component, in :data:`COMPONENTS` order."""
    return {name: getattr(reward, name).weight for name in COMPONENTS}


def composite_reward(components: pd.DataFrame | dict[str, Any], reward: RewardParams) -> np.ndarray:
    """``intercept + sum(weight * component)`` for every row (columns named as :data:`COMPONENTS`)."""
    total = np.full(len(np.atleast_1d(components[COMPONENTS[0]])), reward.intercept, dtype=np.float64)
    for name, weight in component_weights(reward).items():
        total = total + weight * np.asarray(components[name], dtype=np.float64)
    return total


def check_scorers(reward: RewardParams) -> None:
    """Check every component's scorer device (and model path, where it has one) before a stage writes."""
    from refine_af_utils.models import check_model_params

    for name in COMPONENTS:
        check_model_params(getattr(reward, name), f"reward.{name}")


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


def content_reward_scale(run_dir: str | Path, reward: RewardParams) -> tuple[float, float, int]:
    """Mean and standard deviation of the content reward per parsed stage 2 candidate, and their count.

    A candidate's content reward is the mean Eq. 1 reward of its kept instances, recomputed
    from ``scores.csv``'s components with ``reward``'s weights. The RL parse penalty is
    measured in these units (see :func:`unparsed_reward`).
    """
    path = RunLayout(run_dir).scores_file
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


