"""The study report: ``study.md`` with CSV tables and PNG figures, from the run folders that exist.

Numbers are read from each run's files (stages 3, 4 and 6); a run that stopped early shows ``-``
and names what is missing. The A/A control compares the Self-Instruct arms of two seeds of one
setting task by task: the same recipe on both sides, so any win is chance.
"""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    import pandas as pd

from refine_af_utils.files import atomic_write_text
from refine_af_utils.layout import STAGES, STUDY_FIGURE, STUDY_REPORT, STUDY_TABLE, RunLayout
from refine_af_utils.run_folder import REPO_ROOT, read_marker
from refine_af_utils.study.reuse import reused_stages
from refine_af_utils.study.spec import Setting, StudySpec

COMPONENTS = ("reward_model", "understandability", "naturalness", "coherence", "reward")


def run_files(run_dir: Path) -> dict[str, Path]:
    """What the report reads from each run (stage 6's metrics and statistics, 3's held-out gains, 4's rewards)."""
    layout = RunLayout(run_dir)
    return {"metrics": layout.metrics("06"), "rl_metrics": layout.metrics("03"), "overall_ci": layout.file("06", "overall_ci"),
            "tasks_improved": layout.file("06", "tasks_improved"), "heldout_summary": layout.heldout_summary_file,
            "reward_by_arm": layout.file("04", "reward_by_arm")}


HEADLINES = {  # per-setting summary columns and their labels
    "heldout_reward_gain": "held-out RL reward gain (trained - base)",
    "self_instruct_rougeL": "Self-Instruct ROUGE-L",
    "refine_af_rougeL": "REFINE-AF ROUGE-L",
    "rougeL_difference": "ROUGE-L, REFINE-AF - Self-Instruct",
    "win_share": "tasks improved (share)",
    **{f"{c}_change": f"{c}, REFINE-AF - Self-Instruct arm data" for c in COMPONENTS},
}


def _float(value: Any) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return result


