"""Run the pipeline's notebooks in order with papermill.

    python -m refine_af_utils.run params/default.yaml [--only 01] [--from 01] [--force]

Each notebook gets ``params_path`` and ``run_dir`` injected into its ``parameters`` cell
and is saved, executed, to ``<run_dir>/notebooks/``. A stage that finished with the same
params is skipped (its marker is ``<run_dir>/stages/<stage>.json``, which also records
its wall time) unless ``--force``, which also deletes the stage's outputs first.

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
from typing import Iterator, Optional, Sequence

from refine_af_utils.errors import RefineAFError, RunLockedError, project_error_names
from refine_af_utils.params import Params, load_params
from refine_af_utils.results import run_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"


@dataclass(frozen=True)
class Stage:
    """One notebook of the pipeline and the folder of ``run_dir`` it writes."""

    id: str
    notebook: str
    output_dir: Optional[str]  # None: the stage rewrites its files in place (the report)
    title: str
    sections: tuple[str, ...] = ()  # the params keys it reads beyond those of the stages before it


STAGES = [
    Stage("00", "00_seed_tasks.ipynb", "seeds", "seed tasks", ("seed_tasks",)),
    Stage("01", "01_instruction_generation.ipynb", "instructions", "instruction generation",
          ("model", "random_seed", "num_instructions", "instruction_generation", "classification")),
    Stage("02", "02_reward_analysis.ipynb", "reward_analysis", "reward analysis",
          ("instance_generation", "reward", "reward_analysis")),
    Stage("03", "03_ppo_training.ipynb", "rl", "RL training", ("rl",)),
    Stage("04", "04_instance_generation.ipynb", "data", "instance generation (both arms)"),
    Stage("05", "05_sft.ipynb", "sft", "SFT (both arms)", ("sft",)),
    Stage("06", "06_superni_evaluation.ipynb", "eval", "Super-NI evaluation", ("evaluation",)),
    Stage("07", "07_paper_tables.ipynb", None, "report"),
]


def stage_fingerprint(stage: Stage, params: Params) -> str:
    """A hash of the params a stage depends on: its own sections and every earlier stage's.

    The pipeline is a chain, so a change to one stage's keys reruns it and the stages after
    it, never the ones before (an evaluation-only change reruns stage 6 and the report).
    """
    upto = STAGES[: STAGES.index(stage) + 1]
    return params.fingerprint(*[section for s in upto for section in s.sections])


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


def _marker(run_dir: Path, stage: Stage) -> Path:
    return run_dir / "stages" / f"{stage.id}.json"


def stage_is_complete(run_dir: Path, stage: Stage, params: Params) -> bool:
    """True when the stage finished before with the same params."""
    marker = _marker(run_dir, stage)
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()).get("params_fingerprint") == stage_fingerprint(stage, params)


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


def run_stage(stage: Stage, params_path: Path, run_dir: Path, params: Params, force: bool = False) -> float:
    """Execute one notebook with papermill; return its wall time in seconds.

    A project error inside the notebook becomes a :class:`StageError` with one line and the
    executed notebook's path; any other error propagates with its traceback.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from refine_af_utils.notebook import kernel_config

    if force:
        if stage.output_dir is not None:
            shutil.rmtree(run_dir / stage.output_dir, ignore_errors=True)
        _marker(run_dir, stage).unlink(missing_ok=True)
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
    marker = _marker(run_dir, stage)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({
        "stage": stage.id,
        "notebook": stage.notebook,
        "params_fingerprint": stage_fingerprint(stage, params),
        "seconds": seconds,
    }, indent=2) + "\n")
    return seconds


def run_pipeline(
    params_path: str | Path, only: Optional[str] = None, start: Optional[str] = None,
    force: bool = False, results_root: str | Path = REPO_ROOT / "results",
) -> Path:
    """Run the selected stages for a params file; return the run directory."""
    params_path = Path(params_path)
    params = load_params(params_path)
    run_dir = run_folder(results_root, params.run_name)
    stages = select_stages(only, start)
    with run_lock(run_dir):
        for stage in stages:
            if not force and stage_is_complete(run_dir, stage, params):
                print(f"[{stage.id}] {stage.notebook}: complete, skipped (--force reruns it)", flush=True)
                continue
            print(f"[{stage.id}] {stage.notebook}: running", flush=True)
            seconds = run_stage(stage, params_path, run_dir, params, force=force)
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
    parser.add_argument("--results-root", default=str(REPO_ROOT / "results"), help="where run folders go")
    args = parser.parse_args(argv)
    try:
        run_dir = run_pipeline(args.params, args.only, args.start, args.force, args.results_root)
    except StageError as error:
        print(error, file=sys.stderr)
        return 1
    except RefineAFError as error:  # bad params, unsafe run name, run locked by another runner
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"results in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
