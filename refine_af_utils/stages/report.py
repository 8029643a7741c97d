"""Stage 7: the paper's tables and figures, regenerated from a run's CSV and JSONL results.

No model runs here: every table and figure is drawn again from what stages 0-6 wrote, into
``<run_dir>/report.md`` with ``table_*.csv`` and ``fig_*.png`` beside it. Figures carry no
timestamps, so running the stage twice gives byte-identical PNGs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from refine_af_utils.comparison import (
    DIFFERENCE,
    PAPER_TASKS_IMPROVED,
    STATISTICS_FILES,
    EvaluationStatistics,
    statistics_from_run,
)
from refine_af_utils.figures import (
    arm_comparison_figure,
    arm_rewards_figure,
    component_histograms_figure,
    components_figure,
    correlations_figure,
    evaluation_figure,
    filter_counts_figure,
    heldout_figure,
    lengths_figure,
    novelty_figure,
    reward_kl_figure,
    sft_loss_figure,
    yield_funnel_figure,
)
from refine_af_utils.files import atomic_write_text, read_jsonl, read_whole_csv
from refine_af_utils.layout import ARMS, MODELS, STAGES, RunLayout
from refine_af_utils.run_folder import StageResult, stage_entry
from refine_af_utils.arm_views import paired_instances, word_lengths, yield_counts
from refine_af_utils.reward import COMPONENTS
from refine_af_utils.trl_bridge import logged_kl_unit

def markdown_table(table: pd.DataFrame, index: bool = True, digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table (no third-party formatter)."""
    frame = table.rename_axis(table.index.name or "").reset_index() if index else table

    def cell(value: Any) -> str:
        if isinstance(value, (float, np.floating)):
            if np.isnan(value):
                return ""
            return f"{value:.{digits}f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(str(c) if str(c) else " " for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


@dataclass
class Report(StageResult):
    """Stage 7's result, built section by section: Markdown text, tables and figures written."""

    run_dir: Path
    parts: list[str] = field(default_factory=list)
    tables: dict[str, Path] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """``<run_dir>/report.md``."""
        return RunLayout(self.run_dir).report

    def text(self, markdown: str) -> None:
        """Add a paragraph or heading."""
        self.parts.append(markdown.strip())

    def table(self, name: str, table: pd.DataFrame, caption: str, index: bool = True,
              shown: pd.DataFrame | None = None) -> None:
        """Write ``table_<name>.csv`` and add the table (or the part of it in ``shown``) to the report."""
        path = RunLayout(self.run_dir).table(name)
        table.to_csv(path, index=index)
        self.tables[name] = path
        self.parts.append(f"**Table: {caption}** (`{path.name}`)\n\n"
                          f"{markdown_table(table if shown is None else shown, index)}")

    def figure(self, name: str, draw: Callable[[Path], Path], caption: str) -> None:
        """Draw ``fig_<name>.png`` and add it to the report."""
        path = draw(RunLayout(self.run_dir).figure(name))
        self.figures[name] = path
        self.parts.append(f"**Figure: {caption}**\n\n![{caption}]({path.name})")

    def write(self) -> Path:
        """Write ``report.md``."""
        return atomic_write_text(self.path, "\n\n".join(self.parts) + "\n")


PAIRED_INSTANCES_SHOWN = 6  # rows of the paired-instances view in report.md


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the stage that writes it before stage 7")
    return path


def _csv(path: Path, **kwargs: Any) -> pd.DataFrame:
    return pd.read_csv(_require(path), **kwargs)


def wall_times(run_dir: Path) -> pd.DataFrame:
    """Seconds per stage from the runner's stage markers (stage 7 itself is running and not listed), and each
    stage's peak memory from its metrics (GB; absent for a run recorded before the package measured it)."""
    rows = []
    layout = RunLayout(run_dir)
    for stage in STAGES[:-1]:
        marker = layout.marker(stage.id)
        if marker.is_file():
            metrics = json.loads(layout.metrics(stage.id).read_text()) if layout.metrics(stage.id).is_file() else {}
            rows.append({"stage": stage.id, "name": stage.title, "seconds": json.loads(marker.read_text())["seconds"],
                         "peak_rss_gb": metrics.get("peak_rss_gb")})
    table = pd.DataFrame(rows, columns=["stage", "name", "seconds", "peak_rss_gb"])
    if len(table):
        table.loc[len(table)] = {"stage": "0-6", "name": "total", "seconds": round(table["seconds"].sum(), 1),
                                 "peak_rss_gb": table["peak_rss_gb"].max()}
    return table


