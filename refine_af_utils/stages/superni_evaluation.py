"""Stage 6: zero-shot Super-NaturalInstructions evaluation of the base and both SFT models.

Every model answers the first ``evaluation.max_instances`` instances of every test task with
the definition-only prompt (:func:`refine_af_utils.prompts.evaluation_prompt`), greedily.
Predictions are appended batch by batch to ``superni_evaluation/predictions_<model>.jsonl`` with the prompt,
the references and the metrics, so anyone can recompute them, and a rerun continues where a
crash stopped. Per task, per category (12) and overall scores follow Tk-Instruct (means over
instances); the paper's headline is the share of tasks on which REFINE-AF beats Self-Instruct.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from refine_af_utils.comparison import (
    EvaluationStatistics,
    bootstrap_seed,
    category_winners,
    compare_arms,
    evaluation_statistics,
    grouped_scores,
    per_task_scores,
    tasks_improved,
    write_statistics,
)
from refine_af_utils.figures import EVALUATION_FIGURES, evaluation_figure
from refine_af_utils.layout import MODELS, RunLayout
from refine_af_utils.run_folder import StageResult, stage_entry
from refine_af_utils.params import ModelParams, Params
from refine_af_utils.prompts import evaluation_prompt
from refine_af_utils.superni import BUNDLED_SUPERNI, SuperNIError, SuperNITask, load_tasks, score


def resolve_superni_dir(value: str) -> Path:
    """``bundled`` -> our offline set; otherwise a natural-instructions checkout (it must exist)."""
    if value == "bundled":
        return BUNDLED_SUPERNI
    if value.startswith("superni@"):  # downloaded by `python -m refine_af_utils.downloads superni --commit <sha>`
        from refine_af_utils.downloads import resolve_superni_ref
        return resolve_superni_ref(value)
    path = Path(value).expanduser()
    if not path.is_dir():
        raise SuperNIError(
            f"evaluation.superni_dir: '{value}' is not a folder; clone github.com/allenai/natural-instructions "
            "and point this key at it, or use 'bundled'")
    return path


def _model_files_sha256(folder: Path) -> str:
    """sha256 over a finished stage 5 model's weight files (read in chunks: full 7B models are large)."""
    if not (folder.parent / "complete").is_file():
        raise FileNotFoundError(f"{folder}: no finished SFT model; run stage 5 first")
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_evaluated_model(params: Params, name: str, run_dir: Path) -> Any:
    """The engine (``model.engine``) over the base backbone, or over the backbone with an arm's stage 5 adapter
    merged (or its full SFT model)."""
    from refine_af_utils.engines import load_engine

    if name == "base":
        return load_engine(params.model)
    folder = RunLayout(run_dir).sft_model(name)
    if params.sft.full_fine_tuning:
        spec = ModelParams(**{**params.to_dict()["model"], "name_or_path": str(folder), "revision": None})
        return load_engine(spec)
    return load_engine(params.model, folder)


def _clip_prompt(tokenizer: Any, prompt: str, max_tokens: int) -> str:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prompt if len(ids) <= max_tokens else tokenizer.decode(ids[-max_tokens:])


