"""Studies: one params file over a grid of settings and seeds, each run through the same runner.

    python -m refine_af_utils.study params/studies/reward_ablation.yaml [--launcher local|slurm] [--dry-run]

A spec (YAML) names a base params file, seeds and a grid of settings::

    name: reward_ablation            # optional: the spec file's stem
    params: ../default.yaml          # relative to the spec file
    seeds: [42, 43, 44]
    until: "07"                      # optional: the last stage to run (default "07")
    grid:
      - name: paper
        set: {}                      # dotted --set overrides (the runner's)
      - name: und-plus
        set: {reward.understandability.weight: 0.4421}
      - name: mistral
        params: ../recipes/mistral-7b/paper.yaml   # optional: this setting's own params file
    slurm: {timeout_min: 4320, gpus_per_node: 1}   # optional: submitit parameters (--launcher slurm)
    reuse_from: [reward_ablation]    # optional: other studies (same results root) whose runs may donate stages

Each run (setting x seed) is ``results/<study>/<setting>-seed<N>/``, made by
:func:`refine_af_utils.run.run_pipeline` with ``run_name`` and ``random_seed`` set. Before a run
starts, every stage it shares with another run of the study (equal :func:`~refine_af_utils.run.stage_fingerprint`,
the other run's stage complete) is copied from that run instead of being run again: the stage's
folder, its metrics, its executed notebook and, last, its marker, each through a temporary name and
a rename, so a copy cut off by a kill never looks complete. The runner then finds those stages
complete (their markers record the same params, outputs and inputs) and runs the rest. A complete
run is skipped; a rerun of a killed study continues it. ``results/<study>/study.md`` (with CSV
tables and PNG figures beside it) summarises the runs that exist.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import yaml

if TYPE_CHECKING:
    import pandas as pd

from refine_af_utils.errors import RefineAFError, RunLockedError, decode_utf8
from refine_af_utils.layout import STAGES, RunLayout, Stage, stage_fingerprint
from refine_af_utils.params import Params, ParamsError, load_params
from refine_af_utils.results import sha256_file
from refine_af_utils.run import LOCK_FILE, REPO_ROOT, _read_marker, run_lock, run_pipeline, stage_status

STUDY_FILE = ".study.json"   # per run: its setting, seed and the stages copied from other runs (hidden: no stage output)
TMP_DIR = ".study-tmp"       # per run: copies in progress (hidden; renamed into place when whole)
SPEC_KEYS = {"name", "description", "params", "seeds", "until", "grid", "slurm", "reuse_from"}
SETTING_KEYS = {"name", "set", "params"}
STUDY_SET_KEYS = {"run_name", "random_seed"}  # set by the study for every run
LAUNCHERS = ("local", "slurm", "submitit-local")
DEFAULT_TIMEOUT_MIN = 3 * 24 * 60  # submitit's local executor would stop a job after 2 minutes otherwise
# Stages not worth waiting for under --launcher slurm: stage 00 runs no model and takes seconds.
CHEAP_STAGES = {"00"}


class StudySpecError(RefineAFError, ValueError):
    """A study spec that cannot be run: one line naming the file and the key."""


# --- The spec ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One point of the grid: a name, the params file and the dotted overrides."""

    name: str
    params: Path
    overrides: dict[str, Any]


@dataclass(frozen=True)
class StudyRun:
    """One run of a study: a setting with a seed."""

    setting: Setting
    seed: int

    @property
    def name(self) -> str:
        """``<setting>-seed<N>``: the run's folder and ``run_name``."""
        return f"{self.setting.name}-seed{self.seed}"

    @property
    def overrides(self) -> dict[str, Any]:
        """The setting's overrides plus the run's name and seed."""
        return {**self.setting.overrides, "run_name": self.name, "random_seed": self.seed}

    def load(self) -> Params:
        """The run's params, resolved and validated."""
        return load_params(self.setting.params, overrides=self.overrides)


@dataclass(frozen=True)
class StudySpec:
    """A validated study spec."""

    path: Path
    name: str
    params: Path
    seeds: tuple[int, ...]
    grid: tuple[Setting, ...]
    until: str = STAGES[-1].id
    slurm: dict[str, Any] = dataclasses.field(default_factory=dict)
    description: str = ""
    reuse_from: tuple[str, ...] = ()

    @property
    def runs(self) -> list[StudyRun]:
        """Every run, setting by setting, seed by seed (the order they run in)."""
        return [StudyRun(setting, seed) for setting in self.grid for seed in self.seeds]

    @property
    def stages(self) -> list[Stage]:
        """The stages each run goes through: the first up to ``until``."""
        ids = [s.id for s in STAGES]
        return STAGES[: ids.index(self.until) + 1]


