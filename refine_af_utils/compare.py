"""Does a run reproduce another? Every headline of two reports, judged identical, consistent or different.

    python -m refine_af_utils.compare results/default results/my-run [--output check.md]

Reads only what stage 7 writes at the top of a run folder (``table_*.csv``) and the run's resolved
``params.yaml``, so it works on the committed ``results/default`` as on any local run. Bit-identical
results are expected only from the same params on the same CPU kind in the same dtype (the report's
Environment section says which); elsewhere kernels round differently and every sampled token may
change. So each headline quantity gets one of:

- **identical**: equal to the precision the report writes;
- **consistent**: not equal, but within noise by one of three rules, named in the output: each
  estimate lies inside the other's 95% interval (``intervals``); the two estimates do not differ by a
  two-sided z-test at 0.05 whose standard errors come from the intervals (``z-test``); or the
  difference lies within the 95% band of the difference of two runs that differ only by their seed,
  1.96 x sqrt(2) x the quantity's SD over the seeds of the committed seeds study (``seeds``,
  ``results/studies/default_seeds/study_runs.csv``);
- **different**: none of those holds: different beyond noise;
- **not judged**: a quantity without an interval and without a seeds-study SD that differs.

Two tiers. The **headlines** (each model's ROUGE-L and exact match and the paired difference, the win
share and its tests, the task counts, stage 3's held-out gains, stage 4's arm comparison) decide the
verdict: ``identical`` when every quantity is; ``different beyond noise`` when more headlines are
different than chance gives (each judgement is a test at 5%, so among 27 headlines one or two are
expected to differ by chance: the limit is the fewest that a binomial with p = 0.05 reaches with
probability at most 5%); ``consistent`` otherwise. The **details** (each category's difference, the dataset statistics) are judged
and shown but do not decide it: their intervals cover only the evaluation's sampling of instances,
not the generation of the data, so any run whose data differ (another seed, another machine) moves
them beyond those intervals. Two runs made with other params (beyond the run name, dtypes and
devices) are not compared: that is one line naming the keys.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd
import yaml

from refine_af_utils.errors import RefineAFError
from refine_af_utils.layout import STUDY_TABLE, RunLayout
from refine_af_utils.params import Params
from refine_af_utils.run_folder import DEFAULT_RESULTS_ROOT, REPO_ROOT

SEEDS_STUDY_RUNS = DEFAULT_RESULTS_ROOT / "studies" / "default_seeds" / STUDY_TABLE.format(name="runs")
Z_95 = 1.959963984540054
IDENTICAL, CONSISTENT, DIFFERENT, NOT_JUDGED = "identical", "consistent", "different", "not judged"
# Keys that may differ between two runs of the same experiment: the run's name, and where and in what
# precision it computed (a reproduction on another machine or dtype is what this module checks).
MACHINE_KEYS = (re.compile(r"^run_name$"), re.compile(r"(^|\.)dtype$"), re.compile(r"(^|\.)device$"))
# Quantity name -> the seeds study's column whose spread over seeds bounds "consistent".
SEEDS_COLUMNS = {
    "ROUGE-L: base": "base_rougeL",
    "ROUGE-L: self_instruct": "self_instruct_rougeL",
    "ROUGE-L: refine_af": "refine_af_rougeL",
    "ROUGE-L: refine_af - self_instruct": "rougeL_difference",
    "win share (REFINE-AF better)": "win_share",
    "tasks: tie": "ties",
    "tasks: Self-Instruct better": "losses",
    "sign test p": "sign_test_p",
    "Wilcoxon test p": "wilcoxon_p",
    "stage 3 held-out gain: reward": "heldout_reward_gain",
    "stage 3 held-out gain: parsed": "heldout_parsed_gain",
    "stage 3 held-out gain: content": "heldout_content_gain",
}


class CompareError(RefineAFError, ValueError):
    """Two runs that cannot be compared: a missing run or table, or runs of other params."""


@dataclass(frozen=True)
class Quantity:
    """One headline number of a run: its estimate and, where the report gives one, its 95% interval."""

    name: str
    estimate: float
    low: Optional[float] = None
    high: Optional[float] = None
    headline: bool = True  # decides the verdict (details are shown and judged, see the module docstring)
    text: Optional[str] = None  # what the report wrote where it is not a number ("n/a (no non-tied tasks)")

    @property
    def has_interval(self) -> bool:
        """True when the report gives a 95% interval for it."""
        return self.low is not None and self.high is not None


@dataclass
class Comparison:
    """Per-quantity judgements of two runs and the verdict."""

    run_a: Path
    run_b: Path
    environment_a: str
    environment_b: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def table(self) -> pd.DataFrame:
        """One row per quantity: run A, run B, the judgement and the rule that decided it."""
        return pd.DataFrame(self.rows, columns=["quantity", "tier", "run A", "run B", "judgement", "rule"])

    def count(self, judgement: str, tier: str = "headline") -> int:
        """How many quantities of ``tier`` got ``judgement``."""
        return sum(row["judgement"] == judgement and row["tier"] == tier for row in self.rows)

    @property
    def chance_limit(self) -> int:
        """The fewest different headlines that chance alone gives with probability at most 5%, when each
        judged headline is a test at 5% (binomial; the headlines are correlated, so this is approximate)."""
        from scipy.stats import binom

        judged = sum(row["tier"] == "headline" and row["judgement"] != NOT_JUDGED for row in self.rows)
        return next(k for k in range(judged + 2) if binom.sf(k - 1, judged, 0.05) <= 0.05)

    @property
    def verdict(self) -> str:
        """``identical``, ``consistent`` or ``different beyond noise``, from the headlines."""
        if self.count(DIFFERENT) >= self.chance_limit:
            return "different beyond noise"
        if all(row["judgement"] == IDENTICAL for row in self.rows):
            return IDENTICAL
        return CONSISTENT

    def verdict_line(self) -> str:
        """The one-line verdict with its counts."""
        parts = []
        for tier in ("headline", "detail"):
            total = sum(row["tier"] == tier for row in self.rows)
            counts = ", ".join(f"{self.count(j, tier)} {j}" for j in (IDENTICAL, CONSISTENT, DIFFERENT, NOT_JUDGED))
            parts.append(f"{total} {tier}s: {counts}")
        return (f"verdict: {self.verdict} ({'; '.join(parts)}; {self.chance_limit} or more different headlines "
                f"would be beyond chance)")

    def markdown(self) -> str:
        """The comparison as a Markdown page (what ``--output`` writes)."""
        from refine_af_utils.stages.report import markdown_table

        return "\n\n".join([
            f"# Reproduction check: `{self.run_b}` against `{self.run_a}`",
            f"Made by `python -m refine_af_utils.compare {self.run_a} {self.run_b}`. Run A: {self.environment_a}. "
            f"Run B: {self.environment_b}. Rules: see `refine_af_utils/compare.py` (identical to the report's "
            "precision; consistent when each estimate lies inside the other's 95% interval, or a z-test on the "
            "difference with standard errors from the intervals gives p >= 0.05, or the difference lies within "
            "1.96 x sqrt(2) x the quantity's SD over the committed seeds study's seeds; not judged: neither an "
            "interval nor a seeds SD). Headlines decide the verdict; details (per category, dataset statistics) "
            "are judged against intervals that cover the evaluation's sampling only, not the data's generation.",
            f"**{self.verdict_line()}**",
            markdown_table(self.table, index=False),
        ]) + "\n"


def _number(cell: Any) -> tuple[float, Optional[str]]:
    """A report cell as a float, or NaN and the cell's text where the report wrote words."""
    try:
        return float(cell), None
    except (TypeError, ValueError):
        return math.nan, str(cell)