def predict(params: Params, name: str, tasks: Sequence[SuperNITask], run_dir: str | Path) -> pd.DataFrame:
    """One model's scored predictions for every instance, resuming from ``predictions_<name>.jsonl``."""
    from refine_af_utils.engines import Decoding
    from refine_af_utils.resumable import resume_batches

    cfg = params.evaluation
    run_dir = Path(run_dir)
    jobs = [(task, instance) for task in tasks for instance in task.instances]
    decoding = Decoding(max_new_tokens=cfg.max_new_tokens)  # greedy, stops at the end token

    def prepare(engine: Any, pending: list[tuple[SuperNITask, Any]]) -> list[tuple[Any, Any, str]]:
        prompts = [_clip_prompt(engine.tokenizer, evaluation_prompt(t, i), cfg.max_prompt_tokens) for t, i in pending]
        order = sorted(range(len(pending)), key=lambda k: len(prompts[k]))  # similar lengths batch with less padding
        return [(*pending[k], prompts[k]) for k in order]

    def generate(engine: Any, batch: list[tuple[Any, Any, str]], seed: Optional[int]) -> list[dict[str, Any]]:
        outputs = engine.generate([prompt for _, _, prompt in batch], decoding, seed)
        return [{"task": task.name, "category": task.category, "id": instance.id, "prompt": prompt,
                 "prediction": output.text.strip(), "references": instance.references,
                 **score(output.text.strip(), instance.references)}
                for (task, instance, prompt), output in zip(batch, outputs)]

    records = resume_batches(RunLayout(run_dir).predictions(name), jobs, job_key=lambda j: (j[0].name, j[1].id),
                             record_key=lambda r: (r["task"], r["id"]), batch_size=cfg.batch_size,
                             load=lambda: load_evaluated_model(params, name, run_dir), generate=generate,
                             prepare=prepare, desc=f"Super-NI predictions ({name})")
    table = pd.DataFrame(records)
    return table.sort_values(["task", "id"], kind="stable").reset_index(drop=True)


@dataclass
class SuperNIEvaluationResult(StageResult):
    """Stage 6's tables and figures."""

    predictions: dict[str, pd.DataFrame]
    per_task: pd.DataFrame
    per_category: pd.DataFrame
    overall: pd.DataFrame
    comparison: pd.DataFrame
    improvement: dict[str, Any]
    statistics: EvaluationStatistics | None = None


@stage_entry
def run(params: Params, run_dir: str | Path) -> SuperNIEvaluationResult:
    """Stage 6 for the notebook: predict with the three models, score, tabulate and draw."""
    from refine_af_utils.models import check_device, resolve_model_path
    from refine_af_utils.run_folder import open_stage

    stage = open_stage(__name__, params, run_dir)
    run_dir, layout = stage.run_dir, stage.layout
    # Inputs first: a run that fails on them must not leave a config.json that refuses the corrected run.
    superni_dir = resolve_superni_dir(params.evaluation.superni_dir)
    tasks = load_tasks(superni_dir, params.evaluation.max_instances)
    check_device(params.model.device)
    resolve_model_path(params.model.name_or_path)
    models = (*MODELS, *params.sft.external_arms)  # the base model, the two arms, then any external arm
    models_sha256 = {f"{arm}_model_sha256": _model_files_sha256(layout.sft_model(arm)) for arm in models[1:]}
    stage.check_config(**models_sha256)
    predictions = {name: predict(params, name, tasks, run_dir) for name in models}
    per_task = per_task_scores(predictions)
    per_category = grouped_scores(predictions, "category", metric="rougeL")
    overall = grouped_scores(predictions, None).T
    overall["tasks"] = len(tasks)
    overall["instances"] = [len(predictions[name]) for name in overall.index]
    comparison = compare_arms(per_task)
    improvement = tasks_improved(comparison)
    statistics = evaluation_statistics(predictions, bootstrap_seed(params.random_seed))
    winners = category_winners(per_category)
    per_task.round(4).to_csv(stage.file("per_task"), index=False)
    winners.to_csv(stage.file("per_category"), index_label="category")
    overall.to_csv(stage.file("overall"), index_label="model")
    comparison.round(4).to_csv(stage.file("task_comparison"), index=False)
    write_statistics(layout, statistics, improvement)
    figures = {name: evaluation_figure(name, statistics, stage.file("figure", name=name))
               for name in EVALUATION_FIGURES}
    stage.record_metrics({
        **{f"{name}_rougeL": float(overall.loc[name, "rougeL"]) for name in models},
        **{f"{name}_exact_match": float(overall.loc[name, "exact_match"]) for name in models},
        **improvement, "superni_dir": params.evaluation.superni_dir,
        **{k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in statistics.improvement.items()},
        **{f"{row.model.replace(' - ', '_minus_')}_{row.metric}_ci": [row.ci_low, row.ci_high]
           for row in statistics.overall.itertuples()},
    })
    return SuperNIEvaluationResult(predictions, per_task, winners, overall, comparison, improvement, statistics,
                                   figures=figures)