def _safe_name(value: Any) -> bool:
    from refine_af_utils.params import RUN_NAME_PATTERN

    return isinstance(value, str) and bool(RUN_NAME_PATTERN.fullmatch(value)) and value not in (".", "..")


def _params_path(spec_path: Path, value: Any, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise StudySpecError(f"{spec_path}: key '{key}' must be the path of a params file (relative to the spec), "
                             f"got {value!r}")
    path = Path(value) if Path(value).is_absolute() else spec_path.parent / value
    if not path.is_file():
        raise StudySpecError(f"{spec_path}: key '{key}': {path}: params file not found")
    return path


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study spec; every run's params are loaded once to check its overrides.

    Raises :class:`StudySpecError` with one line naming the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise StudySpecError(f"{path}: study spec not found")
    text = decode_utf8(path.read_bytes(), str(path), StudySpecError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        raise StudySpecError(f"{where}: not valid YAML ({problem})") from error
    if not isinstance(data, dict):
        raise StudySpecError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    unknown = sorted(set(data) - SPEC_KEYS)
    if unknown:
        raise StudySpecError(f"{path}: unknown key '{unknown[0]}' (known keys: {', '.join(sorted(SPEC_KEYS))})")
    for key in ("params", "seeds", "grid"):
        if key not in data:
            raise StudySpecError(f"{path}: required key '{key}' is missing")
    name = data.get("name", path.stem)
    if not _safe_name(name):
        raise StudySpecError(f"{path}: key 'name' must be a folder name of letters, digits, '-', '_' and '.', "
                             f"got {name!r}")
    base = _params_path(path, data["params"], "params")
    seeds = data["seeds"]
    if (not isinstance(seeds, list) or not seeds
            or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds)):
        raise StudySpecError(f"{path}: key 'seeds' must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise StudySpecError(f"{path}: key 'seeds' lists a seed twice: {seeds!r}")
    until = data.get("until", STAGES[-1].id)
    ids = [s.id for s in STAGES]
    if isinstance(until, int) and not isinstance(until, bool):
        until = f"{until:02d}"
    if until not in ids:
        raise StudySpecError(f"{path}: key 'until' must be a stage id ({', '.join(ids)}), got {data.get('until')!r}")
    slurm = data.get("slurm") or {}
    if not isinstance(slurm, dict) or any(not isinstance(k, str) for k in slurm):
        raise StudySpecError(f"{path}: key 'slurm' must be a mapping of submitit parameters, got {slurm!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise StudySpecError(f"{path}: key 'description' must be text, got {description!r}")
    reuse_from = data.get("reuse_from") or []
    if not isinstance(reuse_from, list) or not all(_safe_name(s) and s != name for s in reuse_from):
        raise StudySpecError(f"{path}: key 'reuse_from' must be a list of other studies' names (folders beside "
                             f"this study's in the results root), got {reuse_from!r}")
    grid = data["grid"]
    if not isinstance(grid, list) or not grid:
        raise StudySpecError(f"{path}: key 'grid' must be a non-empty list of settings (name, set, params)")
    settings: list[Setting] = []
    for i, item in enumerate(grid):
        key = f"grid[{i}]"
        if not isinstance(item, dict):
            raise StudySpecError(f"{path}: key '{key}' must be a mapping with name, set and optionally params, "
                                 f"got {item!r}")
        unknown = sorted(set(item) - SETTING_KEYS)
        if unknown:
            raise StudySpecError(f"{path}: unknown key '{key}.{unknown[0]}' (known keys here: "
                                 f"{', '.join(sorted(SETTING_KEYS))})")
        setting_name = item.get("name")
        if not _safe_name(setting_name):
            raise StudySpecError(f"{path}: key '{key}.name' must be a folder name of letters, digits, '-', '_' "
                                 f"and '.', got {setting_name!r}")
        if any(s.name == setting_name for s in settings):
            raise StudySpecError(f"{path}: key '{key}.name': setting '{setting_name}' is named twice")
        overrides = item.get("set") or {}
        if not isinstance(overrides, dict) or any(not isinstance(k, str) for k in overrides):
            raise StudySpecError(f"{path}: key '{key}.set' must be a mapping of dotted params keys to values, "
                                 f"got {overrides!r}")
        taken = sorted(STUDY_SET_KEYS & set(overrides))
        if taken:
            raise StudySpecError(f"{path}: key '{key}.set.{taken[0]}' is set by the study for every run "
                                 "(run_name: <setting>-seed<N>; random_seed: from seeds)")
        params = _params_path(path, item["params"], f"{key}.params") if "params" in item else base
        settings.append(Setting(setting_name, params, dict(overrides)))
    spec = StudySpec(path, name, base, tuple(seeds), tuple(settings), until, dict(slurm), description,
                     tuple(reuse_from))
    for run in spec.runs:
        try:
            run.load()
        except ParamsError as error:
            raise StudySpecError(f"{path}: setting '{run.setting.name}' (seed {run.seed}): {error}") from None
    return spec


# --- Reuse of stages shared with other runs ---------------------------------------------------------

def _copy_ignore(folder: str, names: list[str]) -> set[str]:
    """Training checkpoints and half-written files are not copied (caches are: they are keyed by content)."""
    return {n for n in names if n == "checkpoints" or n.startswith("checkpoint-") or n.endswith((".partial", ".tmp"))
            or n.startswith(".")}


def _replace_file(source: Path, target: Path, tmp: Path) -> None:
    """Copy ``source`` to ``target`` through ``tmp`` (metadata kept) and a rename: whole or not at all."""
    shutil.copy2(source, tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)


def copy_stage(donor: Path, run_dir: Path, stage: Stage) -> None:
    """Copy one complete stage from run ``donor`` into ``run_dir`` (both locked by the caller).

    The run's marker goes first, then the stage's folder is copied to a temporary folder and
    renamed into place, then its metrics and executed notebook, and the donor's marker last: a
    kill at any moment leaves the stage without a marker (the runner reruns it, or the study copies
    it again). Modification times are kept, so the marker's recorded sizes and times still match.
    """
    if stage.output_dir is None:
        raise ValueError(f"stage {stage.id} writes into the run folder itself and is never copied")
    tmp = run_dir / TMP_DIR / f"{stage.id}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    RunLayout(run_dir).marker(stage.id).unlink(missing_ok=True)
    shutil.copytree(donor / stage.output_dir, tmp / stage.output_dir, ignore=_copy_ignore, copy_function=shutil.copy2)
    target = run_dir / stage.output_dir
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp / stage.output_dir, target)
    metrics = donor / "metrics" / f"{stage.id}.json"
    if metrics.is_file():
        _replace_file(metrics, run_dir / "metrics" / metrics.name, tmp / "metrics.json")
    else:
        (run_dir / "metrics" / metrics.name).unlink(missing_ok=True)
    notebook = donor / "notebooks" / stage.notebook
    if notebook.is_file():
        _replace_file(notebook, run_dir / "notebooks" / stage.notebook, tmp / "notebook.ipynb")
    _replace_file(RunLayout(donor).marker(stage.id), RunLayout(run_dir).marker(stage.id), tmp / "marker.json")
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _try_lock(run_dir: Path) -> Iterator[bool]:
    """Hold ``run_dir``'s runner lock when free (yield True); yield False when another process holds it."""
    try:
        with run_lock(run_dir):
            yield True
    except RunLockedError:
        yield False


def is_locked(run_dir: Path) -> bool:
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


def _complete_prefix(donor: Path, stages: Sequence[Stage], params: Params) -> int:
    """How many of ``stages``, from the first, ``donor`` completed with the fingerprints ``params`` give."""
    count = 0
    for stage in stages:
        marker = _read_marker(donor, stage)
        if marker is None or marker.get("params_fingerprint") != stage_fingerprint(stage, params):
            break
        if stage_status(donor, stage, params).run:
            break
        count += 1
    return count


def _study_record(run_dir: Path) -> dict[str, Any]:
    try:
        record = json.loads((run_dir / STUDY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_study_record(run_dir: Path, record: dict[str, Any]) -> None:
    path = run_dir / STUDY_FILE
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    partial.replace(path)


def _donor_label(donor: Path, study_dir: Path) -> str:
    """A donor run's name, prefixed with its study when it belongs to another study."""
    return donor.name if donor.parent == study_dir else f"{donor.parent.name}/{donor.name}"


def reuse_stages(study_dir: Path, run: StudyRun, params: Params, stages: Sequence[Stage],
                 other_studies: Sequence[Path] = ()) -> dict[str, str]:
    """Copy into the run every stage another run completed with the same fingerprint.

    Donors are the study's other runs and the runs of ``other_studies`` (the spec's ``reuse_from``).
    The donor is the run folder sharing the longest leading chain of complete stages (ties: this
    study first, then by name); a donor whose lock is held (a runner at work in it) is passed over. A
    stage the run already has, with the donor's very outputs, is kept. Returns ``{stage id: donor}``
    of the stages copied now.
    """
    run_dir = study_dir / run.name
    reusable = [s for s in stages if s.output_dir is not None]  # the report is per run, and cheap
    best: tuple[int, Optional[Path]] = (0, None)
    candidates = [p for folder in (study_dir, *other_studies) if folder.is_dir()
                  for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    for donor in candidates:
        if donor == run_dir or not (donor / "stages").is_dir() or is_locked(donor):
            continue
        count = _complete_prefix(donor, reusable, params)
        if count > best[0]:
            best = (count, donor)
    count, donor = best
    if donor is None:
        return {}
    copied: dict[str, str] = {}
    with _try_lock(donor) as donor_free, _try_lock(run_dir) as run_free:
        if not (donor_free and run_free):
            return {}
        shutil.rmtree(run_dir / TMP_DIR, ignore_errors=True)  # what a killed copy left (never a stage's output)
        record = _study_record(run_dir)
        record.update({"run": run.name, "setting": run.setting.name, "seed": run.seed})
        reused = record.setdefault("reused", {})
        for stage in reusable[:count]:
            mine = _read_marker(run_dir, stage)
            theirs = _read_marker(donor, stage) or {}
            if (mine is not None and not stage_status(run_dir, stage, params).run
                    and {k: v["sha256"] for k, v in mine.get("outputs", {}).items()}
                    == {k: v["sha256"] for k, v in theirs.get("outputs", {}).items()}):
                continue  # already here, the same outputs
            copy_stage(donor, run_dir, stage)
            label = _donor_label(donor, study_dir)
            copied[stage.id] = label
            reused[stage.id] = {"from": label, "marker_sha256": sha256_file(RunLayout(run_dir).marker(stage.id))}
            print(f"[{stage.id}] {stage.notebook}: reused from {label} (same params and inputs)", flush=True)
        _write_study_record(run_dir, record)
    return copied


def reused_stages(run_dir: Path) -> dict[str, str]:
    """``{stage id: donor run}`` of the stages copied into a run that are still the copies (same marker)."""
    result = {}
    for stage_id, entry in (_study_record(run_dir).get("reused") or {}).items():
        marker = RunLayout(run_dir).marker(stage_id)
        if isinstance(entry, dict) and marker.is_file() and sha256_file(marker) == entry.get("marker_sha256"):
            result[stage_id] = entry.get("from", "?")
    return result


# --- Running ----------------------------------------------------------------------------------------

def run_is_complete(run_dir: Path, params: Params, stages: Sequence[Stage]) -> bool:
    """True when every stage of ``stages`` is complete in ``run_dir`` (the runner would skip them all)."""
    return run_dir.is_dir() and not any(stage_status(run_dir, s, params).run for s in stages)


def study_dir_of(spec: StudySpec, results_root: str | Path) -> Path:
    """``<results_root>/<study name>``."""
    from refine_af_utils.results import run_folder

    return run_folder(results_root, spec.name)


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
        _write_study_record(run_dir, {"run": run.name, "setting": run.setting.name, "seed": run.seed, "reused": {}})
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


def run_study(spec: StudySpec, results_root: str | Path = REPO_ROOT / "results", launcher: str = "local",
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
    executor = _executor(launcher, study_dir / ".submitit", spec)
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


# --- The study report ---------------------------------------------------------------------------------

COMPONENTS = ("reward_model", "understandability", "naturalness", "coherence", "reward")
RUN_FILES = {  # what the report reads, per run, and the stage that writes it
    "metrics/06.json": "06", "eval/overall_ci.csv": "06", "eval/tasks_improved.csv": "06",
    "rl/heldout_summary.csv": "03", "data/reward_by_arm.csv": "04",
}
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


def run_headlines(run_dir: Path) -> dict[str, Any]:
    """One run's headline numbers with their CIs, from the files that exist; ``missing`` names the others."""
    import pandas as pd

    row: dict[str, Any] = {}
    missing = [name for name in RUN_FILES if not (run_dir / name).is_file()]
    done = [s.id for s in STAGES if RunLayout(run_dir).marker(s.id).is_file()]
    row["stages_done"] = f"{done[0]}-{done[-1]}" if done else "none"
    revisions = {str((_read_marker(run_dir, s) or {}).get("code", "not recorded")) for s in STAGES if s.id in done}
    row["code"] = ", ".join(sorted(revisions))  # the package revision(s) its stages were made by
    if (run_dir / "metrics/06.json").is_file():
        metrics = json.loads((run_dir / "metrics/06.json").read_text())
        row["base_rougeL"] = _float(metrics.get("base_rougeL"))
    if (run_dir / "eval/overall_ci.csv").is_file():
        overall = pd.read_csv(run_dir / "eval/overall_ci.csv")
        for model, key in (("self_instruct", "self_instruct"), ("refine_af", "refine_af"),
                           ("refine_af - self_instruct", "rougeL_difference")):
            hit = overall[(overall["model"] == model) & (overall["metric"] == "rougeL")]
            if len(hit):
                name = key if key == "rougeL_difference" else f"{key}_rougeL"
                row[name] = float(hit["mean"].iloc[0])
                row[f"{name}_ci_low"], row[f"{name}_ci_high"] = float(hit["ci_low"].iloc[0]), float(hit["ci_high"].iloc[0])
    if (run_dir / "eval/tasks_improved.csv").is_file():
        improved = pd.read_csv(run_dir / "eval/tasks_improved.csv").set_index("measure")["value"]
        for key in ("tasks", "wins", "ties", "losses", "win_share", "win_share_ci_low", "win_share_ci_high",
                    "sign_test_p", "wilcoxon_p"):
            if key in improved.index:
                row[key] = _float(improved[key])
    if (run_dir / "rl/heldout_summary.csv").is_file():
        summary = pd.read_csv(run_dir / "rl/heldout_summary.csv").set_index("measure")
        for measure in summary.index:
            for column, suffix in (("mean_difference", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high")):
                row[f"heldout_{measure}_gain{suffix}"] = float(summary.loc[measure, column])
    if (run_dir / "data/reward_by_arm.csv").is_file():
        by_arm = pd.read_csv(run_dir / "data/reward_by_arm.csv", index_col=0)
        if {"self_instruct", "refine_af"} <= set(by_arm.columns):
            for component in COMPONENTS:
                if component in by_arm.index:
                    row[f"{component}_change"] = float(by_arm.loc[component, "refine_af"]
                                                       - by_arm.loc[component, "self_instruct"])
    row["missing"] = ", ".join(missing)
    return row


def self_instruct_per_task(run_dir: Path) -> Optional["pd.Series"]:
    """The Self-Instruct arm's mean ROUGE-L per task (``eval/per_task.csv``, else its predictions); None if neither."""
    import pandas as pd

    per_task = run_dir / "eval" / "per_task.csv"
    if per_task.is_file():
        table = pd.read_csv(per_task)
        if {"task", "rougeL_self_instruct"} <= set(table.columns):
            return table.set_index("task")["rougeL_self_instruct"].astype(float)
    predictions = run_dir / "eval" / "predictions_self_instruct.jsonl"
    if predictions.is_file():
        from refine_af_utils.jsonl import read_jsonl

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


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


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
    return {"runs": runs, "settings": settings, "win_share_by_seed": win_share, "aa_control": aa}


def _lookup(runs: "pd.DataFrame", setting: str, seed: int, key: str) -> float:
    """``runs``' ``key`` for one setting and seed (NaN when the column or the run lacks it)."""
    if key not in runs:
        return float("nan")
    hit = runs[(runs["setting"] == setting) & (runs["seed"] == seed)][key]
    return _float(hit.iloc[0]) if len(hit) else float("nan")


def _figures(tables: dict[str, "pd.DataFrame"], differences: list[float], refine_differences: list[float],
             study_dir: Path) -> list[str]:
    """PNG figures beside the tables; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from refine_af_utils.plots import save_figure

    names = []
    runs = tables["runs"]
    panels = [k for k in ("heldout_reward_gain", "rougeL_difference", "win_share") if k in runs and
              pd_notna_any(runs[k])]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
        settings = list(dict.fromkeys(runs["setting"]))
        for ax, key in zip(axes[0], panels):
            for i, setting in enumerate(settings):
                part = runs[runs["setting"] == setting]
                values = part[key].astype(float)
                ax.scatter([i] * len(values), values, color="tab:blue", alpha=0.7, s=18)
                low, high = f"{key}_ci_low", f"{key}_ci_high"
                if low in part and high in part:
                    for value, lo, hi in zip(values, part[low].astype(float), part[high].astype(float)):
                        if math.isfinite(lo) and math.isfinite(hi):
                            ax.plot([i, i], [lo, hi], color="tab:blue", alpha=0.25, linewidth=3)
                if values.notna().any():
                    ax.hlines(values.mean(), i - 0.3, i + 0.3, color="black")
            ax.axhline(0.5 if key == "win_share" else 0.0, color="grey", linestyle=":", linewidth=1)
            ax.set_xticks(range(len(settings)), settings, rotation=45, ha="right")
            ax.set_title(HEADLINES.get(key, key), fontsize=9)
        fig.suptitle("Per setting: each seed (dot, 95% CI bar) and the mean over seeds (line)", fontsize=10)
        save_figure(fig, study_dir / "fig_settings.png")
        names.append("fig_settings.png")
    if differences:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        bins = 20
        ax.hist(differences, bins=bins, alpha=0.6, label="A/A: Self-Instruct arm, seed j - seed i", density=True)
        if refine_differences:
            ax.hist(refine_differences, bins=bins, alpha=0.5, label="REFINE-AF - Self-Instruct (same run)",
                    density=True)
        ax.axvline(0.0, color="grey", linestyle=":")
        ax.set_xlabel("per-task ROUGE-L difference")
        ax.set_ylabel("density")
        ax.set_title("Per-task differences: chance (A/A) against the REFINE-AF effect", fontsize=10)
        ax.legend(fontsize=8)
        save_figure(fig, study_dir / "fig_aa_control.png")
        names.append("fig_aa_control.png")
    return names


def pd_notna_any(series: Any) -> bool:
    """True when a column holds at least one number."""
    import pandas as pd

    return bool(pd.to_numeric(series, errors="coerce").notna().any())


def _refine_differences(spec: StudySpec, study_dir: Path) -> list[float]:
    import pandas as pd

    result: list[float] = []
    for run in spec.runs:
        path = study_dir / run.name / "eval" / "per_task.csv"
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
        table.to_csv(study_dir / f"study_{name}.csv", index=name == "win_share_by_seed")
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
            "`data/reward_by_arm.csv`):", ""]
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
                f"task by task (`eval/per_task.csv`): the same recipe on both sides, so any win is chance. Over "
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
    path = study_dir / "study.md"
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text("\n".join(out) + "\n")
    partial.replace(path)
    return path


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


# --- Command line ------------------------------------------------------------------------------------

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
        folders = [study_dir, *(study_dir.parent / name for name in spec.reuse_from)]
        counts = {_donor_label(d, study_dir): _complete_prefix(d, reusable, params)
                  for folder in folders if folder.is_dir() for d in sorted(folder.iterdir())
                  if d.is_dir() and d != run_dir and (d / "stages").is_dir()}
        if counts and max(counts.values()):
            donor = max(counts, key=lambda k: counts[k])
            shared = [f"{s.id} from {donor}" for s in reusable[: counts[donor]]]
        lines.append(f"{run.name}: run (stages 00-{spec.until}" + (f"; reuses {', '.join(shared)}" if shared else "")
                     + ")")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m refine_af_utils.study", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="study spec YAML, e.g. params/studies/reward_ablation.yaml")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="local: in this process, run after run (default); slurm: one submitit job per run; "
                             "submitit-local: the slurm code path with submitit's local executor (no Slurm)")
    parser.add_argument("--results-root", default=str(REPO_ROOT / "results"), help="the study goes in ROOT/<name>/")
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
    print(f"report: {study_dir / 'study.md'}")
    if failures:
        print(f"{len(failures)} run(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failures.items()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
