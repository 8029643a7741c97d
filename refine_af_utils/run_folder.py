"""The run folder's mechanics: where a run lives, what a stage opens, its config check and metrics.

A stage's entry point starts with :func:`open_stage` (its folder, its file names, the config check,
its metrics record and its seeds, found from the registry by the stage's module, so no stage spells
its own id); the runner and the stage entry points share one command line (:func:`add_run_arguments`).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from refine_af_utils.errors import StageConfigError
from refine_af_utils.files import atomic_write_text
from refine_af_utils.layout import CONFIG_FILE, RESOLVED_PARAMS, RunLayout, Stage, stage_config, stage_of_module

if TYPE_CHECKING:
    import argparse

    from refine_af_utils.params import Params

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout: the package, the notebooks, results/
DEFAULT_RESULTS_ROOT = REPO_ROOT / "results"


def record_metrics(run_dir: str | Path, stage: str, metrics: dict[str, Any]) -> Path:
    """Write a stage's headline numbers to ``<run_dir>/metrics/<stage>.json`` (whole or absent)."""
    return atomic_write_text(RunLayout(run_dir).metrics(stage), json.dumps(metrics, indent=2, sort_keys=True) + "\n")


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
    corrected run.
    """
    path = Path(out_dir) / CONFIG_FILE
    config = json.loads(json.dumps(config, sort_keys=True))
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(config) if before.get(k) != config.get(k))
        if changed:
            raise StageConfigError(
                f"{out_dir} was made with other settings ({', '.join(changed)} differ); "
                "rerun the stage with --force to start it again"
            )
    else:  # whole or absent: processes under accelerate never read a half-written file
        atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


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


def stage_command_line(description: str, argv: Optional[Sequence[str]] = None) -> tuple[Any, Path]:
    """Parse a stage entry point's command line (:func:`add_run_arguments`); return (params, run_dir).

    ``--set`` works as on the runner (dotted keys, YAML values, checked by the schema); the resolved
    params are written to ``<run_dir>/params.yaml``.
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
    write_resolved_params(run_dir, params, f"Resolved params of run '{params.run_name}', written by a stage "
                                           f"entry point: {args.params}{sets}")
    return params, run_dir


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

    def file(self, name: str, **fields: Any) -> Path:
        """One of the stage's files by its name in ``layout.STAGE_FILES``."""
        return self.layout.file(self.stage.id, name, **fields)

    def check_config(self, **extra: Any) -> None:
        """Refuse to continue a folder made with other settings (:func:`check_stage_config`): the stage's
        params chain plus ``extra`` (e.g. the sha256 of an upstream model). Call it after the inputs are checked."""
        check_stage_config(self.folder, {**stage_config(self.stage, self.params), **extra})

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
