"""Reuse of stages shared between runs: a stage another run completed with the same fingerprint is copied.

Each copy goes through a temporary name and a rename, the marker last, so a copy cut off by a kill
never looks complete. ``<run>/.study.json`` records which stages were copied from which run. What is
copied, the markers, the status and the locks are :mod:`refine_af_utils.run_folder`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from refine_af_utils.errors import RunLockedError
from refine_af_utils.files import atomic_write_text, partial_path, sha256_file
from refine_af_utils.layout import STUDY_FILE, RunLayout, Stage, stage_fingerprint
from refine_af_utils.layout import STUDY_TMP_DIR as TMP_DIR  # per run: copies in progress, renamed into place
from refine_af_utils.params import Params
from refine_af_utils.locking import is_locked, run_lock
from refine_af_utils.run_folder import is_transient, read_marker, sha_map, stage_status
from refine_af_utils.study.spec import StudyRun


def _copy_ignore(folder: str, names: list[str]) -> set[str]:
    """What is never copied: the output rule's transient names (checkpoints, half-written, hidden files);
    caches are copied (their entries are keyed by content)."""
    return {name for name in names if is_transient(name)}


def _replace_file(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` (metadata kept) through ``<target>.<pid>.partial`` and a rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(target)
    shutil.copy2(source, partial)
    os.replace(partial, target)


def copy_stage(donor: Path, run_dir: Path, stage: Stage) -> None:
    """Copy one complete stage from run ``donor`` into ``run_dir`` (both locked by the caller).

    The run's marker goes first, then the stage's folder is copied to a temporary folder and
    renamed into place, then its metrics and executed notebook, and the donor's marker last: a
    kill at any moment leaves the stage without a marker (the runner reruns it, or the study copies
    it again). Modification times are kept, so the marker's recorded sizes and times still match.
    """
    if stage.output_dir is None:
        raise ValueError(f"stage {stage.id} writes into the run folder itself and is never copied")
    source, layout = RunLayout(donor), RunLayout(run_dir)
    tmp = partial_path(run_dir / TMP_DIR / stage.id)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    layout.marker(stage.id).unlink(missing_ok=True)
    shutil.copytree(donor / stage.output_dir, tmp / stage.output_dir, ignore=_copy_ignore, copy_function=shutil.copy2)
    target = run_dir / stage.output_dir
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp / stage.output_dir, target)
    if source.metrics(stage.id).is_file():
        _replace_file(source.metrics(stage.id), layout.metrics(stage.id))
    else:
        layout.metrics(stage.id).unlink(missing_ok=True)
    if (source.notebooks / stage.notebook).is_file():
        _replace_file(source.notebooks / stage.notebook, layout.notebooks / stage.notebook)
    _replace_file(source.marker(stage.id), layout.marker(stage.id))
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _try_lock(run_dir: Path) -> Iterator[bool]:
    """Hold ``run_dir``'s runner lock when free (yield True); yield False when another process holds it."""
    try:
        with run_lock(run_dir):
            yield True
    except RunLockedError:
        yield False


def complete_prefix(donor: Path, stages: Sequence[Stage], params: Params) -> int:
    """How many of ``stages``, from the first, ``donor`` completed with the fingerprints ``params`` give."""
    count = 0
    for stage in stages:
        marker = read_marker(donor, stage)
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


def write_study_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Write ``<run_dir>/.study.json`` (the run's setting, seed and copied stages) whole, through a rename."""
    atomic_write_text(run_dir / STUDY_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")


def donor_runs(study_dir: Path, run_dir: Path, other_studies: Sequence[Path] = ()) -> list[Path]:
    """The run folders that may donate stages to ``run_dir``: the other runs with markers of the study,
    then of ``other_studies``, each by name."""
    return [p for folder in (study_dir, *other_studies) if folder.is_dir() for p in sorted(folder.iterdir())
            if p.is_dir() and p != run_dir and not p.name.startswith(".") and RunLayout(p).markers.is_dir()]


def donor_label(donor: Path, study_dir: Path) -> str:
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
    for donor in donor_runs(study_dir, run_dir, other_studies):
        if is_locked(donor):
            continue
        count = complete_prefix(donor, reusable, params)
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
            mine = read_marker(run_dir, stage)
            theirs = read_marker(donor, stage) or {}
            if (mine is not None and not stage_status(run_dir, stage, params).run
                    and sha_map(mine.get("outputs", {})) == sha_map(theirs.get("outputs", {}))):
                continue  # already here, the same outputs
            copy_stage(donor, run_dir, stage)
            label = donor_label(donor, study_dir)
            copied[stage.id] = label
            reused[stage.id] = {"from": label, "marker_sha256": sha256_file(RunLayout(run_dir).marker(stage.id))}
            print(f"[{stage.id}] {stage.notebook}: reused from {label} (same params and inputs)", flush=True)
        write_study_record(run_dir, record)
    return copied


def reused_stages(run_dir: Path) -> dict[str, str]:
    """``{stage id: donor run}`` of the stages copied into a run that are still the copies (same marker)."""
    result = {}
    for stage_id, entry in (_study_record(run_dir).get("reused") or {}).items():
        marker = RunLayout(run_dir).marker(stage_id)
        if isinstance(entry, dict) and marker.is_file() and sha256_file(marker) == entry.get("marker_sha256"):
            result[stage_id] = entry.get("from", "?")
    return result


def run_is_complete(run_dir: Path, params: Params, stages: Sequence[Stage]) -> bool:
    """True when every stage of ``stages`` is complete in ``run_dir`` (the runner would skip them all)."""
    return run_dir.is_dir() and not any(stage_status(run_dir, s, params).run for s in stages)

