"""The run folder's mechanics: where a run lives, what a stage opens and records, and what the runner checks.

A stage's entry point starts with :func:`open_stage` (its folder, its file names, the config check,
its metrics record and its seeds, found from the registry by the stage's module, so no stage spells
its own id); the runner and the stage entry points share one command line (:func:`add_run_arguments`).
The runner (:mod:`refine_af_utils.run`) and the study (:mod:`refine_af_utils.study`) share the rest:
what counts as a stage's output (:func:`counts_as_output`), its marker (:func:`write_marker`), whether
it is complete (:func:`stage_status`); a stage runs under the run's lock (:mod:`refine_af_utils.locking`)
through :func:`stage_entry` / :func:`stage_session`.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from refine_af_utils.errors import RunLockedError, StageConfigError
from refine_af_utils.files import atomic_write_text, sha256_file
from refine_af_utils.locking import hold_or_join_lock
from refine_af_utils.processes import is_main_process, wait_for_every_process
from refine_af_utils.layout import (CONFIG_FILE, LOCK_FILE, OUTPUTS_VERSION, RESOLVED_PARAMS, STAGES, RunLayout, Stage,
                                    flatten, stage_config, stage_fingerprint, stage_of_module, stage_params)

if TYPE_CHECKING:
    import argparse

    from refine_af_utils.params import Params

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout: the package, the notebooks, results/
DEFAULT_RESULTS_ROOT = REPO_ROOT / "results"


def record_metrics(run_dir: str | Path, stage: str, metrics: dict[str, Any]) -> Path:
    """Write a stage's headline numbers to ``<run_dir>/metrics/<stage>.json`` (whole or absent), with the
    process's peak memory so far (:func:`peak_memory`)."""
    return atomic_write_text(RunLayout(run_dir).metrics(stage),
                             json.dumps({**metrics, **peak_memory()}, indent=2, sort_keys=True) + "\n")


def peak_memory() -> dict[str, float]:
    """``peak_rss_gb``: this process's peak resident memory in GB (10^9 bytes; under the runner each stage has a kernel of its
    own, so it is the stage's; in a Lab kernel, the kernel's so far); ``peak_gpu_memory_gb``: torch's peak
    CUDA allocation, where CUDA was used."""
    import resource
    import sys

    peak = {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)}  # KiB on Linux
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    return peak


def read_metrics(run_dir: str | Path, stage: str) -> dict[str, Any]:
    """The metrics a stage recorded (see :func:`record_metrics`)."""
    return json.loads(RunLayout(run_dir).metrics(stage).read_text())


def run_folder(results_root: str | Path, run_name: str) -> Path:
    """``<results_root>/<run_name>``, after checking that the name is safe and the folder lies inside the root.

    Raises :class:`~refine_af_utils.params.ParamsError` for ``.``, ``..``, a path or a name whose
    resolved folder (symbolic links followed) is not a sub-folder of the resolved results root.
    """
    from refine_af_utils.params import ParamsError, check_run_name

    check_run_name(run_name)
    root = Path(results_root)
    run_dir = root / run_name
    if run_dir.resolve().parent != root.resolve():
        raise ParamsError(f"run_name {run_name!r}: the run folder {run_dir.resolve()} is not inside the results "
                          f"root {root.resolve()}")
    return run_dir


def check_stage_config(out_dir: str | Path, config: dict[str, Any]) -> None:
    """Refuse to resume a stage whose outputs were made with other settings.

    The first run writes ``config.json`` into the stage folder; a later run whose ``config``
    differs stops with the keys that changed (rerun the stage with ``--force`` to start over):
    a :class:`~refine_af_utils.errors.StageConfigError`. Call it only after the stage's inputs
    passed validation, so that a run that fails on bad input leaves no config that blocks the
    corrected run. A folder whose last run failed (:func:`mark_config_failed`) is resumed with the
    same settings and started over with other ones: a failure never blocks its own fix.
    """
    import shutil

    path = Path(out_dir) / CONFIG_FILE
    config = json.loads(json.dumps(config, sort_keys=True))
    if path.is_file():
        before = json.loads(path.read_text())
        failed = before.pop(FAILED_KEY, None)
        from refine_af_utils.params import ADDED_KEYS

        for dotted, unchanged in ADDED_KEYS.items():  # a folder made before a key existed had its old behaviour
            if dotted not in before and config.get(dotted) == unchanged:
                before[dotted] = unchanged
        changed = sorted(k for k in set(before) | set(config) if before.get(k) != config.get(k))
        if changed and failed is None:
            raise StageConfigError(
                f"{out_dir} was made with other settings ({', '.join(changed)} differ); "
                "rerun the stage with --force to start it again"
            )
        if changed:
            print(f"{out_dir}: its last run failed ({failed}); starting it over with the new settings "
                  f"({', '.join(changed[:6])} differ)", file=sys.stderr, flush=True)
            if is_main_process():  # under a launch, rank 0 alone changes the folder
                shutil.rmtree(out_dir)
        elif failed is None:
            return
    if is_main_process():
        _write_config(path, config)


