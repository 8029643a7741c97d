"""The package's structure: stage modules are siblings over shared lower layers."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from refine_af_utils.layout import STAGES, RunLayout

PACKAGE = Path(__file__).resolve().parents[1] / "refine_af_utils"
STAGE_MODULES = {f"stages.{stage.stem}" for stage in STAGES}


def _module_of(dotted: str) -> str:
    """A module's name in the import graph: ``stages.<stem>`` for a stage, else the top-level name (a
    subpackage such as ``study`` counts as one module)."""
    parts = dotted.split(".")[1:]
    return ".".join(parts[:2]) if parts[0] == "stages" and len(parts) > 1 else parts[0]


def _module_of_path(path: Path) -> str:
    parts = [p for p in path.relative_to(PACKAGE).with_suffix("").parts if p != "__init__"]
    return _module_of(".".join(("refine_af_utils", *parts))) if parts else ""


def _imported_modules(path: Path) -> set[str]:
    """Every refine_af_utils module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module in ("refine_af_utils", "refine_af_utils.stages"):
            found.update(_module_of(f"{node.module}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("refine_af_utils."):
            found.add(_module_of(node.module))
        elif isinstance(node, ast.Import):
            found.update(_module_of(a.name) for a in node.names if a.name.startswith("refine_af_utils."))
    return found


def test_every_stage_has_one_stem_module_notebook_folder_and_test():
    """Stage <id> <stem>: refine_af_utils/stages/<stem>.py, notebooks/<id>_<stem>.ipynb, <run_dir>/<stem>/
    (the report writes at the top) and tests/test_<stem>.py."""
    for stage in STAGES:
        assert (PACKAGE / "stages" / f"{stage.stem}.py").is_file(), stage
        assert (PACKAGE.parent / "notebooks" / f"{stage.id}_{stage.stem}.ipynb").is_file(), stage
        assert (PACKAGE.parent / "tests" / f"test_{stage.stem}.py").is_file(), stage
        assert stage.output_dir in (stage.stem, None), stage
    assert {p.stem for p in (PACKAGE / "stages").glob("*.py")} - {"__init__"} == {s.stem for s in STAGES}


def test_every_stage_exposes_run_returning_a_stage_result_and_its_notebook_calls_it():
    import importlib
    import json
    import typing

    from refine_af_utils.run_folder import StageResult

    for stage in STAGES:
        module = importlib.import_module(stage.module)
        assert getattr(module.run, "stage_entry", None) == stage, stage  # @stage_entry: the lock, failures marked
        returned = typing.get_type_hints(module.run)["return"]
        assert issubclass(returned, StageResult), stage
        assert list(typing.get_type_hints(module.run)) == ["params", "run_dir", "return"], stage
        cells = json.loads((PACKAGE.parent / "notebooks" / stage.notebook).read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        assert f"from refine_af_utils.stages import {stage.stem}" in code and f"{stage.stem}.run(params, run_dir)" in code


def test_no_stage_module_spells_its_own_id():
    """A stage finds itself in the registry (run_folder.open_stage / layout.stage_of_module by its module)."""
    for stage in STAGES:
        tree = ast.parse((PACKAGE / "stages" / f"{stage.stem}.py").read_text())
        spelled = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value == stage.id]
        assert spelled == [], (stage.stem, spelled)


def test_no_stage_module_imports_another_stage_module():
    offenders = {}
    for module in STAGE_MODULES:
        others = (_imported_modules(PACKAGE / "stages" / f"{module.split('.')[1]}.py") & STAGE_MODULES) - {module}
        if others:
            offenders[module] = sorted(others)
    assert offenders == {}


def test_lower_layers_import_no_stage_module():
    """Shared modules (layout, reward, figures, comparison, ...) never reach up into a stage."""
    tools = {"run", "study", "compare", "notebook", "downloads"}  # the runners, the reproduction check, helpers above the stages
    for path in PACKAGE.rglob("*.py"):
        module = _module_of_path(path)
        if module in STAGE_MODULES or module in tools or module == "stages":
            continue
        assert not _imported_modules(path) & STAGE_MODULES, path.name


def test_the_layout_owns_the_paths_stage_folders_come_from_the_registry(tmp_path):
    layout = RunLayout(tmp_path)
    folders = [layout.stage_folder(s.id).name for s in STAGES if s.output_dir]
    assert folders == [s.stem for s in STAGES if s.output_dir]  # each stage's folder is its stem
    assert folders[:7] == ["seed_tasks", "instruction_generation", "reward_analysis", "rl_training",
                           "instance_generation", "sft", "superni_evaluation"]  # (docs/adding-a-stage.md adds more)
    assert layout.arm_data("refine_af") == tmp_path / "instance_generation" / "refine_af.jsonl"
    assert layout.sft_model("self_instruct") == tmp_path / "sft" / "self_instruct" / "model"
    assert layout.score_cache == tmp_path / "reward_analysis" / "cache"
    assert layout.marker("03") == tmp_path / "stages" / "03.json"
    # a file pattern's own field may be called "name" (stage 6's figures)
    assert layout.file("06", "figure", name="per_category") == tmp_path / "superni_evaluation" / "per_category.png"


def test_stage_config_is_the_registry_chain_less_what_a_stage_may_continue_under():
    from refine_af_utils.layout import STAGE, stage_config, stage_fingerprint
    from refine_af_utils.params import load_params

    params = load_params(PACKAGE.parent / "params" / "smoke.yaml")
    rl = stage_config(STAGE["03"], params)
    assert "rl.kl_coef" in rl and "reward.coherence.weight" in rl and "seed_tasks" in rl
    assert "rl.updates" not in rl and "rl.checkpoint_every" not in rl  # training may be extended in place
    assert "num_instructions" not in stage_config(STAGE["01"], params)
    assert stage_config(STAGE["02"], params)["num_instructions"] == params.num_instructions
    more = load_params(PACKAGE.parent / "params" / "smoke.yaml", overrides={"rl.updates": params.rl.updates + 4})
    assert stage_config(STAGE["03"], more) == rl and stage_fingerprint(STAGE["03"], more) != \
        stage_fingerprint(STAGE["03"], params)  # rerun in place, continuing
    evaluation_only = load_params(PACKAGE.parent / "params" / "smoke.yaml", overrides={"evaluation.max_new_tokens": 7})
    assert all(stage_config(STAGE[s], evaluation_only) == stage_config(STAGE[s], params) for s in ("01", "02", "03"))
    assert stage_config(STAGE["06"], evaluation_only) != stage_config(STAGE["06"], params)


SEEDED_CALLS = {"Random", "RandomState", "manual_seed", "manual_seed_all", "set_seed", "default_rng", "seed", "shuffle"}


def _seed_argument(node: ast.Call) -> ast.expr | None:
    """The seed a seeding call gets: its ``seed=`` keyword or its first argument (``shuffle``: the keyword only)."""
    for keyword in node.keywords:
        if keyword.arg == "seed":
            return keyword.value
    name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
    return node.args[0] if node.args and name != "shuffle" else None


def _seed_rule_offences(source: str) -> list[str]:
    """Seeding calls that take no seed, or one computed in place (arithmetic, an f-string, the run's seed as is)."""
    tree = ast.parse(source)
    raw = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)  # `seed = params.random_seed`
           for target in node.targets if isinstance(target, ast.Name)
           and isinstance(node.value, ast.Attribute) and node.value.attr == "random_seed"}
    offences = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name not in SEEDED_CALLS:
            continue
        arg = _seed_argument(node)
        if arg is None:
            if name != "shuffle" and not node.args:  # an unseeded generator (rng.shuffle(items) is a draw, not a seed)
                offences.append(f"line {node.lineno}: {ast.unparse(node)}")
            continue
        # derive_seed(...), or stage.derive_seed(...) (run_folder.StageRun: derive_seed with the stage's id)
        derived = isinstance(arg, ast.Call) and "derive_seed" in (getattr(arg.func, "id", ""),
                                                                  getattr(arg.func, "attr", ""))
        passed_in = isinstance(arg, ast.Name) and arg.id not in {"random_seed", *raw}  # a seed derived by the caller
        if not (derived or passed_in):
            offences.append(f"line {node.lineno}: {ast.unparse(node)}")
    return offences