def evaluation_statistics_tables(run_dir: Path, improvement: pd.Series, random_seed: int | None
                                 ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Stage 6's statistics (overall CIs, per-task, per-category CIs, tests over tasks) for the report.

    Read from ``superni_evaluation/`` when stage 6 wrote them; a run evaluated before they existed gets them
    computed from its predictions with the run's seed (``random_seed``), in memory, the same numbers
    stage 6 would write.
    """
    paths = {key: RunLayout(run_dir).file("06", name) for key, name in STATISTICS_FILES.items()}
    missing = [path for path in paths.values() if not path.is_file()]
    if not missing and "sign_test_p" in improvement.index:
        tests = {str(key): value for key, value in improvement.items()}
        return (pd.read_csv(paths["overall"]), pd.read_csv(paths["tasks"]), pd.read_csv(paths["per_category"]), tests)
    if random_seed is None:
        where = missing[0] if missing else RunLayout(run_dir).file("06", "tasks_improved")
        raise FileNotFoundError(f"{where}: missing stage 6 statistics; run the stage that writes them before stage 7 "
                                "(or give the run's random_seed to compute them from the predictions)")
    statistics = statistics_from_run(run_dir, int(random_seed))
    return statistics.overall, statistics.tasks, statistics.per_category, dict(statistics.improvement)


def _stage_span(ids: list[str]) -> str:
    """Stage ids with consecutive runs joined: ``00-03, 05``."""
    runs: list[list[str]] = []
    for stage_id in ids:
        if runs and int(stage_id) == int(runs[-1][-1]) + 1:
            runs[-1].append(stage_id)
        else:
            runs.append([stage_id])
    return ", ".join(run[0] if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def environment_table(run_dir: Path) -> pd.DataFrame:
    """``table_environment``: the machine, dtypes and versions each stage of 00-06 recorded in its marker.

    A value that differs between stages is listed with the stages that had it; stages whose marker
    predates environment records (or that have not run) are named in the ``not recorded`` row.
    """
    from refine_af_utils.environment import environment_lines

    values: dict[str, dict[str, list[str]]] = {}
    unrecorded = []
    for stage in STAGES[:-1]:
        marker = RunLayout(run_dir).marker(stage.id)
        record = json.loads(marker.read_text()) if marker.is_file() else {}
        if "environment" not in record:
            unrecorded.append(stage.id)
            continue
        for what, value in environment_lines(record["environment"]):
            values.setdefault(what, {}).setdefault(value, []).append(stage.id)
    rows = []
    for what, by_value in values.items():
        shown = (next(iter(by_value)) if len(by_value) == 1
                 else "; ".join(f"{value} (stage {_stage_span(ids)})" for value, ids in by_value.items()))
        rows.append({"what": what, "value": shown})
    if unrecorded:
        rows.append({"what": "not recorded", "value": f"stage {_stage_span(unrecorded)} (no marker, or one made "
                                                      "before environment records)"})
    return pd.DataFrame(rows, columns=["what", "value"])


def environment_sentence(table: pd.DataFrame) -> str:
    """What kind of reproduction to expect from this run's environment."""
    values = dict(zip(table["what"], table["value"]))
    kind, identity = values.get("CPU kind"), values.get("CPU identity", "unknown")
    identity = "identity not recorded" if identity.startswith("unknown") else identity
    dtype = values.get("dtype: backbone (generation, RL, SFT, evaluation)")
    if kind is None or identity is None or dtype is None or "(stage" in f"{kind}{identity}{dtype}":
        return ("The stages did not all record one CPU kind, CPU identity and dtype, so no exact reproduction is "
                "to be expected; compare runs with `python -m refine_af_utils.compare`.")
    return (f"Made on a `{kind}` CPU ({identity}) in `{dtype}`. The same params on a machine with the same CPU "
            f"kind and identity in `{dtype}` are expected to give these numbers exactly; elsewhere they differ "
            "draw by draw (kernels round differently), and `python -m refine_af_utils.compare RUN_A RUN_B` tells "
            "whether two runs agree within noise.")


def _num(value: Any) -> float:
    """A float from a CSV cell (NaN for empty or None)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _level(tests: dict[str, Any]) -> str:
    return f"{100 * _num(tests['confidence_level']):.0f}%"


def _p(value: Any) -> str:
    p = _num(value)
    return "n/a (no non-tied tasks)" if np.isnan(p) else f"{p:.3g}"


def chance_sentence(overall_ci: pd.DataFrame, tests: dict[str, Any], metric: str = "rougeL") -> str:
    """One plain sentence: is REFINE-AF vs Self-Instruct distinguishable from chance (CI and p-values)."""
    row = overall_ci[(overall_ci["model"] == DIFFERENCE) & (overall_ci["metric"] == metric)].iloc[0]
    alpha = _num(tests["alpha"])
    sign_p, wilcoxon = _num(tests["sign_test_p"]), _num(tests["wilcoxon_p"])
    excludes = row["ci_low"] > 0 or row["ci_high"] < 0
    significant = [p < alpha for p in (sign_p, wilcoxon) if not np.isnan(p)]
    side = "excludes" if excludes else "includes"
    difference = (f"the overall ROUGE-L difference (REFINE-AF minus Self-Instruct) is {row['mean']:+.2f} with a "
                  f"{_level(tests)} CI of [{row['ci_low']:.2f}, {row['ci_high']:.2f}], which {side} 0, and over "
                  f"tasks the sign test gives p = {_p(sign_p)} and the Wilcoxon signed-rank test "
                  f"p = {_p(wilcoxon)} (alpha {alpha:g})")
    if excludes and significant and all(significant):
        leader = "REFINE-AF" if row["mean"] > 0 else "Self-Instruct"
        return f"**The difference is distinguishable from chance, in favour of {leader}:** {difference}."
    if not excludes and not any(significant):
        return f"**The REFINE-AF vs Self-Instruct difference is not distinguishable from chance:** {difference}."
    return f"**The evidence is mixed (some of the checks below tell the arms apart from chance, some do not):** " \
           f"{difference}."


def main_table(overall_ci: pd.DataFrame) -> pd.DataFrame:
    """``table_main``: per model and for the paired difference, ROUGE-L and exact match with CI bounds."""
    names = {"rougeL": "ROUGE-L", "exact_match": "exact match"}
    external = [m for m in dict.fromkeys(overall_ci["model"]) if m not in (*MODELS, DIFFERENCE)]  # sft.external_arms
    table = pd.DataFrame(index=pd.Index([*MODELS, *external, DIFFERENCE], name="model"))
    for metric, label in names.items():
        rows = overall_ci[overall_ci["metric"] == metric].set_index("model")
        table[label] = rows["mean"].round(2)
        table[f"{label} CI low"] = rows["ci_low"].round(2)
        table[f"{label} CI high"] = rows["ci_high"].round(2)
    counts = overall_ci.drop_duplicates("model").set_index("model")
    table["tasks"], table["instances"] = counts["tasks"].astype(int), counts["instances"].astype(int)
    return table


def tasks_improved_table(wins: int, ties: int, losses: int, tests: dict[str, Any]) -> pd.DataFrame:
    """``table_tasks_improved``: wins, ties, losses, significant ones, the exact interval, tests and power."""
    from refine_af_utils.stats import critical_wins, sign_test_power

    tasks = wins + ties + losses
    alpha, power = _num(tests["alpha"]), _num(tests["power"])
    low, high = _num(tests["win_share_ci_low"]), _num(tests["win_share_ci_high"])
    detectable = _num(tests["min_detectable_win_share"])
    needed = critical_wins(tasks, alpha) if tasks else None
    paper = tuple(share / 100 for share in PAPER_TASKS_IMPROVED)
    paper_power = [sign_test_power(tasks, share, alpha) for share in paper] if tasks else [float("nan")] * 2
    share = f"{100.0 * wins / tasks:.1f}% ({wins}/{tasks})" if tasks else "n/a"
    rows = {
        "REFINE-AF better": (share, f"{100 * low:.1f}-{100 * high:.1f}% (exact, Clopper-Pearson)",
                             f"{PAPER_TASKS_IMPROVED[0]:.0f}-{PAPER_TASKS_IMPROVED[1]:.0f}%"),
        "tie": (f"{ties}/{tasks}", "", "not reported"),
        "Self-Instruct better": (f"{losses}/{tasks}", "", "not reported"),
        "REFINE-AF significantly better (task CI excludes 0)":
            (f"{int(_num(tests['significant_wins']))}/{tasks}", "", "not reported"),
        "Self-Instruct significantly better (task CI excludes 0)":
            (f"{int(_num(tests['significant_losses']))}/{tasks}", "", "not reported"),
        "sign test, wins among wins and losses (two-sided p)": (_p(tests["sign_test_p"]), "", "not reported"),
        "Wilcoxon signed-rank test on per-task differences (two-sided p)":
            (_p(tests["wilcoxon_p"]), "", "not reported"),
        f"wins needed for a two-sided sign test at {alpha:g}":
            (f"{needed}/{tasks}" if needed is not None else "none suffice", "", ""),
        f"smallest win share detectable with {power:.0%} power":
            (f"{100 * detectable:.1f}%" if not np.isnan(detectable) else "none", "",
             f"sign test power at {PAPER_TASKS_IMPROVED[0]:.0f}-{PAPER_TASKS_IMPROVED[1]:.0f}%: "
             f"{100 * paper_power[0]:.0f}-{100 * paper_power[1]:.0f}% with {tasks} tasks"),
    }
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["this run", f"{_level(tests)} CI", "paper"])
    return table.rename_axis("tasks where")


def power_line(tasks: int, tests: dict[str, Any]) -> str:
    """The power line: below which true win share ``tasks`` tasks cannot tell a result from chance."""
    alpha, power = _num(tests["alpha"]), _num(tests["power"])
    detectable = _num(tests["min_detectable_win_share"])
    paper = f"{PAPER_TASKS_IMPROVED[0]:.0f}-{PAPER_TASKS_IMPROVED[1]:.0f}%"
    if np.isnan(detectable):
        return (f"**Power:** with {tasks} tasks, no win share can be told from chance at {power:.0%} power "
                f"(two-sided sign test, alpha {alpha:g}); the paper reports {paper}.")
    low, high = PAPER_TASKS_IMPROVED
    if 100 * detectable > high:
        verdict = "an effect of the paper's size would likely go undetected with this many tasks"
    elif 100 * detectable <= low:
        verdict = f"an effect of the paper's size would be detected with at least {power:.0%} power"
    else:
        verdict = "the paper's range straddles that bound"
    return (f"**Power:** with {tasks} tasks, a win share below {100 * detectable:.1f}% cannot be told from chance "
            f"at {power:.0%} power (two-sided sign test, alpha {alpha:g}); the paper reports {paper}, so {verdict}.")


def per_category_table(per_category_ci: pd.DataFrame, metric: str = "rougeL") -> pd.DataFrame:
    """``table_per_category``: each model's mean [CI] per category, the paired difference, the winner."""
    rows = per_category_ci[per_category_ci["metric"] == metric]
    cell = rows.assign(text=[f"{m:.2f} [{lo:.2f}, {hi:.2f}]" for m, lo, hi in
                             zip(rows["mean"], rows["ci_low"], rows["ci_high"])])
    table = cell.pivot(index="category", columns="model", values="text")[[*MODELS, DIFFERENCE]]
    diff = rows[rows["model"] == DIFFERENCE].set_index("category")
    table["winner"] = np.where(diff["ci_low"] > 0, "refine_af",
                               np.where(diff["ci_high"] < 0, "self_instruct", "neither (CI includes 0)"))
    table["tasks"] = diff["tasks"].astype(int)
    return table.rename_axis(None, axis=1)


def task_table(task_stats: pd.DataFrame) -> pd.DataFrame:
    """``table_task_stats``: the per-task paired differences with CIs, outcomes and floor/constant-label flags."""
    table = task_stats.set_index("task")[["category", "instances", *MODELS, "delta", "ci_low", "ci_high",
                                          "outcome", "significant"]].round(2)
    floor = task_stats["floor"].astype(str).str.lower().eq("true").to_numpy()
    constant = task_stats["constant_label"].astype(str).str.lower().eq("true").to_numpy()
    table["flags"] = [", ".join(name for name, on in (("floor", f), ("constant label", c)) if on)
                      for f, c in zip(floor, constant)]
    return table


def build_report(run_dir: str | Path, run_name: str | None = None, random_seed: int | None = None) -> Report:
    """Regenerate every table and figure of the run into ``report.md`` (see the module docstring).

    ``random_seed`` (the run's) lets a run evaluated before stage 6 wrote its statistics get them
    from its predictions; without it those files must exist.
    """
    from refine_af_utils.plots import bar_chart, save_figure

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    report = Report(run_dir)
    run_name = run_name or run_dir.name
    report.text(f"# REFINE-AF reproduction report: run `{run_name}`\n\n"
                "Generated by stage 7 (`notebooks/07_report.ipynb`) from this run's CSV and JSONL "
                "results only. Every number below comes from this run.")
    environment = environment_table(run_dir)
    report.text("## Environment")
    report.text(environment_sentence(environment))
    report.table("environment", environment.set_index("what"),
                 "where stages 0-6 ran, from their markers (CPU, dtypes each model computed in, versions)")

    metrics06 = json.loads(_require(layout.metrics("06")).read_text())
    _require(layout.file("06", "overall"))
    improvement = _csv(layout.file("06", "tasks_improved"), index_col="measure")["value"]
    overall_ci, task_stats, per_category_ci, tests = evaluation_statistics_tables(run_dir, improvement,
                                                                                  random_seed)
    bundled = metrics06.get("superni_dir") == "bundled"
    report.text("## Main result: zero-shot evaluation")
    if bundled:
        report.text("Evaluated on the **bundled offline set** (12 tasks written for this project in "
                    "Super-NaturalInstructions' format, one per test category). These are **not** "
                    "Super-NI numbers; set `evaluation.superni_dir` to a natural-instructions checkout for those.")
    wins, ties, losses, tasks = (int(float(improvement[k])) for k in ("wins", "ties", "losses", "tasks"))
    level = _level(tests)
    report.text(f"Intervals are {level} percentile bootstrap intervals "
                f"({int(float(tests['bootstrap_resamples'])):,} resamples, seeded from the run's seed): overall and "
                "per category, tasks are resampled, then instances within each drawn task (a cluster bootstrap; "
                "the statistic is the mean over instances, as Tk-Instruct's score); per task, its instances. "
                "The REFINE-AF minus Self-Instruct difference is paired by instance (same task and id).")
    report.text(chance_sentence(overall_ci, tests))
    statistics = EvaluationStatistics(overall_ci, task_stats, per_category_ci, tests)
    report.figure("06_task_forest", lambda p: evaluation_figure("task_forest", statistics, p),
        f"the headline, per task: REFINE-AF minus Self-Instruct ROUGE-L with its {level} CI over the task's "
        "instances, sorted (green: CI above 0, red: below, grey: includes 0)")
    report.table("main", main_table(overall_ci),
                 "overall ROUGE-L and exact match (x100, means over instances) per model and the paired "
                 f"REFINE-AF minus Self-Instruct difference, with {level} cluster bootstrap CIs")
    report.text(f"A task is a tie when the two arms' mean ROUGE-L differ by at most {float(tests['tie_tolerance']):g} "
                "(that is, are equal); ties count as not won in the share and are left out of the sign test and the "
                f"Wilcoxon test. A task is a significant win or loss only when its own {level} CI excludes 0.")
    report.table("tasks_improved", tasks_improved_table(wins, ties, losses, tests),
                 "tasks on which REFINE-AF beats the Self-Instruct baseline (ROUGE-L), with the exact "
                 "(Clopper-Pearson) interval of the share, the tests over tasks and their power")
    report.text(power_line(tasks, tests))

    report.table("per_category", per_category_table(per_category_ci),
                 f"ROUGE-L per category (means over instances) with {level} cluster bootstrap CIs, and the winning arm "
                 "(only where the CI of the paired difference excludes 0)")
    report.table("task_stats", task_table(task_stats),
                 f"per task: ROUGE-L per model, REFINE-AF minus Self-Instruct with its {level} CI over the task's "
                 "instances, the outcome, whether it is significant, and flags (floor: every model scores 0; "
                 "constant label: every instance has the same reference answer)")
    report.figure("06_per_category", lambda p: evaluation_figure("per_category", statistics, p),
                  f"ROUGE-L per category and model, with {level} cluster bootstrap CIs")

    report.text("## Stage 0: seed tasks")
    report.table("seeds", _csv(layout.file("00", "summary"), index_col="statistic"), "seed task statistics")

    report.text("## Stage 1: instruction generation")
    counts = _csv(layout.file("01", "filter_counts"))
    report.table("filter_counts", counts, "candidates per filter (Self-Instruct's filters and the novelty rule)",
                 index=False)
    report.figure("01_filter_counts", lambda p: filter_counts_figure(counts, p), "candidates per filter")
    instructions = pd.DataFrame(read_jsonl(_require(layout.instructions_file)))
    config = json.loads(_require(layout.instruction_config).read_text())
    key = "instruction_generation.novelty_threshold"  # config.json keys are dotted (nested in runs before that)
    threshold = config[key] if key in config else config["instruction_generation"]["novelty_threshold"]
    report.figure("01_novelty", lambda p: novelty_figure(instructions["max_rouge_l"], threshold, p),
                  "instruction novelty: highest ROUGE-L against the earlier pool")

    report.text("## Stage 2: automated feedback (reward components)")
    scores = _csv(layout.scores_file)
    correlations = _csv(layout.file("02", "correlations"), index_col=0)
    summary = scores[[*COMPONENTS, "reward"]].describe().loc[["mean", "std", "min", "max"]].T
    report.table("reward_components", summary, f"reward components over {len(scores)} sampled instances")
    report.table("reward_correlations", correlations, "correlation of the reward components")
    report.figure("02_components", lambda p: component_histograms_figure(scores, p), "reward component distributions")
    report.figure("02_correlations", lambda p: correlations_figure(correlations, p, len(scores)),
                  "component correlations")

    report.text("## Stage 3: RL training of the instance generator")
    rl = read_whole_csv(_require(layout.rl_metrics_file))  # a torn last row (a crash mid-append) is left out
    half = max(len(rl) // 2, 1)
    measures = ["reward", "parsed_share", "content_reward", "kl", "kl_penalty"]
    rl_summary = pd.DataFrame({"update 1": rl.iloc[0][measures].astype(float),
                               "first half": rl.iloc[:half][measures].mean(),
                               "second half": rl.iloc[half:][measures].mean()}).T
    algorithm = json.loads(_require(layout.metrics("03")).read_text())["algorithm"]
    report.table("rl_summary", rl_summary,
                 f"training reward, parsed share, content reward of parsed completions, KL to the reference "
                 f"({logged_kl_unit(algorithm)}; 0 at update 1, where policy and reference are still equal) and KL "
                 f"penalty over the {len(rl)} {algorithm.upper()} updates: update 1 and by half (training prompts; no "
                 f"test, see the held-out table)")
    report.figure("03_reward_kl", lambda p: reward_kl_figure(rl, algorithm, p),
                  "RL reward terms, KL penalty and parsed share per update")
    report.figure("03_components", lambda p: components_figure(rl, p),
                  "reward components of the parsed completions per update")
    heldout = _csv(layout.heldout_eval_file)
    heldout_summary = _csv(layout.heldout_summary_file)
    report.table("rl_heldout", heldout_summary.set_index("measure"),
                 f"held-out instructions (n={len(heldout)}, never RL prompts): trained minus base generator, "
                 "paired by instruction, mean over K samples each, 95% bootstrap CI")
    report.figure("03_heldout", lambda p: heldout_figure(
        heldout_summary, p, f"Held-out instructions (n={len(heldout)}): trained minus base generator, 95% CI"),
        "held-out gain of the RL-trained generator with 95% CIs")

    probe_file = layout.file("03", "reward_probe")
    if probe_file.is_file():
        from refine_af_utils.rl_reward import probe_verdict

        probe = pd.read_csv(probe_file)
        reference = float(probe["reference"].iloc[0])
        report.table("reward_probe", probe.drop(columns="reference").set_index("probe"),
                     "can the reward be earned without doing the task? Eq. 1 of degenerate outputs for the held-out "
                     "instructions beside a real base instance, against stage 2's mean content reward "
                     f"({reference:.4g})")
        report.text(probe_verdict(probe))
    else:
        report.text("The reward probe (degenerate outputs scored by the reward) was not run for this run: its "
                    "stage 3 predates it.")

    report.text("## Stage 4: the two instance datasets")
    report.table("dataset_statistics", _csv(layout.file("04", "statistics"), index_col=0),
                 "dataset statistics in the layout of Self-Instruct's Table 1")
    comparison = _csv(layout.file("04", "arm_comparison"))
    report.table("arm_comparison", comparison.set_index("group"),
                 "per instruction, REFINE-AF minus Self-Instruct, split by RL-train (the pool RL drew its prompts "
                 "from: rl.num_prompts instructions, of which at most rl.updates x rl.batch_size were rolled out) and "
                 "held-out instructions, "
                 "95% bootstrap CI (has_instances: share with a kept instance; reward: over all instructions, "
                 "none kept counting with the parse penalty; content: over kept instances)")
    report.figure("04_arm_comparison", lambda p: arm_comparison_figure(comparison, p),
                  "REFINE-AF minus Self-Instruct per instruction group with 95% CIs")
    report.table("reward_by_arm", _csv(layout.file("04", "reward_by_arm"), index_col=0),
                 "mean reward and components of each arm's kept instances")
    arms = {arm: pd.DataFrame(read_jsonl(_require(layout.arm_data(arm))),
                              columns=["instruction_id", "instruction", "input", "output", *COMPONENTS, "reward"])
            for arm in ARMS}
    report.figure("04_arm_rewards", lambda p: arm_rewards_figure({a: t["reward"] for a, t in arms.items()}, p),
                  "reward distributions of both arms")
    counts = yield_counts(arms, len(read_jsonl(_require(layout.instructions_file))))
    report.figure("04_yield", lambda p: yield_funnel_figure(counts, p),
                  "yield: stage 1's instructions, those with a kept instance, and the kept instances, per arm")
    report.figure("04_lengths", lambda p: lengths_figure(word_lengths(arms), p),
                  "words per non-empty input and per output of each arm's kept instances")
    pairs = paired_instances(arms).set_index("instruction_id")
    report.table("paired_instances", pairs,
                 f"the same instruction's first kept instance from each arm, with its Eq. 1 reward: "
                 f"{min(PAIRED_INSTANCES_SHOWN, len(pairs))} of the {len(pairs)} instructions both arms kept one "
                 f"for, by id (the CSV has them all, with every reward component)",
                 shown=pairs.head(PAIRED_INSTANCES_SHOWN).reindex(columns=[
                     "instruction", *[f"{arm}_{c}" for arm in ARMS for c in ("input", "output", "reward")]]))

    report.text("## Stage 5: supervised fine-tuning")
    losses = _csv(layout.file("05", "loss"))
    report.table("sft_summary", _csv(layout.file("05", "summary"), index_col=0), "SFT on each arm (same settings)")
    report.figure("05_sft_loss", lambda p: sft_loss_figure(losses, p), "SFT training loss per arm")

    report.text("## Wall time")
    times = wall_times(run_dir)
    report.table("wall_time", times.set_index("stage"),
                 "wall time per stage on this machine (seconds) and the peak resident memory of the stage's process "
                 "(GB; the total row: the largest)")
    report.figure("wall_time", lambda p: save_figure(bar_chart(times[times["stage"] != "0-6"], "name", "seconds",
                                                                "Wall time per stage (s)"), p),
                  "wall time per stage")
    report.write()
    return report


@stage_entry
def run(params: Any, run_dir: str | Path) -> Report:
    """Stage 7 for the notebook: build the report and record what it contains."""
    from refine_af_utils.run_folder import open_stage

    report = build_report(run_dir, params.run_name, params.random_seed)
    open_stage(__name__, params, run_dir).record_metrics({"tables": sorted(report.tables),
                                                          "figures": sorted(report.figures)})
    return report