def _write_config(path: Path, config: dict[str, Any]) -> None:
    """Whole or absent: processes under accelerate never read a half-written ``config.json``."""
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


FAILED_KEY = "_failed"  # in a stage's config.json: the error its last run ended with


def mark_config_failed(out_dir: str | Path, error: BaseException) -> None:
    """Record in ``out_dir/config.json`` (when the stage wrote one) that its run ended with ``error``, so
    that a rerun with corrected settings starts over instead of being refused (:func:`check_stage_config`)."""
    path = Path(out_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    line = " ".join(str(error).split())[:300]
    config[FAILED_KEY] = f"{type(error).__name__}: {line}" if line else type(error).__name__
    _write_config(path, config)


def write_resolved_params(run_dir: str | Path, params: Any, header: str = "") -> Path:
    """Write the run's resolved params (no ``extends``, every key) to ``<run_dir>/params.yaml``; return it.

    Written then renamed, so a reader (a notebook, another process under accelerate) never sees half a file.
    """
    from refine_af_utils.params import params_yaml

    return atomic_write_text(Path(run_dir) / RESOLVED_PARAMS, params_yaml(params, header))


def add_run_arguments(parser: "argparse.ArgumentParser", example: str = "evaluation.max_new_tokens=64") -> None:
    """The arguments the runner and every stage entry point share: ``PARAMS [--set KEY=VALUE ...]
    [--results-root DIR]`` (one default: the checkout's ``results/``)."""
    parser.add_argument("params", help="params YAML file, e.g. params/default.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a params key (dotted, e.g. {example}; the value is read as YAML and "
                             "checked by the schema); repeatable")
    parser.add_argument("--results-root", default=str(DEFAULT_RESULTS_ROOT), help="where run folders go")


@contextlib.contextmanager
def stage_command_line(description: str, argv: Optional[Sequence[str]] = None,
                       module: Optional[str] = None) -> Iterator[tuple[Any, Path]]:
    """Parse a stage entry point's command line (:func:`add_run_arguments`); yield (params, run_dir) while
    the process holds the run's lock (or joins its holder: rank 0 of an accelerate job holds it for all).

    ``--set`` works as on the runner (dotted keys, YAML values, checked by the schema); the resolved
    params are written to ``<run_dir>/params.yaml`` under the lock, by rank 0 only. ``module``: the stage
    module whose entry point this is (``__name__``): its config is marked failed if the ``with`` block raises.
    """
    import argparse

    from refine_af_utils.environment import resolve_dtypes
    from refine_af_utils.errors import RefineAFError
    from refine_af_utils.params import load_params, parse_overrides

    parser = argparse.ArgumentParser(description=description)
    add_run_arguments(parser, example="rl.updates=800")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
        params = resolve_dtypes(load_params(args.params, overrides=overrides))
        run_dir = run_folder(args.results_root, params.run_name)
    except RefineAFError as error:
        parser.exit(2, f"error: {error}\n")
    sets = "".join(f" --set {key}={json.dumps(value)}" for key, value in overrides.items())
    session = stage_session(stage_of_module(module), run_dir) if module else hold_or_join_lock(run_dir)
    try:
        with session:
            if is_main_process():
                write_resolved_params(run_dir, params, f"Resolved params of run '{params.run_name}', written by "
                                                       f"a stage entry point: {args.params}{sets}")
            yield params, run_dir
    except RunLockedError as error:
        parser.exit(2, f"error: {error}\n")


def code_revision() -> str:
    """The package's git commit (``<sha>``, ``<sha>-dirty`` with uncommitted changes) or, outside a git
    checkout, its installed version (``refine-af <version>``); recorded in every stage marker."""
    root = REPO_ROOT
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                "refine_af_utils", "notebooks"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version
        try:
            return f"refine-af {version('refine-af')}"
        except PackageNotFoundError:
            return "unknown"


# --- What counts as a stage's output ----------------------------------------------------------------
# Hashed into its marker: every file under its folder (the report: the files at the top of the run
# folder) and its metrics/<id>.json, except what is rebuilt or resumed from and never read as a result:
# caches (`cache/`, which later stages also fill), training checkpoints (`checkpoints/`,
# `checkpoint-*`), hidden files and half-written `*.partial` / `*.tmp` files. The executed notebooks,
# the markers, `params.yaml` and the lock are the runner's, not a stage's. A study copies a stage's
# folder between runs by the same rule, caches included (their entries are keyed by content).
TRANSIENT_DIRS = {"checkpoints", "__pycache__"}
CACHE_DIRS = {"cache"}
RUNNER_FILES = {RESOLVED_PARAMS, LOCK_FILE}


def is_transient(name: str) -> bool:
    """True for a file or folder name that is never an output nor copied: hidden, half-written, a checkpoint."""
    return (name.startswith(".") or name.endswith((".partial", ".tmp")) or name in TRANSIENT_DIRS
            or name.startswith("checkpoint-"))


def counts_as_output(relative: str | Path) -> bool:
    """The output rule for a path relative to a stage's folder: nothing on it transient, no cache folder."""
    parts = Path(relative).parts
    return not any(is_transient(part) for part in parts) and not any(part in CACHE_DIRS for part in parts[:-1])


def stage_outputs(run_dir: str | Path, stage: Stage) -> list[str]:
    """The files a stage wrote that count as its outputs (paths relative to ``run_dir``, sorted)."""
    run_dir = Path(run_dir)
    files = []
    if stage.output_dir is None:
        if run_dir.is_dir():
            files = [p.name for p in run_dir.iterdir()
                     if p.is_file() and p.name not in RUNNER_FILES and counts_as_output(p.name)]
    else:
        folder = run_dir / stage.output_dir
        if folder.is_dir():
            files = [str(p.relative_to(run_dir)) for p in folder.rglob("*")
                     if p.is_file() and counts_as_output(p.relative_to(folder))]
    metrics = RunLayout(run_dir).metrics(stage.id)
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


def sha_map(hashes: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``{path: sha256}`` of a :func:`hash_outputs` record (a marker's ``outputs``)."""
    return {path: entry["sha256"] for path, entry in hashes.items()}


def upstream_hashes(run_dir: str | Path, stage: Stage) -> dict[str, dict[str, str]]:
    """``{stage id: {path: sha256}}`` of every earlier stage's outputs now (what ``stage`` may read)."""
    run_dir = Path(run_dir)
    result = {}
    for earlier in STAGES[: STAGES.index(stage)]:
        marker = read_marker(run_dir, earlier) or {}
        result[earlier.id] = sha_map(hash_outputs(run_dir, earlier, marker.get("outputs")))
    return result


# --- Markers and status -----------------------------------------------------------------------------
def read_marker(run_dir: str | Path, stage: Stage) -> Optional[dict[str, Any]]:
    """A stage's marker as written (None when it is absent or torn)."""
    path = RunLayout(run_dir).marker(stage.id)
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except ValueError:
        return None  # a torn marker (written by an older runner, not atomically): the stage never finished
    return marker if isinstance(marker, dict) else None


def write_marker(run_dir: str | Path, stage: Stage, params: "Params", seconds: float,
                 inputs: Optional[dict[str, dict[str, str]]] = None) -> Path:
    """Record a finished stage: params, wall time, its outputs' hashes and the upstream hashes it ran on.

    ``inputs`` are the upstream hashes taken when the stage started (now, when not given). The marker
    is whole or absent (:func:`~refine_af_utils.files.atomic_write_text`).
    """
    from refine_af_utils.environment import machine_environment
    from refine_af_utils.models import embedded_weights_record

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
    return atomic_write_text(RunLayout(run_dir).marker(stage.id), json.dumps(record, indent=2) + "\n")


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


def stage_status(run_dir: str | Path, stage: Stage, params: "Params") -> StageStatus:
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
    for earlier, files in upstream_hashes(run_dir, stage).items():
        changed = _changed_files(marker["inputs"].get(earlier, {}), files)
        if changed:
            return StageStatus(True, f"stage {earlier}'s outputs changed since it ran: {_some(changed)}",
                               from_scratch=True)
    changed = _changed_files(sha_map(marker["outputs"]), sha_map(hash_outputs(run_dir, stage, marker["outputs"])))
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
        # Only keys the stage may continue under (``Stage.resumable``) keep its outputs; any other change
        # would be refused by its config check, so the stage starts over (and --dry-run says so).
        in_place = bool(keys) and all(any(k == r or k.startswith(f"{r}.") for r in stage.resumable) for k in keys)
        return StageStatus(True, f"params changed: {_some(keys, 6)}" if keys else "params changed",
                           from_scratch=not in_place)
    return StageStatus(False, "complete, skipped (outputs, inputs and params unchanged; --force reruns it)")


def stage_is_complete(run_dir: str | Path, stage: Stage, params: "Params") -> bool:
    """True when the stage finished with the same params, inputs and (unchanged) outputs."""
    return not stage_status(run_dir, stage, params).run


@contextlib.contextmanager
def stage_session(stage: Stage, run_dir: str | Path) -> Iterator[None]:
    """What every writer of a stage runs under: the run's lock (:func:`hold_or_join_lock`) and, when the
    stage raises, its ``config.json`` marked failed so that corrected params start it over."""
    with hold_or_join_lock(run_dir):
        try:
            yield
        except Exception as error:
            if stage.output_dir is not None:
                mark_config_failed(Path(run_dir) / stage.output_dir, error)
            raise


def stage_entry(run: Any) -> Any:
    """Decorator of every stage's ``run(params, run_dir)``: it runs in a :func:`stage_session`, so a notebook
    run by hand takes the run lock (or refuses while a runner holds it) and a failure never blocks its fix."""
    import functools

    stage = stage_of_module(run.__module__)

    @functools.wraps(run)
    def entry(params: "Params", run_dir: str | Path) -> Any:
        from refine_af_utils.library_noise import quiet_known_noise
        from refine_af_utils.progress import library_bars_as_text

        with stage_session(stage, run_dir), library_bars_as_text(), quiet_known_noise():
            return run(params, run_dir)

    entry.stage_entry = stage  # type: ignore[attr-defined]  # for the structure test
    return entry


@dataclass(kw_only=True)
class StageResult:
    """What every stage's ``run(params, run_dir)`` returns: its own tables (fields of a subclass) and its
    figures by name (PNG paths in the stage's folder), which the notebook shows."""

    figures: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class StageRun:
    """What a stage's entry point works with: its folder and files, the config check, metrics and seeds."""

    stage: Stage
    layout: RunLayout
    params: "Params"

    @property
    def run_dir(self) -> Path:
        return self.layout.run_dir

    @property
    def folder(self) -> Path:
        """The stage's own folder (created)."""
        return self.layout.stage_folder(self.stage.id, create=True)

    def file(self, name: str, /, **fields: Any) -> Path:
        """One of the stage's files by its name in ``layout.STAGE_FILES``."""
        return self.layout.file(self.stage.id, name, **fields)

    def check_config(self, **extra: Any) -> None:
        """Refuse to continue a folder made with other settings (:func:`check_stage_config`): the stage's
        params chain plus ``extra`` (e.g. the sha256 of an upstream model). Call it after the inputs are checked."""
        config = {**stage_config(self.stage, self.params), **extra}
        if is_main_process():  # under a launch, rank 0 settles the folder (and may start it over) first
            check_stage_config(self.folder, config)
        wait_for_every_process(self.params.model.device)
        if not is_main_process():  # then the others compare, reading only
            check_stage_config(self.folder, config)

    def record_metrics(self, metrics: dict[str, Any]) -> Path:
        """The stage's headline numbers, for the tests, the report and ``compare``."""
        return record_metrics(self.run_dir, self.stage.id, metrics)

    def derive_seed(self, *parts: Any) -> int:
        """The seed of one random stream of this stage (the one seed rule, :func:`derive_seed`)."""
        from refine_af_utils.seeding import derive_seed

        return derive_seed(self.params.random_seed, self.stage.id, *parts)


def open_stage(module: str, params: "Params", run_dir: str | Path) -> StageRun:
    """The :class:`StageRun` a stage's entry point starts with: ``open_stage(__name__, params, run_dir)``."""
    return StageRun(stage_of_module(module), RunLayout(run_dir), params)
