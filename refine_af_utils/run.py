"""Run the pipeline's notebooks in order with papermill.

    python -m refine_af_utils.run params/default.yaml [--only 01 | --from 01] [--force] [--dry-run]
                                  [--set evaluation.max_new_tokens=64 ...]

The params file (its ``extends`` chain applied, then every ``--set key=value``, typed and checked
by the schema) is written resolved to ``<run_dir>/params.yaml``; each notebook gets that file's
path as ``params_path`` and ``run_dir`` injected into its ``parameters`` cell and is saved,
executed, to ``<run_dir>/notebooks/``.

A stage's marker, ``<run_dir>/stages/<stage>.json``, records its wall time, the params sections it
depends on (its own and every earlier stage's), the sha256 of every file it wrote (see
:func:`~refine_af_utils.run_folder.stage_outputs`) and of the earlier stages' outputs it could read.
A stage counts as complete, and is skipped, only when its params are unchanged, its outputs are there
and unchanged and the earlier stages' outputs are those it was run on. A changed or deleted output,
or a changed upstream output, reruns the stage from scratch (as ``--force`` does: its folder is
deleted first) with one line naming what changed; a params change reruns it in place (the stage
resumes, or refuses a folder made with other settings). ``--dry-run`` prints, per stage, run or skip
and why, and changes nothing. The markers, the output rule, the status and the lock are
:mod:`refine_af_utils.run_folder`'s; this module runs the notebooks.

One runner per run folder: the runner holds an OS lock on ``<run_dir>/.lock`` while it runs,
and a second one exits at once naming the holder's PID and command line (the OS drops the
lock of a killed runner). A project error raised in a notebook (bad params, seeds, Super-NI
data, a stage folder made with other settings, a missing model) is printed as one line,
``[NN] stage: message``, with the executed notebook that holds the full traceback.
"""

from __future__ import annotations