def _format(quantity: Quantity) -> str:
    if quantity.text is not None:
        return quantity.text
    text = f"{quantity.estimate:.4g}"
    return f"{text} [{quantity.low:.4g}, {quantity.high:.4g}]" if quantity.has_interval else text


def _table(run_dir: Path, name: str, **kwargs: Any) -> pd.DataFrame:
    path = RunLayout(run_dir).table(name)
    if not path.is_file():
        raise CompareError(f"{path}: missing; is {run_dir} a run whose report (stage 07) has been made?")
    return pd.read_csv(path, **kwargs)


_BRACKETED = re.compile(r"^\s*(-?[\d.]+)\s*\[\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\]\s*$")
_COUNT = re.compile(r"\((\d+)/(\d+)\)|^(\d+)/(\d+)$")
_SHARE_CI = re.compile(r"(-?[\d.]+)-(-?[\d.]+)%")


def run_quantities(run_dir: str | Path) -> list[Quantity]:
    """Every headline quantity of a run's report, read from its ``table_*.csv`` files."""
    run_dir = Path(run_dir)
    quantities: list[Quantity] = []
    main = _table(run_dir, "main", index_col="model")
    for model, row in main.iterrows():
        for metric in ("ROUGE-L", "exact match"):
            quantities.append(Quantity(f"{metric}: {model}", float(row[metric]), float(row[f"{metric} CI low"]),
                                       float(row[f"{metric} CI high"])))
    improved = _table(run_dir, "tasks_improved", index_col="tasks where")
    for label, row in improved.iterrows():
        cell = str(row["this run"])
        count = _COUNT.search(cell)
        if label == "REFINE-AF better" and count:
            wins, tasks = int(count.group(1)), int(count.group(2))
            interval = _SHARE_CI.search(str(row["95% CI"]))
            low, high = (float(interval.group(1)) / 100, float(interval.group(2)) / 100) if interval else (None, None)
            quantities.append(Quantity("win share (REFINE-AF better)", wins / tasks, low, high))
        elif count and "needed" not in str(label):
            numerator = int(count.group(3) or count.group(1))
            quantities.append(Quantity(f"tasks: {label}", float(numerator)))
        elif str(label).startswith(("sign test", "Wilcoxon")):
            value, text = _number(cell)
            quantities.append(Quantity(f"{str(label).split()[0].rstrip(',')} test p", value, text=text))
    categories = _table(run_dir, "per_category", index_col="category")
    for category, row in categories.iterrows():
        match = _BRACKETED.match(str(row["refine_af - self_instruct"]))
        if match:
            estimate, low, high = (float(g) for g in match.groups())
            quantities.append(Quantity(f"per category, REFINE-AF - Self-Instruct: {category}", estimate, low, high,
                                       headline=False))
    heldout = _table(run_dir, "rl_heldout", index_col="measure")
    for measure, row in heldout.iterrows():
        quantities.append(Quantity(f"stage 3 held-out gain: {measure}", float(row["mean_difference"]),
                                   float(row["ci_low"]), float(row["ci_high"]),
                                   headline=measure in HELDOUT_PRIMARY))  # the components are secondary
    arms = _table(run_dir, "arm_comparison")
    for _, row in arms.iterrows():
        quantities.append(Quantity(f"stage 4 REFINE-AF - Self-Instruct: {row['group']} {row['measure']}",
                                   float(row["mean_difference"]), float(row["ci_low"]), float(row["ci_high"])))
    statistics = _table(run_dir, "dataset_statistics", index_col=0)
    for statistic, row in statistics.iterrows():
        for arm, value in row.items():
            quantities.append(Quantity(f"dataset {arm}: {statistic}", float(value), headline=False))
    return quantities


