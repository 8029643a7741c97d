"""Copying complete stages between run folders: a stage another run completed with the same settings.

Used by studies (:mod:`refine_af_utils.study.reuse`, across a study's runs) and by the runner (a derived
run that ``--set`` makes from a finished one). Each copy goes through a temporary folder and a rename,
the marker last, so a copy cut off by a kill never looks complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

from refine_af_utils.files import partial_path
from refine_af_utils.layout import STUDY_TMP_DIR as TMP_DIR  # per run: copies in progress, renamed into place
from refine_af_utils.layout import RunLayout, Stage, stage_fingerprint
from refine_af_utils.params import Params
from refine_af_utils.run_folder import is_transient, read_marker, stage_status

__all__ = ["TMP_DIR", "complete_prefix", "copy_stage"]


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
