"""Helpers for the stage notebooks when a person opens them, and the kernel settings of the runner.

The ``parameters`` cell of every notebook takes its defaults from :func:`default_params_path` and
:func:`default_run_dir`, which resolve against the repository (not the folder Jupyter started in) and
read ``$REFINE_AF_PARAMS`` and ``$REFINE_AF_RUN_DIR`` when set. The cell after it calls
:func:`prepare_stage`, which checks that the earlier stages have finished and otherwise stops with a
short message naming the command that produces their outputs, instead of a traceback.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from refine_af_utils.errors import RefineAFError
from refine_af_utils.run_folder import REPO_ROOT
PARAMS_ENV = "REFINE_AF_PARAMS"
RUN_DIR_ENV = "REFINE_AF_RUN_DIR"
DEFAULT_PARAMS = "params/default.yaml"


class StageNotReady(RefineAFError, RuntimeError):
    """A stage notebook opened before its inputs exist; shown in Jupyter as its message, no traceback."""

    def _render_traceback_(self) -> list[str]:  # IPython shows these lines instead of a traceback
        return str(self).splitlines()


def _in_repo(path: str | os.PathLike) -> Path:
    """An absolute path: relative paths are taken from the repository root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def _shown(path: Path) -> str:
    """A path as a command line inside the repository writes it (relative when it is inside)."""
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def default_params_path() -> str:
    """``$REFINE_AF_PARAMS`` or ``params/default.yaml``, as an absolute path (relative ones from the repository)."""
    return str(_in_repo(os.environ.get(PARAMS_ENV) or DEFAULT_PARAMS))


def default_run_dir(params_path: str | os.PathLike | None = None) -> str:
    """``$REFINE_AF_RUN_DIR``, or ``results/<run_name>`` in the repository for the params file (never raises)."""
    if os.environ.get(RUN_DIR_ENV):
        return str(_in_repo(os.environ[RUN_DIR_ENV]))
    return str(REPO_ROOT / "results" / _run_name(_in_repo(params_path or default_params_path())))


