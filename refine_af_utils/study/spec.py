"""A study's spec: the YAML file naming a base params file, seeds and a grid of settings, validated."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refine_af_utils.errors import RefineAFError
from refine_af_utils.layout import STAGES, Stage
from refine_af_utils.params import Params, ParamsError, load_params
from refine_af_utils.params_loading import read_params_yaml  # strict: a key given twice or a tag is one line

SPEC_KEYS = {"name", "description", "params", "seeds", "until", "grid", "slurm", "reuse_from"}
SETTING_KEYS = {"name", "set", "params"}
STUDY_SET_KEYS = {"run_name", "random_seed"}  # set by the study for every run


class StudySpecError(RefineAFError, ValueError):
    """A study spec that cannot be run: one line naming the file and the key."""


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
        return load_params(self.setting.params, overrides=self.overrides,
                           overrides_source=f"study setting '{self.setting.name}'")


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
    try:  # not UTF-8, not YAML, a key given twice, a tag, not a mapping: one line naming the file and line
        data = read_params_yaml(path)
    except ParamsError as error:
        raise StudySpecError(str(error)) from error
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


def study_dir_of(spec: StudySpec, results_root: str | Path) -> Path:
    """``<results_root>/<study name>``."""
    from refine_af_utils.run_folder import run_folder

    return run_folder(results_root, spec.name)
