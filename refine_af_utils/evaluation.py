"""Stage 6: zero-shot Super-NaturalInstructions evaluation of the base and both SFT models.

Every model answers the first ``evaluation.max_instances`` instances of every test task with
the definition-only prompt (:func:`refine_af_utils.superni.evaluation_prompt`), greedily.
Predictions are appended batch by batch to ``eval/predictions_<model>.jsonl`` with the prompt,
the references and the metrics, so anyone can recompute them, and a rerun continues where a
crash stopped. Per task, per category (12) and overall scores follow Tk-Instruct (means over
instances); the paper's headline is the share of tasks on which REFINE-AF beats Self-Instruct.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from refine_af_utils.arms import ARMS
from refine_af_utils.params import ModelParams, Params
from refine_af_utils.seeding import derive_seed
from refine_af_utils.stats import BOOTSTRAP_RESAMPLES, ClusterBootstrap, tasks_improved_tests
from refine_af_utils.superni import BUNDLED_SUPERNI, SuperNITask, evaluation_prompt, load_tasks, score

EVAL_DIR = "eval"
MODELS = ("base", *ARMS)  # the backbone, then its SFT on each arm's dataset
METRICS = ("rougeL", "exact_match")
PAPER_TASKS_IMPROVED = (63.0, 66.0)  # % of Super-NI test tasks where REFINE-AF beats Self-Instruct, per backbone


def resolve_superni_dir(value: str) -> Path:
    """``bundled`` -> our offline set; otherwise a natural-instructions checkout (it must exist)."""
    if value == "bundled":
        return BUNDLED_SUPERNI
    if value.startswith("superni@"):  # downloaded by `python -m refine_af_utils.data superni --commit <sha>`
        from refine_af_utils.data import resolve_superni_ref
        return resolve_superni_ref(value)
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
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


def load_evaluated_model(params: Params, name: str, run_dir: Path) -> tuple[Any, Any]:
    """The base backbone, or the backbone with an arm's stage 5 adapter merged (or its full SFT model)."""
    from refine_af_utils.models import load_causal_lm
    from refine_af_utils.sft import model_dir

    if name == "base":
        return load_causal_lm(params.model)
    folder = model_dir(run_dir, name)
    if params.sft.full_fine_tuning:
        spec = ModelParams(**{**params.to_dict()["model"], "name_or_path": str(folder), "revision": None})
        return load_causal_lm(spec)
    return load_causal_lm(params.model, folder)


def _clip_prompt(tokenizer: Any, prompt: str, max_tokens: int) -> str:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prompt if len(ids) <= max_tokens else tokenizer.decode(ids[-max_tokens:])


def predict(params: Params, name: str, tasks: Sequence[SuperNITask], run_dir: str | Path) -> pd.DataFrame:
    """One model's scored predictions for every instance, resuming from ``predictions_<name>.jsonl``."""
    from refine_af_utils.generation import generate_batch
    from refine_af_utils.jsonl import append_jsonl, read_jsonl, truncate_torn_tail

    cfg = params.evaluation
    run_dir = Path(run_dir)
    path = run_dir / EVAL_DIR / f"predictions_{name}.jsonl"
    truncate_torn_tail(path)
    done = {(r["task"], r["id"]) for r in read_jsonl(path)}
    todo = [(task, instance) for task in tasks for instance in task.instances if (task.name, instance.id) not in done]
    if todo:
        model, tokenizer = load_evaluated_model(params, name, run_dir)
        prompts = [_clip_prompt(tokenizer, evaluation_prompt(t, i), cfg.max_prompt_tokens) for t, i in todo]
        order = sorted(range(len(todo)), key=lambda k: len(prompts[k]))  # similar lengths batch with less padding
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        for batch in tqdm(batches, desc=f"Super-NI predictions ({name})"):
            outputs = generate_batch(model, tokenizer, [prompts[k] for k in batch], cfg.max_new_tokens)
            records = []
            for k, output in zip(batch, outputs):
                task, instance = todo[k]
                prediction = output.text.strip()
                records.append({"task": task.name, "category": task.category, "id": instance.id,
                                "prompt": prompts[k], "prediction": prediction, "references": instance.references,
                                **score(prediction, instance.references)})
            append_jsonl(path, records)
    wanted = {(t.name, i.id) for t in tasks for i in t.instances}
    table = pd.DataFrame([r for r in read_jsonl(path) if (r["task"], r["id"]) in wanted])
    return table.sort_values(["task", "id"], kind="stable").reset_index(drop=True)