def _seeds_thresholds(path: Path = SEEDS_STUDY_RUNS) -> dict[str, float]:
    """Per quantity, the 95% band of the difference of two runs that differ by their seed only:
    1.96 x sqrt(2) x the quantity's SD over the seeds of the committed seeds study."""
    if not path.is_file():
        return {}
    runs = pd.read_csv(path)
    return {name: float(Z_95 * math.sqrt(2) * runs[column].std(ddof=1))
            for name, column in SEEDS_COLUMNS.items() if column in runs and runs[column].notna().sum() >= 2}


def _standard_error(quantity: Quantity) -> float:
    return (quantity.high - quantity.low) / (2 * Z_95)


def judge(a: Quantity, b: Quantity, seeds_threshold: Optional[float] = None, decimals: int = 4) -> tuple[str, str]:
    """``(judgement, rule)`` for one quantity of two runs (see the module docstring)."""
    if math.isnan(a.estimate) or math.isnan(b.estimate):  # words ("n/a ...") or an empty cell in a report
        if math.isnan(a.estimate) and math.isnan(b.estimate) and a.text == b.text:
            return IDENTICAL, "equal"
        return NOT_JUDGED, "not a number"
    same_interval = (a.has_interval == b.has_interval and (not a.has_interval or (
        round(a.low, decimals) == round(b.low, decimals) and round(a.high, decimals) == round(b.high, decimals))))
    if round(a.estimate, decimals) == round(b.estimate, decimals) and same_interval:
        return IDENTICAL, "equal"
    if a.has_interval and b.has_interval:
        if a.low <= b.estimate <= a.high and b.low <= a.estimate <= b.high:
            return CONSISTENT, "intervals"
        spread = math.hypot(_standard_error(a), _standard_error(b))
        if spread > 0 and abs(a.estimate - b.estimate) <= Z_95 * spread:
            return CONSISTENT, "z-test"
    if seeds_threshold is not None and abs(a.estimate - b.estimate) <= seeds_threshold:
        return CONSISTENT, "seeds"
    if not (a.has_interval and b.has_interval) and seeds_threshold is None:
        return NOT_JUDGED, "no interval"
    return DIFFERENT, "beyond noise"


HELDOUT_PRIMARY = ("reward", "parsed", "content")  # stage 3's held-out endpoints that decide the verdict


