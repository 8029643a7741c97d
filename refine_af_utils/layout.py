"""The stage registry and the run layout: the one place that names stages and artefact paths.

Every stage module, the runner, the study runner and the report find a run's files through
:class:`RunLayout`, and the stages through :data:`STAGES`. Stage modules do not import each
other; they read what an earlier stage wrote through the layout's readers.

    <run_dir>/
      params.yaml               the resolved params (the runner's)
      .lock                     one runner per run folder (the runner's)
      stages/<id>.json          completion markers (the runner's)
      notebooks/<id>_*.ipynb    executed notebooks (the runner's)
      metrics/<id>.json         each stage's headline numbers
      seed_tasks/               00: seed_tasks.jsonl, seed_summary.csv
      instruction_generation/   01: instructions.jsonl, batches.jsonl, filter_counts.csv, figures
      reward_analysis/          02: candidates.jsonl, scores.csv, cache/ (the score cache, shared by 03 and 04)
      rl_training/              03: prompts.jsonl, metrics.csv, checkpoints/, adapter/, heldout_*.{jsonl,csv}
      instance_generation/      04: raw_<arm>.jsonl, <arm>.jsonl, per_instruction.csv, arm_comparison.csv
      sft/                      05: <arm>/model/, <arm>/complete, loss.csv, summary.csv
      superni_evaluation/       06: predictions_<model>.jsonl, per_task.csv, statistics CSVs
      report.md, table_*.csv, fig_*.png   07
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from refine_af_utils.params import Params
    from refine_af_utils.seeds import SeedTask

ARMS = ("self_instruct", "refine_af")  # stage 4's two datasets: the untrained and the RL-trained generator
MODELS = ("base", *ARMS)  # stage 6's models: the backbone, then its SFT on each arm's dataset


@dataclass(frozen=True)
class Stage:
    """One stage. Its stem names it everywhere: the notebook ``<id>_<stem>.ipynb``, the module
    ``refine_af_utils.stages.<stem>`` (whose ``run(params, run_dir)`` the notebook calls), the folder
    ``<run_dir>/<stem>/`` it writes and its test ``tests/test_<stem>.py``."""

    id: str
    stem: str
    title: str
    sections: tuple[str, ...] = ()  # the params keys it reads beyond those of the stages before it
    resumable: tuple[str, ...] = ()  # dotted keys that may change while the stage continues its folder
    own_folder: bool = True  # False: it writes at the top of the run folder (the report)
    headline: tuple[str, ...] = ()  # keys of its metrics/<id>.json the runner prints when it ends

    @property
    def notebook(self) -> str:
        return f"{self.id}_{self.stem}.ipynb"

    @property
    def module(self) -> str:
        """The module's full name, ``refine_af_utils.stages.<stem>``."""
        return f"refine_af_utils.stages.{self.stem}"

    @property
    def output_dir(self) -> Optional[str]:
        """The folder of ``run_dir`` it writes (None for the report, which writes at the top)."""
        return self.stem if self.own_folder else None


STAGES = [
    Stage("00", "seed_tasks", "seed tasks", ("seed_tasks",), headline=("tasks", "classification tasks")),
    Stage("01", "instruction_generation", "instruction generation",
          ("model", "random_seed", "num_instructions", "instruction_generation", "classification"),
          resumable=("num_instructions",),  # more instructions later: the bootstrap continues
          headline=("instructions", "count_candidates", "tokens_per_second")),
    Stage("02", "reward_analysis", "reward analysis", ("instance_generation", "reward", "reward_analysis"),
          headline=("instances", "mean_reward")),
    Stage("03", "rl_training", "RL training", ("rl",),
          resumable=("rl.updates", "rl.checkpoint_every"),  # more updates later: training continues
          headline=("updates", "heldout_reward_gain", "last_kl")),
    Stage("04", "instance_generation", "instance generation (both arms)",
          headline=("self_instruct_instances", "refine_af_instances", "reward_all_instructions_difference")),
    Stage("05", "sft", "SFT (both arms)", ("sft",), headline=("self_instruct_last_loss", "refine_af_last_loss")),
    Stage("06", "superni_evaluation", "Super-NI evaluation", ("evaluation",),
          headline=("wins", "ties", "losses", "self_instruct_rougeL", "refine_af_rougeL")),
    Stage("07", "report", "report", own_folder=False, headline=("tables", "figures")),
]
STAGE = {stage.id: stage for stage in STAGES}