def test_every_random_stream_comes_from_the_one_seed_rule():
    """Every Random / manual_seed / set_seed / default_rng / shuffle(seed=) takes derive_seed(...) or a seed the caller derived."""
    offenders = {str(path.relative_to(PACKAGE)): found for path in sorted(PACKAGE.rglob("*.py"))
                 if (found := _seed_rule_offences(path.read_text()))}
    assert offenders == {}


def test_the_seed_rule_check_can_fail():
    bad = ("import random, torch\n"
           "def f(params, batch, dataset):\n"
           "    random.Random(params.random_seed * 1_000_003 + batch)\n"
           "    torch.manual_seed(random_seed)\n"
           "    random.Random(f'{random_seed}:{batch}')\n"
           "    random.Random()\n"
           "    np.random.default_rng()\n"
           "    set_seed(seed=params.random_seed)\n"
           "    dataset.shuffle(seed=42)\n"
           "    seed = params.random_seed\n"
           "    torch.cuda.manual_seed_all(seed)\n"
           "    np.random.RandomState(random_seed + 1)\n")
    assert len(_seed_rule_offences(bad)) == 9
    good = ("random.Random(derive_seed(random_seed, '01', 'batch', 3))\ntorch.manual_seed(seed)\n"
            "rng.shuffle(items)\ndataset.shuffle(seed=derive_seed(random_seed, '05', 'order'))\n")
    assert _seed_rule_offences(good) == []


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere (a subpackage counts as one module)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_of_path(path)
        if name == "":
            continue
        graph.setdefault(name, set()).update(_imported_modules(path) - {name})
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each as the path that closes it (depth-first search)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for other in sorted(graph.get(node, ())):
            if state.get(other) == "open":
                found.append(path[path.index(other):] + [other])
            elif other not in state:
                visit(other, [*path, other])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_circle():
    """Counting imports inside functions and under TYPE_CHECKING too: a circle is a layering mistake."""
    assert _cycles(_import_graph()) == []