def _run_params(run_dir: Path) -> dict[str, Any]:
    from refine_af_utils.layout import flatten

    path = run_dir / "params.yaml"
    if not path.is_file():
        raise CompareError(f"{path}: missing; not a run folder made by the runner")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise CompareError(f"{path}: not a params mapping")
    # a key the run's package version did not have yet counts with the schema's default (a run made before
    # rl.placebo existed was made without a placebo)
    defaults = flatten(Params(run_name=str(data.get("run_name", ""))).to_dict())
    return {key: value for key, value in {**defaults, **flatten(data)}.items()
            if not any(pattern.search(key) for pattern in MACHINE_KEYS)}


def _environment(run_dir: Path) -> str:
    path = RunLayout(run_dir).table("environment")
    if not path.is_file():
        return "environment not recorded"
    values = dict(pd.read_csv(path).itertuples(index=False, name=None))
    dtype = values.get("dtype: backbone (generation, RL, SFT, evaluation)", "unknown dtype")
    return (f"{values.get('CPU kind', 'unknown CPU kind')} CPU ({values.get('CPU', 'unknown')}, "
            f"{values.get('CPU identity', 'identity not recorded')}), {dtype}")


def compare_runs(run_a: str | Path, run_b: str | Path, seeds_study: Path = SEEDS_STUDY_RUNS) -> Comparison:
    """Judge every headline quantity of ``run_b`` against ``run_a``; :class:`CompareError` when they
    cannot be compared (missing folder or table, other params)."""
    run_a, run_b = Path(run_a), Path(run_b)
    for run in (run_a, run_b):
        if not run.is_dir():
            raise CompareError(f"{run}: no such run folder")
    params_a, params_b = _run_params(run_a), _run_params(run_b)
    differing = sorted(k for k in set(params_a) | set(params_b) if params_a.get(k) != params_b.get(k))
    if differing:
        shown = ", ".join(differing[:5]) + (f" and {len(differing) - 5} more" if len(differing) > 5 else "")
        raise CompareError(f"{run_b} was made with other params than {run_a} ({shown} differ): a reproduction "
                           "check compares runs of the same params")
    comparison = Comparison(run_a, run_b, _environment(run_a), _environment(run_b))
    thresholds = _seeds_thresholds(seeds_study)
    quantities_b = {q.name: q for q in run_quantities(run_b)}
    for a in run_quantities(run_a):
        b = quantities_b.pop(a.name, None)
        tier = "headline" if a.headline else "detail"
        if b is None:
            comparison.rows.append({"quantity": a.name, "tier": tier, "run A": _format(a), "run B": "missing",
                                    "judgement": DIFFERENT, "rule": "missing in run B"})
            continue
        judgement, rule = judge(a, b, thresholds.get(a.name))
        comparison.rows.append({"quantity": a.name, "tier": tier, "run A": _format(a), "run B": _format(b),
                                "judgement": judgement, "rule": rule})
    for name, b in quantities_b.items():
        comparison.rows.append({"quantity": name, "tier": "headline" if b.headline else "detail", "run A": "missing",
                                "run B": _format(b), "judgement": DIFFERENT, "rule": "missing in run A"})
    return comparison


def reference_check(reference_run: Optional[str | Path], run_dir: str | Path) -> str:
    """Notebook 07's reproduction check as Markdown: the comparison of ``run_dir`` against ``reference_run``
    (relative paths from the repository), or a line saying how to ask for one."""
    if not reference_run:
        return ("No reference run set: set `reference_run` in the parameters cell (e.g. `\"results/default\"`) "
                "to check this run against it.")
    reference = Path(reference_run).expanduser()
    reference = reference if reference.is_absolute() else REPO_ROOT / reference
    try:
        return compare_runs(reference, run_dir).markdown()
    except CompareError as error:
        return f"**Not compared:** {error}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point: print every quantity's judgement and the verdict; exit 0 unless an error."""
    parser = argparse.ArgumentParser(prog="python -m refine_af_utils.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", help="the reference run folder, e.g. results/default")
    parser.add_argument("run_b", help="the run to check against it")
    parser.add_argument("--output", help="also write the comparison as Markdown to this file")
    args = parser.parse_args(argv)
    try:
        comparison = compare_runs(args.run_a, args.run_b)
    except (CompareError, ValueError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"run A: {comparison.run_a} ({comparison.environment_a})")
    print(f"run B: {comparison.run_b} ({comparison.environment_b})")
    print(comparison.table.to_string(index=False))
    print(comparison.verdict_line())
    if args.output:
        Path(args.output).write_text(comparison.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