# Inside one SFT output folder (stage 5's <arm>/, or any folder sft.fine_tune writes); transformers writes
# a checkpoint's trainer state last, so a checkpoint without it was cut short.
SFT_MODEL, SFT_LOSS, SFT_COMPLETE, TRAINER_STATE = "model", "loss.csv", "complete", "trainer_state.json"
# Every file a stage writes into its folder, by name; ``{arm}``, ``{model}`` and ``{name}`` are filled
# in by the caller (:meth:`RunLayout.file`). Writers and readers (the stage, later stages, the report,
# the study, compare) all find files here; a structure test refuses file-name literals elsewhere.
STAGE_FILES: dict[str, dict[str, str]] = {
    "00": {"seed_tasks": "seed_tasks.jsonl", "summary": "seed_summary.csv"},
    "01": {"instructions": "instructions.jsonl", "batches": "batches.jsonl", "table": "instructions.csv",
           "filter_counts": "filter_counts.csv", "fig_filter_counts": "filter_counts.png",
           "fig_novelty": "novelty_rouge_l.png", "fig_lengths": "instruction_lengths.png"},
    "02": {"candidates": "candidates.jsonl", "scores": "scores.csv", "filter_counts": "filter_counts.csv",
           "correlations": "correlations.csv", "reward_by_type": "reward_by_type.csv",
           "best_examples": "best_examples.csv", "worst_examples": "worst_examples.csv", "score_cache": "cache",
           "fig_components": "component_histograms.png", "fig_correlations": "component_correlations.png",
           "fig_reward": "reward_distribution.png"},
    "03": {"prompts": "prompts.jsonl", "metrics": "metrics.csv", "checkpoints": "checkpoints", "adapter": "adapter",
           "heldout_samples": "heldout_samples.jsonl", "heldout_eval": "heldout_eval.csv",
           "heldout_summary": "heldout_summary.csv", "fig_heldout": "heldout_gain.png",
           "fig_reward_kl": "reward_kl.png", "fig_components": "components.png", "reward_probe": "reward_probe.csv"},
    "04": {"raw": "raw_{arm}.jsonl", "dataset": "{arm}.jsonl", "statistics": "dataset_statistics.csv",
           "reward_by_arm": "reward_by_arm.csv", "per_instruction": "per_instruction.csv",
           "arm_comparison": "arm_comparison.csv", "fig_rewards": "reward_by_arm.png",
           "fig_comparison": "arm_comparison.png", "fig_yield": "yield.png", "fig_lengths": "lengths.png"},
    "05": {"arm": "{arm}", "model": f"{{arm}}/{SFT_MODEL}", "complete": f"{{arm}}/{SFT_COMPLETE}",
           "arm_loss": f"{{arm}}/{SFT_LOSS}",
           "loss": "loss.csv", "summary": "summary.csv", "fig_loss": "loss.png"},
    "06": {"predictions": "predictions_{model}.jsonl", "per_task": "per_task.csv", "per_category": "per_category.csv",
           "overall": "overall.csv", "task_comparison": "task_comparison.csv", "overall_ci": "overall_ci.csv",
           "task_stats": "task_stats.csv", "per_category_ci": "per_category_ci.csv",
           "tasks_improved": "tasks_improved.csv", "figure": "{name}.png"},
}
# Stage 1 bootstraps into any folder (tests use a temporary one): its two append-only files by name.
INSTRUCTIONS_FILE, BATCHES_FILE = STAGE_FILES["01"]["instructions"], STAGE_FILES["01"]["batches"]
# A study folder (results/<study>/) holds one run folder per setting and seed, and the study's report.
STUDY_REPORT, STUDY_TABLE, STUDY_FIGURE = "study.md", "study_{name}.csv", "fig_{name}.png"
CONFIG_FILE = "config.json"  # in every stage folder: the settings it was made with (run_folder.check_stage_config)
RESOLVED_PARAMS = "params.yaml"  # at the top of a run folder: the params it runs with, every key resolved
EXPORT_DIR = "datasets"  # at the top of a run folder: both arms as Hugging Face dataset folders (export.py)
EXPORT_DATA, EXPORT_CARD = "data/train.jsonl", "README.md"  # in each exported arm's folder
LOCK_FILE = ".lock"  # at the top of a run (or study) folder: one runner at a time (locking.run_lock)
# A study's own files, hidden (never a stage's output): per run, its setting, seed and the stages copied from
# other runs, and the copies in progress; in the study folder, the submitit jobs' folder.
STUDY_FILE, STUDY_TMP_DIR, STUDY_JOBS_DIR = ".study.json", ".study-tmp", ".submitit"
SCORE_CACHE_FILE = "{name}-{digest}.jsonl"  # in stage 2's score cache: one scorer's scores
# Inside one RL checkpoint folder (rl_training/checkpoints/update-<n>/).
RL_CHECKPOINT, RL_CHECKPOINT_COMPLETE = "update-{update}", "complete"