# paired_summary's columns (stats.py) and the suffixes they take in a run's row, as heldout_<measure>_gain<suffix>
SUMMARY_SUFFIXES = (("mean_difference", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high"), ("t_ci_low", "_t_low"),
                    ("t_ci_high", "_t_high"), ("sign_flip_p", "_p"), ("pairs", "_pairs"), ("mean_before", "_base"),
                    ("mean_after", "_trained"))


def run_headlines(run_dir: Path) -> dict[str, Any]:
    """One run's headline numbers with their CIs, from the files that exist; ``missing`` names the others."""
    import pandas as pd

    row: dict[str, Any] = {}
    files = run_files(run_dir)
    missing = [str(path.relative_to(run_dir)) for path in files.values() if not path.is_file()]
    done = [s.id for s in STAGES if RunLayout(run_dir).marker(s.id).is_file()]
    row["stages_done"] = f"{done[0]}-{done[-1]}" if done else "none"
    revisions = {str((read_marker(run_dir, s) or {}).get("code", "not recorded")) for s in STAGES if s.id in done}
    row["code"] = ", ".join(sorted(revisions))  # the package revision(s) its stages were made by
    if files["metrics"].is_file():
        metrics = json.loads(files["metrics"].read_text())
        row["base_rougeL"] = _float(metrics.get("base_rougeL"))
    if files["overall_ci"].is_file():
        overall = pd.read_csv(files["overall_ci"])
        for model, key in (("self_instruct", "self_instruct"), ("refine_af", "refine_af"),
                           ("refine_af - self_instruct", "rougeL_difference")):
            hit = overall[(overall["model"] == model) & (overall["metric"] == "rougeL")]
            if len(hit):
                name = key if key == "rougeL_difference" else f"{key}_rougeL"
                row[name] = float(hit["mean"].iloc[0])
                row[f"{name}_ci_low"], row[f"{name}_ci_high"] = float(hit["ci_low"].iloc[0]), float(hit["ci_high"].iloc[0])
    if files["tasks_improved"].is_file():
        improved = pd.read_csv(files["tasks_improved"]).set_index("measure")["value"]
        for key in ("tasks", "wins", "ties", "losses", "win_share", "win_share_ci_low", "win_share_ci_high",
                    "sign_test_p", "wilcoxon_p"):
            if key in improved.index:
                row[key] = _float(improved[key])
    if files["heldout_summary"].is_file():
        summary = pd.read_csv(files["heldout_summary"]).set_index("measure")
        for measure in summary.index:
            for column, suffix in SUMMARY_SUFFIXES:
                if column in summary.columns:  # t intervals: runs made before they were added have none
                    row[f"heldout_{measure}_gain{suffix}"] = float(summary.loc[measure, column])
    if files["rl_metrics"].is_file():
        rl = json.loads(files["rl_metrics"].read_text())
        for key in ("algorithm", "updates", "first_kl", "last_kl", "probe_exploitable", "peak_rss_gb"):
            row[f"rl_{key}"] = rl.get(key)
    if files["reward_by_arm"].is_file():
        by_arm = pd.read_csv(files["reward_by_arm"], index_col=0)
        if {"self_instruct", "refine_af"} <= set(by_arm.columns):
            for component in COMPONENTS:
                if component in by_arm.index:
                    row[f"{component}_change"] = float(by_arm.loc[component, "refine_af"]
                                                       - by_arm.loc[component, "self_instruct"])
    row["missing"] = ", ".join(missing)
    return row


def self_instruct_per_task(run_dir: Path) -> Optional["pd.Series"]:
    """The Self-Instruct arm's mean ROUGE-L per task (``superni_evaluation/per_task.csv``, else its predictions); None if neither."""
    import pandas as pd

    per_task = RunLayout(run_dir).file("06", "per_task")
    if per_task.is_file():
        table = pd.read_csv(per_task)
        if {"task", "rougeL_self_instruct"} <= set(table.columns):
            return table.set_index("task")["rougeL_self_instruct"].astype(float)
    predictions = RunLayout(run_dir).predictions("self_instruct")
    if predictions.is_file():
        from refine_af_utils.files import read_jsonl

        table = pd.DataFrame(read_jsonl(predictions))
        if len(table):
            return table.groupby("task")["rougeL"].mean().astype(float)
    return None


def aa_control(runs: pd.DataFrame, study_dir: Path) -> tuple["pd.DataFrame", list[float]]:
    """The A/A control: per setting, the Self-Instruct arm of seed i against that of seed j, task by task.

    Both arms come from the same recipe, so every task one of them "wins" is won by chance. Returns
    one row per pair (wins of each, ties, shares, sign test) and every per-task difference (j - i).
    """
    import pandas as pd

    from refine_af_utils.comparison import task_outcomes
    from refine_af_utils.stats import sign_test

    rows, differences = [], []
    for setting, group in runs.groupby("setting", sort=False):
        scores = {int(r.seed): self_instruct_per_task(study_dir / r.run) for r in group.itertuples()}
        scores = {seed: s for seed, s in scores.items() if s is not None}
        for a, b in combinations(sorted(scores), 2):
            joined = pd.concat([scores[a].rename("a"), scores[b].rename("b")], axis=1, join="inner")
            if joined.empty:
                continue
            delta = joined["b"] - joined["a"]
            outcome = task_outcomes(delta)
            b_wins, a_wins, ties = int((outcome == "win").sum()), int((outcome == "loss").sum()), int((outcome == "tie").sum())
            tasks = len(joined)
            differences.extend(delta.tolist())
            rows.append({"setting": setting, "seed_a": a, "seed_b": b, "tasks": tasks, "a_better": a_wins,
                         "ties": ties, "b_better": b_wins, "a_better_share": a_wins / tasks,
                         "b_better_share": b_wins / tasks, "decided_share": (a_wins + b_wins) / tasks,
                         "mean_abs_difference": float(delta.abs().mean()), "sign_test_p": sign_test(b_wins, a_wins)})
    columns = ["setting", "seed_a", "seed_b", "tasks", "a_better", "ties", "b_better", "a_better_share",
               "b_better_share", "decided_share", "mean_abs_difference", "sign_test_p"]
    return pd.DataFrame(rows, columns=columns), differences


def _fmt(value: Any, digits: int = 3) -> str:
    """A number for the report: ``-`` when missing, fixed decimals (tiny values in scientific notation)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if 0 < abs(value) < 10 ** -digits else f"{value:.{digits}f}"
    return str(value)


def _with_ci(row: dict[str, Any], key: str, digits: int = 3) -> str:
    """``value [low, high]`` from a row's ``key``, ``key_ci_low`` and ``key_ci_high`` (the value alone without them)."""
    value, low, high = row.get(key), row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    if not _is_number(value):
        return "-"
    if not (_is_number(low) and _is_number(high)):
        return _fmt(value, digits)
    return f"{_fmt(value, digits)} [{_fmt(low, digits)}, {_fmt(high, digits)}]"


def _paired_cell(summary: dict[str, Any], digits: int) -> str:
    """``before -> after: difference [bootstrap CI]; t [low, high]; p`` from one row of ``paired_summary`` (``-``
    without a difference; no t part for a row made before the t interval existed)."""
    if not _is_number(summary.get("mean_difference")):
        return "-"
    t = (f"; t [{_fmt(summary['t_ci_low'], digits)}, {_fmt(summary['t_ci_high'], digits)}]"
         if _is_number(summary.get("t_ci_low")) else "")
    difference = {"d": summary["mean_difference"], "d_ci_low": summary.get("ci_low"), "d_ci_high": summary.get("ci_high")}
    return (f"{_fmt(summary.get('mean_before'), digits)} -> {_fmt(summary.get('mean_after'), digits)}: "
            f"{_with_ci(difference, 'd', digits)}{t}; p {_fmt(summary.get('sign_flip_p'))}")


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of cells formatted already, drawn by the stage 7 report's table writer."""
    import pandas as pd

    from refine_af_utils.stages.report import markdown_table

    return markdown_table(pd.DataFrame([[str(c) for c in row] for row in rows], columns=list(header)), index=False)


def study_tables(spec: StudySpec, study_dir: Path) -> dict[str, "pd.DataFrame"]:
    """The study's tables: ``runs`` (per run), ``settings`` (mean and spread over seeds),
    ``win_share_by_seed`` (setting x seed) and ``aa_control`` (Self-Instruct arm, seed against seed)."""
    import pandas as pd

    rows = []
    for run in spec.runs:
        run_dir = study_dir / run.name
        row = {"run": run.name, "setting": run.setting.name, "seed": run.seed}
        if run_dir.is_dir():
            row.update(run_headlines(run_dir))
            row["reused_stages"] = " ".join(f"{k}<-{v}" for k, v in sorted(reused_stages(run_dir).items()))
        else:
            row.update({"stages_done": "none", "missing": "the whole run (not started)", "reused_stages": ""})
        rows.append(row)
    runs = pd.DataFrame(rows)
    summary_rows = []
    for setting, group in runs.groupby("setting", sort=False):
        entry: dict[str, Any] = {"setting": setting, "seeds": len(group)}
        for key in HEADLINES:
            values = pd.to_numeric(group[key], errors="coerce").dropna() if key in group else pd.Series(dtype=float)
            entry[f"{key}_n"] = int(len(values))
            entry[f"{key}_mean"] = float(values.mean()) if len(values) else float("nan")
            entry[f"{key}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            entry[f"{key}_min"] = float(values.min()) if len(values) else float("nan")
            entry[f"{key}_max"] = float(values.max()) if len(values) else float("nan")
        summary_rows.append(entry)
    settings = pd.DataFrame(summary_rows)
    win_share = pd.DataFrame(
        {f"seed{seed}": [_lookup(runs, setting.name, seed, "win_share") for setting in spec.grid] for seed in spec.seeds},
        index=pd.Index([setting.name for setting in spec.grid], name="setting"))
    aa, _ = aa_control(runs, study_dir)
    return {"runs": runs, "settings": settings, "win_share_by_seed": win_share, "aa_control": aa,
            "placebo_contrast": placebo_contrast(spec, study_dir)}


# The held-out endpoints compared between a setting's trained generator and its placebo's.
PLACEBO_MEASURES = ("reward", "parsed", "content")


def placebo_pairs(spec: StudySpec) -> list[tuple[Setting, Setting]]:
    """``(setting, its placebo)``: a placebo setting (``rl.placebo`` true) and each setting whose resolved params
    equal the placebo's but for ``rl.placebo`` (so the two runs of a seed differ in the reward's order only)."""
    def resolved(setting: Setting) -> tuple[bool, dict[str, Any]]:
        params = next(r for r in spec.runs if r.setting is setting).load().to_dict()
        params.pop("run_name", None)
        return bool(params["rl"].pop("placebo")), params

    views = {s.name: resolved(s) for s in spec.grid}
    return [(s, p) for p in spec.grid if views[p.name][0]
            for s in spec.grid if not views[s.name][0] and views[s.name][1] == views[p.name][1]]


def heldout_contrast(run_dir: Path, control_dir: Path, seed: int) -> tuple["pd.DataFrame", bool]:
    """Two runs' trained generators on the same held-out instructions, from their ``heldout_eval.csv``: per measure of
    ``PLACEBO_MEASURES``, the paired difference (run - control) with its bootstrap and t intervals and sign-flip p
    (:func:`refine_af_utils.stats.paired_summary`, ``mean_before`` the control's); and whether both runs' base samples
    scored the same (the common seeds then pair the two runs sample for sample)."""
    import numpy as np
    import pandas as pd

    from refine_af_utils.seeding import derive_seed
    from refine_af_utils.stats import paired_summary

    mine, control = (pd.read_csv(RunLayout(d).heldout_eval_file) for d in (run_dir, control_dir))
    both = mine.merge(control, on="instruction", how="inner", suffixes=("_run", "_control"))
    same_base = bool(np.allclose(both["base_reward_run"], both["base_reward_control"], equal_nan=True))
    return paired_summary(both, {m: (f"trained_{m}_control", f"trained_{m}_run") for m in PLACEBO_MEASURES},
                          derive_seed(seed, "study", "placebo")), same_base


def placebo_contrast(spec: StudySpec, study_dir: Path) -> "pd.DataFrame":
    """Per seed, each setting's trained generator against its placebo's on the same held-out instructions
    (:func:`heldout_contrast`, setting - placebo): what training gains from the reward's order beyond what updates on
    shuffled rewards do. Seeds where either run lacks its held-out evaluation are left out."""
    import pandas as pd

    rows = []
    for setting, placebo in placebo_pairs(spec):
        for seed in spec.seeds:
            dirs = [study_dir / f"{s.name}-seed{seed}" for s in (setting, placebo)]
            if not all(RunLayout(d).heldout_eval_file.is_file() for d in dirs):
                continue
            summary, same_base = heldout_contrast(*dirs, seed)
            rows += [{"setting": setting.name, "placebo": placebo.name, "seed": seed, "same_base": same_base, **r}
                     for r in summary.to_dict("records")]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["setting", "placebo", "seed", "same_base", "measure"])


def placebo_section(contrast: "pd.DataFrame") -> list[str]:
    """The report's section on ``placebo_contrast``; empty when no setting and its placebo share a seed."""
    if contrast.empty:
        return []
    out = ["", "## Against the placebo", "",
           "Each setting's trained generator minus its placebo's (the same params, each batch's rewards shuffled), "
           "paired over the held-out instructions of one seed: placebo -> setting (means over the pairs the "
           "difference uses), the difference with its 95% bootstrap CI, Student's t interval and the sign-flip "
           "permutation p. What training gains from the reward's order beyond what updates alone do. Content is "
           "over the instructions where both kept an instance. Table: `study_placebo_contrast.csv`.", ""]
    rows = []
    for (setting, placebo, seed), group in contrast.groupby(["setting", "placebo", "seed"], sort=False):
        by_measure = {r["measure"]: r for r in group.to_dict("records")}
        cells = [_paired_cell(by_measure.get(m, {}), 3 if m == "parsed" else 4) for m in PLACEBO_MEASURES]
        pairs = group[group["measure"] == "reward"]["pairs"]
        rows.append([setting, placebo, str(seed), _fmt(pairs.iloc[0] if len(pairs) else None, 0),
                     "yes" if bool(group["same_base"].iloc[0]) else "no", *cells])
    out.append(_markdown(["setting", "placebo", "seed", "pairs", "same base samples", "full reward", "parsed share",
                          "content reward"], rows))
    return out


def _lookup(runs: "pd.DataFrame", setting: str, seed: int, key: str) -> float:
    """``runs``' ``key`` for one setting and seed (NaN when the column or the run lacks it)."""
    if key not in runs:
        return float("nan")
    hit = runs[(runs["setting"] == setting) & (runs["seed"] == seed)][key]
    return _float(hit.iloc[0]) if len(hit) else float("nan")


def _figures(tables: dict[str, "pd.DataFrame"], differences: list[float], refine_differences: list[float],
             study_dir: Path) -> list[str]:
    """PNG figures beside the tables; returns their file names."""
    from refine_af_utils.plots import density_histograms, save_figure, spread_by_group

    names = []
    runs = tables["runs"]
    panels = [k for k in ("heldout_reward_gain", "rougeL_difference", "win_share") if k in runs and
              pd_notna_any(runs[k])]
    if panels:
        fig = spread_by_group(runs, "setting", panels, HEADLINES, {"win_share": 0.5},
                              "Per setting: each seed (dot, labelled, 95% CI bar) and the mean over seeds (line)",
                              within="seed" if "seed" in runs else None)
        names.append(save_figure(fig, study_dir / STUDY_FIGURE.format(name="settings")).name)
    if differences:
        samples = [("A/A: Self-Instruct arm, seed j - seed i", differences, 0.6)]
        if refine_differences:
            samples.append(("REFINE-AF - Self-Instruct (same run)", refine_differences, 0.5))
        fig = density_histograms(samples, "Per-task differences: chance (A/A) against the REFINE-AF effect",
                                 "per-task ROUGE-L difference")
        names.append(save_figure(fig, study_dir / STUDY_FIGURE.format(name="aa_control")).name)
    return names


def pd_notna_any(series: Any) -> bool:
    """True when a column holds at least one number."""
    import pandas as pd

    return bool(pd.to_numeric(series, errors="coerce").notna().any())


def _refine_differences(spec: StudySpec, study_dir: Path) -> list[float]:
    import pandas as pd

    result: list[float] = []
    for run in spec.runs:
        path = RunLayout(study_dir / run.name).file("06", "per_task")
        if path.is_file():
            table = pd.read_csv(path)
            if {"rougeL_refine_af", "rougeL_self_instruct"} <= set(table.columns):
                result.extend((table["rougeL_refine_af"] - table["rougeL_self_instruct"]).tolist())
    return result


def write_study_report(spec: StudySpec, study_dir: Path) -> Path:
    """Write ``study.md``, ``study_runs.csv``, ``study_settings.csv``, ``study_win_share_by_seed.csv``,
    ``study_aa_control.csv`` and the figures into ``study_dir``; return the report's path."""
    tables = study_tables(spec, study_dir)
    for name, table in tables.items():
        table.to_csv(study_dir / STUDY_TABLE.format(name=name), index=name == "win_share_by_seed")
    runs, settings, aa = tables["runs"], tables["settings"], tables["aa_control"]
    _, differences = aa_control(runs, study_dir)
    figures = _figures(tables, differences, _refine_differences(spec, study_dir), study_dir)

    out = [f"# Study `{spec.name}`", ""]
    if spec.description:
        out += [spec.description.strip(), ""]
    out += [f"Spec: `{_relative(spec.path)}`; base params `{_relative(spec.params)}`; seeds "
            f"{', '.join(map(str, spec.seeds))}; stages 00-{spec.until} per run. Each run is "
            "`<setting>-seed<N>` beside this file, made by the same runner; stages shared with another run (same "
            "params fingerprint) were copied from it, not rerun (`reused` below). Numbers are read from each "
            "run's files; a run that stopped early (or `until`) shows `-` and names what is missing.", ""]
    codes = runs["code"].dropna() if "code" in runs else []
    revisions = sorted({c for value in codes for c in str(value).split(", ") if c})
    out += [f"Code: the runs' stages were made by package revision(s) {', '.join(f'`{c}`' for c in revisions) or '-'} "
            "(from their stage markers; `study_runs.csv` has each run's).", ""]
    out += ["## Settings", "", _markdown(["setting", "params", "overrides"], [
        [s.name, f"`{_relative(s.params)}`", ", ".join(f"`{k}={json.dumps(v)}`" for k, v in s.overrides.items()) or
         "(none)"] for s in spec.grid]), ""]
    out += ["## Per run", "", "Means with 95% bootstrap CIs (stage 3: paired over held-out instructions; stage 6: "
            "tasks, then instances); the win share with its exact interval. Table: `study_runs.csv`.", ""]
    out.append(_markdown(
        ["run", "stages", "held-out reward gain", "Self-Instruct ROUGE-L", "REFINE-AF ROUGE-L",
         "difference", "wins/ties/losses", "win share", "sign p", "reused", "missing"],
        [[r["run"], r.get("stages_done", "none"), _with_ci(r, "heldout_reward_gain"),
          _with_ci(r, "self_instruct_rougeL", 2), _with_ci(r, "refine_af_rougeL", 2), _with_ci(r, "rougeL_difference", 2),
          "/".join(_fmt(r.get(k), 0) for k in ("wins", "ties", "losses")) if _is_number(r.get("wins")) else "-",
          _with_ci(r, "win_share", 2), _fmt(r.get("sign_test_p")), r.get("reused_stages") or "-",
          r.get("missing") or "-"] for r in runs.to_dict("records")]))
    out += ["", "Change in each reward component, REFINE-AF arm minus Self-Instruct arm (stage 4's instances, "
            "`instance_generation/reward_by_arm.csv`):", ""]
    out.append(_markdown(["run", *COMPONENTS], [[r["run"], *(_fmt(r.get(f"{c}_change"), 4) for c in COMPONENTS)]
                                                 for r in runs.to_dict("records")]))
    out += ["", "## Per setting: mean and spread over seeds", "",
            "Mean, standard deviation (n-1) and range over the seeds that reached the number. Table: "
            "`study_settings.csv`.", ""]
    header = ["setting", "seeds"] + [HEADLINES[k] for k in ("heldout_reward_gain", "rougeL_difference", "win_share",
                                                            "self_instruct_rougeL", "refine_af_rougeL")]
    out.append(_markdown(header, [[s["setting"], str(s["seeds"])] + [
        _spread(s, k) for k in ("heldout_reward_gain", "rougeL_difference", "win_share", "self_instruct_rougeL",
                                "refine_af_rougeL")] for s in settings.to_dict("records")]))
    out += heldout_section(runs)
    out += placebo_section(tables["placebo_contrast"])
    win_share = tables["win_share_by_seed"]
    out += ["", "Tasks improved (win share) per seed. Table: `study_win_share_by_seed.csv`.", ""]
    out.append(_markdown(["setting", *win_share.columns], [[idx, *(_fmt(v, 2) for v in row)]
                                                            for idx, row in win_share.iterrows()]))
    out += ["", "## A/A control: how often an arm wins a task by chance", ""]
    if aa.empty:
        out.append("No pair of runs of one setting has stage 6's per-task scores yet (it needs two seeds of a "
                   "setting through stage 06), so there is no A/A control.")
    else:
        decided = float(aa["decided_share"].mean())
        better = float(pd_mean(aa[["a_better_share", "b_better_share"]].to_numpy().ravel()))
        out += [f"The Self-Instruct arm of seed i against the Self-Instruct arm of seed j of the same setting, "
                f"task by task (`superni_evaluation/per_task.csv`): the same recipe on both sides, so any win is chance. Over "
                f"{len(aa)} pair(s), a given seed's arm 'won' {better:.0%} of tasks on average and "
                f"{decided:.0%} of tasks had a winner. Compare with the REFINE-AF win shares above. Table: "
                "`study_aa_control.csv`.", ""]
        out.append(_markdown(["setting", "seed i", "seed j", "tasks", "i better", "ties", "j better",
                              "share decided", "mean abs difference", "sign p"],
                             [[r["setting"], str(r["seed_a"]), str(r["seed_b"]), str(r["tasks"]), str(r["a_better"]),
                               str(r["ties"]), str(r["b_better"]), _fmt(r["decided_share"], 2),
                               _fmt(r["mean_abs_difference"], 3), _fmt(r["sign_test_p"])]
                              for r in aa.to_dict("records")]))
    if figures:
        out += ["", "## Figures", ""] + [f"![{name}]({name})" for name in figures]
    return atomic_write_text(study_dir / STUDY_REPORT, "\n".join(out) + "\n")


# Stage 3's held-out endpoints shown per run: the primary (full reward), then the secondary ones.
HELDOUT_SHOWN = (("reward", "full reward (primary)", 4), ("parsed", "parsed share", 3), ("content", "content reward", 4),
                 ("output_words", "output words", 1), ("copy_rouge_l", "copy rate (ROUGE-L)", 3),
                 ("kl_to_base", "KL to the base (nats per completion)", 3))


def heldout_section(runs: "pd.DataFrame") -> list[str]:
    """Stage 3 on its held-out instructions, run by run: each endpoint's paired gain (trained - base) with its
    bootstrap and t intervals and sign-flip p, the KL at the first and last update and the probe's verdict;
    then, per setting, whether the primary gain's intervals lie above 0 in every seed. Empty without stage 3."""
    if "heldout_reward_gain" not in runs or not pd_notna_any(runs["heldout_reward_gain"]):
        return []
    records = [r for r in runs.to_dict("records") if _is_number(r.get("heldout_reward_gain"))]

    def cell(r: dict[str, Any], measure: str, digits: int) -> str:
        return _paired_cell({column: r.get(f"heldout_{measure}_gain{suffix}") for column, suffix in SUMMARY_SUFFIXES},
                            digits)

    out = ["", "## Stage 3 on held-out instructions", "",
           "Per run: base -> trained generator (means over the pairs the difference uses), the paired gain with its "
           "95% bootstrap CI, Student's t interval and the sign-flip permutation p, over held-out instructions "
           "(each the mean of its samples); the KL to the base at the first and last update; whether a degenerate "
           "output reaches stage 2's mean reward (the probe). Secondary endpoints are over the instructions where "
           "both generators kept an instance.", ""]
    out.append(_markdown(["run", "pairs", *(label for _, label, _ in HELDOUT_SHOWN), "KL update 1", "KL last",
                          "probe exploitable", "stage 3 peak RSS (GB)"],
                         [[r["run"], _fmt(r.get("heldout_reward_gain_pairs"), 0),
                           *(cell(r, m, d) for m, _, d in HELDOUT_SHOWN), _fmt(r.get("rl_first_kl"), 4),
                           _fmt(r.get("rl_last_kl"), 4), str(r.get("rl_probe_exploitable", "-")),
                           _fmt(r.get("rl_peak_rss_gb"), 2)] for r in records]))
    verdicts = []
    for setting in dict.fromkeys(r["setting"] for r in records):
        mine = [r for r in records if r["setting"] == setting]
        bootstrap_above = [r for r in mine if _is_number(r.get("heldout_reward_gain_ci_low"))
                           and r["heldout_reward_gain_ci_low"] > 0]
        above = [r["run"] for r in bootstrap_above if _is_number(r.get("heldout_reward_gain_t_low"))
                 and r["heldout_reward_gain_t_low"] > 0]
        # runs made before the t interval existed: said apart, not counted under "both intervals"
        bootstrap_only = [r["run"] for r in bootstrap_above if not _is_number(r.get("heldout_reward_gain_t_low"))]
        includes = [r["run"] for r in mine if r.get("heldout_reward_gain_ci_low", 1) <= 0 <= r.get("heldout_reward_gain_ci_high", -1)]
        older = (f"; above 0 by the bootstrap CI alone (no t interval recorded) in {len(bootstrap_only)} "
                 f"({', '.join(bootstrap_only)})" if bootstrap_only else "")
        verdicts.append(f"- `{setting}`: full-reward gain above 0 (both intervals) in {len(above)} of {len(mine)} "
                        f"run(s){' (' + ', '.join(above) + ')' if above else ''}{older}; interval includes 0 in "
                        f"{len(includes)}.")
    return out + ["", *verdicts]


def pd_mean(values: Any) -> float:
    """The mean of the finite values (NaN when none)."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))


def _spread(entry: dict[str, Any], key: str) -> str:
    n = entry.get(f"{key}_n", 0)
    if not n:
        return "-"
    mean = _fmt(entry[f"{key}_mean"], 3)
    if n == 1:
        return f"{mean} (1 seed)"
    return (f"{mean} ± {_fmt(entry[f'{key}_sd'], 3)} (range {_fmt(entry[f'{key}_min'], 3)} to "
            f"{_fmt(entry[f'{key}_max'], 3)}, {n} seeds)")


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)

