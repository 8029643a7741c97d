"""Run the pipeline's notebooks in order with papermill.

    python -m refine_af_utils.run params/default.yaml [--only 01 | --from 01] [--force] [--dry-run]
                                  [--set evaluation.max_new_tokens=64 ...]

The params file (its ``extends`` chain applied, then every ``--set key=value``, typed and checked
by the schema) is written resolved to ``<run_dir>/params.yaml``; each notebook gets that file's
path as ``params_path`` and ``run_dir`` injected into its ``parameters`` cell and is saved,
executed, to ``<run_dir>/notebooks/``.

A stage's marker, ``<run_dir>/stages/<stage>.json``, records its wall time, the params sections it
depends on (its own and every earlier stage's), the sha256 of every file it wrote (see
:func:`stage_outputs`) and of the earlier stages' outputs it could read. A stage counts as complete,
and is skipped, only when its params are unchanged, its outputs are there and unchanged and the
earlier stages' outputs are those it was run on. A changed or deleted output, or a changed upstream
output, reruns the stage from scratch (as ``--force`` does: its folder is deleted first) with one
line naming what changed; a params change reruns it in place (the stage resumes, or refuses a folder
made with other settings). ``--dry-run`` prints, per stage, run or skip and why, and changes nothing.

One runner per run folder: the runner holds an OS lock on ``<run_dir>/.lock`` while it runs,
and a second one exits at once naming the holder's PID and command line (the OS drops the
lock of a killed runner). A project error raised in a notebook (bad params, seeds, Super-NI
data, a stage folder made with other settings, a missing model) is printed as one line,
``[NN] stage: message``, with the executed notebook that holds the full traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from refine_af_utils.environment import machine_environment, resolve_dtypes
from refine_af_utils.errors import RefineAFError, RunLockedError, project_error_names
from refine_af_utils.layout import OUTPUTS_VERSION, STAGES, RunLayout, Stage, flatten, stage_fingerprint, stage_params
from refine_af_utils.params import Params, load_params, parse_overrides
from refine_af_utils.files import sha256_file
from refine_af_utils.run_folder import RESOLVED_PARAMS, code_revision, run_folder, write_resolved_params

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def select_stages(only: Optional[str] = None, start: Optional[str] = None) -> list[Stage]:
    """The stages to run: all, ``--only ID`` or ``--from ID`` onwards."""
    ids = [s.id for s in STAGES]
    for name, value in (("--only", only), ("--from", start)):
        if value is not None and value not in ids:
            raise SystemExit(f"{name} {value}: unknown stage (stages: {', '.join(ids)})")
    if only is not None:
        return [s for s in STAGES if s.id == only]
    if start is not None:
        return STAGES[ids.index(start):]
    return list(STAGES)


# What counts as a stage's output, hashed into its marker: every file under its folder (the report: the
# files at the top of the run folder) and its metrics/<id>.json, except what is rebuilt or resumed from
# and never read as a result: caches (`cache/`, which later stages also fill), training checkpoints
# (`checkpoints/`, `checkpoint-*`), hidden files and half-written `*.partial` / `*.tmp` files. The
# executed notebooks (`notebooks/`), the markers (`stages/`), `params.yaml` and the lock are the
# runner's, not a stage's.
SKIPPED_DIRS = {"cache", "checkpoints", "__pycache__"}
RUNNER_FILES = {RESOLVED_PARAMS}  # the lock is hidden (.lock)


def _counts_as_output(relative: Path) -> bool:
    parts = relative.parts
    if any(part.startswith(".") for part in parts):
        return False
    if any(part in SKIPPED_DIRS or part.startswith("checkpoint-") for part in parts[:-1]):
        return False
    return not parts[-1].endswith((".partial", ".tmp"))


def stage_outputs(run_dir: str | Path, stage: Stage) -> list[str]:
    """The files a stage wrote that count as its outputs (paths relative to ``run_dir``, sorted)."""
    run_dir = Path(run_dir)
    files = []
    if stage.output_dir is None:
        if run_dir.is_dir():
            files = [p.name for p in run_dir.iterdir()
                     if p.is_file() and p.name not in RUNNER_FILES and _counts_as_output(Path(p.name))]
    else:
        folder = run_dir / stage.output_dir
        if folder.is_dir():
            files = [str(p.relative_to(run_dir)) for p in folder.rglob("*")
                     if p.is_file() and _counts_as_output(p.relative_to(folder))]
    metrics = run_dir / "metrics" / f"{stage.id}.json"
    if metrics.is_file():
        files.append(str(metrics.relative_to(run_dir)))
    return sorted(files)


def hash_outputs(run_dir: str | Path, stage: Stage, known: Optional[dict[str, dict[str, Any]]] = None
                 ) -> dict[str, dict[str, Any]]:
    """``{path: {sha256, size, mtime_ns}}`` of a stage's outputs now.

    A file whose size and modification time (ns) match ``known`` (a marker's record) keeps the recorded
    sha256 instead of being read again: a stage's multi-gigabyte model files are not rehashed at every
    start. Any write changes the modification time, so an edited file is always rehashed.
    """
    run_dir = Path(run_dir)
    known = known or {}
    hashes = {}
    for relative in stage_outputs(run_dir, stage):
        stat = (run_dir / relative).stat()
        before = known.get(relative)
        if before and before.get("size") == stat.st_size and before.get("mtime_ns") == stat.st_mtime_ns:
            sha = before["sha256"]
        else:
            sha = sha256_file(run_dir / relative)
        hashes[relative] = {"sha256": sha, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return hashes


def read_marker(run_dir: Path, stage: Stage) -> Optional[dict[str, Any]]:
    """A stage's marker as written (None when it is absent or torn)."""
    path = RunLayout(run_dir).marker(stage.id)
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except ValueError:
        return None  # a torn marker (written by an older runner, not atomically): the stage never finished
    return marker if isinstance(marker, dict) else None


def _sha_map(hashes: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {path: entry["sha256"] for path, entry in hashes.items()}


def upstream_hashes(run_dir: str | Path, stage: Stage) -> dict[str, dict[str, str]]:
    """``{stage id: {path: sha256}}`` of every earlier stage's outputs now (what ``stage`` may read)."""
    run_dir = Path(run_dir)
    result = {}
    for earlier in STAGES[: STAGES.index(stage)]:
        marker = read_marker(run_dir, earlier) or {}
        result[earlier.id] = _sha_map(hash_outputs(run_dir, earlier, marker.get("outputs")))
    return result


def _changed_files(before: dict[str, str], now: dict[str, str]) -> list[str]:
    """``path (deleted|new|changed)`` for every difference between two ``{path: sha256}`` maps."""
    lines = []
    for path in sorted(set(before) | set(now)):
        if path not in now:
            lines.append(f"{path} deleted")
        elif path not in before:
            lines.append(f"{path} new")
        elif before[path] != now[path]:
            lines.append(f"{path} changed")
    return lines


def _some(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


@dataclass(frozen=True)
class StageStatus:
    """Whether a stage must run, why, and whether from scratch (its outputs deleted first)."""

    run: bool
    reason: str
    from_scratch: bool = False


def stage_status(run_dir: str | Path, stage: Stage, params: Params) -> StageStatus:
    """Complete (skip) or not, and why: no marker; an upstream output or one of its own outputs that
    changed since the marker was written (from scratch); params keys that changed (in place)."""
    run_dir = Path(run_dir)
    marker = read_marker(run_dir, stage)
    if marker is None:
        return StageStatus(True, "not run yet (no marker)")
    if "outputs" not in marker or "inputs" not in marker:
        return StageStatus(True, "its marker predates output hashes (older runner)")
    if marker.get("outputs_version", 1) != OUTPUTS_VERSION:
        return StageStatus(True, f"made by an older package (outputs version {marker.get('outputs_version', 1)}, "
                                 f"now {OUTPUTS_VERSION}: the same params give other outputs)", from_scratch=True)
    now_inputs = upstream_hashes(run_dir, stage)
    for earlier, files in now_inputs.items():
        changed = _changed_files(marker["inputs"].get(earlier, {}), files)
        if changed:
            return StageStatus(True, f"stage {earlier}'s outputs changed since it ran: {_some(changed)}",
                               from_scratch=True)
    changed = _changed_files(_sha_map(marker["outputs"]), _sha_map(hash_outputs(run_dir, stage, marker["outputs"])))
    if changed:
        return StageStatus(True, f"its outputs changed since it ran: {_some(changed)}", from_scratch=True)
    if marker.get("params_fingerprint") != stage_fingerprint(stage, params):
        before = flatten(marker.get("params", {}))
        now = flatten(stage_params(stage, params))
        keys = sorted(k for k in set(before) | set(now) if before.get(k, "<unset>") != now.get(k, "<unset>"))
        dtypes = [k for k in keys if k.endswith(".dtype")]
        if dtypes:  # never continue a float32 stage in bfloat16: its outputs would mix both
            changes = ", ".join(f"{k} {before.get(k, '<unset>')} -> {now.get(k, '<unset>')}" for k in dtypes)
            return StageStatus(True, f"the resolved dtype changed ({changes}; `auto` resolves by machine)",
                               from_scratch=True)
        return StageStatus(True, f"params changed: {_some(keys, 6)}" if keys else "params changed")
    return StageStatus(False, "complete, skipped (outputs, inputs and params unchanged; --force reruns it)")


def stage_is_complete(run_dir: Path, stage: Stage, params: Params) -> bool:
    """True when the stage finished with the same params, inputs and (unchanged) outputs."""
    return not stage_status(run_dir, stage, params).run


def write_marker(run_dir: str | Path, stage: Stage, params: Params, seconds: float,
                 inputs: Optional[dict[str, dict[str, str]]] = None) -> Path:
    """Record a finished stage: params, wall time, its outputs' hashes and the upstream hashes it ran on.

    ``inputs`` are the upstream hashes taken when the stage started (now, when not given).
    """
    from refine_af_utils.models import embedded_weights_record

    run_dir = Path(run_dir)
    marker = RunLayout(run_dir).marker(stage.id)
    marker.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "stage": stage.id,
        "notebook": stage.notebook,
        "params_fingerprint": stage_fingerprint(stage, params),
        "outputs_version": OUTPUTS_VERSION,
        "code": code_revision(),
        "seconds": seconds,
        "environment": {**machine_environment(params), **embedded_weights_record(params)},
        "params": stage_params(stage, params),
        "inputs": upstream_hashes(run_dir, stage) if inputs is None else inputs,
        "outputs": hash_outputs(run_dir, stage),
    }
    partial = marker.with_name(f"{marker.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(marker)  # a marker is whole or absent
    return marker


class StageError(RefineAFError, RuntimeError):
    """A stage whose notebook raised one of the project's errors; the message is one line."""


LOCK_FILE = ".lock"


def _command_line() -> str:
    """This process's command line, as typed (``python -m refine_af_utils.run ...``) where /proc has it."""
    try:
        parts = [p.decode(errors="replace") for p in Path("/proc/self/cmdline").read_bytes().split(b"\0") if p]
    except OSError:
        parts = [sys.executable, *sys.argv]
    return shlex.join(parts).replace("\n", "\\n")  # one line, in the lock file and in messages


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold the run folder's lock (``flock`` on ``<run_dir>/.lock``) for the ``with`` block.

    Raises :class:`~refine_af_utils.errors.RunLockedError` at once, naming the holder's PID and
    command line, when another process holds it. The OS releases the lock when its holder
    exits, even by SIGKILL, so a stale lock file never blocks.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(path.read_text())
                who = f"pid {holder['pid']}: {holder['command']}"
            except (OSError, ValueError, KeyError, TypeError):
                who = "a process that is just starting"
            raise RunLockedError(f"{run_dir}: another runner is using this run ({who}); "
                                 "wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps({"pid": os.getpid(), "command": _command_line(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n").encode())
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # still locked: nobody reads a stale holder
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def is_locked(run_dir: str | Path) -> bool:
    """True while a runner (or a study copying into it) holds ``run_dir``'s lock; nothing is written."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock just taken
    return False


def run_stage(stage: Stage, params_path: Path, run_dir: Path, params: Params, force: bool = False) -> float:
    """Execute one notebook with papermill; return its wall time in seconds.

    ``force`` deletes the stage's folder and marker first (from scratch). A project error inside
    the notebook becomes a :class:`StageError` with one line and the executed notebook's path; any
    other error propagates with its traceback.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from refine_af_utils.notebook import kernel_config

    if force:
        if stage.output_dir is not None:
            shutil.rmtree(run_dir / stage.output_dir, ignore_errors=True)
        layout = RunLayout(run_dir)
        layout.metrics(stage.id).unlink(missing_ok=True)
        layout.marker(stage.id).unlink(missing_ok=True)
    inputs = upstream_hashes(run_dir, stage)  # what the stage reads, as it starts
    executed = run_dir / "notebooks" / stage.notebook
    executed.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
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


def _resolved_header(params_path: Path, overrides: dict[str, Any]) -> str:
    sets = "".join(f" --set {key}={json.dumps(value)}" for key, value in overrides.items())
    return (f"Resolved params of run '{{run}}', written by the runner: {params_path}{sets}\n"
            "(extends applied, every key spelled out). Every stage notebook reads this file.")


def run_pipeline(
    params_path: str | Path, only: Optional[str] = None, start: Optional[str] = None,
    force: bool = False, results_root: str | Path = REPO_ROOT / "results",
    overrides: Optional[dict[str, Any]] = None, dry: bool = False,
) -> Path:
    """Run the selected stages for a params file (``overrides``: dotted keys); return the run directory.

    ``dry``: print what would run and why, and change nothing.
    """
    params_path = Path(params_path)
    overrides = overrides or {}
    params = resolve_dtypes(load_params(params_path, overrides=overrides))  # params.yaml holds the dtypes used
    run_dir = run_folder(results_root, params.run_name)
    stages = select_stages(only, start)
    if dry:
        for line in dry_run(params, run_dir, stages, force):
            print(line, flush=True)
        return run_dir
    with run_lock(run_dir):
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
            print(f"[{stage.id}] {stage.notebook}: done in {seconds:.0f} s", flush=True)
    return run_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m refine_af_utils.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("params", help="params YAML file, e.g. params/default.yaml")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--only", metavar="STAGE", help="run only this stage (its notebook number, e.g. 01)")
    group.add_argument("--from", dest="start", metavar="STAGE", help="run this stage and the ones after it")
    parser.add_argument("--force", action="store_true", help="rerun stages even if complete, from scratch")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params key (dotted, e.g. evaluation.max_new_tokens=64; the value is "
                             "read as YAML and checked by the schema); repeatable")
    parser.add_argument("--dry-run", action="store_true", help="print per stage run or skip and why; change nothing")
    parser.add_argument("--results-root", default=str(REPO_ROOT / "results"), help="where run folders go")
    args = parser.parse_args(argv)
    try:
        run_dir = run_pipeline(args.params, args.only, args.start, args.force, args.results_root,
                               overrides=parse_overrides(args.overrides), dry=args.dry_run)
    except StageError as error:
        print(error, file=sys.stderr)
        return 1
    except RefineAFError as error:  # bad params, unsafe run name, run locked by another runner
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.dry_run:
        print(f"results in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
