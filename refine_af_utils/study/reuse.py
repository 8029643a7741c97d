"""Reuse of stages shared between runs: a stage another run completed with the same fingerprint is copied.

Each copy goes through a temporary name and a rename, the marker last, so a copy cut off by a kill
never looks complete. ``<run>/.study.json`` records which stages were copied from which run. What is
copied, the markers, the status and the locks are :mod:`refine_af_utils.run_folder`'s.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from refine_af_utils.errors import RunLockedError
from refine_af_utils.files import atomic_write_text, sha256_file
from refine_af_utils.layout import STUDY_FILE, RunLayout, Stage
from refine_af_utils.params import Params
from refine_af_utils.locking import is_locked, run_lock
from refine_af_utils.run_copy import TMP_DIR, complete_prefix, copy_stage
from refine_af_utils.run_folder import read_marker, sha_map, stage_status
from refine_af_utils.study.spec import StudyRun


@contextlib.contextmanager
def _try_lock(run_dir: Path) -> Iterator[bool]:
    """Hold ``run_dir``'s runner lock when free (yield True); yield False when another process holds it."""
    try:
        with run_lock(run_dir):
            yield True
    except RunLockedError:
        yield False


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