def stage_of_module(module: str) -> Stage:
    """The registry's stage whose module is ``module`` (a stage module passes its ``__name__``; run as
    ``python -m refine_af_utils.stages.<stem>`` that is ``__main__``, whose spec still names the module)."""
    if module == "__main__":
        import sys

        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else module
    for stage in STAGES:
        if stage.module == module:
            return stage
    raise KeyError(f"{module}: no stage in layout.STAGES runs this module")


def stage_sections(stage: Stage) -> list[str]:
    """The params sections a stage depends on: its own and every earlier stage's (the chain)."""
    return [section for s in STAGES[: STAGES.index(stage) + 1] for section in s.sections]


# Bumped when a code change makes a stage write other outputs for the same params (a new random-stream
# rule, a prompt): a marker written under an older version no longer counts as complete, so a run never
# mixes stages made by two versions. 2: the one seed rule (derive_seed for every stream).
OUTPUTS_VERSION = 2


def stage_fingerprint(stage: Stage, params: "Params") -> str:
    """A hash of the params a stage depends on: its own sections and every earlier stage's.

    The pipeline is a chain, so a change to one stage's keys reruns it and the stages after
    it, never the ones before (an evaluation-only change reruns stage 6 and the report). Dtypes are
    hashed as this machine resolves them (``auto`` is float32 here, bfloat16 there): a run continued
    on a machine that resolves them differently reruns its stages instead of mixing dtypes.
    """
    import hashlib
    import json

    from refine_af_utils.environment import resolve_dtypes
    from refine_af_utils.inputs import input_contents

    fingerprint = resolve_dtypes(params).fingerprint(*stage_sections(stage))
    contents = input_contents(params, stage_sections(stage))  # local inputs by content, not by path
    if not contents:
        return fingerprint
    return hashlib.sha256(json.dumps([fingerprint, contents], sort_keys=True).encode()).hexdigest()[:16]


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{dotted.key: value}``."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def stage_params(stage: Stage, params: "Params") -> dict[str, Any]:
    """``{section: settings}`` of the sections a stage depends on, dtypes resolved on this machine (what its
    marker records and :func:`stage_fingerprint` hashes)."""
    from refine_af_utils.environment import resolve_dtypes
    from refine_af_utils.inputs import input_contents

    settings = resolve_dtypes(params).to_dict()
    result = {section: settings[section] for section in stage_sections(stage)}
    contents = input_contents(params, stage_sections(stage))
    if contents:  # what local inputs hold (sha256): an edit reruns the stage, named "inputs.<key>"
        result["inputs"] = contents
    return result