def test_the_circle_check_can_fail():
    assert _cycles({"prompts": {"superni"}, "superni": {"rouge", "prompts"}, "rouge": set()}) == [
        ["prompts", "superni", "prompts"]]


FILE_NAME = re.compile(r"\.(csv|jsonl|json)$")
# File names that are not this package's results: formats of other projects and the bundled data.
NOT_RESULT_FILES = {
    "downloads.py": {"data/seed_tasks.jsonl", "human_eval/user_oriented_instructions.jsonl",  # in the repositories
                     "manifest.json", ".json"},  # the download cache's record; Super-NI's tasks/<name>.json
    "superni.py": {".json"},  # a Super-NI checkout's tasks/<name>.json
    "seeds.py": {"seed_tasks.jsonl", "seeds.jsonl"},  # the bundled seed file; a downloaded one's fallback name
    "models.py": {"adapter_config.json"},  # peft's adapter folder
    "scorers.py": {"config.json"},  # a transformers model folder's config
}


def _file_name_literals(source: str) -> list[tuple[int, str]]:
    """String constants (f-string parts included) that end like a result file's name."""
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and FILE_NAME.search(node.value)
            and "://" not in node.value]  # a URL names a remote file


def test_layout_names_every_result_file():
    """A .csv / .jsonl / .json name spelled outside layout.py is a second place that names a file."""
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "layout.py":
            continue
        allowed = NOT_RESULT_FILES.get(path.name, set())
        found = [f"line {line}: {value!r}" for line, value in _file_name_literals(path.read_text())
                 if value not in allowed]
        if found:
            offenders[str(path.relative_to(PACKAGE))] = found
    assert offenders == {}


def test_the_file_name_check_can_fail():
    source = 'out = run_dir / "superni_evaluation" / "per_task.csv"\npath = folder / f"{name}-{digest}.jsonl"\nx = "a.json"\n'
    assert sorted(_file_name_literals(source)) == [(1, "per_task.csv"), (2, ".jsonl"), (3, "a.json")]