def per_task_scores(predictions: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Mean ROUGE-L and exact match per task and model (columns ``rougeL_<model>``, ...)."""
    tables = []
    for name, table in predictions.items():
        grouped = table.groupby(["task", "category"], sort=True)
        means = grouped[list(METRICS)].mean().add_suffix(f"_{name}")
        tables.append(means)
    result = pd.concat(tables, axis=1).reset_index()
    counts = next(iter(predictions.values())).groupby("task").size().rename("instances")
    return result.merge(counts, on="task")


def grouped_scores(predictions: dict[str, pd.DataFrame], by: str | None) -> pd.DataFrame:
    """Tk-Instruct's grouped metrics: means over the instances of each group (or of all, ``by=None``)."""
    rows = {}
    for name, table in predictions.items():
        if by is None:
            rows[name] = table[list(METRICS)].mean()
        else:
            rows[name] = table.groupby(by)["rougeL"].mean()
    return pd.DataFrame(rows).round(2)


TIE_TOLERANCE = 1e-9  # a task is a tie when the two arms' mean scores differ by at most this (i.e. are equal)


def task_outcomes(delta: Any, atol: float = TIE_TOLERANCE) -> np.ndarray:
    """``win``, ``tie`` or ``loss`` per difference (REFINE-AF minus Self-Instruct); a tie is ``|delta| <= atol``."""
    delta = np.asarray(delta, dtype=np.float64)
    return np.where(np.isclose(delta, 0.0, atol=atol), "tie", np.where(delta > 0, "win", "loss"))


def compare_arms(per_task: pd.DataFrame, metric: str = "rougeL", atol: float = TIE_TOLERANCE) -> pd.DataFrame:
    """Per task: REFINE-AF's score minus Self-Instruct's, and the outcome (win, tie, loss)."""
    delta = per_task[f"{metric}_refine_af"] - per_task[f"{metric}_self_instruct"]
    outcome = task_outcomes(delta, atol)
    return pd.DataFrame({"task": per_task["task"], "category": per_task["category"],
                         "self_instruct": per_task[f"{metric}_self_instruct"],
                         "refine_af": per_task[f"{metric}_refine_af"], "delta": delta, "outcome": outcome})


def tasks_improved(comparison: pd.DataFrame) -> dict[str, Any]:
    """Counts and shares of wins, ties and losses of REFINE-AF over Self-Instruct (ties counted apart)."""
    counts = comparison["outcome"].value_counts()
    total = len(comparison)
    summary: dict[str, Any] = {"tasks": total}
    for outcome, plural in (("win", "wins"), ("tie", "ties"), ("loss", "losses")):
        summary[plural] = int(counts.get(outcome, 0))
        summary[f"{outcome}_share_percent"] = round(100.0 * counts.get(outcome, 0) / total, 1) if total else None
    return summary


def category_winners(per_category: pd.DataFrame) -> pd.DataFrame:
    """Each category's mean ROUGE-L per model and which arm wins it."""
    table = per_category.copy()
    delta = table["refine_af"] - table["self_instruct"]
    table["winner"] = np.where(np.isclose(delta, 0.0), "tie", np.where(delta > 0, "refine_af", "self_instruct"))
    return table


DIFFERENCE = "refine_af - self_instruct"  # the paired difference's name in the statistics tables


def paired_predictions(predictions: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per instance answered by every model (same task and id): ``<metric>_<model>`` columns.

    ``references`` (as a tuple) comes along when the predictions carry it, for the constant-label flag.
    """
    keys = ["task", "category", "id"]
    table = None
    for name, frame in predictions.items():
        part = frame[keys + list(METRICS)].rename(columns={m: f"{m}_{name}" for m in METRICS})
        table = part if table is None else table.merge(part, on=keys, how="inner", validate="one_to_one")
    first = next(iter(predictions.values()))
    if "references" in first.columns:
        refs = first[["task", "id"]].assign(references=[tuple(str(r).strip() for r in refs)
                                                        for refs in first["references"]])
        table = table.merge(refs, on=["task", "id"], how="left")
    return table.sort_values(["task", "id"], kind="stable").reset_index(drop=True)


@dataclass
class EvaluationStatistics:
    """Stage 6's statistics: overall and per-category means with cluster bootstrap CIs, per-task paired
    differences with instance bootstrap CIs and flags, and the tests over tasks."""

    overall: pd.DataFrame       # model (and the paired difference), metric, mean, ci_low, ci_high, tasks, instances
    tasks: pd.DataFrame         # per task: ROUGE-L per model, difference with CI, outcome, significance, flags
    per_category: pd.DataFrame  # category, model (and the difference), metric, mean, ci_low, ci_high, tasks, instances
    improvement: dict[str, Any]  # wins/ties/losses, significant ones, exact interval, p-values, power


def evaluation_statistics(predictions: dict[str, pd.DataFrame], seed: int,
                          resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95) -> EvaluationStatistics:
    """Every statistic of stage 6 from the scored predictions (see :class:`EvaluationStatistics`).

    One :class:`~refine_af_utils.stats.ClusterBootstrap` (tasks, then instances) serves all of them,
    so the models and their paired difference share the same draws. Per task, REFINE-AF minus
    Self-Instruct on ROUGE-L with an instance bootstrap CI; a task is a significant win or loss only
    when that CI excludes 0. Ties follow :func:`task_outcomes`.
    """
    paired = paired_predictions(predictions)
    models = list(predictions)
    columns = [(name, metric) for metric in METRICS for name in models]
    columns += [(DIFFERENCE, metric) for metric in METRICS]
    values = np.column_stack(
        [paired[f"{m}_{name}"] for name, m in columns if name != DIFFERENCE]
        + [paired[f"{m}_refine_af"] - paired[f"{m}_self_instruct"] for name, m in columns if name == DIFFERENCE])
    boot = ClusterBootstrap(values, paired["task"], seed, resamples)

    def rows(intervals: list[Any], **extra: Any) -> list[dict[str, Any]]:
        return [{**extra, "model": name, "metric": metric, "mean": iv.mean, "ci_low": iv.low, "ci_high": iv.high,
                 "tasks": iv.clusters, "instances": iv.instances} for (name, metric), iv in zip(columns, intervals)]

    overall = pd.DataFrame(rows(boot.interval(level=level)))
    category_of = paired.groupby("task")["category"].first()
    per_category = pd.DataFrame([row for category, names in category_of.groupby(category_of).groups.items()
                                 for row in rows(boot.interval(list(names), key=f"category:{category}", level=level),
                                                 category=category)])
    means, low, high = boot.cluster_intervals(level)
    diff = columns.index((DIFFERENCE, "rougeL"))
    tasks = pd.DataFrame({"task": list(boot.names), "category": category_of.loc[list(boot.names)].to_numpy(),
                          "instances": boot.sizes})
    for j, (name, metric) in enumerate(columns):
        if metric == "rougeL" and name != DIFFERENCE:
            tasks[name] = means[:, j]
    tasks["delta"], tasks["ci_low"], tasks["ci_high"] = means[:, diff], low[:, diff], high[:, diff]
    tasks["outcome"] = task_outcomes(tasks["delta"])
    tasks["significant"] = np.where(tasks["ci_low"] > 0, "win", np.where(tasks["ci_high"] < 0, "loss", "no"))
    tasks["floor"] = (tasks[models] == 0).all(axis=1)
    if "references" in paired.columns:
        tasks["constant_label"] = (paired.groupby("task")["references"].nunique() == 1).loc[tasks["task"]].to_numpy()
    else:
        tasks["constant_label"] = pd.NA

    counts = tasks["outcome"].value_counts()
    wins, ties, losses = (int(counts.get(k, 0)) for k in ("win", "tie", "loss"))
    tests = tasks_improved_tests(wins, ties, losses, tasks["delta"].where(tasks["outcome"] != "tie", 0.0),
                                 level=level)
    improvement = {"significant_wins": int((tasks["significant"] == "win").sum()),
                   "significant_losses": int((tasks["significant"] == "loss").sum()),
                   "floor_tasks": int(tasks["floor"].sum()),
                   "constant_label_tasks": int(tasks["constant_label"].eq(True).sum()),
                   "tie_tolerance": TIE_TOLERANCE, "confidence_level": level, "bootstrap_resamples": resamples,
                   "bootstrap_seed": int(seed), **tests}
    return EvaluationStatistics(overall, tasks, per_category, improvement)


STATISTICS_FILES = {"overall": "overall_ci.csv", "tasks": "task_stats.csv", "per_category": "per_category_ci.csv"}


def write_statistics(out: Path, statistics: EvaluationStatistics, improvement: dict[str, Any]) -> None:
    """Write ``overall_ci.csv``, ``task_stats.csv``, ``per_category_ci.csv`` and ``tasks_improved.csv`` to ``out``.

    ``improvement`` is :func:`tasks_improved`'s counts; the statistics' rows follow them in
    ``tasks_improved.csv`` (one ``measure,value`` table).
    """
    statistics.overall.to_csv(out / STATISTICS_FILES["overall"], index=False)
    statistics.tasks.to_csv(out / STATISTICS_FILES["tasks"], index=False)
    statistics.per_category.to_csv(out / STATISTICS_FILES["per_category"], index=False)
    pd.Series({**improvement, **statistics.improvement}, dtype=object).to_csv(
        out / "tasks_improved.csv", header=["value"], index_label="measure")


def bootstrap_seed(random_seed: int) -> int:
    """The seed of stage 6's bootstrap, from the run's seed (the one seed rule)."""
    return derive_seed(random_seed, "06", "bootstrap")


def statistics_from_run(run_dir: str | Path, random_seed: int) -> EvaluationStatistics:
    """Stage 6's statistics again from ``eval/predictions_<model>.jsonl`` (same seed rule, same numbers)."""
    from refine_af_utils.jsonl import read_jsonl

    predictions = {}
    for name in MODELS:
        path = Path(run_dir) / EVAL_DIR / f"predictions_{name}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run the stage that writes it before stage 7")
        predictions[name] = pd.DataFrame(read_jsonl(path))
    return evaluation_statistics(predictions, bootstrap_seed(random_seed))


@dataclass
class EvaluationResult:
    """Stage 6's tables and figures."""

    predictions: dict[str, pd.DataFrame]
    per_task: pd.DataFrame
    per_category: pd.DataFrame
    overall: pd.DataFrame
    comparison: pd.DataFrame
    improvement: dict[str, Any]
    figures: dict[str, Path]
    statistics: EvaluationStatistics | None = None


def evaluation_figure(name: str, per_category: pd.DataFrame, comparison: pd.DataFrame, path: Path) -> Path:
    """Draw ``per_category`` (bars per model) or ``task_deltas`` (per-task difference histogram) to ``path``."""
    from refine_af_utils.plots import grouped_bars, histogram, save_figure

    if name == "per_category":
        return save_figure(grouped_bars(per_category[list(MODELS)], "ROUGE-L per category", "ROUGE-L"), path)
    if name == "task_deltas":
        return save_figure(histogram(comparison["delta"], "REFINE-AF minus Self-Instruct, per task",
                                     "ROUGE-L difference", vline=0.0, vline_label="tie"), path)
    raise ValueError(f"unknown evaluation figure '{name}'")


EVALUATION_FIGURES = ("per_category", "task_deltas")


def run_evaluation_stage(params: Params, run_dir: str | Path) -> EvaluationResult:
    """Stage 6 for the notebook: predict with the three models, score, tabulate and draw."""
    from refine_af_utils.models import check_device, resolve_model_path
    from refine_af_utils.results import check_stage_config, record_metrics, stage_dir
    from refine_af_utils.sft import model_dir

    run_dir = Path(run_dir)
    out = stage_dir(run_dir, EVAL_DIR)
    # Inputs first: a run that fails on them must not leave a config.json that refuses the corrected run.
    superni_dir = resolve_superni_dir(params.evaluation.superni_dir)
    tasks = load_tasks(superni_dir, params.evaluation.max_instances)
    check_device(params.model.device)
    resolve_model_path(params.model.name_or_path)
    settings = params.to_dict()
    check_stage_config(out, {
        "model": settings["model"], "evaluation": settings["evaluation"],
        **{f"{arm}_model_sha256": _model_files_sha256(model_dir(run_dir, arm)) for arm in MODELS[1:]},
    })
    predictions = {name: predict(params, name, tasks, run_dir) for name in MODELS}
    per_task = per_task_scores(predictions)
    per_category = grouped_scores(predictions, "category")
    overall = grouped_scores(predictions, None).T
    overall["tasks"] = len(tasks)
    overall["instances"] = [len(predictions[name]) for name in overall.index]
    comparison = compare_arms(per_task)
    improvement = tasks_improved(comparison)
    statistics = evaluation_statistics(predictions, bootstrap_seed(params.random_seed))
    winners = category_winners(per_category)
    per_task.round(4).to_csv(out / "per_task.csv", index=False)
    winners.to_csv(out / "per_category.csv", index_label="category")
    overall.to_csv(out / "overall.csv", index_label="model")
    comparison.round(4).to_csv(out / "task_comparison.csv", index=False)
    write_statistics(out, statistics, improvement)
    figures = {name: evaluation_figure(name, per_category, comparison, out / f"{name}.png")
               for name in EVALUATION_FIGURES}
    record_metrics(run_dir, "06", {
        **{f"{name}_rougeL": float(overall.loc[name, "rougeL"]) for name in MODELS},
        **{f"{name}_exact_match": float(overall.loc[name, "exact_match"]) for name in MODELS},
        **improvement, "superni_dir": params.evaluation.superni_dir,
        **{k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in statistics.improvement.items()},
        **{f"{row.model.replace(' - ', '_minus_')}_{row.metric}_ci": [row.ci_low, row.ci_high]
           for row in statistics.overall.itertuples()},
    })
    return EvaluationResult(predictions, per_task, winners, overall, comparison, improvement, figures, statistics)
