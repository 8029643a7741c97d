"""Where a run's outputs live, and the per-stage metrics the tests and the report read."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Optional, Sequence

from refine_af_utils.errors import StageConfigError


def stage_dir(run_dir: str | Path, name: str) -> Path:
    """``<run_dir>/<name>``, created if missing."""
    path = Path(run_dir) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def record_metrics(run_dir: str | Path, stage: str, metrics: dict[str, Any]) -> Path:
    """Write a stage's headline numbers to ``<run_dir>/metrics/<stage>.json``."""
    path = stage_dir(run_dir, "metrics") / f"{stage}.json"
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return path


def read_metrics(run_dir: str | Path, stage: str) -> dict[str, Any]:
    """The metrics a stage recorded (see :func:`record_metrics`)."""
    return json.loads((Path(run_dir) / "metrics" / f"{stage}.json").read_text())


def cache_dir() -> Path:
    """The cache folder for prepared models and downloads: ``$REFINE_AF_CACHE`` or ``~/.cache/refine-af``."""
    return Path(os.environ.get("REFINE_AF_CACHE", Path.home() / ".cache" / "refine-af"))


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
    corrected run.
    """
    path = Path(out_dir) / "config.json"
    config = json.loads(json.dumps(config, sort_keys=True))
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(config) if before.get(k) != config.get(k))
        if changed:
            raise StageConfigError(
                f"{out_dir} was made with other settings ({', '.join(changed)} differ); "
                "rerun the stage with --force to start it again"
            )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        # write-then-rename: processes under accelerate never read a half-written file
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        partial.replace(path)


RESOLVED_PARAMS = "params.yaml"


def write_resolved_params(run_dir: str | Path, params: Any, header: str = "") -> Path:
    """Write the run's resolved params (no ``extends``, every key) to ``<run_dir>/params.yaml``; return it.

    Written then renamed, so a reader (a notebook, another process under accelerate) never sees half a file.
    """
    from refine_af_utils.params import params_yaml

    path = Path(run_dir) / RESOLVED_PARAMS
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(params_yaml(params, header))
    partial.replace(path)
    return path


def stage_command_line(description: str, argv: Optional[Sequence[str]] = None) -> tuple[Any, Path]:
    """Parse ``PARAMS [--set KEY=VALUE ...] [--results-root DIR]`` for a stage's own entry point.

    Returns (params, run_dir). ``--set`` works as on the runner (dotted keys, YAML values, checked by
    the schema); the resolved params are written to ``<run_dir>/params.yaml``.
    """
    import argparse

    from refine_af_utils.environment import resolve_dtypes
    from refine_af_utils.errors import RefineAFError
    from refine_af_utils.params import load_params, parse_overrides

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("params", help="params YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params key (dotted, e.g. rl.updates=800; the value is read as YAML); "
                             "repeatable")
    parser.add_argument("--results-root", default="results", help="where run folders go")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
        params = resolve_dtypes(load_params(args.params, overrides=overrides))
        run_dir = run_folder(args.results_root, params.run_name)
    except RefineAFError as error:
        parser.exit(2, f"error: {error}\n")
    sets = "".join(f" --set {key}={json.dumps(value)}" for key, value in overrides.items())
    write_resolved_params(run_dir, params, f"Resolved params of run '{params.run_name}', written by a stage "
                                           f"entry point: {args.params}{sets}")
    return params, run_dir


def code_revision() -> str:
    """The package's git commit (``<sha>``, ``<sha>-dirty`` with uncommitted changes) or, outside a git
    checkout, its installed version (``refine-af <version>``); recorded in every stage marker."""
    root = Path(__file__).resolve().parents[1]  # the checkout: the package and the notebooks the runner executes
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


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
