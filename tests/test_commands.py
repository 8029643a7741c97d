"""Every command the README, the docs and the params files tell a user to run exists.

``python -m X`` and ``accelerate launch ... -m X``: X is a module of this environment that runs as a script;
``--config_file F``: F is a file of the repository; ``make T``: T is a Makefile target. The Hub's old
``huggingface-cli login`` (gone from the pinned huggingface_hub) is not suggested anywhere.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from conftest import REPO_ROOT

SOURCES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
           *sorted((REPO_ROOT / "params").rglob("*.yaml")), REPO_ROOT / "Makefile", REPO_ROOT / ".ci" / "run"]


def _found(pattern: str) -> list[tuple[str, str]]:
    return sorted({(source.relative_to(REPO_ROOT).as_posix(), match) for source in SOURCES
                   for match in re.findall(pattern, source.read_text())})


def _runs_as_script(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return False
    if spec.submodule_search_locations:  # a package: python -m needs its __main__
        return importlib.util.find_spec(f"{module}.__main__") is not None
    return 'if __name__ == "__main__"' in Path(spec.origin).read_text()


def test_every_python_m_module_exists_and_runs_as_a_script():
    modules = _found(r"-m ((?:refine_af_utils|pytest|jupyterlab|ipykernel)[\w.]*)")
    assert any(module == "refine_af_utils.stages.rl_training" for _, module in modules)  # the scan sees them
    assert [(source, module) for source, module in modules
            if module != "pytest" and not _runs_as_script(module)] == []


def test_every_accelerate_config_file_exists():
    configs = _found(r"--config_file[ =](\S+\.yaml)")
    assert configs, "no accelerate config is named: the scan is broken"
    assert [(source, path) for source, path in configs if not (REPO_ROOT / path).is_file()] == []


def test_every_make_target_named_exists():
    targets = set(re.findall(r"(?m)^([\w-]+):", (REPO_ROOT / "Makefile").read_text()))
    named = _found(r"`make ([\w-]+)")
    assert {"reproduce", "test"} <= {target for _, target in named}
    assert [(source, target) for source, target in named if target not in targets] == []


@pytest.mark.parametrize("old", ["huggingface-cli login"])
def test_no_command_that_the_pinned_libraries_removed(old):
    assert [source for source, _ in _found(re.escape(old))] == []