import argparse
import os
import dataclasses
import hashlib
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from refine_af_utils.environment import resolve_dtypes
from refine_af_utils.errors import RefineAFError, UpstreamNotReadyError, project_error_names
from refine_af_utils.layout import STAGES, RunLayout, Stage, stage_fingerprint
from refine_af_utils.params import Params, check_run_name, load_params, parse_overrides
from refine_af_utils.locking import run_lock
from refine_af_utils.progress import TEXT_PROGRESS_ENV
from refine_af_utils.run_copy import TMP_DIR, complete_prefix, copy_stage
from refine_af_utils.run_folder import (DEFAULT_RESULTS_ROOT, REPO_ROOT, add_run_arguments, read_marker, read_metrics, run_folder,
                                        stage_status, upstream_hashes, write_marker, write_resolved_params)

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def select_stages(only: Optional[str] = None, start: Optional[str] = None,
                  until: Optional[str] = None) -> list[Stage]:
    """The stages to run: all, ``--only ID``, or from ``--from ID`` to ``--until ID`` (both included).
    An id is the notebook number, with or without its leading zero (``1`` is ``01``)."""
    ids = [s.id for s in STAGES]

    def stage_id(name: str, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        value = value.zfill(2) if value.isdigit() else value
        if value not in ids:
            raise SystemExit(f"{name} {value}: unknown stage (stages: {', '.join(ids)})")
        return value

    only, start, until = stage_id("--only", only), stage_id("--from", start), stage_id("--until", until)
    if only is not None:
        if until is not None:
            raise SystemExit("--until goes with --from (or alone), not with --only")
        return [s for s in STAGES if s.id == only]
    first = ids.index(start) if start is not None else 0
    last = ids.index(until) if until is not None else len(ids) - 1
    if last < first:
        raise SystemExit(f"--until {until} comes before --from {start}: nothing to run")
    return STAGES[first:last + 1]


class StageError(RefineAFError, RuntimeError):
    """A stage whose notebook raised one of the project's errors; the message is one line."""


def run_stage(stage: Stage, params_path: Path, run_dir: Path, params: Params, force: bool = False) -> float:
    """Execute one notebook with papermill; return its wall time in seconds.

    ``force`` deletes the stage's folder and marker first (from scratch). A project error inside
    the notebook becomes a :class:`StageError` with one line and the executed notebook's path; any
    other error propagates with its traceback.
    """
    import papermill
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    from refine_af_utils.notebook import kernel_config

    layout = RunLayout(run_dir)
    if force:
        if stage.output_dir is not None:
            shutil.rmtree(layout.stage_folder(stage.id), ignore_errors=True)  # a symbolic link is refused
        layout.metrics(stage.id).unlink(missing_ok=True)
        layout.marker(stage.id).unlink(missing_ok=True)
    inputs = upstream_hashes(run_dir, stage)  # what the stage reads, as it starts
    executed = layout.notebooks / stage.notebook
    executed.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    os.environ[TEXT_PROGRESS_ENV] = "1"  # the kernel's bars: text heartbeats here, final state in the notebook
    try:
        papermill.execute_notebook(
            str(NOTEBOOK_DIR / stage.notebook),
            str(executed),
            parameters={"params_path": str(params_path.resolve()), "run_dir": str(run_dir.resolve())},
            cwd=str(REPO_ROOT),
            kernel_name="python3",
            config=kernel_config(),  # IPC transport: no "Kernel is running over TCP without encryption" warning
            progress_bar=False,
            log_output=True,
        )
    except PapermillExecutionError as error:
        if error.ename not in project_error_names():
            raise
        message = " ".join(str(error.evalue).splitlines())
        raise StageError(f"[{stage.id}] {stage.title}: {message} (full traceback in {executed})") from None
    except DeadKernelError:
        raise StageError(f"[{stage.id}] {stage.title}: the notebook's kernel died (killed, or out of memory?); "
                         f"rerun to resume (what it ran so far is in {executed})") from None
    seconds = round(time.time() - started, 1)
    write_marker(run_dir, stage, params, seconds, inputs)
    return seconds


def dry_run(params: Params, run_dir: Path, stages: Sequence[Stage], force: bool = False) -> list[str]:
    """One line per selected stage, ``[NN] notebook: run|skip (why)``; nothing is written."""
    lines = []
    rerun: Optional[Stage] = None  # the first stage that will run: later verdicts hold only if its outputs stay
    for stage in stages:
        if force:
            lines.append(f"[{stage.id}] {stage.notebook}: run (--force: from scratch)")
            continue
        status = stage_status(run_dir, stage, params)
        if status.run:
            how = "from scratch" if status.from_scratch else "resuming its outputs"
            lines.append(f"[{stage.id}] {stage.notebook}: run ({status.reason}; {how})")
            rerun = rerun or stage
        elif rerun is not None:
            lines.append(f"[{stage.id}] {stage.notebook}: skip (complete now; reruns from scratch if stage "
                         f"{rerun.id}'s rerun changes its outputs)")
        else:
            lines.append(f"[{stage.id}] {stage.notebook}: skip ({status.reason})")
    return lines


def _sets(overrides: dict[str, Any]) -> str:
    return "".join(f" --set {key}={json.dumps(value)}" for key, value in overrides.items())


def check_upstream(params: Params, run_dir: Path, stages: Sequence[Stage], command: str,
                   copied: Sequence[Stage] = ()) -> None:
    """Refuse ``--only`` / ``--from`` when a stage before the first selected one is missing or stale.

    A stage run on stale or torn upstream outputs would be marked complete over inputs that no longer
    match its params (e.g. stage 4's instances for new instructions from an adapter trained on old ones).
    ``command`` is the runner's command line without ``--only`` / ``--from``, for the message; ``copied``:
    stages that will be copied, complete, from another run before anything runs.
    """
    first = STAGES.index(stages[0]) if stages else 0
    for stage in STAGES[:first]:
        if stage in copied:
            continue
        status = stage_status(run_dir, stage, params)
        if status.run:
            raise UpstreamNotReadyError(
                f"stage {stages[0].id} ({stages[0].title}) needs stage {stage.id} ({stage.title}) first, which "
                f"would run: {status.reason}; run `{command} --from {stage.id}` (or leave out --only/--from)")


def derived_run_name(run_name: str, overrides: dict[str, Any]) -> str:
    """``<run_name>--<key>-<value>...``: where ``--set`` on a finished run writes (readable, a folder name).

    Each override gives its last key part and its value with characters outside ``[A-Za-z0-9._-]``
    dropped; past 60 characters the suffix is a 10-digit hash of the overrides instead.
    """
    parts = []
    for key, value in sorted(overrides.items()):
        text = re.sub(r"[^A-Za-z0-9._-]+", "", json.dumps(value) if not isinstance(value, str) else value)
        parts.append(f"{key.rsplit('.', 1)[-1]}-{text or 'x'}")
    suffix = "_".join(parts)
    if len(suffix) > 60:
        suffix = "set-" + hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{run_name}--{suffix}"


def _derive_run(params: Params, results_root: Path, overrides: dict[str, Any],
                in_place: bool) -> tuple[Params, Optional[Path], list[Stage]]:
    """Where ``--set`` writes: its run, unless that run has a finished stage the overrides would change
    (then a derived run, :func:`derived_run_name`); never derived with ``in_place`` or a ``run_name`` override.

    Returns the params to run (``run_name`` derived or not), the finished base run (None when not
    derived) and its leading stages that ``--set`` leaves unchanged (copied from it, not rerun).
    """
    if not overrides or in_place or "run_name" in overrides:
        return params, None, []
    base_dir = results_root / params.run_name
    changed = [stage for stage in STAGES if (marker := read_marker(base_dir, stage)) is not None
               and marker.get("params_fingerprint") != stage_fingerprint(stage, params)]
    if not changed:
        return params, None, []
    derived = dataclasses.replace(params, run_name=derived_run_name(params.run_name, overrides))
    check_run_name(derived.run_name, "--set")
    copyable = [stage for stage in STAGES if stage.output_dir is not None]
    return derived, base_dir, copyable[:complete_prefix(base_dir, copyable, derived)]


def _resolved_header(params_path: Path, overrides: dict[str, Any]) -> str:
    sets = _sets(overrides)
    return (f"Resolved params of run '{{run}}', written by the runner: {params_path}{sets}\n"
            "(extends applied, every key spelled out). Every stage notebook reads this file.")


def run_pipeline(
    params_path: str | Path, only: Optional[str] = None, start: Optional[str] = None,
    force: bool = False, results_root: str | Path = DEFAULT_RESULTS_ROOT,
    overrides: Optional[dict[str, Any]] = None, dry: bool = False, refresh_downloads: bool = False,
    until: Optional[str] = None, in_place: bool = False,
) -> Path:
    """Run the selected stages for a params file (``overrides``: dotted keys); return the run directory.

    ``dry``: print what would run and why, and change nothing. ``refresh_downloads``: fetch URL inputs
    (a seed URL) again first; stages whose input content changed then rerun. ``overrides`` on a run that
    has finished stages go to a derived run (:func:`derived_run_name`), which first copies the base run's
    leading stages whose settings they leave unchanged; ``in_place`` changes the base run itself.
    """
    params_path = Path(params_path)
    overrides = overrides or {}
    params = resolve_dtypes(load_params(params_path, overrides=overrides))  # params.yaml holds the dtypes used
    base_name = params.run_name
    params, base_dir, shared = _derive_run(params, Path(results_root), overrides, in_place)
    if refresh_downloads and not dry:
        from refine_af_utils.seeds import refresh_seed_download

        refresh_seed_download(params.seed_tasks)
    run_dir = run_folder(results_root, params.run_name)
    stages = select_stages(only, start, until)
    command = f"python -m refine_af_utils.run {params_path}{_sets(overrides)}"
    to_copy = [stage for stage in shared if stage_status(run_dir, stage, params).run]
    derived = "" if base_dir is None else (
        f"--set changes the finished run '{base_name}': writing to {run_dir} instead (stages "
        f"{', '.join(s.id for s in shared) or 'none'} copied from it, same settings; --in-place changes "
        f"'{base_name}' itself)")
    if dry:  # the same refusal as the run's, then what each stage would do
        check_upstream(params, run_dir, stages, command, copied=to_copy)
        if derived:
            print(derived, flush=True)
        copied_now = [] if force else to_copy  # --force reruns them after the copy anyway
        lines = dry_run(params, run_dir, [s for s in stages if s not in copied_now], force)
        lines += [f"[{s.id}] {s.notebook}: skip (copied from {base_dir}: same settings)" for s in copied_now
                  if s in stages]
        for line in sorted(lines):
            print(line, flush=True)
        return run_dir
    new_folder = not run_dir.exists()
    with run_lock(run_dir):
        try:
            check_upstream(params, run_dir, stages, command, copied=to_copy)  # before anything is written
        except UpstreamNotReadyError:
            if new_folder:  # the lock made it: a refused run leaves nothing behind
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        if derived:
            print(derived, flush=True)
        if to_copy:
            with run_lock(base_dir):  # nobody writes into the base run while its stages are copied
                shutil.rmtree(run_dir / TMP_DIR, ignore_errors=True)  # what a killed copy left
                for stage in to_copy:
                    copy_stage(base_dir, run_dir, stage)
        resolved = write_resolved_params(
            run_dir, params, _resolved_header(params_path, overrides).replace("{run}", params.run_name))
        for stage in stages:
            scratch = force
            if not force:
                status = stage_status(run_dir, stage, params)
                if not status.run:
                    print(f"[{stage.id}] {stage.notebook}: {status.reason}", flush=True)
                    continue
                if status.from_scratch:
                    print(f"[{stage.id}] {stage.notebook}: rerunning from scratch: {status.reason}", flush=True)
                    scratch = True
            print(f"[{stage.id}] {stage.notebook}: running", flush=True)
            seconds = run_stage(stage, resolved, run_dir, params, force=scratch)
            print(f"[{stage.id}] {stage.notebook}: done in {seconds:.0f} s{stage_headline(run_dir, stage)}",
                  flush=True)
    return run_dir


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return str(len(value))
    return str(value)


def stage_headline(run_dir: Path, stage: Stage) -> str:
    """``" (key value, ...)"``: the stage's :attr:`~refine_af_utils.layout.Stage.headline` metrics, each with
    its 95% interval where the stage records one (``<key>_ci_low`` / ``_ci_high``); "" when none is recorded."""
    try:
        metrics = read_metrics(run_dir, stage.id)
    except (OSError, ValueError, RefineAFError):
        return ""
    parts = []
    for key in stage.headline:
        if key not in metrics:
            continue
        interval = ""
        if f"{key}_ci_low" in metrics and f"{key}_ci_high" in metrics:
            interval = f" [{_figure(metrics[f'{key}_ci_low'])}, {_figure(metrics[f'{key}_ci_high'])}]"
        parts.append(f"{key.replace('_', ' ')} {_figure(metrics[key])}{interval}")
    return f" ({', '.join(parts)})" if parts else ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m refine_af_utils.run", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)  # PARAMS, --set, --results-root: as every stage entry point
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--only", metavar="STAGE", help="run only this stage (its notebook number, e.g. 01)")
    group.add_argument("--from", dest="start", metavar="STAGE", help="run this stage and the ones after it")
    parser.add_argument("--until", metavar="STAGE", help="stop after this stage (with or without --from)")
    parser.add_argument("--force", action="store_true", help="rerun stages even if complete, from scratch")
    parser.add_argument("--dry-run", action="store_true", help="print per stage run or skip and why; change nothing")
    parser.add_argument("--in-place", action="store_true",
                        help="with --set on a run that has finished stages: change that run itself (default: "
                             "a derived run <run_name>--<key>-<value>, reusing the stages --set leaves unchanged)")
    parser.add_argument("--refresh-downloads", action="store_true",
                        help="fetch URL inputs (seed_tasks: https://...) again; stages whose input changed rerun")
    from refine_af_utils.memory_plan import add_plan_arguments, print_plan

    parser.add_argument("--plan", action="store_true",
                        help="print each stage's memory (models built on the meta device) and decoding time against "
                             "--gpu-memory, refuse a stage that does not fit naming the key to change; run nothing")
    add_plan_arguments(parser)
    args = parser.parse_args(argv)
    if args.plan:
        try:
            params = load_params(args.params, overrides=parse_overrides(args.overrides))
            return print_plan(params, args.gpu_memory, args.config, args.params)
        except (RefineAFError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    try:
        run_dir = run_pipeline(args.params, args.only, args.start, args.force, args.results_root,
                               overrides=parse_overrides(args.overrides), dry=args.dry_run,
                               refresh_downloads=args.refresh_downloads, until=args.until,
                               in_place=args.in_place)
    except StageError as error:
        print(error, file=sys.stderr)
        return 1
    except RefineAFError as error:  # bad params, unsafe run name, run locked by another runner
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.dry_run:
        report = RunLayout(run_dir).report
        print(f"results in {run_dir}" + (f"; report: {report}" if report.is_file() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
