"""Running a study: each run through the runner (in this process, or one submitit job per run), then the report."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from refine_af_utils.errors import RefineAFError
from refine_af_utils.layout import STUDY_FILE, STUDY_JOBS_DIR, STUDY_REPORT, stage_fingerprint
from refine_af_utils.run import run_pipeline
from refine_af_utils.locking import is_locked, run_lock
from refine_af_utils.run_folder import DEFAULT_RESULTS_ROOT
from refine_af_utils.study.report import write_study_report
from refine_af_utils.study.reuse import (
    complete_prefix,
    donor_label,
    donor_runs,
    reuse_stages,
    run_is_complete,
    write_study_record,
)
from refine_af_utils.study.spec import StudySpec, StudySpecError, load_spec, study_dir_of

LAUNCHERS = ("local", "slurm", "submitit-local")
DEFAULT_TIMEOUT_MIN = 3 * 24 * 60  # submitit's local executor would stop a job after 2 minutes otherwise
# Stages not worth waiting for under --launcher slurm: stage 00 runs no model and takes seconds.
CHEAP_STAGES = {"00"}


def run_one(spec_path: str, run_name: str, results_root: str) -> str:
    """Run one run of a study: reuse shared stages, then the runner stage by stage up to ``until``.

    The same function runs in-process (``--launcher local``) and inside a submitit job (``slurm``).
    Returns ``skipped`` (complete already) or ``ran``.
    """
    spec = load_spec(spec_path)
    run = next((r for r in spec.runs if r.name == run_name), None)
    if run is None:
        raise StudySpecError(f"{spec_path}: no run named {run_name!r} in this spec")
    study_dir = study_dir_of(spec, results_root)
    study_dir.mkdir(parents=True, exist_ok=True)
    params = run.load()
    run_dir = study_dir / run.name
    if run_is_complete(run_dir, params, spec.stages):
        print(f"{run.name}: complete, skipped", flush=True)
        return "skipped"
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / STUDY_FILE).is_file():
        write_study_record(run_dir, {"run": run.name, "setting": run.setting.name, "seed": run.seed, "reused": {}})
    reuse_stages(study_dir, run, params, spec.stages, [study_dir.parent / name for name in spec.reuse_from])
    for stage in spec.stages:  # the runner, one stage at a time, up to `until`
        run_pipeline(run.setting.params, only=stage.id, results_root=study_dir, overrides=run.overrides)
    return "ran"


def donor_plan(spec: StudySpec) -> dict[str, Optional[str]]:
    """Per run, the earlier run (spec order) it should wait for under ``--launcher slurm``: the one sharing
    the most stage fingerprints, when they share a stage beyond :data:`CHEAP_STAGES`; else None."""
    stages = [s for s in spec.stages if s.output_dir is not None]
    fingerprints: dict[str, list[str]] = {}
    plan: dict[str, Optional[str]] = {}
    for run in spec.runs:
        params = run.load()
        mine = [stage_fingerprint(s, params) for s in stages]
        best, best_count = None, 0
        for other, theirs in fingerprints.items():
            count = 0
            while count < len(stages) and mine[count] == theirs[count]:
                count += 1
            if count > best_count:
                best, best_count = other, count
        shared = {s.id for s in stages[:best_count]}
        plan[run.name] = best if shared - CHEAP_STAGES else None
        fingerprints[run.name] = mine
    return plan


def _executor(launcher: str, folder: Path, spec: StudySpec) -> Any:
    import submitit

    cluster = "slurm" if launcher == "slurm" else "local"
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    parameters = {"timeout_min": DEFAULT_TIMEOUT_MIN, **spec.slurm}
    executor.update_parameters(name=f"study-{spec.name}", **parameters)
    return executor


def _stage_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("[") and "] " in line[:6]]


def run_study(spec: StudySpec, results_root: str | Path = DEFAULT_RESULTS_ROOT, launcher: str = "local",
              poll_seconds: float = 5.0) -> tuple[Path, dict[str, str]]:
    """Run every run of the study (skipping complete ones), then write ``study.md``.

    Returns the study folder and ``{run: error}`` of the runs that failed (the others still ran).
    """
    from papermill.exceptions import PapermillExecutionError
    from tqdm.auto import tqdm

    if launcher not in LAUNCHERS:
        raise StudySpecError(f"--launcher {launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    results_root = Path(results_root)
    study_dir = study_dir_of(spec, results_root)
    study_dir.mkdir(parents=True, exist_ok=True)
    failures: dict[str, str] = {}
    runs = spec.runs
    with run_lock(study_dir), tqdm(total=len(runs), desc=f"study {spec.name}", unit="run", file=sys.stderr) as bar:
        if launcher == "local":
            for run in runs:
                bar.set_postfix_str(run.name)
                print(f"== {run.name} ==", flush=True)
                try:
                    run_one(str(spec.path), run.name, str(results_root))
                except (RefineAFError, PapermillExecutionError) as error:  # one run fails, the study goes on
                    failures[run.name] = " ".join(str(error).splitlines())[-500:]
                    print(f"{run.name}: failed: {failures[run.name]}", file=sys.stderr, flush=True)
                bar.update(1)
        else:
            failures = _run_with_submitit(spec, results_root, launcher, poll_seconds, bar)
    write_study_report(spec, study_dir)
    return study_dir, failures


def _run_with_submitit(spec: StudySpec, results_root: Path, launcher: str, poll_seconds: float,
                       bar: Any) -> dict[str, str]:
    """Submit each run as its own job; a run waits for the job of the run it reuses stages from."""
    study_dir = study_dir_of(spec, results_root)
    executor = _executor(launcher, study_dir / STUDY_JOBS_DIR, spec)
    plan = donor_plan(spec)
    pending = [r.name for r in spec.runs]
    jobs: dict[str, Any] = {}
    failures: dict[str, str] = {}
    finished: set[str] = set()
    while pending or jobs:
        for name in list(pending):
            donor = plan[name]
            if donor is not None and donor not in finished:
                continue
            if is_locked(study_dir / name):  # a job of an earlier, killed study process still runs it
                continue
            job = executor.submit(run_one, str(spec.path), name, str(results_root))
            print(f"{name}: submitted as job {job.job_id} (log: {job.paths.stdout})", flush=True)
            jobs[name] = job
            pending.remove(name)
        for name, job in list(jobs.items()):
            if not job.done():
                continue
            try:
                job.result()
            except Exception as error:  # noqa: BLE001 - a failed job is reported, the study goes on
                message = " ".join(str(error).splitlines()[-1:]) or type(error).__name__
                failures[name] = f"{message} (log: {job.paths.stderr})"
                print(f"{name}: failed: {failures[name]}", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                for line in _stage_lines(job.paths.stdout.read_text()):
                    print(f"{name} {line}", flush=True)
            del jobs[name]
            finished.add(name)
            bar.update(1)
        if pending or jobs:
            time.sleep(poll_seconds)
    return failures


def dry_run(spec: StudySpec, results_root: str | Path) -> list[str]:
    """One line per run: complete (skipped), or to run and the stages it can copy now; nothing is written."""
    study_dir = study_dir_of(spec, results_root)
    lines = []
    for run in spec.runs:
        params = run.load()
        run_dir = study_dir / run.name
        if run_is_complete(run_dir, params, spec.stages):
            lines.append(f"{run.name}: complete, skipped")
            continue
        shared = []
        reusable = [s for s in spec.stages if s.output_dir is not None]
        other_studies = [study_dir.parent / name for name in spec.reuse_from]
        counts = {donor_label(d, study_dir): complete_prefix(d, reusable, params)
                  for d in donor_runs(study_dir, run_dir, other_studies)}
        if counts and max(counts.values()):
            donor = max(counts, key=lambda k: counts[k])
            shared = [f"{s.id} from {donor}" for s in reusable[: counts[donor]]]
        lines.append(f"{run.name}: run (stages 00-{spec.until}" + (f"; reuses {', '.join(shared)}" if shared else "")
                     + ")")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point."""
    import refine_af_utils.study as package  # its docstring is the command's

    parser = argparse.ArgumentParser(prog="python -m refine_af_utils.study",
                                     description=package.__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="study spec YAML, e.g. params/studies/reward_ablation.yaml")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="local: in this process, run after run (default); slurm: one submitit job per run; "
                             "submitit-local: the slurm code path with submitit's local executor (no Slurm)")
    parser.add_argument("--results-root", default=str(DEFAULT_RESULTS_ROOT), help="the study goes in ROOT/<name>/")
    parser.add_argument("--report-only", action="store_true", help="rewrite study.md from the runs there; run nothing")
    parser.add_argument("--dry-run", action="store_true", help="print per run: skip, or run and what it reuses")
    parser.add_argument("--poll-seconds", type=float, default=30.0, help="how often the slurm launcher checks its jobs")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        if args.dry_run:
            for line in dry_run(spec, args.results_root):
                print(line)
            return 0
        if args.report_only:
            study_dir = study_dir_of(spec, args.results_root)
            if not study_dir.is_dir():
                raise StudySpecError(f"{study_dir}: no such study folder (run the study first)")
            print(f"report: {write_study_report(spec, study_dir)}")
            return 0
        study_dir, failures = run_study(spec, args.results_root, args.launcher, args.poll_seconds)
    except RefineAFError as error:
        print(f"error: {' '.join(str(error).splitlines())}", file=sys.stderr)
        return 2
    print(f"report: {study_dir / STUDY_REPORT}")
    if failures:
        print(f"{len(failures)} run(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failures.items()), file=sys.stderr)
        return 1
    return 0