def _run_name(params_path: Path) -> str:
    """The params file's ``run_name`` (its file name when unreadable: prepare_stage reports that)."""
    try:
        from refine_af_utils.params import load_params

        return load_params(params_path).run_name  # follows extends:
    except Exception:  # a default must never raise: the parameters cell of every notebook calls this
        pass
    try:
        import yaml

        data = yaml.safe_load(params_path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return params_path.stem
    if isinstance(data, dict) and isinstance(data.get("run_name"), str):
        return data["run_name"]
    return params_path.stem


def _run_command(params_path: Path, run_dir: Path, stage_id: str) -> str:
    command = f"python -m refine_af_utils.run {_shown(params_path)} --only {stage_id}"
    if run_dir.parent != REPO_ROOT / "results":
        command += f" --results-root {_shown(run_dir.parent)}"
    return command


def prepare_stage(stage_id: str, params_path: str | os.PathLike, run_dir: str | os.PathLike) -> tuple[str, str]:
    """Resolve a notebook's parameters against the repository and check that its inputs exist.

    Returns ``(params_path, run_dir)`` as absolute paths and makes the repository root the working
    directory (relative paths inside params files then mean what they mean to the runner). Raises
    :class:`StageNotReady` when the params file is missing or an earlier stage has not finished (its
    ``metrics/<stage>.json`` is missing); the message says which command produces it.
    """
    from refine_af_utils.layout import STAGES, RunLayout

    ids = [stage.id for stage in STAGES]
    if stage_id not in ids:
        raise ValueError(f"unknown stage '{stage_id}' (stages: {', '.join(ids)})")
    params = _in_repo(params_path)
    run = _in_repo(run_dir)
    if not params.is_file():
        raise StageNotReady(
            f"{params}: params file not found. Set params_path in the parameters cell (or ${PARAMS_ENV}) "
            f"to a file in params/, e.g. {DEFAULT_PARAMS}.")
    os.chdir(REPO_ROOT)
    missing = [stage for stage in STAGES[:ids.index(stage_id)] if not RunLayout(run).metrics(stage.id).is_file()]
    if missing:
        this = STAGES[ids.index(stage_id)]
        first = missing[0]
        commands = "\n".join(f"    {_run_command(params, run, stage.id)}" for stage in missing)
        raise StageNotReady(
            f"Stage {this.id} ({this.title}) needs the outputs of stage {first.id} ({first.title}), "
            f"which are not in {run} yet.\n"
            f"Run {'stage ' + first.id if len(missing) == 1 else 'stages ' + ', '.join(s.id for s in missing)} "
            f"first, from the repository root ({REPO_ROOT}):\n{commands}\n"
            f"or open notebooks/{first.notebook} and run it; then run this notebook again."
            + ("" if run.name == _run_name(params) else
               f"\n(The runner writes to a folder named after run_name '{_run_name(params)}', not '{run.name}'.)"))
    return str(params), str(run)


def kernel_config() -> Any:
    """Kernel settings for papermill: IPC transport (local sockets) instead of unencrypted TCP.

    ipykernel warns "Kernel is running over TCP without encryption" for TCP kernels; over IPC there is
    nothing to warn about. Unix socket paths are limited to about 100 characters, so a runtime folder
    with a long path keeps TCP.
    """
    import uuid

    from jupyter_core.paths import jupyter_runtime_dir
    from traitlets.config import Config

    config = Config()
    runtime = Path(jupyter_runtime_dir())
    # <runtime>/kernel-<uuid>-ipc-<port>: an absolute prefix (a relative one would follow the kernel's
    # working directory, not the client's); unix socket paths are limited to 107 bytes
    if len(str(runtime)) + 50 < 100:
        runtime.mkdir(parents=True, exist_ok=True)
        config.KernelManager.transport = "ipc"
        config.KernelManager.ip = str(runtime / f"kernel-{uuid.uuid4()}-ipc")
    return config


# `![caption](fig_x.png)`: an image link of the report, relative to the report's folder.
_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")


def show_markdown(path: str | os.PathLike) -> None:
    """Display a Markdown file (``report.md``) with its relative PNG links shown as images.

    ``IPython.display.Markdown(filename=...)`` leaves ``![..](fig_x.png)`` relative, and JupyterLab resolves
    it against the notebook's folder, not the file's: every figure 404s. Here the text between images is
    displayed as Markdown and each image as a PNG output, which JupyterLab, the executed notebook and
    any notebook viewer show without a server. A link to a missing PNG is left as written.
    """
    from IPython.display import Image, Markdown, display

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    start = 0
    for match in _IMAGE_LINK.finditer(text):
        image = path.parent / match.group(2)
        if not image.is_file():
            continue
        if text[start:match.start()].strip():
            display(Markdown(text[start:match.start()]))
        display(Image(filename=str(image)))
        start = match.end()
    if text[start:].strip():
        display(Markdown(text[start:]))


# `make lab` passes this to Jupyter (--ContentsManager.pre_save_hook); tests/test_browser.py too.
PRE_SAVE_HOOK = "refine_af_utils.notebook.keep_committed_notebooks_clean"


def keep_committed_notebooks_clean(model: dict[str, Any], path: str, contents_manager: Any = None,
                                   **_: Any) -> None:
    """Jupyter pre-save hook: a notebook under ``notebooks/`` is saved without outputs (nbstripout's rule).

    Exploring in ``make lab`` (Run All, autosave, Ctrl+S) then never dirties the committed notebooks:
    outputs stay in the browser and in the runner's executed copies under ``results/<run>/notebooks/``.
    When only outputs changed, the file on disk is written back as it was (byte for byte).
    """
    import nbformat
    from nbstripout import strip_output

    on_disk = (Path(getattr(contents_manager, "root_dir", REPO_ROOT)) / path.strip("/")).resolve()
    if model.get("type") != "notebook" or on_disk.parent != (REPO_ROOT / "notebooks").resolve():
        return
    notebook = strip_output(nbformat.from_dict(model["content"]), keep_output=False, keep_count=False,
                            keep_id=True, extra_keys=["metadata.widgets"])
    if on_disk.is_file():
        committed = nbformat.read(on_disk, as_version=4)
        if [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in notebook.cells]:
            notebook = committed
    model["content"] = notebook


def _plain(value: Any) -> Any:
    """A whole number as an int (``36``, not ``36.000``); anything else as it is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def as_table(values: Any, name: str = "value") -> Any:
    """A mapping (a dict, a Series, a params dataclass; nested sections as dotted keys) or a DataFrame as a
    table whose whole numbers show as integers, for a notebook cell."""
    import dataclasses

    import pandas as pd

    if isinstance(values, pd.DataFrame):
        return pd.DataFrame({column: pd.Series([_plain(v) for v in values[column]], index=values.index, dtype=object)
                             for column in values.columns})
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        values = dataclasses.asdict(values)

    def flat(mapping: Any, prefix: str = "") -> dict[str, Any]:
        rows: dict[str, Any] = {}
        for key, value in mapping.items():
            if isinstance(value, dict) and value:
                rows.update(flat(value, f"{prefix}{key}."))
            else:
                rows[f"{prefix}{key}"] = value if not isinstance(value, (list, tuple)) else ", ".join(map(str, value))
        return rows

    rows = flat(values)
    return pd.DataFrame({name: pd.Series([_plain(v) for v in rows.values()], index=list(rows), dtype=object)})
