"""The pins in requirements.txt, environment.yml and the lock file agree."""

import re

import yaml

from conftest import REPO_ROOT


def _pins(lines):
    return dict(line.strip().split("==", 1) for line in lines if re.match(r"^\s*[A-Za-z0-9_.\-]+==", line))


def test_pins_agree_everywhere():
    top = _pins((REPO_ROOT / "requirements.txt").read_text().splitlines())
    lock = _pins((REPO_ROOT / "requirements-lock.txt").read_text().splitlines())
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    conda_pip = _pins(next(d for d in env["dependencies"] if isinstance(d, dict))["pip"])
    assert top == conda_pip
    normalise = lambda name: name.lower().replace("_", "-")  # noqa: E731
    lock = {normalise(k): v for k, v in lock.items()}
    for name, version in top.items():
        assert lock[normalise(name)] == version, name
    assert top["trl"] == "1.9.2"  # the last trl that ships PPO (stage 3)
    assert all("+" not in v for v in lock.values())  # no local builds that other machines cannot get
