"""Where a run's outputs live, and the per-stage metrics the tests and the report read."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence


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


def check_stage_config(out_dir: str | Path, config: dict[str, Any]) -> None:
    """Refuse to resume a stage whose outputs were made with other settings.

    The first run writes ``config.json`` into the stage folder; a later run whose ``config``
    differs stops with the keys that changed (rerun the stage with ``--force`` to start over).
    """
    path = Path(out_dir) / "config.json"
    config = json.loads(json.dumps(config, sort_keys=True))
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(config) if before.get(k) != config.get(k))
        if changed:
            raise RuntimeError(
                f"{out_dir} was made with other settings ({', '.join(changed)} differ); "
                "rerun the stage with --force to start it again"
            )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        # write-then-rename: processes under accelerate never read a half-written file
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        partial.replace(path)


def stage_command_line(description: str, argv: Optional[Sequence[str]] = None) -> tuple[Any, Path]:
    """Parse ``PARAMS [--results-root DIR]`` for a stage's own entry point; return (params, run_dir)."""
    import argparse

    from refine_af_utils.params import load_params

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("params", help="params YAML file")
    parser.add_argument("--results-root", default="results", help="where run folders go")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    return params, Path(args.results_root) / params.run_name