def stage_config(stage: Stage, params: "Params") -> dict[str, Any]:
    """The settings a stage's folder is made with, for ``config.json``: every key of its sections and the
    earlier stages' (as :func:`stage_fingerprint`, dtypes resolved), less the keys it may continue under
    (``resumable``)."""
    flat = flatten(stage_params(stage, params))
    return {key: value for key, value in flat.items()
            if not any(key == r or key.startswith(f"{r}.") for r in stage.resumable)}


def _missing(path: Path, stage_id: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{path}: {what} is missing; run stage {stage_id} first (--only {stage_id})")


@dataclass(frozen=True)
class RunLayout:
    """Every artefact path of one run folder, and readers for what one stage hands the next."""

    run_dir: Path

    def __init__(self, run_dir: str | Path) -> None:
        object.__setattr__(self, "run_dir", Path(run_dir))

    # --- folders ------------------------------------------------------------------------------------
    def stage_folder(self, stage_id: str, create: bool = False) -> Path:
        """The folder a stage writes (``seeds``, ``instructions``, ...); created when ``create``."""
        name = STAGE[stage_id].output_dir
        if name is None:
            raise ValueError(f"stage {stage_id} writes at the top of the run folder, not into a folder of its own")
        path = self.run_dir / name
        if path.is_symlink():  # writing through it would put results outside the results root
            from refine_af_utils.errors import StageConfigError

            raise StageConfigError(f"{path} is a symbolic link (to {path.resolve()}); a stage writes only inside "
                                   "its run folder: replace the link by a folder")
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def seeds(self) -> Path:
        return self.stage_folder("00")

    @property
    def instructions_dir(self) -> Path:
        return self.stage_folder("01")

    @property
    def reward_analysis(self) -> Path:
        return self.stage_folder("02")

    @property
    def rl(self) -> Path:
        return self.stage_folder("03")

    @property
    def data(self) -> Path:
        return self.stage_folder("04")

    @property
    def sft(self) -> Path:
        return self.stage_folder("05")

    @property
    def eval(self) -> Path:
        return self.stage_folder("06")

    def file(self, stage_id: str, name: str, /, **fields: Any) -> Path:
        """A stage's file by its name in :data:`STAGE_FILES` (``file("04", "raw", arm="refine_af")``)."""
        try:
            pattern = STAGE_FILES[stage_id][name]
        except KeyError:
            raise KeyError(f"stage {stage_id} has no file named {name!r} in layout.STAGE_FILES") from None
        return self.stage_folder(stage_id) / pattern.format(**fields)

    # --- the runner's files -------------------------------------------------------------------------
    @property
    def markers(self) -> Path:
        """The folder of the stages' completion markers (``stages/``)."""
        return self.run_dir / "stages"

    def marker(self, stage_id: str) -> Path:
        """The runner's completion marker of a stage."""
        return self.markers / f"{stage_id}.json"

    @property
    def lock(self) -> Path:
        """The runner's lock file (``.lock``, hidden: never a stage's output)."""
        return self.run_dir / LOCK_FILE

    def metrics(self, stage_id: str) -> Path:
        """A stage's headline numbers (``metrics/<id>.json``)."""
        return self.run_dir / "metrics" / f"{stage_id}.json"

    @property
    def notebooks(self) -> Path:
        return self.run_dir / "notebooks"

    # --- artefacts one stage hands another ----------------------------------------------------------
    @property
    def seed_tasks_file(self) -> Path:
        return self.file("00", "seed_tasks")

    @property
    def instructions_file(self) -> Path:
        return self.file("01", "instructions")

    @property
    def instruction_config(self) -> Path:
        return self.instructions_dir / CONFIG_FILE

    @property
    def scores_file(self) -> Path:
        """Stage 2's per-instance component scores (``scores.csv``)."""
        return self.file("02", "scores")

    @property
    def score_cache(self) -> Path:
        """The scorers' cache: filled by stage 2, read and extended by stages 3 and 4."""
        return self.file("02", "score_cache")

    @property
    def rl_prompts_file(self) -> Path:
        """Stage 3's split of the instructions (train, held-out, unused)."""
        return self.file("03", "prompts")

    @property
    def rl_metrics_file(self) -> Path:
        return self.file("03", "metrics")

    @property
    def rl_checkpoints(self) -> Path:
        return self.file("03", "checkpoints")

    @property
    def adapter(self) -> Path:
        """Stage 3's trained LoRA adapter (the REFINE-AF instance generator)."""
        return self.file("03", "adapter")

    @property
    def heldout_samples_file(self) -> Path:
        return self.file("03", "heldout_samples")

    @property
    def heldout_eval_file(self) -> Path:
        return self.file("03", "heldout_eval")

    @property
    def heldout_summary_file(self) -> Path:
        return self.file("03", "heldout_summary")

    def arm_raw(self, arm: str) -> Path:
        """Stage 4's raw completions of one arm (append-only, resumable)."""
        return self.file("04", "raw", arm=arm)

    def arm_data(self, arm: str) -> Path:
        """Stage 4's dataset of one arm: the instances stage 5 trains on."""
        return self.file("04", "dataset", arm=arm)

    def exported_dataset(self, arm: str) -> Path:
        """One arm's dataset as a Hugging Face dataset folder (``README.md`` card, ``data/train.jsonl``)."""
        return self.run_dir / EXPORT_DIR / arm

    def sft_arm(self, arm: str) -> Path:
        """Stage 5's folder for one arm (checkpoints, ``model/``, ``complete``)."""
        return self.file("05", "arm", arm=arm)

    def sft_model(self, arm: str) -> Path:
        """Where stage 5 saves an arm's fine-tuned adapter (or full model)."""
        return self.file("05", "model", arm=arm)

    def sft_complete(self, arm: str) -> Path:
        """Written when an arm's stage 5 model is whole."""
        return self.file("05", "complete", arm=arm)

    def predictions(self, model: str) -> Path:
        """Stage 6's scored predictions of one model (append-only, resumable)."""
        return self.file("06", "predictions", model=model)

    @property
    def report(self) -> Path:
        return self.run_dir / "report.md"

    def table(self, name: str) -> Path:
        """A report table, ``table_<name>.csv``."""
        return self.run_dir / f"table_{name}.csv"

    def figure(self, name: str) -> Path:
        """A report figure, ``fig_<name>.png``."""
        return self.run_dir / f"fig_{name}.png"

    # --- readers ------------------------------------------------------------------------------------
    def seed_tasks(self) -> list["SeedTask"]:
        """The seed tasks stage 0 wrote for this run."""
        from refine_af_utils.seeds import load_seed_tasks

        if not self.seed_tasks_file.is_file():
            raise _missing(self.seed_tasks_file, "00", "the seed tasks")
        return load_seed_tasks(self.seed_tasks_file)

    def instructions(self) -> list[dict[str, Any]]:
        """The instruction records stage 1 wrote (a clear error when there are none)."""
        from refine_af_utils.files import read_jsonl

        records = read_jsonl(self.instructions_file)
        if not records:
            raise _missing(self.instructions_file, "01", "the instructions")
        return records

    def rl_split(self) -> dict[str, str]:
        """Stage 3's split: instruction text -> ``train``, ``heldout`` or ``unused``."""
        from refine_af_utils.files import read_jsonl

        if not self.rl_prompts_file.is_file():
            raise _missing(self.rl_prompts_file, "03", "stage 3's prompt split")
        return {r["instruction"]: r["split"] for r in read_jsonl(self.rl_prompts_file)}

    def arm_instances(self, arm: str) -> list[dict[str, Any]]:
        """Stage 4's dataset of one arm, each record checked to have string instruction, input, output."""
        from refine_af_utils.files import read_jsonl

        path = self.arm_data(arm)
        if not path.is_file():
            raise _missing(path, "04", f"the dataset of arm '{arm}'")
        records = read_jsonl(path)
        for line, record in enumerate(records, start=1):
            for key in ("instruction", "input", "output"):
                if not isinstance(record.get(key), str):
                    raise ValueError(f"{path}:{line}: key '{key}' must be a string, got {record.get(key)!r}")
        return records
